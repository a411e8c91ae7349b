"""COCO-Stuff-27 (STEGO protocol): curated IIC image lists, 182 fine labels merged to 27 coarse classes.

Layout under the data root (as STEGO's ``cocostuff`` folder): ``cocostuff/images/{val,train}2017/<id>.jpg``,
``cocostuff/annotations/{val,train}2017/<id>.png`` (0-based fine stuffthingmaps, 255 = unlabeled) and
``cocostuff/curated/{val,train}2017/Coco164kFull_Stuff_Coarse_7.txt`` (2,175 val / 49,629 train ids). The
list files come with the STEGO/PiCIE data, not with COCO: they cannot be downloaded here, so a missing list
fails with its path. The fine->coarse map is the data table ``data/cocostuff_fine_to_coarse.csv``.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from ..base import Dataset
from ..errors import ConfigError, DataError
from ..registry import register
from ._common import FileListDataset, FileTriple, read_label_png, remap, resolve_root
from ._lists import check_count, check_listed_files, read_list

TABLE_PATH = Path(__file__).resolve().parent / "data" / "cocostuff_fine_to_coarse.csv"
CURATED_LIST = "Coco164kFull_Stuff_Coarse_7.txt"
CURATED_COUNTS = {"val": 2175, "train": 49629}  # IIC/PiCIE curated lists (reference study §1.1)
N_FINE = 182
UNLABELED = 255
OFFICIAL_LABELS = "stuffthingmaps_trainval2017"  # the label folder as COCO-Stuff ships it


@lru_cache(maxsize=1)
def fine_to_coarse_table() -> tuple[np.ndarray, list[str], list[str]]:
    """(fine id -> coarse id array of length 182, the 27 coarse names by id, the 182 fine names by id)."""
    with open(TABLE_PATH, encoding="utf-8") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    fine = np.array([int(r["fine_id"]) for r in rows])
    if sorted(fine.tolist()) != list(range(N_FINE)):
        raise DataError(f"{TABLE_PATH} must list fine ids 0..{N_FINE - 1} exactly once")
    order = np.argsort(fine)
    coarse = np.array([int(rows[i]["coarse_id"]) for i in order], dtype=np.int64)
    names: dict[int, str] = {}
    for r in rows:
        if names.setdefault(int(r["coarse_id"]), r["coarse_name"]) != r["coarse_name"]:
            raise DataError(f"{TABLE_PATH}: coarse id {r['coarse_id']} has two names")
    if sorted(names) != list(range(27)):
        raise DataError(f"{TABLE_PATH} must use coarse ids 0..26, got {sorted(names)}")
    return coarse, [names[i] for i in range(27)], [rows[i]["fine_name"] for i in order]


def coarse_lookup() -> np.ndarray:
    """Raw PNG value (0..255) -> coarse class (-1 = ignore for 255; -2 marks values that must not occur)."""
    coarse, _, _ = fine_to_coarse_table()
    table = np.full(256, -2, dtype=np.int64)
    table[:N_FINE] = coarse
    table[UNLABELED] = -1
    return table


@register("dataset", "cocostuff27")
class CocoStuff27(FileListDataset):
    """COCO-Stuff-27 on the curated IIC lists (val: 2,175 images); 182 fine labels -> 27 coarse classes."""

    description = "COCO-Stuff-27, curated val list (2,175 images), STEGO protocol"

    # explicit signature, repeated across datasets on purpose: the registry reads parameters from it
    def __init__(
        self,
        split: Literal["val", "train", "train+val"] = "val",
        list_file: str | None = None,
        strict_count: bool = True,
        root: str | None = None,
        data_root: str | None = None,
        limit: int | None = None,
        resize_labels: bool = False,
    ):
        if list_file is not None and split == "train+val":
            raise ConfigError("cocostuff27: list_file names one list; use split 'val' or 'train' with it")
        self.split = split
        self.list_file = list_file
        self.strict_count = strict_count
        self.root = root
        self.data_root = data_root
        self.limit = limit
        self.resize_labels = resize_labels
        _, self.class_names, _ = fine_to_coarse_table()
        self.num_classes = 27
        self._table = coarse_lookup()

    def _base(self) -> Path:
        return resolve_root(self.root, self.data_root, "cocostuff", "cocostuff27")

    def _list_files(self) -> list[FileTriple]:
        base = self._base()
        items = []
        for split in ("train", "val") if self.split == "train+val" else (self.split,):
            if self.list_file is None:
                path = base / "curated" / f"{split}2017" / CURATED_LIST
            else:
                path = Path(self.list_file).expanduser()
                path = path if path.is_absolute() else base / path
            ids = read_list(path, "cocostuff27", "image list (list_file)")
            if self.strict_count and path.name == CURATED_LIST:
                check_count(len(ids), CURATED_COUNTS[split], "cocostuff27", f"{split} list {str(path)!r}")
            items += [
                (i, base / "images" / f"{split}2017" / f"{i}.jpg", base / "annotations" / f"{split}2017" / f"{i}.png")
                for i in ids
            ]  # fmt: skip
        return items

    def check(self) -> None:
        Dataset.check(self)  # the listed files must exist before their sizes are compared
        base = self._base()
        official = base / OFFICIAL_LABELS
        if not (base / "annotations").is_dir() and official.is_dir():  # COCO's own name for the label folder
            raise DataError(
                f"dataset 'cocostuff27': {str(base)!r} holds COCO's {OFFICIAL_LABELS}/ but not annotations/ "
                f"(STEGO's layout); link it: ln -s {OFFICIAL_LABELS} {base / 'annotations'}"
            )
        check_listed_files([p for _, img, lab in self._files() for p in (img, lab)], "cocostuff27")
        self.check_label_sizes()

    def load_label(self, index: int) -> np.ndarray:
        path = self._files()[index][2]
        valid = "COCO-Stuff uses 0..181 and 255"
        return self._fit_label(remap(read_label_png(path), self._table, path, valid=valid), index)
