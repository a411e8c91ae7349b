"""Every grid file shipped in benchmarks/ parses, names known plugins with valid parameters, has >= 3 seeds
and, except VOC (bring your own copy), finds its data in the repo's data/ folder wherever it runs from."""

from __future__ import annotations

import pytest

from tests.conftest import DATA, REPO
from ussbench.config import STAGE_KEYS, load_grid
from ussbench.errors import ConfigError
from ussbench.pipeline import build_plugin
from ussbench.runner import _validation_injections, expand_cells, validate_grid

GRIDS = sorted((REPO / "benchmarks").glob("*.yaml"))
NOT_SHIPPED = {"voc_grid"}  # data we cannot ship: the grid must say which flag to pass


def test_there_are_shipped_grids():
    names = {p.stem for p in GRIDS}
    assert {"msrc_grid", "camvid_grid", "voc_grid", "omh_grid", "hsg_table4_grid"} <= names


@pytest.mark.parametrize("path", GRIDS, ids=[p.stem for p in GRIDS])
def test_shipped_grid_is_valid_from_any_folder(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may depend on the current folder
    grid = load_grid(path.name)  # a bare name finds the shipped grid
    assert grid.path.resolve() == path.resolve()
    assert len(grid.seeds) >= 3, f"{path.name}: fewer than 3 seeds"
    assert grid.data_root == str(DATA), "shipped grids read the repo's data/ by default"
    for entries in grid.stages.values():
        for entry in entries:
            if not entry.skipped and entry.kind != "dataset":
                build_plugin(entry, _validation_injections(entry, grid))
    if path.stem in NOT_SHIPPED:
        with pytest.raises(
            ConfigError, match=r"datasets\[0\] \(voc2012\): .*VOCdevkit.*pass --data-root DIR"
        ):
            validate_grid(grid)
    else:
        for entry in grid.stages["datasets"]:
            dataset = build_plugin(entry, {"data_root": grid.data_root})
            dataset.check()  # every image and label of the shipped data, sizes included
            assert len(dataset) in (591, 233)
    assert expand_cells(grid), f"{path.name}: every cell excluded"


def test_camvid_grids_are_the_msrc_grids_on_camvid():
    """Grid composition: camvid_grid.yaml is msrc_grid.yaml (its base) with CamVid as the dataset."""
    for msrc_name, camvid_name in (("msrc_grid", "camvid_grid"), ("msrc_full_grid", "camvid_full_grid")):
        msrc, camvid = load_grid(f"{msrc_name}.yaml"), load_grid(f"{camvid_name}.yaml")
        assert [e.name for e in camvid.stages["datasets"]] == ["camvid"]
        for key in STAGE_KEYS:
            if key != "datasets":
                assert camvid.stages[key] == msrc.stages[key], key
        assert (camvid.seeds, camvid.protocol) == (msrc.seeds, msrc.protocol)
        assert camvid.name != msrc.name and camvid.output != msrc.output  # never inherited
        assert len(camvid.sources) == len(msrc.sources) + 1


def test_reports_show_project_paths_relative_and_others_as_given(tmp_path):
    """A committed report's header names its grid file without this machine's folder names."""
    from ussbench.paths import PACKAGE_DIR, display_path

    assert display_path(PACKAGE_DIR.parent / "benchmarks" / "msrc_grid.yaml") == "benchmarks/msrc_grid.yaml"
    elsewhere = "/some/other/clone/benchmarks/msrc_grid.yaml"  # as a committed run.json may hold it
    assert display_path(elsewhere) == "benchmarks/msrc_grid.yaml"
    outside = tmp_path / "my_grid.yaml"
    assert display_path(outside) == str(outside)
    assert display_path(None) == "?"
