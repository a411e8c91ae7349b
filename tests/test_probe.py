"""Linear probe: patch majority labels, a separable representation scores high, k-fold never trains on the
scored images, once per representation in a grid, switchable in the protocol."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from tests.conftest import tiny_grid
from ussbench.config import load_grid
from ussbench.evaluation import probe
from ussbench.evaluation.probe import ProbeSettings, linear_probe, patch_labels
from ussbench.runner import run_grid


def test_patch_labels_take_the_majority_of_labelled_pixels():
    label = np.array([[0, 0, 1, 1], [0, 1, 1, 1], [2, 2, -1, -1], [2, -1, -1, -1]])
    assert list(patch_labels(label, (2, 2), 3)) == [0, 1, 2, -1]


def _maps(n_images: int, dim: int, rng: np.random.Generator, signal: float):
    """(h, w, D) features whose first 3 dims carry the patch's class with strength ``signal``, and labels."""
    feats, labels = [], []
    for _ in range(n_images):
        classes = rng.integers(0, 3, size=(4, 4))
        f = rng.normal(size=(4, 4, dim)).astype(np.float32)
        f[..., :3] += signal * np.eye(3, dtype=np.float32)[classes]
        feats.append(torch.from_numpy(f))
        labels.append(np.kron(classes, np.ones((8, 8), dtype=np.int64)))  # 32x32 pixels, 8x8 per patch
    return feats, labels


def test_a_separable_representation_scores_high():
    feats, labels = _maps(20, 8, np.random.default_rng(0), signal=6.0)
    for classifier in ("ridge", "logistic"):
        result = linear_probe(feats, labels, 3, ProbeSettings(folds=4, classifier=classifier))
        assert result.miou > 90 and result.acc > 95 and result.folds == 4


def test_k_fold_never_scores_an_image_it_trained_on():
    """Pure-noise features: a probe fitted on the scored patches memorises them (256 dims, 192 patches); the
    k-fold probe must stay near chance (3 classes)."""
    feats, labels = _maps(12, 256, np.random.default_rng(1), signal=0.0)
    held_out = linear_probe(feats, labels, 3, ProbeSettings(folds=3))
    assert held_out.acc < 50
    x = torch.cat([f.reshape(-1, 256) for f in feats])
    y = torch.cat([torch.from_numpy(patch_labels(lab, (4, 4), 3)) for lab in labels])
    z = (x - x.mean(0)) / x.std(0)
    zt = torch.cat([z, torch.ones(len(z), 1)], 1)
    onehot = torch.nn.functional.one_hot(y, 3).float()
    w, b = probe._fit_ridge([((zt.T @ zt).double(), (zt.T @ onehot).double())], ProbeSettings().ridge)
    train_acc = float(((z @ w + b).argmax(1) == y).float().mean())
    assert train_acc > 0.9  # what a probe trained on its test images would report


def test_grid_computes_the_probe_once_per_representation(tmp_path, toy_root, monkeypatch):
    calls = []
    original = probe.linear_probe
    monkeypatch.setattr(probe, "linear_probe", lambda *a, **k: calls.append(1) or original(*a, **k))
    grid = load_grid(
        tiny_grid(tmp_path, toy_root)
    )  # 2 image x 2 dataset clusterers x 2 seeds, one representation
    run_grid(grid, progress=False)
    assert len(calls) == 1
    results = pd.read_csv(grid.output / "results.csv")
    assert results.probe_miou.notna().all() and results.probe_miou.nunique() == 1
    assert (results.probe_feature == "tokens").all()
    assert "probe mIoU (%)" in (grid.output / "leaderboard.md").read_text()


def test_probe_can_be_switched_off(tmp_path, toy_root):
    grid = load_grid(tiny_grid(tmp_path, toy_root, seeds=[0], image_clusterers=["none"], dataset_clusterers=["kmeans"],
                               protocol={"linear_probe": False}))  # fmt: skip
    run_grid(grid, progress=False)
    assert "probe_miou" not in pd.read_csv(grid.output / "results.csv")
