"""Bootstrap statistics with known answers: paired deltas, p-values, seeding, shrinking intervals, ranks."""

from __future__ import annotations

import numpy as np
import pytest

from ussbench.evaluation.metrics import ConfusionMatrix, evaluate_counts
from ussbench.evaluation.statistics import (
    CellCounts,
    bootstrap_rows,
    centred_interval,
    halving_plan,
    paired_delta,
    percentile_interval,
    point_scores,
    rank_ranges,
    replicate_scores,
    resample_weights,
)


def synthetic_cell(n_images: int, accuracy, seed: int, k: int = 4, pixels: int = 400) -> CellCounts:
    """Images with random class mixes; each pixel keeps its class's own cluster (a permutation of the classes)
    with probability ``accuracy`` (a float, or one value per image), else lands in a random cluster."""
    rng = np.random.default_rng(seed)
    accuracy = np.broadcast_to(np.asarray(accuracy, dtype=np.float64), (n_images,))
    perm = np.roll(np.arange(k), 1)
    cm = ConfusionMatrix(k, k)
    for i in range(n_images):
        gt = rng.choice(k, size=pixels, p=rng.dirichlet(np.ones(k)))
        keep = rng.random(pixels) < accuracy[i]
        pred = np.where(keep, perm[gt], rng.integers(0, k, size=pixels))
        cm.update(pred, gt)
    return CellCounts(cm.per_image_counts(), cm.n_images, k, k)


def test_point_scores_equal_the_cell_score():
    cell = synthetic_cell(30, 0.6, seed=0)
    s = evaluate_counts(cell.total())
    miou, acc = point_scores(cell)
    assert miou == pytest.approx(s.miou * 100) and acc == pytest.approx(s.pixel_accuracy * 100)


def test_the_match_is_recomputed_inside_each_replicate():
    """A replicate that draws one image N times scores as that image alone with its own Hungarian."""
    a = synthetic_cell(5, 0.9, seed=1)
    rows = a.per_image
    # image 0 relabelled by another permutation: matched over the split, its clusters would be wrong
    b_rows = rows.copy()
    b_rows[b_rows[:, 0] == 0, 1] = (b_rows[b_rows[:, 0] == 0, 1] + 1) % 4
    cell = CellCounts(b_rows, 5, 4, 4)
    only_first = np.zeros((1, 5), dtype=np.int32)
    only_first[0, 0] = 5
    miou, _ = replicate_scores(cell, only_first)
    alone = rows[rows[:, 0] == 0]
    counts = np.zeros((4, 4), dtype=np.int64)
    np.add.at(counts, (alone[:, 1], alone[:, 2]), alone[:, 3])
    assert miou[0] == pytest.approx(evaluate_counts(counts).miou * 100)
    assert miou[0] > 70  # its own match recovers the permutation; the split's match would not


def test_identical_cells_give_zero_delta_with_interval_containing_zero():
    cell = synthetic_cell(40, 0.5, seed=2)
    boot = bootstrap_rows({"a": [(0, cell)], "b": [(0, cell)]}, n_resamples=300)
    d = paired_delta(boot["a"].miou, boot["b"].miou, boot["a"].nested_miou, boot["b"].nested_miou)
    assert d.delta == 0.0
    assert d.low <= 0.0 <= d.high and not d.decided
    assert d.p_value == 1.0


def test_a_cell_better_on_every_image_has_p_below_001():
    n = 40
    worse = synthetic_cell(n, 0.45, seed=3)
    better = synthetic_cell(n, 0.75, seed=3)  # same images, more pixels kept on every image
    boot = bootstrap_rows({"better": [(0, better)], "worse": [(0, worse)]}, n_resamples=1000)
    d = paired_delta(
        boot["better"].miou, boot["worse"].miou, boot["better"].nested_miou, boot["worse"].nested_miou
    )
    assert d.delta > 10 and d.low > 0
    assert d.p_value < 0.01


