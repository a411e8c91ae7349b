"""PASCAL VOC 2012 segmentation in its standard VOCdevkit layout (val = 1,449 images, 21 classes, 255 = void)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..base import Dataset
from ..errors import DataError
from ..registry import register
from ._common import read_label_png, read_rgb, remap, resolve_root

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip


@register("dataset", "voc2012")
class VOC2012(Dataset):
    """PASCAL VOC 2012: <data_root>/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}."""

    description = "PASCAL VOC 2012 segmentation"

    def __init__(
        self,
        split: Literal["train", "val", "trainval"] = "val",
        root: str | None = None,
        data_root: str | None = None,
        limit: int | None = None,
    ):
        self.split = split
        self.root = root
        self.data_root = data_root
        self.limit = limit
        self.class_names = list(VOC_CLASSES)
        self.num_classes = 21
        self._table = np.full(256, -1, dtype=np.int64)
        self._table[:21] = np.arange(21)
        self._ids: list[str] | None = None

    def _base(self):
        return resolve_root(self.root, self.data_root, "VOCdevkit/VOC2012", "voc2012")

    def ids(self) -> list[str]:
        if self._ids is None:
            list_file = self._base() / "ImageSets" / "Segmentation" / f"{self.split}.txt"
            if not list_file.is_file():
                raise DataError(f"VOC split list {str(list_file)!r} does not exist")
            ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
            self._ids = ids[: self.limit] if self.limit else ids
        return self._ids

    def load_image(self, index: int) -> np.ndarray:
        path = self._base() / "JPEGImages" / f"{self.ids()[index]}.jpg"
        if not path.is_file():
            raise DataError(f"VOC image {str(path)!r} does not exist")
        return read_rgb(path)

    def load_label(self, index: int) -> np.ndarray:
        path = self._base() / "SegmentationClass" / f"{self.ids()[index]}.png"
        if not path.is_file():
            raise DataError(f"VOC label {str(path)!r} does not exist")
        return remap(read_label_png(path), self._table, path)
