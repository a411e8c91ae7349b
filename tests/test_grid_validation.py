"""Grid files are validated before work starts; each error is one line naming file, key and expectation."""

from __future__ import annotations

import re
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import yaml

from tests.conftest import tiny_grid
from ussbench import registry
from ussbench.cli import main
from ussbench.config import load_grid
from ussbench.errors import ConfigError, PluginError
from ussbench.runner import expand_cells, validate_grid


def edit(path, **changes):
    data = yaml.safe_load(path.read_text())
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


def test_valid_grid_loads(tmp_path, toy_root):
    grid = load_grid(tiny_grid(tmp_path, toy_root))
    assert [e.label for e in grid.stages["image_clusterers"]] == ["none", "km3"]
    assert grid.stages["feature_learners"][0].skipped
    validate_grid(grid)


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"imagee_clusterers": ["none"]},
            r"grid.yaml: unknown key 'imagee_clusterers' \(did you mean 'image_clusterers'\?\)",
        ),
        (
            {"dataset_clusterers": ["kmeanz"]},
            r"grid.yaml: dataset_clusterers\[0\]: unknown dataset_clusterer plugin 'kmeanz'.*did you mean 'kmeans'",
        ),
        (
            {"image_clusterers": [{"name": "kmeans_per_image", "params": {"n_segmnts": 3}}]},
            r"image_clusterers\[0\]\.params: .*no parameter 'n_segmnts'",
        ),
        (
            {"image_clusterers": [{"name": "kmeans_per_image", "params": {"n_segments": "3"}}]},
            r"parameter 'n_segments' .* expects int, got '3'",
        ),
        ({"seeds": ["zero"]}, r"key 'seeds'\[0\]: expected int"),
        (
            {"protocol": {"matching": "greedy"}},
            r"protocol\.matching: expected one of auto, hungarian, many_to_one",
        ),
        ({"data_root": "/no/such/folder"}, r"key 'data_root': data folder '/no/such/folder' does not exist"),
        ({"image_clusterers": [{"name": "kmeans_per_image", "preset": "fast"}]}, r"unknown preset 'fast'"),
        ({"device": "tpu"}, r"key 'device' expects auto, cpu, cuda"),
    ],
)
def test_load_errors_name_file_and_key(tmp_path, toy_root, changes, message):
    path = edit(tiny_grid(tmp_path, toy_root), **changes)
    with pytest.raises(ConfigError, match=message):
        load_grid(path)


def test_missing_weight_file_fails_before_work(tmp_path, toy_root):
    path = edit(
        tiny_grid(tmp_path, toy_root),
        backbones=[{"name": "dino_vits16", "params": {"weights": "/nope/dino.pth"}}],
    )
    grid = load_grid(path)
    with pytest.raises(
        ConfigError, match=r"backbones\[0\] \(dino_vits16\): weights file '/nope/dino.pth' .* does not exist"
    ):
        validate_grid(grid)
    assert not (tmp_path / "out").exists()


def test_plugin_parameters_are_checked_before_any_backbone_check(tmp_path, toy_root, monkeypatch):
    """A bad clusterer parameter is reported before a backbone's check() (which may convert weights) runs."""
    from ussbench.backbones.dino import RandomViT

    checked = []
    monkeypatch.setattr(RandomViT, "check", lambda self: checked.append(self))
    path = edit(tiny_grid(tmp_path, toy_root), image_clusterers=[{"name": "acg", "params": {"epochs": -1}}])
    with pytest.raises(ConfigError, match=r"image_clusterers\[0\] \(acg\): epochs must be >= 0") as err:
        validate_grid(load_grid(path))
    assert "acg: acg" not in str(err.value) and "--set" not in str(err.value)  # the plugin is named once
    assert checked == []
    with pytest.raises(ConfigError, match=r"\(with --set\): image_clusterers\[0\] \(acg\): epochs"):
        valid = edit(
            tiny_grid(tmp_path, toy_root), image_clusterers=[{"name": "acg", "params": {"epochs": 1}}]
        )
        validate_grid(load_grid(valid, sets=["image_clusterers.acg.epochs=-1"]))
    validate_grid(load_grid(tiny_grid(tmp_path, toy_root)))
    assert len(checked) == 1  # a valid grid still runs the backbone's check


def test_missing_dataset_folder_fails_before_work(tmp_path, toy_root):
    path = edit(tiny_grid(tmp_path, toy_root), datasets=[{"name": "msrc_v2"}])
    with pytest.raises(ConfigError, match=r"datasets\[0\] \(msrc_v2\): .*msrc_v2.* does not exist"):
        validate_grid(load_grid(path))


