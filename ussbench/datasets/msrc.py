"""MSRC-v2 (591 object-centric photos): the shipped stand-in for PASCAL VOC.

Labels 0-22 (255 void). MSRC-21 drops horse (4) and mountain (7) to void and renumbers the rest in order.
There is no official split: unsupervised methods fit and evaluate on all images (reports say so).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..registry import register
from ._common import FileListDataset, FileTriple, identity_table, paired_files, resolve_root

MSRC23_CLASSES = [
    "building", "grass", "tree", "cow", "horse", "sheep", "sky", "mountain", "aeroplane", "water", "face",
    "car", "bicycle", "flower", "sign", "bird", "book", "chair", "road", "cat", "dog", "body", "boat",
]  # fmt: skip
MSRC21_DROPPED = (4, 7)  # horse, mountain


def msrc_lookup(classes: int) -> tuple[np.ndarray, list[str]]:
    """Raw value (0..255) -> class id (-1 = ignore) and the class names, for 21 or 23 classes."""
    if classes == 23:
        return identity_table(23), list(MSRC23_CLASSES)
    table = np.full(256, -1, dtype=np.int64)
    kept = [c for c in range(23) if c not in MSRC21_DROPPED]
    table[kept] = np.arange(len(kept))
    return table, [MSRC23_CLASSES[c] for c in kept]


@register("dataset", "msrc_v2")
class MSRCv2(FileListDataset):
    """MSRC-v2, 591 photos, 21 (usual) or 23 classes; images/<name>.jpg + labels/<name>.png."""

    description = "MSRC-v2 (591 images; no official split: fit and evaluate on all images)"

    # explicit signature, repeated across datasets on purpose: the registry reads parameters from it
    def __init__(
        self,
        classes: Literal[21, 23] = 21,
        root: str | None = None,
        data_root: str | None = None,
        limit: int | None = None,
        resize_labels: bool = False,
    ):
        self.classes = classes
        self.root = root
        self.data_root = data_root
        self.limit = limit
        self.resize_labels = resize_labels
        self._table, self.class_names = msrc_lookup(classes)
        self.num_classes = len(self.class_names)

    def _list_files(self) -> list[FileTriple]:
        base = resolve_root(self.root, self.data_root, "msrc_v2", "msrc_v2")
        return paired_files(base / "images", base / "labels")
