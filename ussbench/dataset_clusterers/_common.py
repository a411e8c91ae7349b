"""Helpers shared by the dataset-level clusterers: input checks, device choice, preprocessing, k-means++."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones import precision as _precision
from ..backbones.precision import PRECISIONS
from ..errors import ConfigError, NumericalError

log = logging.getLogger(__name__)

ZERO_NORM = 1e-12


def check_matrix(X: torch.Tensor, n_clusters: int, who: str, *, allow_zero: bool = False) -> torch.Tensor:
    """Validate (N, D) input and return it as a detached float32 tensor (on its own device).

    Fewer vectors than clusters, NaN/inf rows and (unless ``allow_zero``) zero vectors, for which cosine
    similarity is undefined, each raise one clear error naming the parameter and the offending rows.
    """
    if not isinstance(X, torch.Tensor):
        X = torch.as_tensor(np.asarray(X))
    if X.ndim != 2:
        raise ValueError(f"{who}: X must be an (N, D) matrix, got shape {tuple(X.shape)}")
    if X.shape[1] < 1:
        raise ValueError(f"{who}: X has no feature dimensions (shape {tuple(X.shape)})")
    if X.shape[0] < n_clusters:
        raise ValueError(f"{who}: n_clusters={n_clusters} exceeds the number of vectors in X ({X.shape[0]})")
    X = X.detach().float()
    bad = ~torch.isfinite(X).all(dim=1)
    if bool(bad.any()):
        rows = torch.nonzero(bad).flatten()
        raise NumericalError(
            f"{who}: {rows.numel()} rows of X contain NaN or inf (first at row {int(rows[0])})"
        )
    if not allow_zero:
        zero = X.norm(dim=1) <= ZERO_NORM
        if bool(zero.any()):
            rows = torch.nonzero(zero).flatten()
            raise ValueError(
                f"{who}: {rows.numel()} rows of X are zero vectors (first at row {int(rows[0])}); "
                "their cosine similarity / L2 normalisation is undefined"
            )
    return X


def check_positive(who: str, **values: float | int | None) -> None:
    """Raise ConfigError for the first parameter that is not > 0 (None is accepted)."""
    for name, value in values.items():
        if value is not None and not value > 0:
            raise ConfigError(f"{who}: {name} must be > 0, got {value!r}")


def check_choice(who: str, name: str, value: object, choices: Sequence[str]) -> None:
    """Raise ConfigError unless ``value`` is one of ``choices`` (listed as 'a', 'b' or 'c'; longer as a tuple)."""
    if value not in choices:
        if len(choices) <= 3:
            listed = " or ".join([", ".join(repr(c) for c in choices[:-1]), repr(choices[-1])])
        else:
            listed = f"one of {tuple(choices)}"
        raise ConfigError(f"{who}: {name} must be {listed}, got {value!r}")


def resolve_device(device: str, who: str) -> torch.device:
    """torch.device for ``device``; a CUDA request without CUDA falls back to CPU with a logged warning."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"{who}: device {device!r} is not a torch device ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        log.warning("%s: device %r requested but CUDA is not available; running on CPU", who, device)
        return torch.device("cpu")
    return dev


def prepare_input(
    transform: InputTransform,
    X: torch.Tensor,
    n_clusters: int,
    who: str,
    device: str,
    *,
    allow_zero: bool = False,
    fit: bool = False,
) -> torch.Tensor:
    """Check X, move it to the plugin's device and map it through the input transform (fitted first if ``fit``)."""
    X = check_matrix(X, n_clusters, who, allow_zero=allow_zero)
    X = X.to(resolve_device(device, who))
    return transform.fit_transform(X) if fit else transform.transform(X)


class Standardiser:
    """Per-dimension z-scoring fitted on the training vectors (the study's "norm/std input")."""

    def fit(self, X: torch.Tensor) -> Standardiser:
        self.mean_ = X.mean(0)
        # Constant dimensions keep scale 1 so they map to 0 instead of NaN.
        std = X.std(0, unbiased=False)
        self.scale_ = torch.where(std > 1e-12, std, torch.ones_like(std))
        return self

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        return (X - self.mean_.to(X.device)) / self.scale_.to(X.device)