def test_bootstrap_is_seeded_and_reproducible():
    rows = {"a": [(0, synthetic_cell(25, 0.5, seed=4)), (1, synthetic_cell(25, 0.55, seed=5))]}
    one = bootstrap_rows(rows, n_resamples=200, seed=11)
    two = bootstrap_rows(rows, n_resamples=200, seed=11)
    other = bootstrap_rows(rows, n_resamples=200, seed=12)
    assert np.array_equal(one["a"].nested_miou, two["a"].nested_miou)
    assert not np.array_equal(one["a"].nested_miou, other["a"].nested_miou)
    assert np.array_equal(resample_weights(25, 50, seed=3), resample_weights(25, 50, seed=3))
    assert (resample_weights(25, 50, seed=3).sum(1) == 25).all()


def test_intervals_shrink_as_images_are_added():
    # per-image accuracy varies between images, so which images are drawn matters
    widths = {}
    for n in (20, 320):
        acc = np.random.default_rng(6).uniform(0.2, 0.9, size=n)
        boot = bootstrap_rows({"a": [(0, synthetic_cell(n, acc, seed=6))]}, n_resamples=400)
        lo, hi = centred_interval(boot["a"].miou, boot["a"].nested_miou)
        widths[n] = hi - lo
    # 16x the images: ~1/4 the width; assert a wide margin
    assert widths[320] < 0.6 * widths[20]


def test_nested_seeds_widen_the_interval_when_seeds_disagree():
    n = 60
    same = [(s, synthetic_cell(n, 0.6, seed=7)) for s in range(3)]
    spread = [(s, synthetic_cell(n, a, seed=7)) for s, a in enumerate((0.35, 0.6, 0.85))]
    boot = bootstrap_rows({"same": same, "spread": spread}, n_resamples=400)
    w_same = np.subtract(*percentile_interval(boot["same"].nested_miou)[::-1])
    w_spread = np.subtract(*percentile_interval(boot["spread"].nested_miou)[::-1])
    assert w_spread > 2 * w_same
    plan = halving_plan(boot["spread"])
    assert plan.image_share < 0.5  # seeds dominate this row's uncertainty
    assert plan.seeds_to_halve is not None and plan.seeds_to_halve > 3


def test_rank_ranges_group_rows_that_cannot_be_told_apart():
    n = 60
    acc = np.random.default_rng(8).uniform(0.3, 0.8, size=n)
    top = synthetic_cell(n, np.minimum(acc + 0.2, 1.0), seed=8)
    mid_a = synthetic_cell(n, acc, seed=8)
    mid_b = synthetic_cell(n, acc, seed=9)  # same quality, other pixel noise
    boot = bootstrap_rows({"top": [(0, top)], "a": [(0, mid_a)], "b": [(0, mid_b)]}, n_resamples=500)
    keys = ["top", "a", "b"]
    ranks = rank_ranges(np.array([boot[k].miou for k in keys]), np.stack([boot[k].nested_miou for k in keys]))
    assert ranks[0] == (1, 1)
    assert ranks[1] == (2, 3) and ranks[2] == (2, 3)


def test_rows_on_different_images_are_refused():
    with pytest.raises(ValueError, match="same images"):
        bootstrap_rows({"a": [(0, synthetic_cell(10, 0.5, 0))], "b": [(0, synthetic_cell(12, 0.5, 0))]})


