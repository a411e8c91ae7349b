"""Image-level bootstrap statistics of leaderboard rows, from the cells' per-image confusion counts.

Method (stated in every report header, see :data:`METHOD`):

- **Resampling unit: the image.** One replicate draws N images with replacement from the N evaluated
  images; every row of the same data uses the *same* draws, so any two rows are compared paired.
- **The cluster-to-class match is recomputed inside every replicate** (one Hungarian per replicate and
  seed on the resampled split's counts): the match is part of the method, and freezing it at the full
  split's match would make the interval too narrow.
- **Seeds are nested.** A row with S seeds scores each replicate once per seed; the replicate's value is
  the mean over S seeds drawn with replacement from the row's seeds (the same seed positions for every row
  with S seeds). The interval so covers both which images were evaluated and which seeds ran.
- **Interval: basic bootstrap, centred.** Re-matching flatters every replicate a little (a match fitted
  to a resample fits it better than the full split's match fits the full split: about +0.4 mIoU for raw
  tokens on MSRC-v2), so the replicates sit above the full-split score. The interval is therefore built from
  the replicates' spread around their own mean: ``[score - (q_hi - mean), score + (mean - q_lo)]`` with
  q_lo, q_hi the replicate quantiles (default 95%). It is an interval for the protocol's expected score on
  another image set of this size, and contains the reported score. A plain percentile interval would be
  shifted up by the re-matching optimism.
- **Paired Δ:** the replicate-wise difference of two rows, paired by seed value: rows that ran different seeds
  (a failed cell) are compared on the seeds both ran, each restricted to them (no Δ when they share none);
  with the same centred interval; two-sided p-value
  ``(1 + #{|Δ* - mean(Δ*)| >= |Δ|}) / (B + 1)`` (the replicates centred as the null distribution), so the
  smallest p-value with B replicates is ``1 / (B + 1)``.
- **Rank ranges:** a row's rank lies between 1 + (number of rows significantly better than it) and
  n - (number of rows significantly worse), "significantly" meaning that the paired interval of the
  difference excludes 0 (pairwise, not corrected for multiple comparisons).
- **Halving an interval:** the width is taken as proportional to sqrt(V_img N0/N + s^2/S), with V_img the
  replicate variance of the seed mean with the seeds held fixed and s^2 the between-seed variance of the
  full-split scores; the plan solves for the seeds (or images) that halve it.

Everything is a pure function of numpy arrays and a seed: the same inputs give the same numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np
import scipy.sparse as sp

from .metrics import Matching, Objective, match_many, score_many

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
DEFAULT_SEED = 0
METHOD = (
    "bootstrap over images ({B} replicates, seed {seed}): every replicate redraws the images with replacement "
    "(the same draws for every row of a dataset, so comparisons are paired), recomputes the cluster-to-class "
    "match on the resampled counts, and averages the row's seeds drawn with replacement (nested); "
    "{level:.0%} basic (centred) intervals around the full-split score (truncated to [0, 100]); Δ p-values "
    "two-sided from the centred paired replicates"
)


@dataclass(frozen=True)
class CellCounts:
    """One finished cell's per-image confusion counts: (nnz, 4) rows of image, cluster, class, pixels."""

    per_image: np.ndarray
    n_images: int
    n_clusters: int
    n_classes: int

    def __post_init__(self) -> None:
        rows = np.asarray(self.per_image).reshape(-1, 4)
        if rows.size and (
            rows[:, 0].max() >= self.n_images
            or rows[:, 1].max() >= self.n_clusters
            or rows[:, 2].max() >= self.n_classes
            or rows.min() < 0
        ):
            raise ValueError(
                f"per-image counts outside {self.n_images} images x {self.n_clusters} clusters x "
                f"{self.n_classes} classes"
            )

    def matrix(self) -> sp.csr_matrix:
        """Sparse (N images, K*C) counts: row i is image i's flattened clusters x classes matrix."""
        rows = np.asarray(self.per_image, dtype=np.int64).reshape(-1, 4)
        return sp.csr_matrix(
            (rows[:, 3].astype(np.float64), (rows[:, 0], rows[:, 1] * self.n_classes + rows[:, 2])),
            shape=(self.n_images, self.n_clusters * self.n_classes),
        )

    def total(self) -> np.ndarray:
        """The split's clusters x classes counts (what the cell's own score was computed from)."""
        rows = np.asarray(self.per_image, dtype=np.int64).reshape(-1, 4)
        total = np.zeros((self.n_clusters, self.n_classes), dtype=np.int64)
        np.add.at(total, (rows[:, 1], rows[:, 2]), rows[:, 3])
        return total


