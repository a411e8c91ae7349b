"""CamVid (SegNet 11-class split, 701 road scenes): the shipped scene-centric set. Label 11 = void."""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..base import Dataset
from ..registry import register
from ._common import paired_files, read_label_png, read_rgb, remap, resolve_root

CAMVID_CLASSES = [
    "sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence", "car", "pedestrian",
    "bicyclist",
]  # fmt: skip


@register("dataset", "camvid")
class CamVid(Dataset):
    """CamVid, 11 classes; <split>/images/<name>.jpg + <split>/labels/<name>.png (11 = void)."""

    description = "CamVid SegNet split (train 367 / val 101 / test 233)"

    def __init__(
        self,
        split: Literal["train", "val", "test", "trainval", "all"] = "test",
        root: str | None = None,
        data_root: str | None = None,
        limit: int | None = None,
    ):
        self.split = split
        self.root = root
        self.data_root = data_root
        self.limit = limit
        self.class_names = list(CAMVID_CLASSES)
        self.num_classes = 11
        self._table = np.full(256, -1, dtype=np.int64)
        self._table[:11] = np.arange(11)
        self._pairs = None

    def _files(self):
        if self._pairs is None:
            base = resolve_root(self.root, self.data_root, "camvid", "camvid")
            splits = {"trainval": ["train", "val"], "all": ["train", "val", "test"]}.get(
                self.split, [self.split]
            )
            pairs = []
            for split in splits:
                pairs += paired_files(base / split / "images", base / split / "labels")
            self._pairs = pairs[: self.limit] if self.limit else pairs
        return self._pairs

    def ids(self) -> list[str]:
        return [p[0] for p in self._files()]

    def load_image(self, index: int) -> np.ndarray:
        return read_rgb(self._files()[index][1])

    def load_label(self, index: int) -> np.ndarray:
        path = self._files()[index][2]
        return remap(read_label_png(path), self._table, path)
