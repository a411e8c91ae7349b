"""Potsdam-3 (STEGO protocol): IIC's 200x200 ISPRS Potsdam tiles, 6 classes merged to 3.

Layout under the data root (IIC's preparation, as in STEGO's zip): ``potsdam/imgs/<id>.mat`` (key ``img``,
(H, W, 4) RGB+IR uint8; the first 3 channels are used), ``potsdam/gt/<id>.mat`` (key ``gt``, (H, W) ids
0 roads, 1 buildings, 2 low vegetation, 3 trees, 4 cars, 5 clutter) and the lists ``labelled_test.txt``
(evaluation), ``labelled_train.txt``, ``unlabelled_train.txt``, ``all.txt``. Merged classes:
{0, 4} roads and cars -> 0, {1, 5} buildings and clutter -> 1, {2, 3} trees and vegetation -> 2; 255 -> ignore.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from ..errors import DataError
from ..registry import register
from ._common import FileListDataset, FileTriple, remap, resolve_root
from ._lists import check_listed_files, read_list

POTSDAM3_CLASSES = ["roads and cars", "buildings and clutter", "trees and vegetation"]
FINE_TO_COARSE = {0: 0, 4: 0, 1: 1, 5: 1, 2: 2, 3: 2}
SPLIT_LISTS = {
    "val": ["labelled_test.txt"],
    "train": ["labelled_train.txt"],
    "unlabelled_train": ["unlabelled_train.txt"],
    "train+val": ["labelled_train.txt", "labelled_test.txt"],
    "all": ["all.txt"],
}
UNLABELLED_SPLITS = ("unlabelled_train", "all")  # their images may have no gt file


def potsdam3_lookup() -> np.ndarray:
    """Raw gt value (0..255) -> merged class; 255 -> -1; -2 marks values that must not occur."""
    table = np.full(256, -2, dtype=np.int64)
    for fine, coarse in FINE_TO_COARSE.items():
        table[fine] = coarse
    table[255] = -1
    return table


def load_mat(path: Path, key: str) -> np.ndarray:
    """Array ``key`` of a MATLAB file; missing file, key or unreadable file raise DataError."""
    import scipy.io

    if not path.is_file():
        raise DataError(f"file {str(path)!r} does not exist")
    try:
        data = scipy.io.loadmat(str(path))
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {str(path)!r}: {exc}") from exc
    if key not in data:
        raise DataError(
            f"{str(path)!r} has no variable {key!r} (has {sorted(k for k in data if not k.startswith('__'))})"
        )
    return np.asarray(data[key])


def rgb_from_rgbir(img: np.ndarray, path: Path) -> np.ndarray:
    """First three channels as RGB uint8 (float images in [0, 1] scaled by 255 and truncated, as
    torchvision's to_pil_image does in the reference)."""
    if img.ndim != 3 or img.shape[2] < 3:
        raise DataError(f"image {str(path)!r} must be (H, W, >=3), got shape {img.shape}")
    rgb = img[:, :, :3]
    if rgb.dtype == np.uint8:
        return np.ascontiguousarray(rgb)
    if np.issubdtype(rgb.dtype, np.floating):
        return np.clip(rgb * 255.0, 0, 255).astype(np.uint8)
    raise DataError(f"image {str(path)!r} has dtype {rgb.dtype}; expected uint8 or float")


@register("dataset", "potsdam3")
class Potsdam3(FileListDataset):
    """Potsdam-3 (IIC tiles): roads+cars / buildings+clutter / trees+vegetation; val = labelled_test."""

    description = "Potsdam-3, labelled_test split, STEGO protocol"

    # explicit signature, repeated across datasets on purpose: the registry reads parameters from it
    def __init__(
        self,
        split: Literal["val", "train", "unlabelled_train", "train+val", "all"] = "val",
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
        self.class_names = list(POTSDAM3_CLASSES)
        self.num_classes = 3
        self._table = potsdam3_lookup()

    def _list_files(self) -> list[FileTriple]:
        base = resolve_root(self.root, self.data_root, "potsdam", "potsdam3")
        ids = []
        for name in SPLIT_LISTS[self.split]:
            ids += read_list(base / name, "potsdam3", f"{self.split} list")
        return [(i, base / "imgs" / f"{i}.mat", base / "gt" / f"{i}.mat") for i in ids]

    def check(self) -> None:
        super().check()
        paths = [img for _, img, _ in self._files()]
        if self.split not in UNLABELLED_SPLITS:
            paths += [gt for _, _, gt in self._files()]
        check_listed_files(paths, "potsdam3")

    def load_image(self, index: int) -> np.ndarray:
        path = self._files()[index][1]
        return rgb_from_rgbir(load_mat(path, "img"), path)

    def load_label(self, index: int) -> np.ndarray:
        path = self._files()[index][2]
        if not path.is_file() and self.split in UNLABELLED_SPLITS:
            h, w = self.load_image(index).shape[:2]
            return np.full((h, w), -1, dtype=np.int64)
        raw = load_mat(path, "gt").astype(np.int64)
        if raw.ndim == 3 and raw.shape[2] == 1:
            raw = raw[:, :, 0]
        if raw.ndim != 2:
            raise DataError(f"label {str(path)!r} must be (H, W), got shape {raw.shape}")
        label = remap(raw, self._table, path, "label", "Potsdam uses 0..5 and 255")
        return self._fit_label(label, index, self.load_image(index).shape[:2])

    def header_sizes(self, index: int) -> None:
        """MATLAB tiles have no cheap header: their sizes are compared when a label is loaded."""
        return None
