"""Any folder of images with same-named single-channel PNG label maps."""

from __future__ import annotations

import numpy as np

from ..errors import ConfigError, DataError
from ..registry import register
from ._common import FileListDataset, FileTriple, nearby_data_root, paired_files, resolve_root


def class_table(num_classes: int, ignore_index: int) -> np.ndarray:
    """Raw label value -> class id (-1: ignored): the first num_classes values other than ignore_index."""
    values = [v for v in range(num_classes + 1) if v != ignore_index][:num_classes]
    table = np.full(max(256, num_classes + 1, ignore_index + 1), -1, dtype=np.int64)
    table[values] = np.arange(num_classes)
    return table


@register("dataset", "image_folder")
class ImageMaskFolder(FileListDataset):
    """<root>/<images_dir>/<name>.{jpg,png} + <root>/<labels_dir>/<name>.png with values 0..num_classes-1.

    The classes are the first ``num_classes`` label values other than ``ignore_index``: 0..num_classes-1 with
    the default 255, 1..num_classes with ``ignore_index: 0`` (folders that mark void as 0). Every other value
    is ignored (void)."""

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
        self._table = class_table(num_classes, ignore_index)

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
