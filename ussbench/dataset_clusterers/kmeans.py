"""Dataset-level k-means: faiss (GPU when present), torch or scikit-learn engines, all from one shared init.

Every restart draws its initial centroids once (seeded k-means++ or random points) and hands the same
array to the chosen engine, so engines differ only in their Lloyd iterations and agree on the result.
Input pipeline (study Table 5): [per-dimension z-score] -> [L2 rows] -> [PCA] -> [L2 rows if cosine].

Engine ``auto`` (the default): faiss on a GPU with faiss-gpu, torch on other GPUs, and on the CPU
scikit-learn's Elkan k-means (exact Lloyd with triangle-inequality bounds that skip most distance
computations once few points move) for L2, torch's spherical Lloyd for cosine. Measured on MSRC-v2's
222,000 raw patch tokens (384-d, K 21, 5 restarts, 1 core): faiss 81.6 s, torch 69.6 s, Elkan 32.1 s;
on 2 cores (benchmarks/perf/clusterers_study.py, one run) Elkan 18.4 s vs faiss 88.2 s.
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
    kmeans_plusplus_many,
    l2_normalise,
    prepare_input,
    random_points,
)

log = logging.getLogger(__name__)

ENGINES = ("auto", "faiss", "torch", "sklearn", "sklearn_elkan", "sklearn_minibatch")
SKLEARN_ENGINES = ("sklearn", "sklearn_elkan", "sklearn_minibatch")
_CHUNK = 1 << 16  # rows per distance block: bounds the (chunk, R * k) matrices on large inputs
FAISS_CHUNK = 10  # faiss iterations between convergence checks

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


def resolve_engine(engine: str, metric: str, device: str) -> str:
    """The engine ``auto`` stands for on this device and metric (any other engine is returned unchanged)."""
    if engine != "auto":
        return engine
    if torch.device(device).type == "cuda":
        return "faiss" if faiss_gpu_available() else "torch"
    return "torch" if metric == "cosine" else "sklearn_elkan"


def assign(Z: torch.Tensor, C: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row (cosine: largest dot product with unit centroids) and its squared distance."""
    labels, dist, _, _ = assign_many(Z, C[None], metric, accumulate=False)
    return labels[0], dist[0]


