"""Grid files are validated before work starts; each error is one line naming file, key and expectation."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tests.conftest import tiny_grid
from ussbench.config import load_grid
from ussbench.errors import ConfigError
from ussbench.runner import validate_grid


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
        ({"data_root": "/no/such/folder"}, r"data_root '/no/such/folder' does not exist"),
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
