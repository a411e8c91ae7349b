"""Shared fixtures: a tiny synthetic image+mask folder, a tiny grid file that runs in seconds, one torch thread;
DATA is the data shipped inside the repo (MSRC-v2, CamVid test), which tests read directly."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import ussbench  # noqa: F401  (sets MKL_CBWR before any torch product runs; see ussbench/__init__.py)

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"  # shipped in the repo: tests never depend on a folder outside the clone


def write_toy_folder(root: Path, n_images: int = 6, size: tuple[int, int] = (48, 64), seed: int = 0) -> Path:
    """Images of three flat colour bands (classes 0, 1, 2 in random order) with a void stripe (255)."""
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=np.uint8)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    H, W = size
    for i in range(n_images):
        order = rng.permutation(3)
        label = np.zeros((H, W), dtype=np.uint8)
        for band, cls in enumerate(order):
            label[:, band * W // 3 : (band + 1) * W // 3] = cls
        label[:, -1] = 255  # a void column
        image = colours[np.minimum(label, 2)] + rng.integers(0, 10, size=(H, W, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / f"img{i:02d}.png")
        Image.fromarray(label, mode="L").save(root / "labels" / f"img{i:02d}.png")
    return root


@pytest.fixture
def toy_root(tmp_path: Path) -> Path:
    return write_toy_folder(tmp_path / "toy")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op torch thread for the test (use per module): tiny tensors on 2 shared cores only spin-wait."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_grid(tmp_path: Path, data_root: Path, **overrides) -> Path:
    """A 2x2 grid x 2 seeds on the toy folder with a 2-block random ViT; returns the grid file path."""
    grid = {
        "name": "tiny",
        "data_root": str(data_root),
        "output": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "device": "cpu",
        "seeds": [0, 1],
        "datasets": [
            {"name": "image_folder", "params": {"num_classes": 3, "class_names": ["red", "green", "blue"]}}
        ],
        "backbones": [
            {"name": "random_vit", "params": {"depth": 2, "resolution": 32, "arch": "vit_small_patch16_224"}}
        ],
        "image_clusterers": [
            "none",
            {"name": "kmeans_per_image", "params": {"n_segments": 3}, "label": "km3"},
        ],
        "dataset_clusterers": [
            "kmeans",
            {"name": "kmeans", "params": {"engine": "sklearn"}, "label": "km-sklearn"},
        ],
        "protocol": {"panels": 2},
    }
    grid.update(overrides)
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return path
