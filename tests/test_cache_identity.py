"""The feature cache key names the data's content, not where it lies: a copy elsewhere reuses the features."""

from __future__ import annotations

import shutil

from tests.conftest import write_toy_folder
from ussbench import registry


def _identity(root):
    spec = registry.get("dataset", "image_folder")
    return registry.instantiate(spec, {"data_root": str(root), "num_classes": 3}).cache_identity()


def test_moved_data_keeps_its_cache_identity(tmp_path):
    first = write_toy_folder(tmp_path / "a" / "toy")
    shutil.copytree(first, tmp_path / "b" / "toy")
    assert _identity(first) == _identity(tmp_path / "b" / "toy")
    assert "data_root" not in _identity(first)["params"]


def test_different_images_change_the_identity(tmp_path):
    few = write_toy_folder(tmp_path / "few", n_images=4)
    many = write_toy_folder(tmp_path / "many", n_images=5)
    assert _identity(few) != _identity(many)
    (few / "images" / "img00.png").rename(few / "images" / "renamed.png")
    (few / "labels" / "img00.png").rename(few / "labels" / "renamed.png")
    assert _identity(few) != _identity(write_toy_folder(tmp_path / "few2", n_images=4))
