"""Cityscapes-27 (STEGO protocol): gtFine label ids 7..33 become classes 0..26, everything else is ignored.

Standard layout under the data root: ``cityscapes/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` and
``cityscapes/gtFine/<split>/<city>/<name>_gtFine_labelIds.png`` (val: 500 images, train: 2,975).
STEGO's ``CityscapesSeg``: target = labelId - 7, < 0 -> ignore; its metric also drops targets >= 27, which
here become ignore directly (label ids > 33, e.g. 255).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ..errors import DataError
from ..registry import register
from ._common import (
    FileListDataset,
    FileTriple,
    no_images_error,
    read_label_png,
    remap,
    resolve_root,
)
from ._lists import check_count

FIRST_NONVOID = 7
CITYSCAPES27_CLASSES = [
    "road",
    "sidewalk",
    "parking",
    "rail track",
    "building",
    "wall",
    "fence",
    "guard rail",
    "bridge",
    "tunnel",
    "pole",
    "polegroup",
    "traffic light",
    "traffic sign",
    "vegetation",
    "terrain",
    "sky",
    "person",
    "rider",
    "car",
    "truck",
    "bus",
    "caravan",
    "trailer",
    "train",
    "motorcycle",
    "bicycle",
]  # fmt: skip  (label ids 7..33 of the Cityscapes label table, in order)
SPLIT_COUNTS = {"val": 500, "train": 2975}
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def cityscapes27_lookup() -> np.ndarray:
    """Raw label id (0..255) -> class (label id - 7 for ids 7..33, else -1)."""
    table = np.full(256, -1, dtype=np.int64)
    table[FIRST_NONVOID : FIRST_NONVOID + 27] = np.arange(27)
    return table


@register("dataset", "cityscapes27")
class Cityscapes27(FileListDataset):
    """Cityscapes-27, gtFine labelIds - 7 (27 classes incl. parking, rail track, ...); val 500 images."""

    description = "Cityscapes-27, gtFine val (500 images), STEGO protocol"

    # explicit signature, repeated across datasets on purpose: the registry reads parameters from it
    def __init__(
        self,
        split: Literal["val", "train"] = "val",
        strict_count: bool = True,
        root: str | None = None,
        data_root: str | None = None,
        limit: int | None = None,
        resize_labels: bool = False,
    ):
        self.split = split
        self.strict_count = strict_count
        self.root = root
        self.data_root = data_root
        self.limit = limit
        self.resize_labels = resize_labels
        self.class_names = list(CITYSCAPES27_CLASSES)
        self.num_classes = 27
        self._table = cityscapes27_lookup()

    def _list_files(self) -> list[FileTriple]:
        base = resolve_root(self.root, self.data_root, "cityscapes", "cityscapes27")
        img_dir = base / "leftImg8bit" / self.split
        gt_dir = base / "gtFine" / self.split
        for d in (img_dir, gt_dir):
            if not d.is_dir():
                raise DataError(f"dataset 'cityscapes27': folder {str(d)!r} does not exist")
        items = []
        for img in sorted(img_dir.glob(f"*/*{IMAGE_SUFFIX}")):
            stem = img.name[: -len(IMAGE_SUFFIX)]
            lab = gt_dir / img.parent.name / f"{stem}{LABEL_SUFFIX}"
            if not lab.is_file():
                raise DataError(f"dataset 'cityscapes27': label file {str(lab)!r} does not exist")
            items.append((f"{img.parent.name}/{stem}", img, lab))
        if not items:
            raise DataError(f"dataset 'cityscapes27': {no_images_error(img_dir, f'<city>/*{IMAGE_SUFFIX}')}")
        if self.strict_count:
            check_count(
                len(items), SPLIT_COUNTS[self.split], "cityscapes27", f"{self.split} split {str(img_dir)!r}"
            )
        return items

    def load_label(self, index: int) -> np.ndarray:
        path = self._files()[index][2]
        return self._fit_label(remap(read_label_png(path), self._table, path), index)
