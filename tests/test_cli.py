"""The command line a new user meets: bare grid names, --set, --dry-run, -v, grid composition, small --limit."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from tests.conftest import DATA, REPO, tiny_grid
from ussbench.cli import main
from ussbench.config import load_grid
from ussbench.errors import ConfigError


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def cells(out):
    return [json.loads(p.read_text()) for p in sorted((out / "cells").glob("*.json"))]


# --- bare grid names -----------------------------------------------------------------------------------------


def test_bare_grid_name_finds_the_shipped_grid_from_any_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("msrc_grid.yaml", "msrc_grid", str(REPO / "benchmarks" / "msrc_grid.yaml")):
        grid = load_grid(name)
        assert grid.path.resolve() == REPO / "benchmarks" / "msrc_grid.yaml"
        assert grid.data_root == str(DATA)
    (tmp_path / "msrc_grid.yaml").write_text("name: mine\ndatasets: [msrc_v2]\nbackbones: [random_vit]\n"
                                             "image_clusterers: [none]\ndataset_clusterers: [kmeans]\n")  # fmt: skip
    assert load_grid("msrc_grid.yaml").name == "mine", "a path (here: the current folder) comes first"


# --- grid composition ------------------------------------------------------------------------------------------


def test_base_grid_keys_are_inherited_and_overridden(tmp_path, toy_root):
    base = tiny_grid(tmp_path, toy_root)
    data = yaml.safe_load(base.read_text())
    data["data_root"] = "toy"  # relative to the base file's folder, not to the current folder
    data["description"] = "the base"
    base.write_text(yaml.safe_dump(data))
    sub = tmp_path / "sub"
    sub.mkdir()
    child = sub / "child.yaml"
    child.write_text("base: ../grid.yaml\nname: child\nseeds: [3]\nimage_clusterers: [none]\n")
    grid = load_grid(child)
    assert grid.sources == [child.resolve(), base.resolve()]
    assert grid.name == "child" and grid.seeds == [3]
    assert grid.data_root == str(toy_root)
    assert [e.label for e in grid.stages["image_clusterers"]] == ["none"]
    assert [e.label for e in grid.stages["dataset_clusterers"]] == ["kmeans", "km-sklearn"]  # inherited
    assert grid.description == "" and grid.output == grid.output.__class__("reports/child")  # not inherited
    grandchild = sub / "grandchild.yaml"
    grandchild.write_text("base: child.yaml\nname: gc\ndataset_clusterers: [kmeans]\n")
    gc = load_grid(grandchild)
    assert gc.seeds == [3] and len(gc.sources) == 3 and len(gc.stages["dataset_clusterers"]) == 1


def test_base_cycle_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(
        ConfigError, match=r"b.yaml: key 'base' makes a cycle: .*a.yaml -> .*b.yaml -> .*a.yaml"
    ):
        load_grid(tmp_path / "a.yaml")


def test_inherited_exclude_rule_naming_a_replaced_entry_is_dropped(tmp_path, toy_root, caplog):
    base = tiny_grid(
        tmp_path, toy_root, exclude=[{"image_clusterer": "km3", "dataset_clusterer": "km-sklearn"}]
    )
    assert len(load_grid(base).exclude) == 1
    child = tmp_path / "child.yaml"
    child.write_text("base: grid.yaml\nname: child\ndataset_clusterers: [kmeans]\n")
    with caplog.at_level("WARNING", logger="ussbench.config"):
        grid = load_grid(child)
    assert (
        grid.exclude == []
    )  # the rule named 'km-sklearn', which the child no longer has: it matched nothing
    assert (
        "grid.yaml (base of" in caplog.text
        and "'km-sklearn'" in caplog.text
        and "rule dropped" in caplog.text
    )
    # the child's own rules are still checked: a typo is an error naming the child file
    child.write_text("base: grid.yaml\nname: child\nexclude: [{image_clusterer: km4}]\n")
    with pytest.raises(ConfigError, match=r"child.yaml: exclude\[0\].image_clusterer: 'km4' is no label"):
        load_grid(child)


# --- --set --------------------------------------------------------------------------------------------------


def test_set_overrides_keys_and_plugin_parameters(tmp_path, toy_root):
    path = tiny_grid(tmp_path, toy_root)
    grid = load_grid(path, sets=[
        "seeds=[4, 5]",
        "protocol.objective=iou",
        "image_clusterers.km3.n_segments=2",           # by label
        "dataset_clusterers.kmeans.n_init=2",          # by plugin name: both k-means entries
        "dataset_clusterers.1.label=sk",               # by index, an entry field
        "backbones.*.depth=1",                         # every entry
        "datasets.image_folder.limit=2",
    ])  # fmt: skip
    assert grid.seeds == [4, 5] and grid.protocol["objective"] == "iou"
    assert grid.stages["image_clusterers"][1].params == {"n_segments": 2}
    assert [e.params.get("n_init") for e in grid.stages["dataset_clusterers"]] == [2, 2]
    assert [e.label for e in grid.stages["dataset_clusterers"]] == ["kmeans n_init=2", "sk"]
    assert grid.stages["backbones"][0].params["depth"] == 1
    assert grid.stages["datasets"][0].params["limit"] == 2
    assert grid.sets and load_grid(path).seeds == [0, 1], "the file itself is unchanged"


def test_set_values_are_validated_like_the_file(tmp_path, toy_root):
    path = tiny_grid(tmp_path, toy_root)
    with pytest.raises(
        ConfigError, match=r"grid.yaml \(with --set\): key 'seeds'\[0\]: expected an integer seed"
    ):
        load_grid(path, sets=["seeds=[-3]"])
    with pytest.raises(ConfigError, match=r"no parameter 'n_segmnts'"):
        load_grid(path, sets=["image_clusterers.km3.n_segmnts=2"])
    with pytest.raises(ConfigError, match=r"protocol: unknown key 'panel'"):
        load_grid(path, sets=["protocol.panel=2"])
    with pytest.raises(
        ConfigError, match=r"--set image_clusterers.km3: expected image_clusterers.ENTRY.PARAM=VALUE"
    ):
        load_grid(path, sets=["image_clusterers.km3=2"])
    with pytest.raises(
        ConfigError, match=r"--set seeds: not valid YAML: line 1, column 3: expected ',' or ']'"
    ):
        load_grid(path, sets=["seeds=[0"])


# --- a small run end to end: --dry-run, -v, --set, --limit ------------------------------------------------------


def test_dry_run_lists_cells_then_finished_ones_and_v_shows_each_cells_miou(tmp_path, toy_root, capsys):
    grid = tiny_grid(tmp_path, toy_root)
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "run", "--grid", grid, "--dry-run", "--seeds", 0)
    assert code == 0 and not out.exists() and not (tmp_path / "cache").exists(), "a dry run writes nothing"
    assert "cache is empty" in stdout and "exclude rule" not in stdout  # no rules: none mentioned
    listed = [line for line in stdout.splitlines() if line.startswith("  to run ")]
    assert len(listed) == 4 and "0 finished, 4 to run" in stdout
    assert any("km3" in line and "km-sklearn" in line and "seed 0" in line for line in listed)

    code, _, stderr = run_cli(capsys, "run", "--grid", grid, "--seeds", 0, "--no-progress", "--no-report")
    assert code == 0 and "mIoU" not in stderr, "info messages are hidden by default"
    (out / "cells" / next(iter(sorted((out / "cells").glob("*.json")))).name).unlink()
    code, _, stderr = run_cli(
        capsys, "run", "--grid", grid, "--seeds", 0, "--no-progress", "--no-report", "-v"
    )
    assert code == 0 and len([line for line in stderr.splitlines() if "mIoU" in line]) == 1
    code, stdout, _ = run_cli(capsys, "-v", "run", "--grid", grid, "--seeds", 0, "--dry-run")
    assert code == 0 and "4 finished, 0 to run" in stdout
    assert "fingerprints" not in stdout.split("to run;")[1]  # file hashes are no stage values
    assert len([line for line in stdout.splitlines() if line.startswith("  finished ")]) == 4
    assert re.search(r"stage values already cached: features 1/1", stdout), stdout

    # damaged files: the dry run says what a run would recompute, and moves nothing
    arrays = sorted((out / "cells").glob("*.npz"))[0]
    arrays.write_bytes(arrays.read_bytes()[:100])
    features = next((tmp_path / "cache" / "features").glob("*.pt"))
    features.write_bytes(features.read_bytes()[:1000])
    code, stdout, _ = run_cli(capsys, "run", "--grid", grid, "--seeds", 0, "--dry-run")
    assert code == 0 and "3 finished, 1 to run (1 with damaged files, recomputed)" in stdout, stdout
    assert re.search(r"stage values already cached: features 0/1", stdout), stdout
    assert arrays.is_file() and features.is_file() and not (out / "cells" / "corrupt").exists()


def test_more_clusters_than_vectors_clip_on_a_limited_run_and_are_refused_otherwise(
    tmp_path, toy_root, capsys
):
    """Every patch a segment (no static bound): 6 images of 2x3 patches give 36 vectors, 1 image 6; k = 40."""
    grid = tiny_grid(tmp_path, toy_root, seeds=[0], image_clusterers=["none"],
                     dataset_clusterers=[{"name": "kmeans", "params": {"n_clusters": 40}}])  # fmt: skip
    code, stdout, stderr = run_cli(capsys, "run", "--grid", grid, "--no-progress", "--no-report")
    # the count is only known once the image-level stage ran: the cell fails (recorded, one line), exit 1
    assert code == 1 and "Traceback" not in stderr, stderr
    assert "1 cells (0 run, 0 resumed, 1 failed)" in stdout and "(no report written)" in stdout, stdout
    assert "cell image_folder" in stderr and "| none | kmeans | none | seed 0: kmeans asks" in stderr
    assert "asks for 40 clusters but the image-level stage gave 36 vectors" in stderr
    assert cells(tmp_path / "out") == [], "the refused cell left no result record"
    (failed,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "cells" / "failed").glob("*.json")]
    assert "asks for 40 clusters" in failed["row"]["error"]
    code, _, stderr = run_cli(capsys, "run", "--grid", grid, "--no-progress", "--no-report", "--limit", 1)
    assert code == 0, stderr
    (record,) = cells(tmp_path / "out")
    assert record["row"]["n_clusters"] == 6 and record["row"]["n_segments"] == 6
    assert record["row"]["note"] == "n_clusters clipped from 40 to 6: only 6 vectors (dataset limit)"
    # a limit that covers the whole dataset (6 images) is the full run: the same cell, refused again
    code, _, stderr = run_cli(capsys, "run", "--grid", grid, "--no-progress", "--no-report", "--limit", 100)
    assert code == 1 and "asks for 40 clusters but the image-level stage gave 36 vectors" in stderr, stderr
    (again,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "cells" / "failed").glob("*.json")]
    assert again["row"]["cell_id"] == failed["row"]["cell_id"]


@pytest.mark.slow
def test_readme_grid_runs_with_one_image(tmp_path, capsys):
    """--limit 1 on the README grid (per-image k-means, DSM, ACG, HSG x k-means, OTC, ABC; raw tokens x k-means)
    runs all cells, clipping the 21 clusters to the few segments of one image; a random ViT stands in for DINOv2."""
    backbone = (
        "backbones=[{name: random_vit, params: {depth: 1, resolution: 56, arch: vit_small_patch14_dinov2}}]"
    )
    code, stdout, stderr = run_cli(
        capsys, "run", "--grid", "msrc_grid.yaml", "--limit", 1, "--seeds", 0, "--set", backbone,
        "--set", "image_clusterers.acg.epochs=1", "--set", "dataset_clusterers.abc.epochs=2",
        "--output", tmp_path / "out", "--cache-dir", tmp_path / "cache", "--no-progress", "--no-report",
    )  # fmt: skip
    assert code == 0, stderr
    assert "13 cells (13 run, 0 resumed)" in stdout
    assert "stage combination(s) have fewer vectors than clusters" in stderr
    records = cells(tmp_path / "out")
    assert len(records) == 13
    for record in records:
        row = record["row"]
        assert row["n_images"] == 1 and 0.0 <= row["miou"] <= 100.0
        assert row["n_clusters"] <= row["n_segments"] + 1  # + the background cluster of DSM's border segment
        if row["image_clusterer"].startswith("raw tokens"):  # every patch a segment: enough vectors, no clip
            assert row["n_clusters"] == 21 and "clipped" not in row.get("note", "")
        else:
            assert "note" in row and "clipped" in row["note"]


def test_ci_runs_exactly_the_readme_test_command_and_the_readme_grid_resolves():
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Two commands")[1].split("```bash")[1].split("```")[0]
    commands = [line for line in block.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    ci = [
        line
        for line in (REPO / ".ci" / "run").read_text().splitlines()
        if line and not line.startswith(("#", "set ", "cd "))
    ]
    assert ci == [commands[1]], "CI must run exactly the README's test command"
    grid = commands[0].split("--grid", 1)[1].split()[0]
    assert load_grid(grid).stages["datasets"][0].name == "msrc_v2"


def test_an_installed_copy_finds_its_grids_and_data_under_share(tmp_path, monkeypatch):
    """A non-editable install has no checkout beside the package: grids and data come from <prefix>/share."""
    import sysconfig

    from ussbench import paths

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    share = tmp_path / "prefix" / "share" / "ussbench"
    (share / "benchmarks").mkdir(parents=True)
    (share / "data").mkdir()
    (share / "benchmarks" / "g.yaml").write_text("name: g\n")
    monkeypatch.setattr(paths, "PACKAGE_DIR", tmp_path / "site-packages" / "ussbench")
    real_get_path = sysconfig.get_path
    monkeypatch.setattr(
        sysconfig,
        "get_path",
        lambda name, *a, **k: str(tmp_path / "prefix") if name == "data" else real_get_path(name, *a, **k),
    )
    monkeypatch.chdir(tmp_path)
    assert paths.resolve_grid_path("g.yaml") == share / "benchmarks" / "g.yaml"
    assert paths.default_data_root() == share / "data"
    # ... and pyproject.toml really ships them there: every data-files pattern matches shipped files
    data_files = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    shipped = {
        target: sorted(REPO.glob(pattern)) for target, patterns in data_files.items() for pattern in patterns
    }
    assert all(shipped.values()), {t: len(f) for t, f in shipped.items()}
    assert sum(len(f) for t, f in shipped.items() if "msrc_v2" in t) == 2 * 591
    assert sum(len(f) for t, f in shipped.items() if "camvid" in t) == 2 * 233
    assert {p.name for p in shipped["share/ussbench/benchmarks"]} >= {
        "msrc_grid.yaml",
        "camvid_grid.yaml",
        "voc_grid.yaml",
    }


def test_a_grid_may_extend_the_shipped_grid_of_its_own_name(tmp_path):
    (tmp_path / "msrc_grid.yaml").write_text("base: msrc_grid.yaml\nname: my_msrc\nseeds: [7]\n")
    grid = load_grid(tmp_path / "msrc_grid.yaml")
    assert grid.sources == [tmp_path / "msrc_grid.yaml", REPO / "benchmarks" / "msrc_grid.yaml"]
    assert grid.seeds == [7] and grid.name == "my_msrc" and len(grid.stages["image_clusterers"]) == 5
