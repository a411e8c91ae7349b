"""Normalized Foreground Covering on hand-computed cases."""

import numpy as np
import pytest
import torch

from ussbench.base import Segmentation
from ussbench.evaluation.nfcovering import (
    foreground_classes,
    nf_covering,
    nf_covering_image,
    nf_covering_levels,
)

# 4x4 label: left half class 1 (foreground), right half class 0 (background)
LABEL = np.array([[1, 1, 0, 0]] * 4)


def test_single_segment_covers_half():
    # R = left half (8 px), R' = whole image (16 px): IoU 8/16
    score, n = nf_covering_image(np.zeros((4, 4), int), LABEL, [1])
    assert n == 1 and score == pytest.approx(0.5)


def test_exact_segmentation_scores_one():
    seg = np.array([[0, 0, 1, 1]] * 4)
    assert nf_covering_image(seg, LABEL, [1])[0] == pytest.approx(1.0)


def test_best_overlap_is_taken():
    # A = top-left 2x2 (IoU 4/8 = 0.5); B = the other 12 px (inter 4, union 8+12-4=16: 0.25) -> 0.5
    seg = np.ones((4, 4), int)
    seg[:2, :2] = 0
    assert nf_covering_image(seg, LABEL, [1])[0] == pytest.approx(0.5)


def test_two_regions_are_averaged_not_size_weighted():
    label = np.array([[1, 1, 1, 2]] * 2)  # class 1: 6 px, class 2: 2 px
    seg = np.array([[0, 0, 0, 0]] * 2)  # one segment: IoU 6/8 and 2/8 -> mean 0.5
    assert nf_covering_image(seg, label, [1, 2])[0] == pytest.approx(0.5)


def test_void_pixels_are_removed_from_regions_and_segments():
    label = np.array([[1, 1, -1, -1]] * 2)
    seg = np.zeros((2, 4), int)  # without removal IoU would be 4/8
    assert nf_covering_image(seg, label, [1])[0] == pytest.approx(1.0)


def test_connected_regions_split_a_class():
    label = np.array([[1, 0, 1]])
    seg = np.array([[0, 1, 1]])
    # class mode: R = {0, 2}; seg 0 IoU 1/2, seg 1 IoU 1/3 -> 0.5
    assert nf_covering_image(seg, label, [1], "class")[0] == pytest.approx(0.5)
    # connected: R1 = {0} IoU 1 with seg 0; R2 = {2} IoU 1/2 with seg 1 -> 0.75
    score, n = nf_covering_image(seg, label, [1], "connected")
    assert n == 2 and score == pytest.approx(0.75)


def test_split_mean_skips_images_without_foreground_and_upsamples():
    seg_small = torch.tensor([[0, 1], [0, 1]])  # 2x2 patch grid -> nearest to 4x4: halves
    bg_only = np.zeros((4, 4), int)
    res = nf_covering([seg_small, np.zeros((4, 4), int)], [LABEL, bg_only], [1])
    assert res.score == pytest.approx(1.0)
    assert res.n_images == 1 and res.n_regions == 1 and np.isnan(res.per_image[1])


def test_foreground_rules():
    assert foreground_classes(["background", "cat", "dog"]) == [1, 2]
    msrc21 = ["building", "grass", "tree", "cow", "sheep", "sky", "aeroplane", "water", "face", "car"]
    assert foreground_classes(msrc21, "msrc_v2") == [3, 4, 6, 8, 9]
    with pytest.raises(ValueError, match="dataset"):
        foreground_classes(["sky", "road"])
    with pytest.raises(ValueError, match="'cityscapes'"):
        foreground_classes(["sky"], "cityscapes")


def test_levels_of_segmentations():
    maps = {"level0": torch.tensor([[0, 1, 2, 3]] * 4), "level1": torch.zeros(4, 4, dtype=torch.long)}
    seg = Segmentation(maps["level0"], torch.zeros(4, 2), levels=maps)
    res = nf_covering_levels([seg], [LABEL], [1])
    # level0: columns; best IoU for the left half = 4/8; level1: one segment = 8/16
    assert res["level0"].score == pytest.approx(0.5) and res["level1"].score == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 segment maps for 1"):
        nf_covering([LABEL, LABEL], [LABEL], [1])