def resample_weights(n_images: int, n_resamples: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """(B, N) int32: how often each image is drawn in each replicate (each row sums to N)."""
    if n_images < 1 or n_resamples < 1:
        raise ValueError(f"need >= 1 image and replicate, got {n_images} images, {n_resamples} replicates")
    rng = np.random.default_rng([seed, n_images])
    draws = rng.integers(0, n_images, size=(n_resamples, n_images))
    flat = draws + (np.arange(n_resamples) * n_images)[:, None]
    return (
        np.bincount(flat.ravel(), minlength=n_resamples * n_images)
        .reshape(n_resamples, n_images)
        .astype(np.int32)
    )


def seed_draws(n_seeds: int, n_resamples: int, seed: int = DEFAULT_SEED) -> np.ndarray:
    """(B, S) seed positions drawn with replacement per replicate (shared by all rows with S seeds)."""
    rng = np.random.default_rng([seed, 7919, n_seeds])
    return rng.integers(0, n_seeds, size=(n_resamples, n_seeds))


def replicate_scores(
    cell: CellCounts,
    weights: np.ndarray,
    matching: Matching = "auto",
    objective: Objective = "pixels",
    chunk: int = 250,
) -> tuple[np.ndarray, np.ndarray]:
    """mIoU and pixel accuracy (in %) of one cell on each replicate: (B,), (B,).

    Each replicate's counts are the weighted sum of the images' counts; the clusters are matched to the
    classes anew on them (one Hungarian per replicate).
    """
    if weights.shape[1] != cell.n_images:
        raise ValueError(f"weights cover {weights.shape[1]} images, the cell has {cell.n_images}")
    matrix_t = cell.matrix().T.tocsr()  # (K*C, N)
    miou = np.empty(len(weights))
    acc = np.empty(len(weights))
    for start in range(0, len(weights), chunk):
        w = weights[start : start + chunk].astype(np.float64)
        counts = np.asarray(matrix_t @ w.T).T.reshape(len(w), cell.n_clusters, cell.n_classes)
        m, a, _ = score_many(counts, match_many(counts, matching, objective))
        miou[start : start + len(w)], acc[start : start + len(w)] = m * 100.0, a * 100.0
    return miou, acc


def point_scores(
    cell: CellCounts, matching: Matching = "auto", objective: Objective = "pixels"
) -> tuple[float, float]:
    """The cell's own mIoU and pixel accuracy (in %) on the full split (one match)."""
    miou, acc = replicate_scores(cell, np.ones((1, cell.n_images), dtype=np.int32), matching, objective)
    return float(miou[0]), float(acc[0])


@dataclass
class RowBootstrap:
    """A leaderboard row's bootstrap: per-seed full-split scores and per-seed replicates."""

    seeds: list[int]
    miou_point: np.ndarray  # (S,) full-split mIoU per seed (%)
    acc_point: np.ndarray  # (S,)
    miou_reps: np.ndarray  # (S, B) replicate mIoU per seed (%)
    acc_reps: np.ndarray  # (S, B)
    n_images: int
    nested_miou: np.ndarray = field(init=False)  # (B,) seeds drawn with replacement per replicate
    nested_acc: np.ndarray = field(init=False)

    def nest(self, draws: np.ndarray) -> None:
        """Apply the seed draws (B, S) shared by all rows with this many seeds."""
        cols = np.arange(self.miou_reps.shape[1])[:, None]
        self.nested_miou = self.miou_reps.T[cols, draws].mean(1)
        self.nested_acc = self.acc_reps.T[cols, draws].mean(1)

    def restrict(self, seeds: list[int], draws: np.ndarray) -> RowBootstrap:
        """This row on some of its seeds (by value), nested with the draws shared by rows of that many seeds."""
        idx = [self.seeds.index(s) for s in seeds]
        row = RowBootstrap(list(seeds), self.miou_point[idx], self.acc_point[idx], self.miou_reps[idx],
                           self.acc_reps[idx], self.n_images)  # fmt: skip
        row.nest(draws)
        return row

    @property
    def miou(self) -> float:
        return float(self.miou_point.mean())

    @property
    def acc(self) -> float:
        return float(self.acc_point.mean())


def bootstrap_rows(
    rows: dict[str, list[tuple[int, CellCounts]]],
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    matching: Matching = "auto",
    objective: Objective = "pixels",
) -> dict[str, RowBootstrap]:
    """Bootstrap every row of one dataset (all cells must score the same N images), paired across rows.

    ``rows``: row key -> [(seed, cell counts), ...]. Returns row key -> :class:`RowBootstrap` with the
    nested (seed-resampled) replicates filled in.
    """
    sizes = {cell.n_images for cells in rows.values() for _, cell in cells}
    if len(sizes) != 1:
        raise ValueError(
            f"rows of one comparison must score the same images; got image counts {sorted(sizes)}"
        )
    n_images = sizes.pop()
    weights = resample_weights(n_images, n_resamples, seed)
    out: dict[str, RowBootstrap] = {}
    for key, cells in rows.items():
        cells = sorted(cells, key=lambda sc: sc[0])
        points = [point_scores(c, matching, objective) for _, c in cells]
        reps = [replicate_scores(c, weights, matching, objective) for _, c in cells]
        out[key] = RowBootstrap(
            seeds=[s for s, _ in cells],
            miou_point=np.array([p[0] for p in points]),
            acc_point=np.array([p[1] for p in points]),
            miou_reps=np.stack([r[0] for r in reps]),
            acc_reps=np.stack([r[1] for r in reps]),
            n_images=n_images,
        )
    draws: dict[int, np.ndarray] = {}
    for row in out.values():
        s = len(row.seeds)
        if s not in draws:
            draws[s] = seed_draws(s, n_resamples, seed)
        row.nest(draws[s])
    return out


def shared_seeds(a: RowBootstrap, b: RowBootstrap) -> list[int]:
    """The seed values both rows ran, sorted: what a paired comparison of the two can use."""
    return sorted(set(a.seeds) & set(b.seeds))


def on_shared_seeds(
    a: RowBootstrap, b: RowBootstrap, seed: int = DEFAULT_SEED
) -> tuple[RowBootstrap, RowBootstrap] | None:
    """Two rows paired by seed value: as they are when they ran the same seeds, else each restricted to the
    seeds both ran (their seed means then cover the same seeds); None when they share no seed."""
    if a.seeds == b.seeds:
        return a, b
    common = shared_seeds(a, b)
    if not common:
        return None
    draws = seed_draws(len(common), a.miou_reps.shape[1], seed)
    return a.restrict(common, draws), b.restrict(common, draws)


def paired_rows(
    a: RowBootstrap, b: RowBootstrap, seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL
) -> PairedDelta | None:
    """Δ mIoU = A − B of two bootstrapped rows on the seeds both ran; None when they share no seed."""
    pair = on_shared_seeds(a, b, seed)
    if pair is None:
        return None
    ra, rb = pair
    return paired_delta(ra.miou, rb.miou, ra.nested_miou, rb.nested_miou, level)


def percentile_interval(replicates: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """The central ``level`` percentile interval of the replicates (NaNs ignored)."""
    alpha = (1.0 - level) / 2.0
    lo, hi = np.nanquantile(np.asarray(replicates, dtype=np.float64), [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def centred_interval(
    point: float, replicates: np.ndarray, level: float = DEFAULT_LEVEL
) -> tuple[float, float]:
    """Basic bootstrap interval around ``point`` from the replicates' spread about their own mean.

    ``[point - (q_hi - mean), point + (mean - q_lo)]``: the replicates' offset from the point (re-matching
    optimism) is removed, their spread and skew kept (reflected, as the basic bootstrap does).
    """
    reps = np.asarray(replicates, dtype=np.float64)
    reps = reps[np.isfinite(reps)]
    if reps.size == 0:
        return math.nan, math.nan
    lo, hi = percentile_interval(reps, level)
    mean = float(reps.mean())
    return float(point - (hi - mean)), float(point + (mean - lo))


SCORE_RANGE = (0.0, 100.0)  # mIoU and pixel accuracy, in %


def score_interval(point: float, replicates: np.ndarray, level: float = DEFAULT_LEVEL) -> tuple[float, float]:
    """:func:`centred_interval` of a score in %, truncated to [0, 100]: the basic bootstrap reflects the
    replicates' skew and can cross the score's range on few images (a -13 % lower end says only "near 0")."""
    lo, hi = centred_interval(point, replicates, level)
    return max(lo, SCORE_RANGE[0]), min(hi, SCORE_RANGE[1])


@dataclass(frozen=True)
class PairedDelta:
    """Row A minus row B: point difference, its paired bootstrap interval and two-sided p-value."""

    delta: float
    low: float
    high: float
    p_value: float

    @property
    def decided(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0


def paired_delta(
    a_point: float, b_point: float, a_reps: np.ndarray, b_reps: np.ndarray, level: float = DEFAULT_LEVEL
) -> PairedDelta:
    """Δ = A - B from replicates computed on the same image draws and seeds (see :func:`paired_rows`)."""
    delta = float(a_point - b_point)
    diff = np.asarray(a_reps, dtype=np.float64) - np.asarray(b_reps, dtype=np.float64)
    diff = diff[np.isfinite(diff)]
    if diff.size == 0:
        return PairedDelta(delta, math.nan, math.nan, math.nan)
    lo, hi = centred_interval(delta, diff, level)
    centred = np.abs(diff - diff.mean())
    p = (1 + np.sum(centred >= abs(delta) - 1e-12)) / (diff.size + 1)
    return PairedDelta(delta, lo, hi, float(min(1.0, p)))


def rank_ranges(
    points: np.ndarray, replicates: np.ndarray, level: float = DEFAULT_LEVEL
) -> list[tuple[int, int]]:
    """Each row's (best, worst) possible rank given pairwise paired intervals (see module docstring).

    ``points``: (R,) point estimates; ``replicates``: (R, B) paired replicates.
    """
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    alpha = (1.0 - level) / 2.0
    better = np.zeros((n, n), dtype=bool)  # better[i, j]: row i significantly above row j
    for i in range(n):
        diff = replicates[i][None, :] - replicates  # (R, B): i minus every row
        upper_q = np.nanquantile(diff, 1.0 - alpha, axis=1)
        lows = (points[i] - points) - (upper_q - np.nanmean(diff, axis=1))  # centred interval's lower ends
        better[i] = lows > 0
        better[i, i] = False
    return ranks_from_better(better)


def ranks_from_better(better: np.ndarray) -> list[tuple[int, int]]:
    """Each row's (best, worst) rank from ``better[i, j]``: row i significantly above row j."""
    n = len(better)
    return [(1 + int(better[:, i].sum()), n - int(better[i].sum())) for i in range(n)]


def format_rank(rank: tuple[int, int]) -> str:
    """'3' or '2–4'."""
    lo, hi = rank
    return str(lo) if lo == hi else f"{lo}–{hi}"


@dataclass(frozen=True)
class HalvingPlan:
    """How the interval width would shrink: current width, image share of the variance, what halves it."""

    width: float
    image_share: float  # fraction of the variance explained by which images were drawn
    seeds_to_halve: int | None  # total seeds (same images) that halve the width; None: seeds alone cannot
    images_factor_to_halve: float | None  # x current images (same seeds); None: images alone cannot


def halving_plan(row: RowBootstrap, level: float = DEFAULT_LEVEL) -> HalvingPlan:
    """Seeds or images needed to halve the row's mIoU interval (width ~ sqrt(V_img N0/N + s^2/S))."""
    lo, hi = centred_interval(row.miou, row.nested_miou, level)
    v_img = float(np.nanvar(row.miou_reps.mean(0), ddof=1)) if row.miou_reps.shape[1] > 1 else 0.0
    s = len(row.seeds)
    v_seed = float(np.var(row.miou_point, ddof=1)) / s if s > 1 else math.nan
    if not math.isfinite(v_seed):
        return HalvingPlan(hi - lo, math.nan, None, 4.0)
    total = v_img + v_seed
    target = total / 4.0
    seeds = math.ceil(v_seed * s / (target - v_img)) if target > v_img and v_seed > 0 else None
    factor = v_img / (target - v_seed) if target > v_seed and v_img > 0 else None
    return HalvingPlan(hi - lo, v_img / total if total > 0 else math.nan, seeds, factor)


def seeds_to_decide(a: RowBootstrap, b: RowBootstrap, level: float = DEFAULT_LEVEL) -> int | None:
    """Seeds per row (same images) at which the paired interval of the current Δ = A - B would exclude 0.

    Normal approximation: half-width z sqrt(V_img + (s_A^2 + s_B^2)/S), with V_img the replicate variance of
    the difference of the seed means (seeds held fixed) and s^2 the rows' between-seed variances. None when
    the image part alone is as wide as |Δ| (only more images can decide it) or a row has a single seed.
    """
    if len(a.seeds) < 2 or len(b.seeds) < 2:
        return None
    z = NormalDist().inv_cdf(0.5 + level / 2.0)
    delta = a.miou - b.miou
    v_img = float(np.nanvar(a.miou_reps.mean(0) - b.miou_reps.mean(0), ddof=1))
    v_seed = float(np.var(a.miou_point, ddof=1) + np.var(b.miou_point, ddof=1))
    room = (delta / z) ** 2 - v_img
    if room <= 0:
        return None
    return max(2, math.ceil(v_seed / room))
