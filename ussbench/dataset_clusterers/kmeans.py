"""Dataset-level k-means: faiss (GPU when present) by default, scikit-learn as the tested fallback."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..base import DatasetClusterer
from ..errors import ConfigError, NumericalError
from ..registry import register


def check_vectors(X: torch.Tensor, n_clusters: int, who: str) -> np.ndarray:
    """Validate (N, D) input for a dataset clusterer and return it as float32 numpy."""
    if X.ndim != 2:
        raise ValueError(f"{who}: expected (N, D) vectors, got shape {tuple(X.shape)}")
    if X.shape[0] < n_clusters:
        raise ValueError(f"{who}: {X.shape[0]} vectors cannot form {n_clusters} clusters")
    arr = X.detach().float().cpu().numpy()
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).any(1).sum())
        raise NumericalError(f"{who}: {bad} input vectors contain NaN or inf")
    return np.ascontiguousarray(arr, dtype=np.float32)


def faiss_gpu_available() -> bool:
    try:
        import faiss

        return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    except ImportError:
        return False


@register("dataset_clusterer", "kmeans")
class KMeansClusterer(DatasetClusterer):
    """k-means over all segment vectors; engine faiss (GPU if present) or sklearn; L2 or cosine (spherical)."""

    def __init__(
        self,
        n_clusters: int = 21,
        engine: Literal["faiss", "sklearn"] = "faiss",
        metric: Literal["l2", "cosine"] = "l2",
        normalise_input: bool = True,
        n_init: int = 5,
        max_iter: int = 100,
        seed: int = 0,
        device: str = "cpu",
    ):
        if n_clusters < 1:
            raise ConfigError(f"kmeans: n_clusters must be >= 1, got {n_clusters}")
        self.n_clusters = n_clusters
        self.engine = engine
        self.metric = metric
        self.normalise_input = normalise_input
        self.n_init = n_init
        self.max_iter = max_iter
        self.seed = seed
        self.device = device

    def _prepare(self, X: torch.Tensor) -> np.ndarray:
        if self.normalise_input or self.metric == "cosine":
            X = F.normalize(X.float(), dim=1)
        return check_vectors(X, 1, "kmeans")

    def fit(self, X: torch.Tensor) -> KMeansClusterer:
        arr = check_vectors(X, self.n_clusters, "kmeans")
        arr = self._prepare(torch.from_numpy(arr))
        if self.engine == "faiss":
            import faiss

            km = faiss.Kmeans(
                arr.shape[1], self.n_clusters, niter=self.max_iter, nredo=self.n_init, seed=self.seed,
                spherical=self.metric == "cosine", gpu=self.device.startswith("cuda") and faiss_gpu_available(),
                verbose=False, min_points_per_centroid=1, max_points_per_centroid=1_000_000,
            )  # fmt: skip
            km.train(arr)
            self.cluster_centers_ = km.centroids.copy()
            self.inertia_ = float(km.obj[-1]) if len(km.obj) else float("nan")
        else:
            from sklearn.cluster import KMeans

            km = KMeans(self.n_clusters, n_init=self.n_init, max_iter=self.max_iter, random_state=self.seed)
            km.fit(arr)
            self.cluster_centers_ = km.cluster_centers_.astype(np.float32)
            self.inertia_ = float(km.inertia_)
        return self

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        arr = self._prepare(X)
        c = self.cluster_centers_
        if self.metric == "cosine":
            sim = arr @ (c / np.linalg.norm(c, axis=1, keepdims=True).clip(1e-12)).T
            return torch.from_numpy(sim.argmax(1)).long()
        d = (arr**2).sum(1, keepdims=True) - 2 * arr @ c.T + (c**2).sum(1)[None]
        return torch.from_numpy(d.argmin(1)).long()
