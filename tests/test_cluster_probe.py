"""STEGO's cluster probe as a dataset clusterer: loss value, blob recovery, logits, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_rand_score

from ussbench import registry
from ussbench.dataset_clusterers.cluster_probe import ClusterProbe, probe_loss
from ussbench.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on 2 shared cores: one torch thread


def blobs(k: int = 4, d: int = 8, n: int = 100, noise: float = 0.15, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(d)[:k]
    X = torch.cat([centres[c] + noise * torch.randn(n, d, generator=g) for c in range(k)])
    return X, np.repeat(np.arange(k), n)


def test_loss_matches_hand_computation():
    X = F.normalize(torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, -1.0]]), dim=1)
    C = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # unit directions e1, e2 after normalisation
    # cosines: row0 (1, 0) -> max 1; row1 (0.6, 0.8) -> max 0.8; row2 (0, -1) -> max 0 (first of ties)
    assert probe_loss(X, C).item() == pytest.approx(-(1.0 + 0.8 + 0.0) / 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_blobs_from_kmeanspp_seeds(seed):
    X, y = blobs()
    probe = ClusterProbe(n_clusters=4, steps=200, batch_size=64, init="kmeans++", seed=seed).fit(X)
    labels = probe.predict(X).numpy()
    assert adjusted_rand_score(y, labels) == pytest.approx(1.0)
    assert probe.n_empty_ == 0
    for c in range(4):  # each centroid points at the mean direction of the vectors it won
        mean_dir = F.normalize(X[torch.as_tensor(labels == c)].mean(0), dim=0)
        assert F.cosine_similarity(probe.cluster_centers_[c], mean_dir, dim=0) > 0.95


def test_reference_init_trains_and_lowers_the_loss():
    X, y = blobs(k=3, d=16, n=80)
    probe = ClusterProbe(n_clusters=3, steps=300, batch_size=48, seed=3).fit(X)
    h = probe.loss_history_
    assert h.shape == (300,) and h[-20:].mean() < h[:20].mean() - 0.3
    labels = probe.predict(X).numpy()
    assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < 3
    assert probe.artifacts()["n_empty_clusters"] == probe.n_empty_ == 3 - len(np.unique(labels))


def test_logits_are_alpha_scaled_log_softmax_of_cosines():
    X, _ = blobs(n=20)
    probe = ClusterProbe(n_clusters=4, steps=50, batch_size=32, init="kmeans++", alpha=2.0).fit(X)
    logits = probe.logits(X)
    cos = F.normalize(X, dim=1) @ F.normalize(probe.cluster_centers_, dim=1).T
    assert torch.allclose(logits, torch.log_softmax(2.0 * cos, dim=1), atol=1e-6)
    assert torch.equal(logits.argmax(1), probe.predict(X))
    code_map = X[:12].reshape(3, 4, 8)  # a (H, W, D) code map gives (H, W, K)
    assert probe.logits(code_map).shape == (3, 4, 4)
    assert torch.allclose(probe.logits(code_map).exp().sum(-1), torch.ones(3, 4), atol=1e-5)


def test_seeded_and_detached():
    X, _ = blobs(n=30)
    X.requires_grad_(True)
    a = ClusterProbe(n_clusters=4, steps=30, batch_size=16, seed=5).fit(X)
    b = ClusterProbe(n_clusters=4, steps=30, batch_size=16, seed=5).fit(X)
    c = ClusterProbe(n_clusters=4, steps=30, batch_size=16, seed=6).fit(X)
    assert torch.equal(a.cluster_centers_, b.cluster_centers_)
    assert not torch.equal(a.cluster_centers_, c.cluster_centers_)
    assert X.grad is None  # trained on detached vectors


def test_errors_name_the_parameter():
    with pytest.raises(ConfigError, match="n_clusters"):
        ClusterProbe(n_clusters=0)
    with pytest.raises(ConfigError, match="lr"):
        ClusterProbe(lr=0.0)
    with pytest.raises(ConfigError, match="init"):
        ClusterProbe(init="zeros")
    with pytest.raises(RuntimeError, match="fit"):
        ClusterProbe().predict(torch.ones(3, 2))
    X, _ = blobs(n=10)
    probe = ClusterProbe(n_clusters=2, steps=5, batch_size=8).fit(X)
    with pytest.raises(ValueError, match="dimensions"):
        probe.logits(torch.ones(2, 3))
    with pytest.raises(ValueError, match="n_clusters=50"):
        ClusterProbe(n_clusters=50).fit(X)


def test_registered_with_presets():
    spec = registry._registry["dataset_clusterer"]["cluster_probe"]  # registered on import
    assert spec.cls is ClusterProbe
    assert spec.defaults()["lr"] == 5e-3 and spec.defaults()["alpha"] == 2.0
    assert ClusterProbe(**spec.presets["kmeanspp_init"]).init == "kmeans++"
