"""Any folder of images with same-named single-channel PNG label maps."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from ..errors import ConfigError, DataError
from ..registry import register
from ._common import (
    REFUSED,
    FileListDataset,
    FileTriple,
    nearby_data_root,
    paired_files,
    read_label_png,
    remap,
    resolve_root,
)


def class_table(num_classes: int, ignore_index: int, other: int = -1) -> np.ndarray:
    """Raw label value -> class id: the first num_classes values other than ignore_index; ignore_index -> -1
    (ignored); every other value -> ``other`` (-1: ignored too, REFUSED: an error when read)."""
    values = [v for v in range(num_classes + 1) if v != ignore_index][:num_classes]
    table = np.full(max(256, num_classes + 1, ignore_index + 1), other, dtype=np.int64)
    table[ignore_index] = -1
    table[values] = np.arange(num_classes)
    return table


@register("dataset", "image_folder")
class ImageMaskFolder(FileListDataset):
    """<root>/<images_dir>/<name>.{jpg,png} + <root>/<labels_dir>/<name>.png with values 0..num_classes-1.

    The classes are the first ``num_classes`` label values other than ``ignore_index``: 0..num_classes-1 with
    the default 255, 1..num_classes with ``ignore_index: 0`` (folders that mark void as 0). Any other value is
    an error naming the file (``other_values: error``, the default: a num_classes set too low would otherwise
    silently drop classes from the score) or is ignored like ignore_index (``other_values: void``)."""

    description = "generic image + mask folder"

    def __init__(
        self,
        num_classes: int,
        root: str | None = None,
        data_root: str | None = None,
        images_dir: str = "images",
        labels_dir: str = "labels",
        ignore_index: int = 255,
        class_names: list[str] | None = None,
        limit: int | None = None,
        resize_labels: bool = False,
        other_values: Literal["error", "void"] = "error",
    ):
        if num_classes < 1:
            raise ConfigError(f"image_folder: num_classes must be >= 1, got {num_classes}")
        if ignore_index < 0:
            raise ConfigError(f"image_folder: ignore_index must be a label value >= 0, got {ignore_index}")
        if class_names is not None and len(class_names) != num_classes:
            raise ConfigError(f"image_folder: {len(class_names)} class_names for num_classes={num_classes}")
        self.num_classes = num_classes
        self.root = root
        self.data_root = data_root
        self.images_dir = images_dir
        self.labels_dir = labels_dir
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        self.limit = limit
        self.resize_labels = resize_labels
        self.other_values = other_values
        self._table = class_table(num_classes, ignore_index, REFUSED if other_values == "error" else -1)

    def _list_files(self) -> list[FileTriple]:
        base = resolve_root(self.root, self.data_root, ".", "image_folder")
        images = base / self.images_dir
        if not images.is_dir():  # a data root one level off: name the folder that holds both sub-folders
            nearby = nearby_data_root(base, self.images_dir)
            if nearby is not None and (nearby / self.labels_dir).is_dir():
                flag = "the dataset's root" if self.root is not None else "--data-root"
                raise DataError(
                    f"image folder {str(images)!r} does not exist; {str(nearby)!r} holds {self.images_dir}/ and "
                    f"{self.labels_dir}/: pass it as {flag}"
                )
        return paired_files(images, base / self.labels_dir)

    def load_label(self, index: int) -> np.ndarray:
        path = self._files()[index][2]
        valid = (f"it is neither one of the {self.num_classes} classes ({self._class_values()}) nor ignore_index "
                 f"{self.ignore_index}; set num_classes / ignore_index to match the labels, or other_values: void "
                 "to ignore such values")  # fmt: skip
        return self._fit_label(remap(read_label_png(path), self._table, path, valid=valid), index)

    def _class_values(self) -> str:
        """The raw values that are classes, e.g. "values 0..2" or "values 0..3 without 1"."""
        values = np.flatnonzero(self._table >= 0)
        span = f"values {values[0]}..{values[-1]}"
        return span if values[-1] - values[0] + 1 == len(values) else f"{span} without {self.ignore_index}"

    def cache_identity(self) -> dict[str, Any]:
        """As FileListDataset's, without ``other_values`` (it changes no image, so no cached feature)."""
        identity = super().cache_identity()
        identity["params"].pop("other_values", None)
        return identity