def test_intervals_are_centred_on_the_score_despite_re_matching_optimism():
    """Each image clusters its classes perfectly but under its own permutation: the split's match fits
    none of them well, while a replicate's match fits the images the draw repeats, so the replicates sit
    well above the split's score; the centred interval is moved back around the score."""
    rng = np.random.default_rng(0)
    cm = ConfusionMatrix(4, 4)
    for _ in range(12):
        gt = rng.integers(0, 4, size=200)
        cm.update(rng.permutation(4)[gt], gt)
    cell = CellCounts(cm.per_image_counts(), 12, 4, 4)
    boot = bootstrap_rows({"perm": [(0, cell)]}, n_resamples=400)["perm"]
    assert boot.nested_miou.mean() - boot.miou > 2  # the optimism is real here
    lo_p, hi_p = percentile_interval(boot.nested_miou)
    lo, hi = centred_interval(boot.miou, boot.nested_miou)
    assert lo < boot.miou < hi
    assert abs((lo + hi) / 2 - boot.miou) < abs((lo_p + hi_p) / 2 - boot.miou) - 2


def test_seeds_to_decide_follows_the_seed_spread():
    from ussbench.evaluation.statistics import seeds_to_decide

    n = 80
    acc = np.random.default_rng(11).uniform(0.4, 0.7, size=n)

    def row(shift, spread, salt):
        return [(s, synthetic_cell(n, np.clip(acc + shift + d, 0, 1), seed=100 * salt + s))
                for s, d in enumerate((-spread, 0.0, spread))]  # fmt: skip

    boot = bootstrap_rows({"a": row(0.04, 0.08, 1), "b": row(0.0, 0.08, 2), "c": row(0.08, 0.08, 3)}, 300)
    small, large = seeds_to_decide(boot["a"], boot["b"]), seeds_to_decide(boot["c"], boot["b"])
    assert small is not None and large is not None and small > large >= 2  # a larger Δ needs fewer seeds
    twin = row(0.0, 0.08, 4)
    same = bootstrap_rows({"x": twin, "y": twin}, 300)
    assert seeds_to_decide(same["x"], same["y"]) is None  # no Δ to decide: only images could


def test_rows_are_paired_by_seed_value_not_by_position():
    """Seeds [0, 1, 2] vs [0, 2]: both restricted to seeds 0 and 2 (by value); the same seeds: the rows as they
    are; no seed in common: no pairing."""
    from ussbench.evaluation.statistics import on_shared_seeds, paired_rows

    cells = {s: synthetic_cell(10, 0.6, seed=s) for s in (0, 1, 2, 7)}
    boots = bootstrap_rows({"full": [(s, cells[s]) for s in (0, 1, 2)], "gap": [(s, cells[s]) for s in (0, 2)],
                            "same": [(s, cells[s]) for s in (0, 1, 2)], "lone": [(7, cells[7])]}, 50)  # fmt: skip
    full, gap = on_shared_seeds(boots["full"], boots["gap"])
    assert full.seeds == gap.seeds == [0, 2]
    assert np.array_equal(full.miou_point, boots["full"].miou_point[[0, 2]])
    assert paired_rows(boots["full"], boots["gap"]).delta == pytest.approx(0.0, abs=1e-9)  # the same cells
    assert on_shared_seeds(boots["full"], boots["same"]) == (boots["full"], boots["same"])
    assert (
        on_shared_seeds(boots["full"], boots["lone"]) is None
        and paired_rows(boots["gap"], boots["lone"]) is None
    )


def test_score_intervals_stay_within_0_and_100():
    """On few images the basic interval reflects the replicates' skew and crossed 0 (a new user saw mIoU CI
    [-13.10, 3.52] at --limit 3); score intervals are truncated to the score's range, Δ intervals are not."""
    from ussbench.evaluation.statistics import centred_interval, score_interval

    reps = np.array([2.0, 3.0, 5.0, 30.0, 40.0])  # right-skewed: the reflected lower end goes below 0
    assert centred_interval(3.0, reps)[0] < 0
    lo, hi = score_interval(3.0, reps)
    assert lo == 0.0 and hi == centred_interval(3.0, reps)[1]
    assert score_interval(99.0, 100.0 - reps)[1] == 100.0
    inside = np.array([40.0, 41.0, 42.0, 43.0])
    assert score_interval(41.5, inside) == centred_interval(41.5, inside)  # no change where it fits
