"""Dataset-level k-means: engines agree from one init, blobs recovered, preprocessing, errors, card."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from _helpers import assert_rejects_degenerate_inputs, blobs, checked_card
from sklearn.datasets import make_blobs
from sklearn.decomposition import PCA as SkPCA
from sklearn.metrics import adjusted_rand_score

from ussbench.dataset_clusterers.kmeans import KMeansClusterer
from ussbench.errors import ConfigError

ENGINES = ["faiss", "torch", "sklearn", "sklearn_elkan", "auto"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _overlapping(seed=0):
    """Data where Lloyd needs several iterations: 30 overlapping blobs clustered into 8."""
    X, _ = make_blobs(1500, n_features=12, centers=30, cluster_std=2.5, random_state=seed)
    return torch.tensor(X, dtype=torch.float32)


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_engines_agree_from_the_same_init(metric):
    X = _overlapping()
    fits = {
        e: KMeansClusterer(8, engine=e, metric=metric, n_init=2, max_iter=100, tol=0.0, seed=3).fit(X)
        for e in ENGINES
    }
    ref = fits["torch"].inertia_
    for engine, km in fits.items():
        assert abs(km.inertia_ - ref) / ref < 0.01, (engine, km.inertia_, ref)
    # faiss and torch run the same (spherical) Lloyd steps: same partition.
    assert adjusted_rand_score(fits["faiss"].labels_, fits["torch"].labels_) > 0.99


def test_elkan_reaches_lloyds_fixed_point():
    """Elkan is exact Lloyd: from one init it ends where the torch Lloyd ends (same partition, same inertia)."""
    X = _overlapping(seed=5)
    lloyd = KMeansClusterer(8, engine="torch", n_init=3, max_iter=300, tol=0.0, seed=2).fit(X)
    elkan = KMeansClusterer(8, engine="sklearn_elkan", n_init=3, max_iter=300, tol=0.0, seed=2).fit(X)
    assert adjusted_rand_score(lloyd.labels_, elkan.labels_) > 0.999
    assert abs(elkan.inertia_ - lloyd.inertia_) / lloyd.inertia_ < 1e-4


def test_auto_engine_resolves_by_device_and_metric():
    X = _overlapping(seed=6)
    assert KMeansClusterer(8, n_init=1).fit(X).artifacts()["engine"] == "sklearn_elkan"
    assert KMeansClusterer(8, metric="cosine", n_init=1).fit(X).artifacts()["engine"] == "torch"
    assert KMeansClusterer(8, engine="faiss", n_init=1).fit(X).artifacts()["engine"] == "faiss"


_THREAD_PROBE = """
import hashlib, sys, torch
from sklearn.datasets import make_blobs
from ussbench.dataset_clusterers.kmeans import KMeansClusterer
X, _ = make_blobs(20000, n_features=32, centers=40, cluster_std=3.0, random_state=0)
km = KMeansClusterer(12, engine=sys.argv[1], n_init=4, seed=1).fit(torch.tensor(X, dtype=torch.float32))
print(hashlib.sha256(km.cluster_centers_.tobytes() + km.labels_.numpy().tobytes()).hexdigest())
"""


@pytest.mark.parametrize("engine", ["sklearn_elkan", "sklearn"])
def test_sklearn_restarts_do_not_depend_on_the_thread_count(engine):
    """Restarts on one OpenMP thread each, spread over the run's threads: bit-identical on 1 and 2 threads.

    Separate processes, because OpenMP reads its thread count once per process (OMP_NUM_THREADS);
    scikit-learn's own threading gives centroids about 1e-5 apart on this data.
    """
    digests = set()
    for threads in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": threads, "USSBENCH_THREADS": threads}
        out = subprocess.run([sys.executable, "-c", _THREAD_PROBE, engine], env=env, capture_output=True,
                             text=True, check=True)  # fmt: skip
        digests.add(out.stdout.strip())
    assert len(digests) == 1


def test_minibatch_engine_close_to_lloyd():
    X = _overlapping(seed=1)
    full = KMeansClusterer(8, engine="torch", n_init=1, seed=0).fit(X)
    mini = KMeansClusterer(8, engine="sklearn_minibatch", n_init=1, batch_size=256, seed=0).fit(X)
    assert mini.inertia_ < full.inertia_ * 1.05


def test_explicit_init_is_used_by_every_engine():
    X = _overlapping(seed=2)
    probe = KMeansClusterer(8, engine="torch")
    probe.fit(X)
    init = probe.initial_centroids(probe.transform(X), restart=7)
    inertias = [KMeansClusterer(8, engine=e).fit(X, init_centroids=init).inertia_ for e in ENGINES]
    assert max(inertias) / min(inertias) < 1.01
    with pytest.raises(ValueError, match="init_centroids"):
        KMeansClusterer(8, engine="torch").fit(X, init_centroids=init[:3])


@pytest.mark.parametrize("engine", ENGINES + ["sklearn_minibatch"])
@pytest.mark.parametrize(
    "options",
    [{"metric": "l2"}, {"metric": "cosine"}, {"standardise": True, "normalise_input": False}, {"pca_dim": 4}],
)
def test_blobs_recovered_exactly(engine, options):
    X, y = blobs([60, 60, 60, 60, 60], seed=4)
    km = KMeansClusterer(5, engine=engine, n_init=2, batch_size=64, seed=0, **options)
    labels = km.fit(X).predict(X)
    assert labels.dtype == torch.int64 and labels.shape == (300,)
    assert adjusted_rand_score(y, labels.numpy()) == 1.0
    assert torch.equal(labels, km.labels_)


def test_seeded_and_deterministic():
    X = _overlapping(seed=5)
    a = KMeansClusterer(8, engine="torch", seed=11).fit(X)
    b = KMeansClusterer(8, engine="torch", seed=11).fit(X)
    c = KMeansClusterer(8, engine="torch", seed=12, n_init=1).fit(X)
    assert torch.equal(a.labels_, b.labels_) and a.inertia_ == b.inertia_
    assert not np.allclose(a.initial_centroids(a.transform(X), 0), c.initial_centroids(c.transform(X), 0))


def test_pca_matches_sklearn_and_standardise_scales():
    X = _overlapping(seed=6) * torch.linspace(0.5, 3, 12)
    km = KMeansClusterer(4, engine="torch", pca_dim=3, normalise_input=False).fit(X)
    Z = km.transform(X).numpy()
    ref = SkPCA(3).fit_transform(X.numpy())
    for j in range(3):  # same components up to sign
        corr = np.corrcoef(Z[:, j], ref[:, j])[0, 1]
        assert abs(corr) > 0.9999
    std = KMeansClusterer(4, engine="torch", standardise=True, normalise_input=False).fit(X).transform(X)
    np.testing.assert_allclose(std.mean(0).numpy(), 0, atol=1e-4)
    np.testing.assert_allclose(std.std(0, unbiased=False).numpy(), 1, atol=1e-4)


def test_empty_cluster_is_reseeded():
    X, _ = blobs([50, 50], seed=7)
    init = torch.stack([X[0], X[0] + 100.0, X[60]])  # the second centre attracts no point
    km = KMeansClusterer(3, engine="torch", normalise_input=False).fit(X, init_centroids=init)
    assert torch.bincount(km.labels_, minlength=3).min() > 0


def test_empty_cluster_is_reseeded_with_the_farthest_point():
    """An empty cluster takes the point farthest from its centroid (scikit-learn's rule), here an outlier; the
    nearest point (a seed itself, at distance 0) would leave the outlier inside a blob's cluster."""
    X, _ = blobs([50, 50], seed=7)
    outlier = X[:50].mean(0) + 40.0
    X = torch.cat([X, outlier[None]])
    init = torch.stack([X[0], X[0] + 100.0, X[60]])  # the second centre attracts no point
    km = KMeansClusterer(3, engine="torch", normalise_input=False, max_iter=1).fit(X, init_centroids=init)
    torch.testing.assert_close(torch.from_numpy(km.cluster_centers_[1]), outlier)
    converged = KMeansClusterer(3, engine="torch", normalise_input=False).fit(X, init_centroids=init)
    assert converged.labels_[-1] != converged.labels_[0] and converged.labels_[-1] != converged.labels_[60]
    assert torch.bincount(converged.labels_, minlength=3).tolist().count(1) == 1  # the outlier alone


def _offset_scaled_blobs(seed: int):
    """Blobs far from the origin with unequal per-dimension scales and unequal spreads."""
    X, y = make_blobs(
        [80, 80, 80], n_features=6, cluster_std=[0.3, 1.0, 2.0], random_state=seed, center_box=(-10, 10)
    )
    X = X * np.linspace(0.5, 4.0, 6) + 50.0
    return torch.tensor(X, dtype=torch.float32), y


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_predict_replays_the_fitted_standardisation(metric):
    """norm/std input: predict must z-score new vectors with the statistics fitted on the training set."""
    X, y = _offset_scaled_blobs(0)
    km = KMeansClusterer(3, engine="torch", metric=metric, standardise=True, normalise_input=False, seed=0)
    km.fit(X)
    assert adjusted_rand_score(y, km.labels_.numpy()) == 1.0
    assert torch.equal(km.predict(X), km.labels_)
    # a subset alone has other statistics: re-fitting the transform on it (or skipping it) changes labels
    part = X[y != 2]
    assert torch.equal(km.predict(part), km.labels_[torch.from_numpy(y != 2)])


@pytest.mark.parametrize("engine", ["torch", "faiss"])
def test_predict_replays_the_input_normalisation(engine):
    """normalise_input: each vector is L2-normalised before its nearest (non-unit) L2 centroid is found, so
    rescaling a vector never changes its label; without the normalisation small vectors all go to the
    centroid of smallest norm."""
    X, _ = _offset_scaled_blobs(1)
    X = X - X.mean(0)  # directions differ between the blobs
    km = KMeansClusterer(3, engine=engine, metric="l2", normalise_input=True, seed=0).fit(X)
    norms = np.linalg.norm(km.cluster_centers_, axis=1)
    assert norms.max() - norms.min() > 0.01  # the centroids are not all of one norm
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(0))
    scale = torch.logspace(-3, 3, X.shape[0])[perm].unsqueeze(1)
    assert torch.equal(km.predict(X * scale), km.labels_)


def test_degenerate_inputs_raise_clear_errors():
    X, _ = blobs([10, 10], seed=8)
    km = KMeansClusterer(5, engine="torch")
    assert_rejects_degenerate_inputs(km.fit, X, 5, bad_entry=(3, 1, float("nan")), zero_row=6)
    zero = X.clone()
    zero[6] = 0
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        km.fit(X[0])
    # L2 on raw vectors: a zero vector is an ordinary point.
    KMeansClusterer(2, engine="torch", normalise_input=False).fit(zero)


def test_bad_parameters_raise():
    with pytest.raises(ConfigError, match="engine"):
        KMeansClusterer(engine="cuml")
    with pytest.raises(ConfigError, match="n_clusters"):
        KMeansClusterer(n_clusters=0)
    with pytest.raises(ConfigError, match="pca_dim"):
        KMeansClusterer(3, engine="torch", pca_dim=40).fit(torch.randn(20, 8))
    with pytest.raises(RuntimeError, match="fit"):
        KMeansClusterer(3).predict(torch.randn(5, 4))


def test_card_matches_registry():
    checked_card("dataset_clusterer", "kmeans", "ussbench.dataset_clusterers.kmeans:KMeansClusterer")