def test_cli_reports_one_line_error(tmp_path, toy_root):
    path = edit(tiny_grid(tmp_path, toy_root), dataset_clusterers=["kmeanz"])
    proc = subprocess.run(
        [sys.executable, "-m", "ussbench", "run", "--grid", str(path)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ussbench: error:") and "kmeanz" in lines[0]


# --- strict YAML, seeds, exclude rules, labels, plugins: one line each before any work ----------------------


def write_text(path, text):
    path.write_text(text)
    return path


def test_yaml_1_2_floats_are_floats(tmp_path, toy_root):
    """'2e-2' (no dot) is a float, as YAML 1.2 and Hydra read it; YAML 1.1 would give the string '2e-2'."""
    path = tiny_grid(tmp_path, toy_root)
    text = path.read_text().replace(
        "- kmeans\n", "- {name: otc, params: {epsilon: 2e-2, sinkhorn_iter: 1e1}}\n", 1
    )
    assert "epsilon: 2e-2" in text
    with pytest.raises(
        ConfigError, match=r"parameter 'sinkhorn_iter' of dataset_clusterer 'otc' expects int, got 10.0"
    ):
        load_grid(write_text(path, text))  # 1e1 is the float 10.0, not an integer
    grid = load_grid(write_text(path, text.replace(", sinkhorn_iter: 1e1", "")))
    assert grid.stages["dataset_clusterers"][0].params == {"epsilon": 0.02}
    assert yaml.safe_load("x: 2e-2")["x"] == "2e-2", "PyYAML's own loader still reads YAML 1.1"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "name: a\nseeds: [0]\nname: b\n",
            r"grid.yaml: not valid YAML: line 3, column 1: duplicate key 'name' \(first set on line 1\)",
        ),
        ("protocol: {panels: 2, panels: 3}\n", r"line 1, column 23: duplicate key 'panels'"),
        (
            "name: a\nseeds: [0, 1\ndevice: cpu\n",
            r"grid.yaml: not valid YAML: line 3, column 7: .*flow sequence on line 2",
        ),
        ("- just\n- a list\n", r"expected a mapping of keys at the top level, got list"),
    ],
)
def test_yaml_faults_keep_file_line_and_column(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_grid(write_text(tmp_path / "grid.yaml", text))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"seeds": [-1]}, r"key 'seeds'\[0\]: expected an integer seed in 0..2\*\*32-1, got -1"),
        ({"seeds": [True]}, r"key 'seeds'\[0\]: expected int, got True"),
        ({"seeds": [0, 1, 0]}, r"key 'seeds': seed 0 is listed twice"),
        ({"seeds": []}, r"key 'seeds' must list at least one"),
        ({"protocol": {"panels": 2, "crf_mode": "soft"}}, r"protocol: unknown key 'crf_mode'"),
        (
            {"exclude": [{"image_clusterer": "km4"}]},
            r"exclude\[0\]\.image_clusterer: 'km4' is no label or plugin name of image_clusterers \(labels: 'none', 'km3'\)",
        ),
        ({"exclude": [{}]}, r"exclude\[0\]: an empty rule would exclude every cell"),
        (
            {"exclude": [{"dataset_clusterer": "kmeans"}]},
            r"exclude: the rules exclude every cell of the grid",
        ),
        (
            {
                "image_clusterers": [
                    {"name": "kmeans_per_image", "label": "a"},
                    {"name": "none", "label": "a"},
                ]
            },
            r"image_clusterers\[0\] and \[1\] share the label 'a'",
        ),
        (
            {
                "image_clusterers": [
                    {"name": "kmeans_per_image", "params": {"n_segments": 3}},
                    {"name": "kmeans_per_image", "params": {"n_segments": 3}, "label": "b"},
                ]
            },
            r"image_clusterers\[0\] .* and \[1\] \('b'\) are the same plugin with the same parameters",
        ),
        (
            {"base": "no_such_grid.yaml"},
            r"grid file 'no_such_grid.yaml' does not exist \(looked in .*\); shipped grids: .*msrc_grid.yaml",
        ),
        ({"output": 3}, r"key 'output' expects a path string, got 3"),
    ],
)
def test_more_load_errors_name_file_and_key(tmp_path, toy_root, changes, message):
    path = edit(tiny_grid(tmp_path, toy_root), **changes)
    with pytest.raises(ConfigError, match=message):
        load_grid(path)