class PCA:
    """PCA through the eigendecomposition of the D×D covariance (float64; signs fixed for determinism)."""

    def __init__(self, n_components: int):
        self.n_components = n_components

    def fit(self, X: torch.Tensor) -> PCA:
        n, d = X.shape
        if not 1 <= self.n_components <= d:
            raise ConfigError(
                f"pca_dim must be in [1, {d}] for {d}-dimensional input, got {self.n_components}"
            )
        self.mean_ = X.double().mean(0)
        cov = torch.zeros(d, d, dtype=torch.float64, device=X.device)
        for chunk in X.split(65536):
            c = chunk.double() - self.mean_
            cov += c.T @ c
        evals, evecs = torch.linalg.eigh(cov / max(n - 1, 1))
        comps = evecs[:, torch.argsort(evals, descending=True)[: self.n_components]].T  # (p, d)
        # Sign convention: the largest-magnitude loading of each component is positive.
        sign = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
        self.components_ = (comps * sign).float()
        self.mean_ = self.mean_.float()
        self.explained_variance_ = evals.sort(descending=True).values[: self.n_components].float()
        return self

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        return (X - self.mean_.to(X.device)) @ self.components_.to(X.device).T


def normalise_rows(X: torch.Tensor, who: str) -> torch.Tensor:
    """L2-normalise rows; a row that became zero (e.g. after standardising or PCA) is an error."""
    norms = X.norm(dim=1, keepdim=True)
    if bool((norms <= ZERO_NORM).any()):
        row = int(torch.nonzero(norms.flatten() <= ZERO_NORM)[0])
        raise ValueError(
            f"{who}: row {row} of X is a zero vector after preprocessing; cannot L2-normalise it"
        )
    return X / norms


class InputTransform:
    """The input pipeline: [z-score per dimension] -> [L2 rows] -> [PCA] -> [L2 rows for cosine].

    Fitted on the training vectors and replayed on any vectors passed to ``predict``.
    """

    def __init__(self, standardise: bool, normalise: bool, pca_dim: int | None, unit_output: bool, who: str):
        self.standardise = standardise
        self.normalise = normalise
        self.pca_dim = pca_dim
        self.unit_output = unit_output
        self.who = who

    def fit_transform(self, X: torch.Tensor) -> torch.Tensor:
        self.standardiser_ = Standardiser().fit(X) if self.standardise else None
        Z = self._head(X)
        self.pca_ = PCA(self.pca_dim).fit(Z) if self.pca_dim else None
        return self._tail(Z)

    def transform(self, X: torch.Tensor) -> torch.Tensor:
        return self._tail(self._head(X))

    def _head(self, X: torch.Tensor) -> torch.Tensor:
        if self.standardiser_ is not None:
            X = self.standardiser_.transform(X)
        return normalise_rows(X, self.who) if self.normalise else X

    def _tail(self, X: torch.Tensor) -> torch.Tensor:
        if self.pca_ is not None:
            X = self.pca_.transform(X)
        return normalise_rows(X, self.who) if self.unit_output else X


