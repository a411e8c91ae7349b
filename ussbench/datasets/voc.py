"""PASCAL VOC 2012 segmentation in its standard VOCdevkit layout (val = 1,449 images, 21 classes, 255 = void)."""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..base import Dataset
from ..errors import DataError
from ..registry import register
from ._common import FileListDataset, FileTriple, read_label_png, remap, resolve_root
from ._lists import check_listed_files

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]  # fmt: skip
VOID = 255


def voc_lookup() -> np.ndarray:
    """Raw palette index -> class: 0..20 themselves, 255 -> -1 (void), every other value -2 (never in VOC).

    A value such as 38 or 147 means the PNG was re-saved as grey levels or colours, not palette indices:
    ignoring it would silently score only the pixels that happen to stay 0..20.
    """
    table = np.full(256, -2, dtype=np.int64)
    table[: len(VOC_CLASSES)] = np.arange(len(VOC_CLASSES))
    table[VOID] = -1
    return table


@register("dataset", "voc2012")
class VOC2012(FileListDataset):
    """PASCAL VOC 2012: <data_root>/VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,ImageSets/Segmentation}."""

    description = "PASCAL VOC 2012 segmentation"

    # explicit signature, repeated across datasets on purpose: the registry reads parameters from it
    def __init__(
        self,
        split: Literal["train", "val", "trainval"] = "val",
        root: str | None = None,
        data_root: str | None = None,
        limit: int | None = None,
        resize_labels: bool = False,
    ):
        self.split = split
        self.root = root
        self.data_root = data_root
        self.limit = limit
        self.resize_labels = resize_labels
        self.class_names = list(VOC_CLASSES)
        self.num_classes = 21
        self._table = voc_lookup()

    def _list_files(self) -> list[FileTriple]:
        base = resolve_root(self.root, self.data_root, "VOCdevkit/VOC2012", "voc2012")
        list_file = base / "ImageSets" / "Segmentation" / f"{self.split}.txt"
        if not list_file.is_file():
            raise DataError(f"VOC split list {str(list_file)!r} does not exist")
        ids = [line.strip() for line in list_file.read_text().splitlines() if line.strip()]
        images = base / "JPEGImages"
        files = [(i, images / f"{i}.jpg", base / "SegmentationClass" / f"{i}.png") for i in ids]
        if images.is_dir() and not all(image.is_file() for _, image, _ in files):
            # a copy re-saved as .JPG / .jpeg: take each listed image under the suffix it has
            jpegs = {p.stem: p for p in images.iterdir() if p.suffix.lower() in (".jpg", ".jpeg")}
            files = [
                (i, image if image.is_file() else jpegs.get(i, image), label) for i, image, label in files
            ]
        return files

    def check(self) -> None:
        """Every listed image and label must exist (named by the error), before their sizes are compared."""
        Dataset.check(self)
        check_listed_files([p for _, image, label in self._files() for p in (image, label)], "voc2012")
        self.check_label_sizes()

    def load_image(self, index: int) -> np.ndarray:
        path = self._files()[index][1]
        if not path.is_file():
            raise DataError(f"VOC image {str(path)!r} does not exist")
        return super().load_image(index)

    def load_label(self, index: int) -> np.ndarray:
        path = self._files()[index][2]
        if not path.is_file():
            raise DataError(f"VOC label {str(path)!r} does not exist")
        valid = "VOC labels hold palette indices 0..20 and 255; use the original SegmentationClass PNGs"
        label = remap(read_label_png(path), self._table, path, valid=valid)
        return self._fit_label(label, index)