def assign_many(
    Z: torch.Tensor,
    C: torch.Tensor,
    metric: str,
    z_sq: torch.Tensor | None = None,
    accumulate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Nearest centroid of every row for R centroid sets C (R, k, D) at once, in one pass over Z.

    Returns labels (R, N), squared distances (R, N) and, with ``accumulate``, the per-cluster sums (R, k, D)
    and counts (R, k) of the assigned rows (one-hot products on the same chunk, so Lloyd's update needs no
    second pass). Cosine: the largest dot product with unit centroids.
    """
    R, k, D = C.shape
    N = Z.shape[0]
    Cf = C.reshape(R * k, D)
    CfT = Cf.T.contiguous()
    c_sq = (Cf * Cf).sum(1)
    z_sq = (Z * Z).sum(1) if z_sq is None else z_sq
    labels = torch.empty(R, N, dtype=torch.long, device=Z.device)
    dist = torch.empty(R, N, dtype=Z.dtype, device=Z.device)
    sums = torch.zeros(R * k, D, dtype=Z.dtype, device=Z.device) if accumulate else None
    counts = torch.zeros(R * k, dtype=Z.dtype, device=Z.device) if accumulate else None
    offsets = (torch.arange(R, device=Z.device) * k)[None]
    for start in range(0, N, _CHUNK):
        rows = slice(start, start + _CHUNK)
        Zc = Z[rows]
        if metric == "cosine":
            best, idx = (Zc @ CfT).reshape(-1, R, k).max(2)
            d = (z_sq[rows, None] - 2 * best + c_sq[idx + offsets]).clamp_min_(0)
        else:  # |c|^2 - 2 z.c, the row's |z|^2 added to the minimum only
            part, idx = torch.addmm(c_sq[None], Zc, CfT, alpha=-2).reshape(-1, R, k).min(2)
            d = part.add_(z_sq[rows, None]).clamp_min_(0)
        labels[:, rows] = idx.T
        dist[:, rows] = d.T
        if accumulate:
            onehot = torch.zeros(Zc.shape[0], R * k, dtype=Z.dtype, device=Z.device)
            onehot.scatter_(1, idx + offsets, 1.0)
            sums += onehot.T @ Zc
            counts += onehot.sum(0)
    if accumulate:
        return labels, dist, sums.reshape(R, k, D), counts.reshape(R, k)
    return labels, dist, None, None


def lloyd_torch(
    Z: torch.Tensor, C0: torch.Tensor, metric: str, max_iter: int, tol_abs: float
) -> tuple[torch.Tensor, int]:
    """Lloyd iterations from one initialisation (see :func:`lloyd_torch_many`)."""
    C, n_iter = lloyd_torch_many(Z, C0[None], metric, max_iter, tol_abs)
    return C[0], n_iter[0]


def lloyd_torch_many(
    Z: torch.Tensor,
    C0: torch.Tensor,
    metric: str,
    max_iter: int,
    tol_abs: float,
    z_sq: torch.Tensor | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Lloyd iterations for R restarts C0 (R, k, D) at once; returns the centroids (R, k, D) and iterations.

    Every iteration is one pass over Z for all restarts still running (distances and the next centroids'
    sums in the same chunk). A restart stops when its labels repeat or its centroid shift <= tol_abs. An
    empty cluster is re-seeded with the point farthest from its centroid (as scikit-learn does).
    """
    R = C0.shape[0]
    C = C0.clone()
    z_sq = (Z * Z).sum(1) if z_sq is None else z_sq
    active = list(range(R))
    n_iter = [0] * R
    prev: list[torch.Tensor | None] = [None] * R
    for it in range(1, max_iter + 1):
        if not active:
            break
        labels, dist, sums, counts = assign_many(Z, C[active], metric, z_sq)
        still = []
        for a, r in enumerate(active):
            if prev[r] is not None and torch.equal(labels[a], prev[r]):
                n_iter[r] = it - 1
                continue
            new = sums[a] / counts[a].clamp_min(1).unsqueeze(1)
            empty = torch.nonzero(counts[a] == 0).flatten()
            if empty.numel():
                far = dist[a].topk(empty.numel()).indices
                new[empty] = Z[far]
            if metric == "cosine":
                new = l2_normalise(new)
            shift = float(((new - C[r]) ** 2).sum())
            C[r], prev[r], n_iter[r] = new, labels[a], it
            if shift > tol_abs:
                still.append(r)
        active = still
    return C, n_iter


@register("dataset_clusterer", "kmeans", presets=PRESETS)
class KMeansClusterer(DatasetClusterer):
    """k-means over all segment vectors; engines faiss (GPU if present) / torch / sklearn; L2 or spherical."""

    version = "2"  # 2: engine "auto" (scikit-learn Elkan on the CPU), restart choice thread-invariant

    def __init__(
        self,
        n_clusters: int = 21,
        engine: Literal["auto", "faiss", "torch", "sklearn", "sklearn_elkan", "sklearn_minibatch"] = "auto",
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
        return self._initial_centroids_many(Z, [restart])[0]

    def _initial_centroids_many(
        self, Z: torch.Tensor, restarts: list[int], z_sq: torch.Tensor | None = None
    ) -> torch.Tensor:
        rngs = [np.random.default_rng([self.seed, r]) for r in restarts]
        if self.init == "k-means++":
            C0 = kmeans_plusplus_many(Z, self.n_clusters, rngs, x_sq=z_sq)
        else:
            C0 = torch.stack([random_points(Z, self.n_clusters, rng) for rng in rngs])
        return l2_normalise(C0.reshape(-1, Z.shape[1])).reshape(C0.shape) if self.metric == "cosine" else C0

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
        z_sq = (Z * Z).sum(1)
        if init_centroids is not None:
            C0 = torch.as_tensor(init_centroids, dtype=torch.float32, device=Z.device)
            if C0.shape != (self.n_clusters, Z.shape[1]):
                raise ValueError(
                    f"kmeans: init_centroids must have shape {(self.n_clusters, Z.shape[1])}, "
                    f"got {tuple(C0.shape)}"
                )
            C0s = C0[None]
        else:
            C0s = self._initial_centroids_many(Z, list(range(self.n_init)), z_sq)
        engine = self.engine_ = resolve_engine(self.engine, self.metric, str(Z.device))
        if engine == "torch":
            Cs, iters = lloyd_torch_many(Z, C0s, self.metric, self.max_iter, tol_abs, z_sq)
        elif engine in SKLEARN_ENGINES:
            runs = self._run_sklearn_restarts(Z, C0s, engine)
            Cs, iters = torch.stack([c for c, _ in runs]), [i for _, i in runs]
        else:
            runs = [self._run_engine(Z, C0s[r], r, tol_abs, engine) for r in range(C0s.shape[0])]
            Cs, iters = torch.stack([c for c, _ in runs]), [i for _, i in runs]
        if self.metric == "cosine":
            Cs = l2_normalise(Cs.reshape(-1, Z.shape[1])).reshape(Cs.shape)
        check_labels_finite(Cs, "kmeans", f"centroids of engine {engine!r}")
        labels, dist, _, _ = assign_many(Z, Cs, self.metric, z_sq, accumulate=False)
        # numpy's single-threaded pairwise sum: the restart picked does not depend on the thread count
        inertias = torch.from_numpy(dist.double().cpu().numpy().sum(1))
        best = int(inertias.argmin())  # the first restart among equals, as a sequential loop would keep
        self.inertia_ = float(inertias[best])
        self.n_iter_ = iters[best]
        self.cluster_centers_ = Cs[best].float().cpu().numpy()
        self.labels_ = labels[best].cpu()
        return self

    def _run_sklearn_restarts(
        self, Z: torch.Tensor, C0s: torch.Tensor, engine: str
    ) -> list[tuple[torch.Tensor, int]]:
        """scikit-learn restarts, each on one OpenMP thread, spread over the run's threads.

        One thread per restart makes every restart's sums run in one fixed order, so the result does not
        depend on the thread count (scikit-learn's own threads split the sums by thread); the restarts run
        side by side in a thread pool (scikit-learn's loops release the GIL), which keeps every core busy.
        """
        from concurrent.futures import ThreadPoolExecutor

        from ..threads import run_threads

        arr = np.ascontiguousarray(Z.cpu().numpy(), dtype=np.float32)
        inits = [np.ascontiguousarray(C0.cpu().numpy(), dtype=np.float32) for C0 in C0s]
        workers = max(1, min(run_threads(), len(inits)))
        with ThreadPoolExecutor(workers) as pool:
            jobs = [pool.submit(self._fit_sklearn, arr, init, r, engine) for r, init in enumerate(inits)]
            runs = [job.result() for job in jobs]
        return [(torch.from_numpy(c).to(Z.device), n) for c, n in runs]

    def _fit_sklearn(
        self, arr: np.ndarray, init: np.ndarray, restart: int, engine: str
    ) -> tuple[np.ndarray, int]:
        """One scikit-learn fit from the shared initial centroids, on one OpenMP thread: (centroids, iterations)."""
        from threadpoolctl import threadpool_limits

        seed = self.seed * 1000 + restart
        if engine == "sklearn_minibatch":
            from sklearn.cluster import MiniBatchKMeans

            km = MiniBatchKMeans(
                self.n_clusters, init=init, n_init=1, max_iter=self.max_iter, batch_size=self.batch_size,
                random_state=seed, compute_labels=False,
            )  # fmt: skip
        else:
            from sklearn.cluster import KMeans

            # metric="cosine": Euclidean Lloyd on unit vectors (sklearn has no spherical variant).
            km = KMeans(
                self.n_clusters, init=init, n_init=1, max_iter=self.max_iter, tol=self.tol,
                algorithm="elkan" if engine == "sklearn_elkan" else "lloyd", random_state=seed,
            )  # fmt: skip
        # OpenMP's thread count is per calling thread: set it here, in the worker that runs the fit
        with threadpool_limits(limits=1, user_api="openmp"):
            km.fit(arr)
        return km.cluster_centers_.astype(np.float32), int(km.n_iter_)

    def _run_engine(
        self, Z: torch.Tensor, C0: torch.Tensor, restart: int, tol_abs: float, engine: str
    ) -> tuple[torch.Tensor, int]:
        if engine == "torch":
            return lloyd_torch(Z, C0, self.metric, self.max_iter, tol_abs)
        arr = np.ascontiguousarray(Z.cpu().numpy(), dtype=np.float32)
        init = np.ascontiguousarray(C0.cpu().numpy(), dtype=np.float32)
        seed = self.seed * 1000 + restart
        if engine == "faiss":
            import faiss

            gpu = Z.device.type == "cuda" and faiss_gpu_available()
            if Z.device.type == "cuda" and not gpu:
                log.info("kmeans: faiss has no GPU support in this install; faiss runs on the CPU")
            # faiss has no tolerance: run it in chunks of FAISS_CHUNK iterations from the previous centroids
            # and stop once a chunk no longer moves them (a fixed point stays one); at most max_iter in all.
            centroids, done = init, 0
            while done < self.max_iter:
                chunk = min(FAISS_CHUNK, self.max_iter - done)
                km = faiss.Kmeans(
                    arr.shape[1], self.n_clusters, niter=chunk, nredo=1, seed=seed + done,
                    spherical=self.metric == "cosine", gpu=gpu, verbose=False,
                    min_points_per_centroid=1, max_points_per_centroid=1 << 30,
                )  # fmt: skip
                km.train(arr, init_centroids=centroids)
                shift = float(((km.centroids - centroids) ** 2).sum())
                centroids, done = km.centroids.copy(), done + chunk
                if shift <= tol_abs:
                    break
            return torch.from_numpy(centroids).to(Z.device), done
        raise ConfigError(f"kmeans: unknown engine {engine!r}")

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
        return {
            "inertia": self.inertia_,
            "n_iter": self.n_iter_,
            "engine": getattr(self, "engine_", self.engine),
        }
