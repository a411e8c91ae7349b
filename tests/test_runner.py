"""A full tiny grid: leaderboard files exist and agree with the results table; caching and resume work."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tests.conftest import tiny_grid
from ussbench.atomic import atomic_write_text
from ussbench.cache import Cache
from ussbench.config import load_grid
from ussbench.runner import expand_cells, run_grid


@pytest.fixture
def finished(tmp_path, toy_root):
    grid = load_grid(tiny_grid(tmp_path, toy_root))
    return grid, run_grid(grid, progress=False)


def test_full_tiny_grid_writes_consistent_leaderboard(finished):
    grid, summary = finished
    out = summary.output
    assert summary.n_cells == 2 * 2 * 2 and summary.n_run == 8
    for name in ("results.csv", "results.parquet", "leaderboard.md", "leaderboard.html", "heatmap_miou.png",
                 "miou_vs_runtime.png", "panels.png", "run.json"):  # fmt: skip
        assert (out / name).is_file(), name
    results = pd.read_parquet(out / "results.parquet")
    assert len(results) == 8
    assert set(results.seed) == {0, 1}
    for col in ("params", "versions", "time_features_s", "time_total_s", "peak_rss_mb", "per_class_iou"):
        assert col in results
    assert json.loads(results.params.iloc[0])["dataset_clusterer"]["params"]["n_clusters"] == 3
    md = (out / "leaderboard.md").read_text()
    for (ic, dc), group in results.groupby(["image_clusterer", "dataset_clusterer"]):
        expected = f"{group.miou.mean():.2f} ± {group.miou.std():.2f}"
        assert any(ic in line and dc in line and expected in line for line in md.splitlines()), expected
    assert (results.miou > 0).all() and (results.miou <= 100).all()


def test_flat_colour_bands_are_recovered(tmp_path, toy_root):
    """Three flat colour bands per image: per-image k-means on random-ViT tokens + k=3 must beat chance by far."""
    grid = load_grid(
        tiny_grid(tmp_path, toy_root, seeds=[0], image_clusterers=["none"], dataset_clusterers=["kmeans"])
    )
    run_grid(grid, progress=False)
    results = pd.read_csv(grid.output / "results.csv")
    assert results.pixel_accuracy.iloc[0] > 60.0


def test_rerun_resumes_without_recomputing(finished):
    grid, _ = finished
    again = run_grid(grid, progress=False)
    assert again.n_resumed == 8 and again.n_run == 0


def test_interrupted_grid_resumes_only_missing_cells(finished, monkeypatch):
    grid, summary = finished
    cells = sorted((summary.output / "cells").glob("*.json"))
    cells[0].unlink()
    cells[3].unlink()
    calls = []
    import ussbench.backbones.vit as vit

    original = vit.TimmViTBackbone.extract
    monkeypatch.setattr(
        vit.TimmViTBackbone, "extract", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    again = run_grid(grid, progress=False)
    assert again.n_run == 2 and again.n_resumed == 6
    assert calls == [], "features must come from the disk cache, not be recomputed"


def test_progress_bar_starts_at_the_resumed_cells(finished, capsys):
    """Resumed cells are the bar's start, not instant updates (which made its rate and ETA meaningless)."""
    grid, summary = finished
    for record in sorted((summary.output / "cells").glob("*.json"))[:2]:
        record.unlink()
    capsys.readouterr()
    assert run_grid(grid, progress=True, report=False).n_run == 2
    err = capsys.readouterr().err
    assert "6/8" in err and "0/8" not in err, err[-500:]


def test_feature_cache_is_shared_and_corrupt_entries_are_recomputed(finished, monkeypatch):
    """A corrupt feature entry is moved aside and recomputed by the next run, which reproduces the numbers."""
    grid, summary = finished
    feature_files = list((grid.cache_dir / "features").glob("*.pt"))
    assert len(feature_files) == 1, "all cells share one feature extraction"
    before = pd.read_csv(summary.output / "results.csv").set_index("cell_id").sort_index()
    feature_files[0].write_bytes(b"not a torch file")
    for record in list((summary.output / "cells").glob("*.json"))[:3]:  # three cells to recompute
        record.unlink()
    calls = []
    import ussbench.backbones.vit as vit

    original = vit.TimmViTBackbone.extract
    monkeypatch.setattr(
        vit.TimmViTBackbone, "extract", lambda self, *a, **k: calls.append(1) or original(self, *a, **k)
    )
    again = run_grid(grid, progress=False)
    assert (again.n_run, again.n_resumed) == (3, 5)
    assert calls == [1], "the corrupt entry is recomputed once, not trusted"
    assert len(list((grid.cache_dir / "corrupt" / "features").iterdir())) == 1  # kept aside for inspection
    assert Cache(grid.cache_dir).load("features", feature_files[0].stem) is not None  # a valid entry again
    after = pd.read_csv(summary.output / "results.csv").set_index("cell_id").sort_index()
    assert list(after.index) == list(before.index)
    np.testing.assert_array_equal(after.miou.to_numpy(), before.miou.to_numpy())


def test_cell_order_keeps_shared_stages_adjacent(tmp_path, toy_root):
    cells = expand_cells(load_grid(tiny_grid(tmp_path, toy_root)))
    seeds = [c.seed for c in cells]
    assert seeds == sorted(seeds)


