"""Where per-image confusion counts live: in each cell's ``.npz`` and in a report's compact committed store.

A cell's ``<cell_id>.npz`` holds ``counts_per_image`` (and ``counts_per_image_no_crf`` when the protocol's
CRF ran) as (nnz, 4) int64 rows of image, cluster, class, pixels, plus ``image_ids``. Per-cell records are
not committed, so a report folder also keeps ``per_image_counts.npz``: every reported cell's counts in
compact form (uint16/uint32 columns, image column delta-coded, zlib), keyed by cell id, with the image ids
once per dataset; statistics are recomputed from it when the cells are gone (a fresh clone).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write
from .metrics import ConfusionMatrix
from .statistics import CellCounts

CELL_KEY = "counts_per_image"
CELL_KEY_NO_CRF = "counts_per_image_no_crf"
CELL_IDS_KEY = "image_ids"
STORE_NAME = "per_image_counts.npz"
STORE_VERSION = 1
# what a truncated or damaged .npz raises while it is read
NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError)


@contextmanager
def _unreadable_as_value_error(path: Path, what: str):
    """Re-raise any error of reading a damaged ``.npz`` as one ValueError naming the file."""
    try:
        yield
    except NPZ_ERRORS as exc:
        raise ValueError(f"{what} {path} is unreadable ({type(exc).__name__}: {exc})") from None


def npz_problem(path: Path) -> str | None:
    """Why an ``.npz`` cannot be read in full (truncated, bad CRC), or None when every member reads."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if bad is None else f"member {bad} fails its CRC check"


def cell_arrays(
    conf: ConfusionMatrix, conf_no_crf: ConfusionMatrix | None, image_ids: list[str]
) -> dict[str, np.ndarray]:
    """The arrays a cell's ``.npz`` gets: per-image counts (with and without the protocol CRF) and image ids."""
    out = {CELL_KEY: conf.per_image_counts(), CELL_IDS_KEY: np.asarray(list(image_ids), dtype=str)}
    if conf_no_crf is not None:
        out[CELL_KEY_NO_CRF] = conf_no_crf.per_image_counts()
    return out


def images_fingerprint(image_ids: list[str]) -> str:
    """A short hash of the ordered image ids: two cells with the same fingerprint scored the same images."""
    return hashlib.sha256("\n".join(image_ids).encode()).hexdigest()[:16]


@dataclass
class StoredCell:
    """One cell's per-image counts with what they were scored on."""

    counts: CellCounts
    counts_no_crf: CellCounts | None
    image_ids: list[str]

    @property
    def fingerprint(self) -> str:
        return images_fingerprint(self.image_ids)

    def label_histograms(self) -> np.ndarray:
        """(N, C) labelled pixels per image and class: a content check of the data, independent of the method."""
        rows = np.asarray(self.counts.per_image, dtype=np.int64)
        hist = np.zeros((self.counts.n_images, self.counts.n_classes), dtype=np.int64)
        np.add.at(hist, (rows[:, 0], rows[:, 2]), rows[:, 3])
        return hist


def read_cell_npz(path: Path, n_clusters: int, n_classes: int, n_images: int) -> StoredCell | None:
    """A cell's stored counts, or None when its ``.npz`` predates per-image counts (or is missing); a damaged
    file raises ValueError."""
    if not Path(path).is_file():
        return None
    with _unreadable_as_value_error(path, "cell arrays"), np.load(path, allow_pickle=False) as data:
        if CELL_KEY not in data.files:
            return None
        ids = [str(x) for x in data[CELL_IDS_KEY]] if CELL_IDS_KEY in data.files else []
        n = len(ids) or n_images
        counts = CellCounts(data[CELL_KEY], n, n_clusters, n_classes)
        no_crf = (
            CellCounts(data[CELL_KEY_NO_CRF], n, n_clusters, n_classes)
            if CELL_KEY_NO_CRF in data.files
            else None
        )
    return StoredCell(counts, no_crf, ids or [str(i) for i in range(n)])


def _pack(rows: np.ndarray) -> dict[str, np.ndarray]:
    rows = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    image_step = np.diff(rows[:, 0], prepend=0)  # sorted by image: small non-negative steps
    small = np.stack([image_step, rows[:, 1], rows[:, 2]], 1)
    small_dtype = np.uint16 if small.size == 0 or small.max() < 2**16 else np.uint32
    pixel_dtype = np.uint16 if rows.size == 0 or rows[:, 3].max() < 2**16 else np.uint32
    return {"idx": small.astype(small_dtype), "n": rows[:, 3].astype(pixel_dtype)}


def _unpack(idx: np.ndarray, n: np.ndarray) -> np.ndarray:
    idx = idx.astype(np.int64)
    return np.stack([np.cumsum(idx[:, 0]), idx[:, 1], idx[:, 2], n.astype(np.int64)], 1)


def write_store(path: Path, cells: dict[str, StoredCell]) -> Path:
    """Write the compact store of every given cell (cell id -> counts), atomically."""
    meta: dict[str, Any] = {"version": STORE_VERSION, "cells": {}, "images": {}}
    arrays: dict[str, np.ndarray] = {}
    for cid, cell in sorted(cells.items()):
        fp = cell.fingerprint
        meta["images"].setdefault(fp, cell.image_ids)
        c = cell.counts
        meta["cells"][cid] = {"images": fp, "n_images": c.n_images, "n_clusters": c.n_clusters,
                              "n_classes": c.n_classes, "no_crf": cell.counts_no_crf is not None}  # fmt: skip
        for suffix, counts in (("", c), (".no_crf", cell.counts_no_crf)):
            if counts is not None:
                for name, arr in _pack(counts.per_image).items():
                    arrays[f"{cid}{suffix}.{name}"] = arr
    arrays["meta"] = np.asarray(json.dumps(meta, separators=(",", ":")))

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    return atomic_write(Path(path), save)


def read_store(path: Path) -> dict[str, StoredCell]:
    """Every cell of a compact store (empty when the file does not exist); a damaged file raises ValueError."""
    path = Path(path)
    if not path.is_file():
        return {}
    out: dict[str, StoredCell] = {}
    with _unreadable_as_value_error(path, "per-image store"), np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"]))
        if meta.get("version") != STORE_VERSION:
            raise ValueError(
                f"{path}: per-image store version {meta.get('version')!r}, expected {STORE_VERSION}"
            )
        for cid, info in meta["cells"].items():
            dims = (info["n_images"], info["n_clusters"], info["n_classes"])
            counts = CellCounts(_unpack(data[f"{cid}.idx"], data[f"{cid}.n"]), *dims)
            no_crf = (
                CellCounts(_unpack(data[f"{cid}.no_crf.idx"], data[f"{cid}.no_crf.n"]), *dims)
                if info.get("no_crf")
                else None
            )
            out[cid] = StoredCell(counts, no_crf, list(meta["images"][info["images"]]))
    return out
