"""Dataset-level k-means: faiss (GPU when present), torch or scikit-learn engines, all from one shared init.

Every restart draws its initial centroids once (seeded k-means++ or random points) and hands the same
array to the chosen engine, so engines differ only in their Lloyd iterations and agree on the result.
Input pipeline (study Table 5): [per-dimension z-score] -> [L2 rows] -> [PCA] -> [L2 rows if cosine].
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch

from ..base import DatasetClusterer
from ..errors import ConfigError
from ..registry import register
from ._common import (
    InputTransform,
    check_choice,
    check_labels_finite,
    check_matrix,
    check_positive,
    initial_points,
    l2_normalise,
    prepare_input,
    sq_distances,
)

log = logging.getLogger(__name__)

ENGINES = ("faiss", "torch", "sklearn", "sklearn_minibatch")
_CHUNK = 1 << 18  # rows per distance block: bounds the (chunk, k) matrices on large inputs

# Table 5 of the semester study (VOC, DSM segments). "norm/std" read as per-dimension z-scoring.
PRESETS: dict[str, dict[str, Any]] = {
    "study_l2": {"metric": "l2", "normalise_input": True, "standardise": False},
    "study_cos": {"metric": "cosine", "normalise_input": True, "standardise": False},
    "study_normstd_l2": {"metric": "l2", "normalise_input": False, "standardise": True},
    "study_normstd_cos": {"metric": "cosine", "normalise_input": False, "standardise": True},
    # DSM's extract_bbox_clusters: L2-normalised CLS vectors, MiniBatchKMeans(batch 4096, max_iter 5000).
    "dsm": {"engine": "sklearn_minibatch", "metric": "l2", "normalise_input": True, "batch_size": 4096,
            "max_iter": 5000, "n_init": 3},
}  # fmt: skip


def check_vectors(X: torch.Tensor, n_clusters: int, who: str) -> np.ndarray:
    """Validate (N, D) input for a dataset clusterer and return it as float32 numpy (zero rows allowed)."""
    return check_matrix(X, n_clusters, who, allow_zero=True).cpu().numpy()


def faiss_gpu_available() -> bool:
    try:
        import faiss

        return hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    except ImportError:
        return False


def assign(Z: torch.Tensor, C: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row (cosine: largest dot product with unit centroids) and its squared distance."""
    labels, dist = [], []
    for chunk in Z.split(_CHUNK):
        if metric == "cosine":
            sim = chunk @ C.T.contiguous()
            best, idx = sim.max(1)
            d = ((chunk * chunk).sum(1) - 2 * best + (C * C).sum(1)[idx]).clamp_min(0)
        else:
            d, idx = sq_distances(chunk, C).min(1)
        labels.append(idx)
        dist.append(d)
    return torch.cat(labels), torch.cat(dist)


def lloyd_torch(
    Z: torch.Tensor, C0: torch.Tensor, metric: str, max_iter: int, tol_abs: float
) -> tuple[torch.Tensor, int]:
    """Batched Lloyd iterations on Z's device; stops when labels repeat or the centroid shift <= tol_abs.

    An empty cluster is re-seeded with the point farthest from its centroid (as scikit-learn does).
    """
    C = C0.clone()
    k = C.shape[0]
    prev = None
    it = 0
    for it in range(1, max_iter + 1):
        labels, dist = assign(Z, C, metric)
        if prev is not None and torch.equal(labels, prev):
            return C, it - 1
        counts = torch.bincount(labels, minlength=k)
        new = torch.zeros_like(C).index_add_(0, labels, Z) / counts.clamp_min(1).unsqueeze(1).to(Z.dtype)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():
            far = dist.topk(empty.numel()).indices
            new[empty] = Z[far]
        if metric == "cosine":
            new = l2_normalise(new)
        shift = float(((new - C) ** 2).sum())
        C, prev = new, labels
        if shift <= tol_abs:
            break
    return C, it


