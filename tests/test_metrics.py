"""Evaluation: confusion matrix, one Hungarian match over the split, many-to-one, ignore and absent classes."""

import numpy as np
import pytest

from ussbench.evaluation.metrics import ConfusionMatrix, evaluate_counts, match_clusters, score
from ussbench.pipeline import upsample_nearest


def confusion(pred, gt, k, c):
    cm = ConfusionMatrix(k, c)
    cm.update(np.asarray(pred), np.asarray(gt))
    return cm.counts


def test_permuted_labels_score_100():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 5, size=(40, 40))
    perm = np.array([3, 0, 4, 1, 2])
    s = evaluate_counts(confusion(perm[gt], gt, 5, 5))
    assert s.miou == pytest.approx(1.0)
    assert s.pixel_accuracy == pytest.approx(1.0)
    assert list(s.mapping[perm]) == [0, 1, 2, 3, 4]


def test_hand_computed_case():
    # 2 classes, 2 clusters; cluster 1 -> class 0 (3 px), cluster 0 -> class 1 (2 px); one wrong pixel.
    gt = np.array([0, 0, 0, 1, 1, 1])
    pred = np.array([1, 1, 1, 0, 0, 1])
    s = evaluate_counts(confusion(pred, gt, 2, 2))
    # class 0: tp 3, fp 1, fn 0 -> 3/4; class 1: tp 2, fp 0, fn 1 -> 2/3
    assert s.per_class_iou[0] == pytest.approx(3 / 4)
    assert s.per_class_iou[1] == pytest.approx(2 / 3)
    assert s.miou == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert s.pixel_accuracy == pytest.approx(5 / 6)


def test_ignore_pixels_are_not_counted():
    gt = np.array([0, 1, -1, -1])
    pred = np.array([0, 1, 1, 0])
    cm = confusion(pred, gt, 2, 2)
    assert cm.sum() == 2
    assert evaluate_counts(cm).miou == pytest.approx(1.0)


def test_absent_class_is_excluded_not_zero():
    gt = np.array([0, 0, 1, 1])  # class 2 never occurs and is never predicted after matching
    pred = np.array([0, 0, 1, 1])
    s = evaluate_counts(confusion(pred, gt, 3, 3))
    assert np.isnan(s.per_class_iou[2])
    assert s.miou == pytest.approx(1.0)


def test_more_clusters_than_classes_many_to_one_drops_no_pixel():
    gt = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 2, 2, 1, 1, 3, 3])  # clusters 2 and 3 are extra
    cm = confusion(pred, gt, 4, 2)
    s = evaluate_counts(cm, matching="auto")
    assert s.n_pixels == 8
    assert s.pixel_accuracy == pytest.approx(1.0)  # extra clusters mapped to their majority class
    strict = evaluate_counts(cm, matching="hungarian")
    # one-to-one: the two unmatched clusters' pixels count as misses, never dropped
    assert strict.pixel_accuracy == pytest.approx(0.5)
    assert strict.per_class_iou[0] == pytest.approx(0.5)


def test_iou_objective_differs_from_pixel_objective():
    # Found by search: maximising matched pixels and maximising summed IoU pick different matches here.
    counts = np.array([[16, 44, 13], [11, 35, 31], [2, 4, 18]])
    by_pixels = match_clusters(counts, "hungarian", "pixels")
    by_iou = match_clusters(counts, "hungarian", "iou")
    assert list(by_pixels) == [1, 2, 0]  # 44 + 31 + 2 = 77 matched pixels
    assert list(by_iou) == [1, 0, 2]
    assert score(counts, by_iou).miou > score(counts, by_pixels).miou
    assert score(counts, by_pixels).pixel_accuracy > score(counts, by_iou).pixel_accuracy


def test_prediction_outside_range_raises():
    cm = ConfusionMatrix(2, 2)
    with pytest.raises(ValueError, match=r"\[0, 2\)"):
        cm.update(np.array([0, 2]), np.array([0, 1]))


