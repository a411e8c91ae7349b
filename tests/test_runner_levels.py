"""The runner scores NFCovering of the image-level segments and of every hierarchy level, and draws the levels."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import tiny_grid
from ussbench import registry
from ussbench.base import FeatureSet, ImageClusterer, Segmentation, StageContext
from ussbench.config import load_grid
from ussbench.runner import run_grid


class KnownLevels(ImageClusterer):
    """One segment per image; levels 'oracle' (the ground truth itself) and 'whole' (one segment)."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def predict(self, features: FeatureSet, ctx: StageContext) -> list[Segmentation]:
        out = []
        for i, im in enumerate(features.images):
            label = torch.from_numpy(ctx.dataset.load_label(i).astype(np.int64))
            levels = {"oracle": label.clamp(min=0), "whole": torch.zeros_like(label)}
            out.append(
                Segmentation(
                    torch.zeros(im.grid, dtype=torch.long), im.tokens.mean((0, 1))[None], levels=levels
                )
            )
        return out


@pytest.fixture
def known_levels():
    registry.register("image_clusterer", "known_levels_test")(KnownLevels)
    yield
    registry.unregister("image_clusterer", "known_levels_test")


def test_nfcovering_per_level_in_results_and_report(tmp_path, toy_root, known_levels):
    # class 0 is named 'background': foreground = the two other bands, each a third of the valid pixels
    dataset = {
        "name": "image_folder",
        "params": {"num_classes": 3, "class_names": ["background", "green", "blue"]},
    }
    grid = load_grid(
        tiny_grid(
            tmp_path,
            toy_root,
            seeds=[0],
            datasets=[dataset],
            image_clusterers=["known_levels_test"],
            dataset_clusterers=["kmeans"],
        )  # fmt: skip
    )
    summary = run_grid(grid, progress=False)
    results = pd.read_csv(summary.output / "results.csv")
    assert results.nfcov_oracle.iloc[0] == pytest.approx(100.0)
    assert results.nfcov_whole.iloc[0] == pytest.approx(100.0 / 3, abs=1e-6)
    assert results.nfcov.iloc[0] == pytest.approx(100.0 / 3, abs=1e-6)  # the single segment = 'whole'
    md = (summary.output / "leaderboard.md").read_text()
    assert "NFCov oracle (%)" in md and "NFCov whole (%)" in md and "NFCov segments (%)" in md
    assert (summary.output / "panels_levels.png").is_file()
    data = np.load(summary.output / "cells" / f"{results.cell_id.iloc[0]}.npz")
    assert any(k.startswith("level_oracle_") for k in data.files) and any(
        k.startswith("pred_") for k in data.files
    )


def test_no_foreground_rule_leaves_nfcovering_out(tmp_path, toy_root):
    grid = load_grid(
        tiny_grid(tmp_path, toy_root, seeds=[0], image_clusterers=["none"], dataset_clusterers=["kmeans"])
    )
    summary = run_grid(grid, progress=False)
    results = pd.read_csv(summary.output / "results.csv")
    assert not any(c.startswith("nfcov") for c in results.columns)
    assert not (summary.output / "panels_levels.png").exists()