def test_an_exclude_rule_may_name_a_plugin_or_a_label(tmp_path, toy_root):
    path = edit(
        tiny_grid(tmp_path, toy_root), exclude=[{"image_clusterer": "km3", "dataset_clusterer": "kmeans"}]
    )
    grid = load_grid(path)
    cells = expand_cells(grid)
    assert len(cells) == 2 * (2 * 2 - 2)  # km3 x (kmeans, km-sklearn: both kmeans plugins) gone, per seed
    assert all(c.entry("image_clusterer").label == "none" for c in cells)


def test_plugin_module_that_raises_on_import_is_one_line(tmp_path, toy_root):
    bad = write_text(tmp_path / "bad_plugin.py", "import math\n\nVALUE = 1 / 0\n")
    with pytest.raises(
        PluginError,
        match=r"grid.yaml: plugins\[0\]: plugin module '.*bad_plugin.py' raised ZeroDivisionError on import \(line 3\): division by zero",
    ):
        load_grid(edit(tiny_grid(tmp_path, toy_root), plugins=[str(bad)]))
    write_text(tmp_path / "syntax_plugin.py", "x = 1\ndef broken(:\n")
    with pytest.raises(
        PluginError,
        match=r"plugins\[0\]: plugin module '.*syntax_plugin.py' raised SyntaxError on import \(line 2\)",
    ):
        load_grid(
            edit(tiny_grid(tmp_path, toy_root), plugins=["syntax_plugin.py"])
        )  # relative to the grid file


def test_dotted_plugin_module_that_raises_names_its_line(tmp_path, monkeypatch):
    package = tmp_path / "site" / "acme_broken"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "plugins.py").write_text("import os\n\nraise RuntimeError('no licence server')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(
        PluginError,
        match=r"plugin module 'acme_broken.plugins' raised RuntimeError on import \(line 3\): no licence server",
    ):
        registry.import_plugin_module("acme_broken.plugins")


# --- fault injection through the command line: exit 2, one line, nothing written ---------------------------


def _grid_text(tmp_path, toy_root, text):
    path = tiny_grid(tmp_path, toy_root)
    return ["run", "--grid", str(write_text(path, path.read_text() + text))]


def _edited(**changes):
    return lambda tmp_path, toy_root: ["run", "--grid", str(edit(tiny_grid(tmp_path, toy_root), **changes))]


def _label_of_another_size(tmp_path, toy_root):
    from PIL import Image

    Image.fromarray(np.zeros((10, 10), dtype=np.uint8), mode="L").save(toy_root / "labels" / "img04.png")
    return ["run", "--grid", str(tiny_grid(tmp_path, toy_root))]


def _plugin_raising(tmp_path, toy_root):
    write_text(tmp_path / "boom.py", "raise ImportError('needs libfoo')\n")
    return ["run", "--grid", str(edit(tiny_grid(tmp_path, toy_root), plugins=["boom.py"]))]


def _a_file(tmp_path):
    write_text(tmp_path / "a_file", "not a folder\n")
    return tmp_path / "a_file"


def _plugin_named_kmeans(tmp_path, toy_root):
    write_text(
        tmp_path / "my_kmeans.py",
        "from ussbench.base import DatasetClusterer\nfrom ussbench.registry import register\n\n\n"
        "@register('dataset_clusterer', 'kmeans')\nclass KMeans(DatasetClusterer):\n"
        "    def __init__(self, n_clusters: int = 3):\n        self.n_clusters = n_clusters\n",
    )
    return ["run", "--grid", str(edit(tiny_grid(tmp_path, toy_root), plugins=["my_kmeans.py"]))]


def _plugin_exiting(tmp_path, toy_root):
    write_text(tmp_path / "quits.py", "import sys\n\nsys.exit(3)\n")
    return ["run", "--grid", str(edit(tiny_grid(tmp_path, toy_root), plugins=["quits.py"]))]


def _tiny(*extra):
    return lambda tmp_path, toy_root: ["run", "--grid", str(tiny_grid(tmp_path, toy_root)), *extra]