def test_exclude_removes_cells(tmp_path, toy_root):
    grid = load_grid(
        tiny_grid(
            tmp_path, toy_root, exclude=[{"image_clusterer": "none", "dataset_clusterer": "km-sklearn"}]
        )
    )
    assert len(expand_cells(grid)) == 6


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")

    class Boom(Exception):
        pass

    from ussbench.atomic import atomic_write

    def fail(tmp):
        tmp.write_text("half written")
        raise Boom

    with pytest.raises(Boom):
        atomic_write(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_report_rebuild_from_cells(finished):
    from ussbench.cli import main

    _, summary = finished
    (summary.output / "leaderboard.md").unlink()
    assert main(["report", str(summary.output)]) == 0
    assert (summary.output / "leaderboard.md").is_file()


def test_background_segments_get_their_own_label(tmp_path, toy_root):
    """An image clusterer that marks a background segment: the dataset clusterer gets K-1 clusters."""
    import torch

    from ussbench import register, registry
    from ussbench.base import ImageClusterer, Segmentation

    @register("image_clusterer", "left_background_test")
    class LeftBackground(ImageClusterer):
        """Left half of the grid is background; every right-half patch is a segment."""

        def __init__(self):
            pass

        def predict(self, features, ctx):
            out = []
            for im in features:
                h, w = im.grid
                ids = torch.arange(h * w).reshape(h, w) + 1
                ids[:, : w // 2] = 0
                vec = torch.nn.functional.normalize(im.tokens.reshape(h * w, -1).float(), dim=1)
                vec = torch.cat([vec[:1], vec.reshape(h, w, -1)[:, w // 2 :].reshape(-1, vec.shape[1])])
                ids[:, w // 2 :] = torch.arange(1, 1 + h * (w - w // 2)).reshape(h, -1)
                out.append(Segmentation(ids, vec, background=0))
            return out

    try:
        grid = load_grid(
            tiny_grid(
                tmp_path,
                toy_root,
                seeds=[0],
                image_clusterers=["left_background_test"],
                dataset_clusterers=["kmeans"],
            )
        )
        run_grid(grid, progress=False)
        cell = json.loads(next((grid.output / "cells").glob("*.json")).read_text())
        assert cell["params"]["dataset_clusterer"]["params"]["n_clusters"] == 2
        assert cell["row"]["n_clusters"] == 3
        assert np.asarray(cell["confusion"]).shape == (3, 3)
    finally:
        registry.unregister("image_clusterer", "left_background_test")


def test_stego_protocol_evaluates_on_centre_crops(tmp_path, toy_root):
    """protocol name 'stego': images and labels are resized (short side res) and centre-cropped square."""
    grid = load_grid(tiny_grid(tmp_path, toy_root, seeds=[0], image_clusterers=["none"], dataset_clusterers=["kmeans"],
                               protocol={"name": "stego", "res": 32, "panels": 1}))  # fmt: skip
    assert grid.protocol["matching"] == "hungarian" and grid.protocol["res"] == 32
    run_grid(grid, progress=False)
    cell = json.loads(next((grid.output / "cells").glob("*.json")).read_text())
    # toy images are 48x64 with a void last column: a 32x32 centre crop keeps 32*32 labelled pixels
    assert cell["row"]["n_pixels"] == 32 * 32 * 6
    assert (grid.output / "panels.png").is_file()


def test_cells_of_an_earlier_grid_version_stay_out_of_the_report(tmp_path, toy_root):
    """Editing the grid and re-running into the same folder reports only the current grid's cells."""
    first = load_grid(tiny_grid(tmp_path, toy_root, seeds=[0], dataset_clusterers=["kmeans"]))
    run_grid(first, progress=False)
    second = load_grid(
        tiny_grid(tmp_path, toy_root, seeds=[0], image_clusterers=["none"], dataset_clusterers=["kmeans"])
    )
    summary = run_grid(second, progress=False)
    assert summary.n_resumed == 1 and len(list((summary.output / "cells").glob("*.json"))) == 2
    results = pd.read_csv(summary.output / "results.csv")
    assert list(results.image_clusterer) == ["none"]
    assert "km3" not in (summary.output / "leaderboard.md").read_text()


def test_a_plugin_version_bump_reruns_its_cells(tmp_path, toy_root, monkeypatch):
    """Cells are identified by their plugins' code versions too: a changed plugin is never resumed."""
    from ussbench import registry

    grid = load_grid(tiny_grid(tmp_path, toy_root, seeds=[0], dataset_clusterers=["kmeans"]))
    assert run_grid(grid, progress=False).n_run == 2
    patches = registry.get("image_clusterer", "none").cls
    monkeypatch.setattr(patches, "version", str(getattr(patches, "version", "1")) + "-changed")
    again = run_grid(grid, progress=False)
    assert (again.n_run, again.n_resumed) == (1, 1)
    assert len(pd.read_csv(again.output / "results.csv")) == 2


def test_run_time_counts_planning_and_report_not_only_the_cells(finished, monkeypatch):
    """The summary's (and run.json's) total covers planning (data fingerprints, weights) and the report: a rerun
    that resumes every cell computes nothing, yet it still took its planning time."""
    import time

    from ussbench import runner

    grid, _ = finished
    plan = runner.plan_grid

    def slow_plan(*args, **kwargs):
        time.sleep(0.3)
        return plan(*args, **kwargs)

    monkeypatch.setattr(runner, "plan_grid", slow_plan)
    again = run_grid(grid, progress=False)
    assert again.n_run == 0
    assert again.total_seconds >= again.seconds + 0.3
    last = json.loads((grid.output / "run.json").read_text())["history"][-1]
    assert last["total_seconds"] == round(again.total_seconds, 2)
    assert last["seconds"] == round(again.seconds, 2)
