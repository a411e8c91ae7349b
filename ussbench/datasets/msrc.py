"""MSRC-v2 (591 object-centric photos): the shipped stand-in for PASCAL VOC.

Labels 0-22 (255 void). MSRC-21 drops horse (4) and mountain (7) to void and renumbers the rest in order.
There is no official split: unsupervised methods fit and evaluate on all images (reports say so).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..base import Dataset
from ..registry import register
from ._common import paired_files, read_label_png, read_rgb, remap, resolve_root

MSRC23_CLASSES = [
    "building", "grass", "tree", "cow", "horse", "sheep", "sky", "mountain", "aeroplane", "water", "face",
    "car", "bicycle", "flower", "sign", "bird", "book", "chair", "road", "cat", "dog", "body", "boat",
]  # fmt: skip
MSRC21_DROPPED = (4, 7)  # horse, mountain


def msrc_lookup(classes: int) -> tuple[np.ndarray, list[str]]:
    """Raw value (0..255) -> class id (-1 = ignore) and the class names, for 21 or 23 classes."""
    table = np.full(256, -1, dtype=np.int64)
    if classes == 23:
        table[:23] = np.arange(23)
        return table, list(MSRC23_CLASSES)
    kept = [c for c in range(23) if c not in MSRC21_DROPPED]
    table[kept] = np.arange(len(kept))
    return table, [MSRC23_CLASSES[c] for c in kept]


@register("dataset", "msrc_v2")
class MSRCv2(Dataset):
    """MSRC-v2, 591 photos, 21 (usual) or 23 classes; images/<name>.jpg + labels/<name>.png."""

    description = "MSRC-v2 (591 images; no official split: fit and evaluate on all images)"

    def __init__(
        self,
        classes: Literal[21, 23] = 21,
        root: str | None = None,
        data_root: str | None = None,
        limit: int | None = None,
    ):
        self.classes = classes
        self.root = root
        self.data_root = data_root
        self.limit = limit
        self._table, self.class_names = msrc_lookup(classes)
        self.num_classes = len(self.class_names)
        self._pairs = None

    def _files(self):
        if self._pairs is None:
            base = resolve_root(self.root, self.data_root, "msrc_v2", "msrc_v2")
            pairs = paired_files(base / "images", base / "labels")
            self._pairs = pairs[: self.limit] if self.limit else pairs
        return self._pairs

    def ids(self) -> list[str]:
        return [p[0] for p in self._files()]

    def load_image(self, index: int) -> np.ndarray:
        return read_rgb(self._files()[index][1])

    def load_label(self, index: int) -> np.ndarray:
        path = self._files()[index][2]
        return remap(read_label_png(path), self._table, path)