FAULTS = {
    "duplicate key": (
        lambda t, r: _grid_text(t, r, "seeds: [0]\n"),
        r"line \d+, column 1: duplicate key 'seeds' \(first set on line \d+\)",
    ),
    "yaml syntax": (
        lambda t, r: _grid_text(t, r, "exclude: [{a: 1}\n"),
        r"not valid YAML: line \d+, column \d+: ",
    ),
    "negative seed": (
        _edited(seeds=[-1]),
        r"key 'seeds'\[0\]: expected an integer seed in 0..2\*\*32-1, got -1",
    ),
    "boolean seed": (_edited(seeds=[True]), r"key 'seeds'\[0\]: expected int, got True"),
    "exclude matches nothing": (
        _edited(exclude=[{"dataset_clusterer": "kmeens"}]),
        r"exclude\[0\]\.dataset_clusterer: 'kmeens' is no label or plugin name",
    ),
    "unknown protocol key": (
        _edited(protocol={"objectiv": "iou"}),
        r"protocol: unknown key 'objectiv' \(did you mean 'objective'\?\)",
    ),
    "plugin raises on import": (
        _plugin_raising,
        r"plugins\[0\]: plugin module '.*boom.py' raised ImportError on import \(line 1\): needs libfoo",
    ),
    "duplicate labels": (
        _edited(dataset_clusterers=[{"name": "kmeans", "label": "k"}, {"name": "otc", "label": "k"}]),
        r"dataset_clusterers\[0\] and \[1\] share the label 'k'",
    ),
    "label size": (
        _label_of_another_size,
        r"datasets\[0\] \(image_folder\): label file .*img04.png' is 10x10 but its image 'img04.png' is 64x48",
    ),
    "clusters above vectors": (
        _edited(
            dataset_clusterers=[{"name": "kmeans", "params": {"n_clusters": 40}}],
            image_clusterers=[{"name": "kmeans_per_image", "params": {"n_segments": 3}}],
        ),
        r"image_folder.* x kmeans_per_image n_segments=3 x kmeans: 40 clusters but at most 18 segment vectors \(6 images x 3 segments\)",
    ),
    "limit 0": (
        _tiny("--limit", "0"),
        r"argument --limit: expected a positive integer \(number of images\), got 0",
    ),
    "set unknown key": (
        _tiny("--set", "sedes=[0]"),
        r"--set sedes: unknown grid key 'sedes' \(did you mean 'seeds'\?\)",
    ),
    "set no entry": (
        _tiny("--set", "image_clusterers.acg.epochs=5"),
        r"--set image_clusterers.acg.epochs: no entry of image_clusterers is labelled or named 'acg' \(entries: 'none', 'km3'\)",
    ),
    "set wrong type": (
        _tiny("--set", "image_clusterers.km3.n_segments=three"),
        r"image_clusterers\[1\]\.params: parameter 'n_segments' of image_clusterer 'kmeans_per_image' expects int, got 'three'",
    ),
    "set not key=value": (_tiny("--set", "seeds"), r"--set 'seeds': expected KEY=VALUE"),
    "grid not found": (
        lambda t, r: ["run", "--grid", str(t / "nope.yaml")],
        r"grid file '.*nope.yaml' does not exist",
    ),
    "data root missing": (
        _tiny("--data-root", "/no/such/data"),
        r"data folder '/no/such/data' does not exist \(pass --data-root DIR\)",
    ),
    "report on an empty folder": (
        lambda t, r: (t / "out").mkdir() or ["report", str(t / "out")],
        r"holds no finished cells .*: not a grid output folder",
    ),
    "output under a file": (
        lambda t, r: _tiny("--output", str(_a_file(t) / "out"))(t, r),
        r"--output: '.*a_file/out' lies under '.*a_file', which is a file, not a folder",
    ),
    "cache under a file (dry run)": (
        lambda t, r: _tiny("--cache-dir", str(_a_file(t) / "c"), "--dry-run")(t, r),
        r"--cache-dir: '.*a_file/c' lies under '.*a_file', which is a file, not a folder",
    ),
    "output in the grid under a file": (
        lambda t, r: ["run", "--grid", str(edit(tiny_grid(t, r), output=str(_a_file(t) / "o")))],
        r"grid.yaml: key 'output': '.*a_file/o' lies under",
    ),
    "seed flag": (_tiny("--seeds", "-1"), r"ussbench: error: --seeds\[0\]: expected an integer seed"),
    "device flag": (_tiny("--device", "tpu"), r"ussbench: error: --device expects auto, cpu"),
    "abbreviated flag": (_tiny("--seed", "0"), r"ussbench: error: unrecognized arguments: --seed 0"),
    "data root is a file": (
        lambda t, r: _tiny("--data-root", str(_a_file(t)))(t, r),
        r"--data-root: '.*a_file' is a file, not a data folder",
    ),
    "grid is a folder": (
        lambda t, r: ["run", "--grid", str(t)],
        r"grid file '.*' is a folder \(.*\), not a grid file",
    ),
    "report on a file": (
        lambda t, r: ["report", str(_a_file(t))],
        r"report folder '.*a_file' is a file",
    ),
    "resolution below a patch": (
        _edited(backbones=[{"name": "random_vit", "params": {"depth": 1, "resolution": 8}}]),
        r"backbones\[0\] \(random_vit\): 'resolution' must be at least 16 pixels \(one 16-pixel patch",
    ),
    "backbone batch size 0": (
        _edited(backbones=[{"name": "random_vit", "params": {"depth": 1, "batch_size": 0}}]),
        r"backbones\[0\] \(random_vit\): 'batch_size' must be at least 1, got 0",
    ),
    "dataset limit 0 in the grid": (
        _edited(datasets=[{"name": "image_folder", "params": {"num_classes": 3, "limit": 0}}]),
        r"datasets\[0\] \(image_folder\): .*'limit' must be a positive number of images or null \(all\), got 0",
    ),
    "plugin takes a built-in name": (
        _plugin_named_kmeans,
        r"plugins\[0\]: .*'kmeans' is already registered by ussbench\.dataset_clusterers\.kmeans\.KMeansClusterer; "
        r"KMeans in .*my_kmeans\.py must register its class under another name",
    ),
    "panels not a number": (
        _tiny("--set", "protocol.panels=abc"),
        r"protocol\.panels: expected int, got 'abc'",
    ),
    "negative panels": (_edited(protocol={"panels": -1}), r"protocol\.panels: expected at least 0, got -1"),
    "res zero": (_edited(protocol={"res": 0}), r"protocol\.res: expected at least 1, got 0"),
    "name with a slash": (
        _tiny("--set", "name=/tmp/elsewhere"),
        r"key 'name' \('/tmp/elsewhere'\) names the report folder",
    ),
    "bare seed count": (
        _edited(seeds=3),
        r"key 'seeds' expects a list of seeds, got the number 3: write \[3\] for that one seed, or \[0, 1, 2\] for 3 seeds",
    ),
    "per-image k-means n_init 0": (
        _edited(image_clusterers=[{"name": "kmeans_per_image", "params": {"n_init": 0}}]),
        r"image_clusterers\[0\] \(kmeans_per_image\): n_init must be >= 1, got 0",
    ),
    "a bad parameter on a limited grid that would clip": (
        lambda t, r: (
            _edited(
                dataset_clusterers=[{"name": "kmeans", "params": {"n_clusters": 40}}],
                image_clusterers=[{"name": "kmeans_per_image", "params": {"n_segments": 3, "max_iter": -1}}],
            )(t, r)
            + ["--limit", "2"]
        ),
        r"^ussbench: error: .*max_iter must be >= 1, got -1",  # the only line: no clipping note before it
    ),
    "base names the grid itself": (
        lambda t, r: ["run", "--grid", str(edit(tiny_grid(t, r), base="grid.yaml"))],
        r"grid.yaml: key 'base' \('grid.yaml'\) names this grid file itself; name the grid it extends",
    ),
    "plugin exits on import": (
        _plugin_exiting,
        r"plugins\[0\]: plugin module '.*quits.py' raised SystemExit on import \(line 3\): 3",
    ),
    "report on a missing folder": (
        lambda t, r: ["report", str(t / "nothing")],
        r"report folder '.*nothing' does not exist",
    ),
}


@pytest.mark.parametrize("case", list(FAULTS), ids=list(FAULTS))
def test_malformed_input_exits_2_with_one_line_and_writes_nothing(case, tmp_path, toy_root, capsys):
    build, message = FAULTS[case]
    argv = build(tmp_path, toy_root)
    parser_error = case in ("limit 0", "abbreviated flag")  # argparse's own errors exit from the parser
    with pytest.raises(SystemExit) if parser_error else nullcontext():
        code = main(argv)
    if parser_error:
        code = 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1 and lines[0].startswith("ussbench: error: "), captured.err
    assert re.search(message, lines[0]), lines[0]
    if case != "report on an empty folder":
        assert not (tmp_path / "out").exists(), "nothing may be written to the output folder"
    else:
        assert list((tmp_path / "out").iterdir()) == []
    assert not (tmp_path / "cache").exists(), "nothing may be written to the cache"
