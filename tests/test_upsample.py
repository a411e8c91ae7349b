"""Evaluation without upsampling: per-patch label histograms give exactly the pixel-by-pixel confusion counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ussbench.base import Segmentation
from ussbench.evaluation.metrics import ConfusionMatrix
from ussbench.evaluation.upsample import (
    HistogramMemo,
    cell_histograms,
    evaluate_nearest,
    grid_confusion,
    upsample_nearest,
)
from ussbench.pipeline import nearest_pixel_predictions


def random_cell(seed: int, n_images: int = 7, n_classes: int = 5):
    """Segmentations on uneven grids, labels of sizes that are no multiple of the grid, with void pixels."""
    rng = np.random.default_rng(seed)
    segments, labels = [], []
    for _ in range(n_images):
        h, w = rng.integers(2, 9, size=2)
        H, W = int(h * rng.uniform(3, 20)) + 1, int(w * rng.uniform(3, 20)) + 2
        n_seg = int(rng.integers(1, 6))
        seg_map = torch.from_numpy(rng.integers(0, n_seg, size=(h, w)))
        background = int(rng.integers(0, n_seg)) if rng.random() < 0.4 else None
        segments.append(Segmentation(seg_map, torch.randn(n_seg, 3), background=background))
        label = rng.integers(0, n_classes, size=(H, W))
        label[rng.random((H, W)) < 0.1] = -1
        labels.append(label)
    fg = [torch.ones(s.n_segments, dtype=torch.bool) for s in segments]
    for s, m in zip(segments, fg):
        if s.background is not None:
            m[s.background] = False
    k_dc = 4
    assigned = torch.from_numpy(rng.integers(0, k_dc, size=int(sum(int(m.sum()) for m in fg))))
    return segments, fg, assigned, k_dc, labels, n_classes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_histogram_counts_equal_pixel_by_pixel_counts(seed):
    segments, fg, assigned, k_dc, labels, n_classes = random_cell(seed)
    n_pred = k_dc + 1
    slow = ConfusionMatrix(n_pred, n_classes)
    reference_panels = {}
    for i, pred, _ in nearest_pixel_predictions(segments, fg, assigned, k_dc, [lab.shape for lab in labels]):
        slow.update(pred, labels[i])
        reference_panels[str(i)] = pred.astype(np.int16)
    fast = ConfusionMatrix(n_pred, n_classes)
    panels = evaluate_nearest(fast, segments, fg, assigned, k_dc, HistogramMemo(labels), {0, 3})
    np.testing.assert_array_equal(fast.counts, slow.counts)
    assert fast.counts.sum() == sum(int((lab >= 0).sum()) for lab in labels)
    assert set(panels) == {"0", "3"}
    for key, value in panels.items():
        np.testing.assert_array_equal(value, reference_panels[key])


def test_per_image_counts_sum_to_each_image():
    segments, fg, assigned, k_dc, labels, n_classes = random_cell(5)
    grids = [tuple(s.segment_map.shape) for s in segments]
    hist = cell_histograms(labels, grids, n_classes)
    cells = torch.cat([torch.randint(0, k_dc, (g[0] * g[1],)) for g in grids])
    total, rows = grid_confusion(cells, hist, k_dc)
    for i, label in enumerate(labels):
        start, stop = hist.offsets[i], hist.offsets[i + 1]
        pred = upsample_nearest(cells[start:stop].reshape(grids[i]).numpy(), label.shape)
        expected = ConfusionMatrix(k_dc, n_classes)
        expected.update(pred, label)
        mine = rows[rows[:, 0] == i]
        got = np.zeros((k_dc, n_classes), dtype=np.int64)
        got[mine[:, 1], mine[:, 2]] = mine[:, 3]
        np.testing.assert_array_equal(got, expected.counts)
    assert (rows[:, 3] > 0).all()
    np.testing.assert_array_equal(total.sum(), rows[:, 3].sum())


def test_out_of_range_labels_and_predictions_fail_clearly():
    with pytest.raises(ValueError, match=r"label class ids must lie in \[0, 3\); got 3"):
        cell_histograms([np.array([[0, 3]])], [(1, 1)], 3)
    hist = cell_histograms([np.array([[0, 1], [2, -1]])], [(2, 2)], 3)
    with pytest.raises(ValueError, match=r"predicted cluster ids must lie in \[0, 2\)"):
        grid_confusion(torch.tensor([0, 1, 2, 0]), hist, 2)
    with pytest.raises(ValueError, match="3 cell labels for 4 patch cells"):
        grid_confusion(torch.tensor([0, 1, 0]), hist, 2)


def test_memo_reuses_histograms_per_grid_and_mapping():
    labels = [np.zeros((8, 8), dtype=np.int64)]
    memo = HistogramMemo(labels, size=2)
    a = memo.get([(2, 2)], 2)
    assert memo.get([(2, 2)], 2) is a
    assert memo.get([(4, 4)], 2) is not a  # another grid: another histogram
    memo.get([(2, 2)], 2, mapping="interpolate")
    assert memo.get([(2, 2)], 2) is not a  # evicted (size 2)


@pytest.mark.parametrize("seed", [0, 1])
def test_cell_nfcovering_equals_pixel_nfcovering(seed):
    from ussbench.evaluation.cell_covering import segment_covering_cells
    from ussbench.pipeline import segment_covering

    rng = np.random.default_rng(seed)
    segments, _, _, _, labels, _ = random_cell(seed, n_images=9, n_classes=6)
    labels[2][labels[2] >= 3] = 0  # an image without foreground (classes 3..5 below)
    for s in segments:  # two hierarchy levels on the same grid, one coarser
        s.levels = {
            "l0": s.segment_map.clone(),
            "l1": torch.from_numpy(rng.integers(0, 2, size=s.segment_map.shape)),
        }

    class Data:  # what segment_covering reads from a dataset
        class_names = ["building", "grass", "tree", "cow", "sheep", "sky"]
        num_classes = 6

    expected = segment_covering(segments, labels, Data, "msrc_v2")
    got = segment_covering_cells(segments, Data, "msrc_v2", HistogramMemo(labels))
    assert set(got) == set(expected) == {"nfcov", "nfcov_l0", "nfcov_l1"}
    for key in expected:
        assert got[key] == pytest.approx(expected[key], abs=1e-9)
    assert segment_covering_cells(segments, Data, "unknown", HistogramMemo(labels)) == {}


def test_grid_cells_score_the_same_with_and_without_the_histograms(
    tmp_path, toy_root, monkeypatch, one_thread
):
    """The stage graph's evaluation and NFCovering from the histograms node give the pixel path's records."""
    import ussbench.evaluation.upsample as upsample
    from tests.conftest import tiny_grid
    from ussbench.config import load_grid
    from ussbench.graph import stages
    from ussbench.graph.evaluation import segment_covering
    from ussbench.runner import load_cells, run_grid

    def run(name: str) -> dict[str, dict]:
        (tmp_path / name).mkdir()
        grid = load_grid(tiny_grid(tmp_path / name, toy_root, dataset_clusterers=["kmeans"]))
        run_grid(grid, progress=False, report=False)
        return {(r["row"]["image_clusterer"], r["row"]["seed"]): r for r in load_cells(grid.output)}

    calls = []
    counter = upsample.nearest_counter
    monkeypatch.setattr(stages, "nearest_counter", lambda *a: calls.append(1) or counter(*a))
    fast = run("fast")
    assert (
        len(calls) == len(fast) == 4
    )  # every cell (segment-based, no post-processing) took the histogram path
    monkeypatch.setattr(stages, "nearest_counter", lambda *a: None)  # the pixel-by-pixel loop
    monkeypatch.setattr(stages, "segment_covering_cells",
                        lambda segments, dataset, name, memo: segment_covering(segments, memo.labels, dataset, name))  # fmt: skip
    slow = run("slow")
    assert fast.keys() == slow.keys()
    for key, record in fast.items():
        assert record["confusion"] == slow[key]["confusion"]
        assert sum(map(sum, record["confusion"])) > 0
        for field in ("miou", "pixel_accuracy", "n_pixels"):
            assert record["row"][field] == slow[key]["row"][field]
        nfcov = {k: v for k, v in record["row"].items() if k.startswith("nfcov")}
        assert nfcov.keys() == {k for k in slow[key]["row"] if k.startswith("nfcov")}
        for k, v in nfcov.items():
            assert v == pytest.approx(slow[key]["row"][k], abs=1e-9)