def sq_distances(X: torch.Tensor, C: torch.Tensor, x_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Squared Euclidean distances (n, k) between rows of X and C, clamped at 0 (``x_sq``: X's squared row
    norms, when the caller already has them)."""
    if x_sq is None:
        x_sq = (X * X).sum(1)
    # C.T made contiguous: a transposed-view GEMM is pathologically slow on contended small CPUs.
    return torch.addmm((C * C).sum(1)[None], X, C.T.contiguous(), alpha=-2).add_(x_sq[:, None]).clamp_min_(0)


def kmeans_plusplus(
    X: torch.Tensor, n_clusters: int, rng: np.random.Generator, n_local_trials: int | None = None
) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii; greedy variant as in scikit-learn), on X's device.

    Sampling uses ``rng`` on the host, so the result depends only on X and the generator's seed.
    """
    return kmeans_plusplus_many(X, n_clusters, [rng], n_local_trials)[0]


def kmeans_plusplus_many(
    X: torch.Tensor,
    n_clusters: int,
    rngs: Sequence[np.random.Generator],
    n_local_trials: int | None = None,
    x_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """One greedy k-means++ seeding per generator, all advancing together: (R, k, D).

    Each restart draws from its own generator exactly as :func:`kmeans_plusplus` would, and the candidates
    of every restart are scored in one pass over X per centre (one (n, R * trials) product instead of R).
    """
    n = X.shape[0]
    R = len(rngs)
    trials = n_local_trials or 2 + int(np.log(n_clusters))
    x_sq = (X * X).sum(1) if x_sq is None else x_sq
    centres = torch.empty(R, n_clusters, X.shape[1], dtype=X.dtype, device=X.device)
    first = torch.as_tensor([int(rng.integers(n)) for rng in rngs], device=X.device)
    centres[:, 0] = X[first]
    closest = sq_distances(X, X[first], x_sq).T.contiguous()  # (R, n); sums below in float64
    rows = torch.arange(R, device=X.device)
    for c in range(1, n_clusters):
        cum = torch.cumsum(closest, 1, dtype=torch.float64)
        total = cum[:, -1].cpu().numpy()
        idx = torch.empty(R, trials, dtype=torch.long, device=X.device)
        for r, rng in enumerate(rngs):
            if total[r] <= 0:  # every point coincides with a chosen centre: pick uniformly
                idx[r] = torch.as_tensor(rng.integers(n, size=trials), device=X.device)
            else:
                u = torch.as_tensor(rng.random(trials) * total[r], dtype=torch.float64, device=X.device)
                idx[r] = torch.searchsorted(cum[r], u).clamp_(max=n - 1)
        d = sq_distances(X, X[idx.reshape(-1)], x_sq).T.reshape(R, trials, n)
        cand = torch.minimum(closest[:, None, :], d)  # (R, trials, n)
        # numpy's single-threaded sum: the candidate kept does not depend on the thread count
        best = torch.from_numpy(cand.cpu().numpy().sum(2, dtype=np.float64).argmin(1)).to(X.device)  # (R,)
        centres[:, c] = X[idx[rows, best]]
        closest = cand[rows, best]
    return centres


def random_points(X: torch.Tensor, n_clusters: int, rng: np.random.Generator) -> torch.Tensor:
    """k distinct rows of X chosen uniformly at random (the study's OTC initialisation)."""
    idx = rng.choice(X.shape[0], size=n_clusters, replace=False)
    return X[torch.as_tensor(idx, device=X.device)].clone()


def initial_points(X: torch.Tensor, n_clusters: int, init: str, rng: np.random.Generator) -> torch.Tensor:
    """Seed centroids among the rows of X: k-means++ for init 'k-means++', else k distinct random rows."""
    return kmeans_plusplus(X, n_clusters, rng) if init == "k-means++" else random_points(X, n_clusters, rng)


def check_labels_finite(value: torch.Tensor, who: str, what: str) -> None:
    """Raise NumericalError if a tensor the algorithm produced holds NaN/inf."""
    if not bool(torch.isfinite(value).all()):
        raise NumericalError(f"{who}: {what} became NaN/inf")


def l2_normalise(X: torch.Tensor) -> torch.Tensor:
    """Row-wise L2 normalisation that leaves zero rows at zero (for centroids, never for inputs)."""
    return F.normalize(X, dim=1, eps=ZERO_NORM)


def resolve_precision(precision: str, device: torch.device, who: str) -> str:
    """'fp32' or 'bf16' for a plugin's ``precision``: 'auto' is bf16 on CUDA GPUs that support it and on CPUs
    with native bf16 instructions, else fp32 (the backbones' rule, ``ussbench.backbones.precision``)."""
    check_choice(who, "precision", precision, PRECISIONS)
    return _precision.resolve_precision(precision, device, who)


def autocast(device: torch.device, precision: str):
    """torch.autocast context for a resolved precision ('bf16' casts matmuls/linears to bfloat16)."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with its multi-tensor ('foreach') step: on the CPU the same per-tensor kernels in the same order as
    the default loop (the same bits; tests/test_abc.py checks), with less Python per step (ABC's study preset:
    about 10 ms of its 0.3 s epoch)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