@register("dataset_clusterer", "kmeans", presets=PRESETS)
class KMeansClusterer(DatasetClusterer):
    """k-means over all segment vectors; engines faiss (GPU if present) / torch / sklearn; L2 or spherical."""

    def __init__(
        self,
        n_clusters: int = 21,
        engine: Literal["faiss", "torch", "sklearn", "sklearn_minibatch"] = "faiss",
        metric: Literal["l2", "cosine"] = "l2",
        normalise_input: bool = True,
        standardise: bool = False,
        pca_dim: int | None = None,
        init: Literal["k-means++", "random"] = "k-means++",
        n_init: int = 5,
        max_iter: int = 100,
        tol: float = 1e-4,
        batch_size: int = 4096,
        seed: int = 0,
        device: str = "cpu",
    ):
        check_positive(
            "kmeans", n_clusters=n_clusters, n_init=n_init, max_iter=max_iter, batch_size=batch_size
        )
        check_positive("kmeans", pca_dim=pca_dim)
        if tol < 0:
            raise ConfigError(f"kmeans: tol must be >= 0, got {tol}")
        check_choice("kmeans", "engine", engine, ENGINES)
        check_choice("kmeans", "metric", metric, ("l2", "cosine"))
        check_choice("kmeans", "init", init, ("k-means++", "random"))
        self.n_clusters = n_clusters
        self.engine = engine
        self.metric = metric
        self.normalise_input = normalise_input
        self.standardise = standardise
        self.pca_dim = pca_dim
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.batch_size = batch_size
        self.seed = seed
        self.device = device

    # -- fitting ---------------------------------------------------------------------------------------

    def _allow_zero(self) -> bool:
        """A zero vector is an ordinary point only for L2 k-means on unnormalised input."""
        return not (self.normalise_input or self.metric == "cosine")

    def initial_centroids(self, Z: torch.Tensor, restart: int) -> torch.Tensor:
        """The seeded initial centroids of one restart, in the preprocessed space (shared by all engines)."""
        C0 = initial_points(Z, self.n_clusters, self.init, np.random.default_rng([self.seed, restart]))
        return l2_normalise(C0) if self.metric == "cosine" else C0

    def fit(self, X: torch.Tensor, init_centroids: torch.Tensor | None = None) -> KMeansClusterer:
        """Run n_init restarts and keep the lowest inertia; ``init_centroids`` (k, D') overrides the seeding."""
        transform = InputTransform(
            self.standardise, self.normalise_input, self.pca_dim, self.metric == "cosine", "kmeans"
        )
        Z = prepare_input(
            transform, X, self.n_clusters, "kmeans", self.device, allow_zero=self._allow_zero(), fit=True
        )
        self.transform_ = transform
        tol_abs = self.tol * float(Z.var(0, unbiased=False).mean())
        best: tuple[float, torch.Tensor, torch.Tensor, int] | None = None
        for restart in range(1 if init_centroids is not None else self.n_init):
            if init_centroids is not None:
                C0 = torch.as_tensor(init_centroids, dtype=torch.float32, device=Z.device)
                if C0.shape != (self.n_clusters, Z.shape[1]):
                    raise ValueError(
                        f"kmeans: init_centroids must have shape {(self.n_clusters, Z.shape[1])}, "
                        f"got {tuple(C0.shape)}"
                    )
            else:
                C0 = self.initial_centroids(Z, restart)
            C, n_iter = self._run_engine(Z, C0, restart, tol_abs)
            if self.metric == "cosine":
                C = l2_normalise(C)
            check_labels_finite(C, "kmeans", f"centroids of engine {self.engine!r}")
            labels, dist = assign(Z, C, self.metric)
            inertia = float(dist.double().sum())
            if best is None or inertia < best[0]:
                best = (inertia, C, labels, n_iter)
        assert best is not None
        self.inertia_, C, labels, self.n_iter_ = best
        self.cluster_centers_ = C.float().cpu().numpy()
        self.labels_ = labels.cpu()
        return self

    def _run_engine(
        self, Z: torch.Tensor, C0: torch.Tensor, restart: int, tol_abs: float
    ) -> tuple[torch.Tensor, int]:
        if self.engine == "torch":
            return lloyd_torch(Z, C0, self.metric, self.max_iter, tol_abs)
        arr = np.ascontiguousarray(Z.cpu().numpy(), dtype=np.float32)
        init = np.ascontiguousarray(C0.cpu().numpy(), dtype=np.float32)
        seed = self.seed * 1000 + restart
        if self.engine == "faiss":
            import faiss

            gpu = Z.device.type == "cuda" and faiss_gpu_available()
            if Z.device.type == "cuda" and not gpu:
                log.info("kmeans: faiss has no GPU support in this install; faiss runs on the CPU")
            km = faiss.Kmeans(
                arr.shape[1], self.n_clusters, niter=self.max_iter, nredo=1, seed=seed,
                spherical=self.metric == "cosine", gpu=gpu, verbose=False,
                min_points_per_centroid=1, max_points_per_centroid=1 << 30,
            )  # fmt: skip
            km.train(arr, init_centroids=init)
            return torch.from_numpy(km.centroids.copy()).to(Z.device), self.max_iter
        if self.engine == "sklearn":
            from sklearn.cluster import KMeans

            # metric="cosine": Euclidean Lloyd on unit vectors (sklearn has no spherical variant).
            km = KMeans(
                self.n_clusters, init=init, n_init=1, max_iter=self.max_iter, tol=self.tol,
                algorithm="lloyd", random_state=seed,
            )  # fmt: skip
        else:
            from sklearn.cluster import MiniBatchKMeans

            km = MiniBatchKMeans(
                self.n_clusters, init=init, n_init=1, max_iter=self.max_iter, batch_size=self.batch_size,
                random_state=seed, compute_labels=False,
            )  # fmt: skip
        km.fit(arr)
        return torch.from_numpy(km.cluster_centers_.astype(np.float32)).to(Z.device), int(km.n_iter_)

    # -- inference -------------------------------------------------------------------------------------

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        """X in the space the centroids live in (after the fitted standardise / normalise / PCA)."""
        if not hasattr(self, "cluster_centers_"):
            raise RuntimeError("kmeans: call fit before predict")
        return prepare_input(self.transform_, X, 1, "kmeans", self.device, allow_zero=self._allow_zero())

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        Z = self.transform(X)
        C = torch.from_numpy(self.cluster_centers_).to(Z.device)
        return assign(Z, C, self.metric)[0].long().cpu()

    def artifacts(self) -> dict[str, Any]:
        if not hasattr(self, "inertia_"):
            return {}
        return {"inertia": self.inertia_, "n_iter": self.n_iter_, "engine": self.engine}
