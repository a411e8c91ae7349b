"""Every grid file shipped in benchmarks/ parses, names known plugins with valid parameters, and has >= 3 seeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from ussbench.config import load_grid
from ussbench.pipeline import build_plugin
from ussbench.runner import _validation_injections, expand_cells

GRIDS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("*.yaml"))


def test_there_are_shipped_grids():
    names = {p.stem for p in GRIDS}
    assert {"msrc_grid", "camvid_grid", "voc_grid", "omh_grid", "hsg_table4_grid"} <= names


@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_shipped_grid_is_valid(path):
    grid = load_grid(path)
    assert len(grid.seeds) >= 3, f"{path.name}: fewer than 3 seeds"
    for entries in grid.stages.values():
        for entry in entries:
            if not entry.skipped and entry.kind != "dataset":  # datasets need their data root (VOC: yours)
                build_plugin(entry, _validation_injections(entry, grid))
    assert expand_cells(grid), f"{path.name}: every cell excluded"