def test_streaming_equals_batch():
    rng = np.random.default_rng(1)
    gts = [rng.integers(-1, 4, size=(10, 12)) for _ in range(5)]
    preds = [rng.integers(0, 6, size=(10, 12)) for _ in range(5)]
    streamed = ConfusionMatrix(6, 4)
    for p, g in zip(preds, gts):
        streamed.update(p, g)
    batch = confusion(
        np.concatenate([p.ravel() for p in preds]), np.concatenate([g.ravel() for g in gts]), 6, 4
    )
    assert np.array_equal(streamed.counts, batch)


def test_upsample_nearest_maps_pixels_to_their_patch():
    grid = np.array([[0, 1], [2, 3]])
    up = upsample_nearest(grid, (4, 6))
    assert up.shape == (4, 6)
    assert (
        (up[:2, :3] == 0).all()
        and (up[:2, 3:] == 1).all()
        and (up[2:, :3] == 2).all()
        and (up[2:, 3:] == 3).all()
    )


def test_per_image_counts_sum_to_the_split_and_round_trip():
    rng = np.random.default_rng(2)
    cm = ConfusionMatrix(5, 3)
    gts = [rng.integers(-1, 3, size=(9, 7)) for _ in range(4)]
    gts[2][:] = -1  # an image without a valid pixel is still an image of the split
    preds = [rng.integers(0, 5, size=(9, 7)) for _ in range(4)]
    for p, g in zip(preds, gts):
        cm.update(p, g)
    rows = cm.per_image_counts()
    assert cm.n_images == 4 and rows.shape[1] == 4
    assert set(rows[:, 0]) == {0, 1, 3}
    for i, (p, g) in enumerate(zip(preds, gts)):
        own = confusion(p, g, 5, 3)
        mine = np.zeros((5, 3), dtype=np.int64)
        sel = rows[rows[:, 0] == i]
        mine[sel[:, 1], sel[:, 2]] = sel[:, 3]
        assert np.array_equal(mine, own)
    back = ConfusionMatrix.from_per_image(rows, 5, 3, n_images=4)
    assert np.array_equal(back.counts, cm.counts) and back.n_images == 4
    assert np.array_equal(back.per_image_counts(), rows)


def test_score_many_equals_score():
    from ussbench.evaluation.metrics import match_many, score_many

    rng = np.random.default_rng(3)
    counts = rng.integers(0, 50, size=(20, 6, 4))
    counts[0, :, 3] = 0  # class 3 absent; with a one-to-one match it may also be unpredicted (NaN)
    for matching in ("auto", "hungarian", "many_to_one"):
        maps = match_many(counts, matching)
        miou, acc, iou = score_many(counts, maps)
        for b in range(len(counts)):
            s = score(counts[b], maps[b])
            assert miou[b] == pytest.approx(s.miou) and acc[b] == pytest.approx(s.pixel_accuracy)
            assert np.allclose(iou[b], s.per_class_iou, equal_nan=True)


def test_iou_objective_maximises_summed_iou_by_brute_force():
    """The IoU objective's match is the permutation with the largest summed IoU (catches a wrong union)."""
    import itertools

    def iou_sum(counts, perm):
        r, c = counts.sum(1), counts.sum(0)
        return sum(counts[i, j] / (r[i] + c[j] - counts[i, j]) for i, j in enumerate(perm))

    rng = np.random.default_rng(4)
    for _ in range(60):
        counts = rng.integers(1, 60, size=(4, 4)) * rng.integers(0, 2, size=(4, 4)) + rng.integers(
            0, 3, size=(4, 4)
        )
        counts[counts.sum(1) == 0, 0] = 1
        best = max(iou_sum(counts, p) for p in itertools.permutations(range(4)))
        found = match_clusters(counts, "hungarian", "iou")
        assert iou_sum(counts, found) == pytest.approx(best)
