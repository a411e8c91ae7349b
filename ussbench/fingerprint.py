"""Fingerprints of a stage's input files, so cache keys and cell ids are bound to the data, not to its names.

A file's fingerprint is the sha256 of its content. Hashing every image on every run would cost seconds,
so digests are remembered in ``<cache>/fingerprints/<folder hash>.json`` by (path, size, mtime, ctime):
a warm run only stats the files. A copy of the same data elsewhere gets the same fingerprint (content,
not location); other files under the same names get another one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_json
from .errors import DataError

log = logging.getLogger(__name__)
_FORMAT = "ussbench-digests/1"


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class DigestStore:
    """Remembered file digests of one group of files (one dataset), keyed by path and stat facts."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    def digests(self, paths: list[Path]) -> list[str]:
        """The content digest of each file, rehashing only files whose size/mtime/ctime changed."""
        resolved = [str(Path(p).resolve()) for p in paths]
        store = self._file(resolved)
        known = self._read(store)
        out: list[str] = []
        fresh: dict[str, list] = {}
        changed = False
        for path in resolved:
            try:
                facts = _stat_key(os.stat(path))
                entry = known.get(path)
                if entry is not None and entry[:3] == facts:
                    digest = entry[3]
                else:
                    digest = file_digest(Path(path))
                    changed = True
            except OSError as exc:
                raise DataError(f"data file {path!r} cannot be read: {exc.strerror or exc}") from None
            fresh[path] = [*facts, digest]
            out.append(digest)
        if store is not None and (changed or len(fresh) != len(known)):
            try:
                atomic_write_json(store, {"format": _FORMAT, "files": fresh}, durable=False)
            except OSError as exc:  # a read-only cache still fingerprints, just without memory
                log.warning("could not remember file digests in %s: %s", store, exc)
        return out

    def _file(self, resolved: list[str]) -> Path | None:
        if self.folder is None:
            return None
        parents = sorted({os.path.dirname(p) for p in resolved})
        return self.folder / (hashlib.sha256("\n".join(parents).encode()).hexdigest()[:20] + ".json")

    @staticmethod
    def _read(store: Path | None) -> dict[str, list]:
        if store is None or not store.is_file():
            return {}
        try:
            blob = json.loads(store.read_text())
            files = blob["files"] if blob.get("format") == _FORMAT else {}
            return {k: v for k, v in files.items() if isinstance(v, list) and len(v) == 4}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}


def files_fingerprint(paths: Iterable[Path], store: DigestStore) -> str:
    """One digest for a list of files: their content digests in order (names left out on purpose)."""
    paths = list(paths)
    digests = store.digests(paths)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:32]


def arrays_fingerprint(dataset: Any) -> str:
    """Fallback for datasets that do not list their files: a digest of every decoded image and label."""
    h = hashlib.sha256()
    for i in range(len(dataset)):
        for array in (dataset.load_image(i), dataset.load_label(i)):
            a = np.ascontiguousarray(array)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:32]


def dataset_fingerprint(dataset: Any, store: DigestStore) -> dict[str, Any]:
    """``{"files": n, "content": digest}`` of a dataset's image and label files (``data_files()``), in order.

    Datasets that cannot list their files (``data_files()`` returns None) are fingerprinted by their
    decoded arrays (slower: every image is read), so their identity is still bound to the content.
    """
    files = dataset.data_files() if callable(getattr(dataset, "data_files", None)) else None
    if files is None:
        return {"arrays": len(dataset), "content": arrays_fingerprint(dataset)}
    files = [Path(f) for f in files]
    return {"files": len(files), "content": files_fingerprint(files, store)}


def param_files_fingerprint(params: dict[str, Any], store: DigestStore) -> dict[str, str]:
    """Content digests of the parameters that name an existing file (weights, checkpoints)."""
    out = {}
    for name, value in sorted(params.items()):
        if isinstance(value, str) and value and name not in ("data_root", "cache_dir", "root"):
            path = Path(value).expanduser()
            if path.is_file():
                out[name] = store.digests([path])[0][:32]
    return out
