"""STEGO's cluster probe as a dataset-level clusterer: K free cosine centroids trained with Adam.

Reference study §1.5: ``ClusterLookup(dim, K)`` holds K free centroids (initialised ~ N(0, 1)); its loss is
``-(onehot(argmax cos) * cos).sum(1).mean()`` over all pixels of a batch of detached codes (a mini-batch
spherical k-means), optimised with Adam at lr 5e-3; at test time a pixel takes the centroid of highest
cosine, and the soft scores fed to the CRF are ``log_softmax(2 * cos)``. Here the probe is fitted once on
the final (frozen) vectors, batches are drawn from per-epoch shuffles of all vectors, and ``n_empty_``
counts centroids that win no vector (random N(0, 1) seeds can stay dead; init='kmeans++' avoids it).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..base import DatasetClusterer
from ..errors import ConfigError
from ..registry import register
from ._common import (
    check_choice,
    check_labels_finite,
    check_matrix,
    check_positive,
    kmeans_plusplus,
    random_points,
    resolve_device,
)

CHUNK = 262_144  # rows per matmul at predict time


# "reference": STEGO's settings spelled out (5000 steps of 16 images x 28x28 patches at train res 224, /8).
# "kmeanspp_init": same training from k-means++ seeds, which avoids centroids that never win a vector.
PRESETS = {
    "reference": {"steps": 5000, "batch_size": 12544, "lr": 5e-3, "alpha": 2.0, "init": "randn"},
    "kmeanspp_init": {"init": "kmeans++"},
}


@register("dataset_clusterer", "cluster_probe", presets=PRESETS)
class ClusterProbe(DatasetClusterer):
    """STEGO cluster probe: K cosine centroids, loss -mean max cos, Adam lr 5e-3 on detached vectors."""

    def __init__(
        self,
        n_clusters: int = 27,
        steps: int = 5000,
        batch_size: int = 12544,
        lr: float = 5e-3,
        alpha: float = 2.0,
        init: Literal["randn", "sample", "kmeans++"] = "randn",
        seed: int = 0,
        device: str = "cpu",
    ):
        if n_clusters < 1:
            raise ConfigError(f"cluster_probe: n_clusters must be >= 1, got {n_clusters}")
        if steps < 0:
            raise ConfigError(f"cluster_probe: steps must be >= 0, got {steps}")
        check_positive("cluster_probe", batch_size=batch_size, lr=lr, alpha=alpha)
        check_choice("cluster_probe", "init", init, ("randn", "sample", "kmeans++"))
        self.n_clusters = n_clusters
        self.steps = steps
        self.batch_size = batch_size
        self.lr = lr
        self.alpha = alpha
        self.init = init
        self.seed = seed
        self.device = device

    def fit(self, X: torch.Tensor) -> ClusterProbe:
        """Train the centroids on (N, D) vectors (detached: no gradient reaches whatever produced X)."""
        who = "cluster_probe"
        dev = resolve_device(self.device, who)
        X = check_matrix(X, self.n_clusters, who)
        Xn = F.normalize(X.to(dev), dim=1)
        n, d = Xn.shape
        gen = torch.Generator().manual_seed(int(self.seed))
        if self.init == "randn":  # the reference: torch.randn(n_classes, dim)
            init = torch.randn(self.n_clusters, d, generator=gen).to(dev)
        elif self.init == "sample":
            init = random_points(Xn, self.n_clusters, np.random.default_rng(int(self.seed)))
        else:
            init = kmeans_plusplus(Xn, self.n_clusters, np.random.default_rng(int(self.seed)))
        centroids = torch.nn.Parameter(init.clone())
        opt = torch.optim.Adam([centroids], lr=self.lr)
        batch = min(int(self.batch_size), n)
        order = torch.randperm(n, generator=gen)
        pos = 0
        losses = []
        for _ in range(self.steps):
            if pos + batch > n:  # a new epoch: reshuffle
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos : pos + batch].to(dev)
            pos += batch
            loss = probe_loss(Xn[idx], centroids)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        self.cluster_centers_ = centroids.detach().float()
        check_labels_finite(self.cluster_centers_, who, "centroids")
        self.loss_history_ = torch.stack(losses).cpu().numpy() if losses else np.zeros(0, np.float32)
        counts = torch.bincount(self._argmax(Xn), minlength=self.n_clusters)
        self.n_empty_ = int((counts == 0).sum())
        return self

    def _cos(self, Xn: torch.Tensor) -> torch.Tensor:
        return Xn @ F.normalize(self.cluster_centers_.to(Xn.device), dim=1).T

    def _argmax(self, Xn: torch.Tensor) -> torch.Tensor:
        return torch.cat([self._cos(c).argmax(1) for c in Xn.split(CHUNK)]) if len(Xn) else Xn.new_zeros(0)

    def _check_fitted(self) -> None:
        if not hasattr(self, "cluster_centers_"):
            raise RuntimeError("cluster_probe: call fit() before predict()/logits()")

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """(N,) int64 on the CPU: the centroid of highest cosine similarity."""
        self._check_fitted()
        X = check_matrix(X, 0, "cluster_probe")
        dev = self.cluster_centers_.device
        return self._argmax(F.normalize(X.to(dev), dim=1)).long().cpu()

    def logits(self, X: torch.Tensor) -> torch.Tensor:
        """Soft scores ``log_softmax(alpha * cos)`` (..., K) for vectors (..., D), e.g. a (H, W, D) code map.

        On X's device; these are the reference's CRF inputs (``prepare_probs`` softmaxes them again).
        """
        self._check_fitted()
        if X.shape[-1] != self.cluster_centers_.shape[1]:
            raise ValueError(
                f"cluster_probe: X has {X.shape[-1]} dimensions, centroids have {self.cluster_centers_.shape[1]}"
            )
        flat = F.normalize(X.reshape(-1, X.shape[-1]).float().to(self.cluster_centers_.device), dim=1)
        out = torch.cat([torch.log_softmax(self.alpha * self._cos(c), dim=1) for c in flat.split(CHUNK)])
        return out.reshape(*X.shape[:-1], self.n_clusters).to(X.device)

    def artifacts(self) -> dict[str, Any]:
        return {"loss_history": self.loss_history_.tolist(), "n_empty_clusters": self.n_empty_}


def probe_loss(Xn: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The reference cluster loss: -(onehot(argmax cos) * cos).sum(1).mean() for unit-norm rows Xn."""
    cos = Xn @ F.normalize(centroids, dim=1).T
    hard = F.one_hot(cos.argmax(1), cos.shape[1]).to(cos.dtype)
    return -(hard * cos).sum(1).mean()
