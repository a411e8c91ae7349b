"""CamVid (SegNet 11-class split, 701 road scenes): the shipped scene-centric set. Label 11 = void."""

from __future__ import annotations

from typing import Literal

from ..registry import register
from ._common import FileListDataset, FileTriple, identity_table, paired_files, resolve_root

CAMVID_CLASSES = [
    "sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence", "car", "pedestrian",
    "bicyclist",
]  # fmt: skip


@register("dataset", "camvid")
class CamVid(FileListDataset):
    """CamVid, 11 classes; <split>/images/<name>.jpg + <split>/labels/<name>.png (11 = void)."""

    description = "CamVid SegNet split (train 367 / val 101 / test 233)"

    # explicit signature, repeated across datasets on purpose: the registry reads parameters from it
    def __init__(
        self,
        split: Literal["train", "val", "test", "trainval", "all"] = "test",
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
        self.class_names = list(CAMVID_CLASSES)
        self.num_classes = 11
        self._table = identity_table(11)

    def _list_files(self) -> list[FileTriple]:
        base = resolve_root(self.root, self.data_root, "camvid", "camvid")
        splits = {"trainval": ["train", "val"], "all": ["train", "val", "test"]}.get(self.split, [self.split])
        pairs = []
        for split in splits:
            pairs += paired_files(base / split / "images", base / split / "labels")
        return pairs
