"""Content-addressed on-disk cache for stage outputs (features, learned codes, segmentations).

Keys hash the upstream configuration, the data's fingerprint and the code version, so a 100-cell grid
computes each shared stage once and a re-run or resumed grid reuses it. Each entry is
``root/<stage>/<key>.pt`` holding ``{"format", "stage", "key", "value"}``: it names its own key, which is
checked on load, and it is read with the pickle-free loader of :mod:`ussbench.serialization`. An entry that
cannot be read, is not ours or names another key is moved to ``root/corrupt/`` with a one-line warning and
recomputed. Entries are written atomically; :meth:`Cache.lock` serialises the computation of one entry
across processes, so two runs sharing the cache compute it once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from .atomic import atomic_write
from .locks import entry_lock
from .serialization import UnsafeFileError, safe_load, safe_save, storable

log = logging.getLogger(__name__)

ENTRY_FORMAT = "ussbench-cache/2"


def stable_hash(obj: Any, length: int = 20) -> str:
    """Hex digest of a JSON-serialisable description (keys sorted; non-JSON values via str)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


class CorruptEntry(Exception):
    """A cache entry or cell file that exists but cannot be trusted (unreadable, foreign, or another key's)."""


def read_entry(path: Path | str, stage: str | None = None, key: str | None = None) -> Any:
    """The value stored in an entry file, after checking its format and (when given) its stage and key.

    Raises :class:`CorruptEntry` naming what is wrong; never runs code from the file.
    """
    path = Path(path)
    try:
        blob = safe_load(path)
    except UnsafeFileError as exc:
        raise CorruptEntry(f"not a loadable ussbench file ({exc})") from None
    if not isinstance(blob, dict) or blob.get("format") != ENTRY_FORMAT or "value" not in blob:
        raise CorruptEntry(f"not a {ENTRY_FORMAT} entry")
    if stage is not None and blob.get("stage") != stage:
        raise CorruptEntry(f"holds stage {blob.get('stage')!r}, expected {stage!r}")
    if key is not None and blob.get("key") != key:
        raise CorruptEntry(f"holds key {blob.get('key')!r}, expected {key!r}")
    return blob["value"]


def write_entry(path: Path | str, value: Any, stage: str, key: str) -> Path:
    """Atomically write ``value`` (made storable) as an entry naming its stage and key."""
    blob = {"format": ENTRY_FORMAT, "stage": stage, "key": key, "value": storable(value, f"{stage} {key}")}
    return atomic_write(path, lambda tmp: safe_save(blob, tmp))


def move_aside(path: Path, corrupt_dir: Path, reason: str, what: str) -> Path | None:
    """Move an untrusted file into ``corrupt_dir`` (kept for inspection) and warn in one line."""
    corrupt_dir.mkdir(parents=True, exist_ok=True)
    target = corrupt_dir / f"{path.name}.{time.strftime('%Y%m%d-%H%M%S')}.{os.getpid()}"
    try:
        os.replace(path, target)
    except FileNotFoundError:  # another process moved it first
        return None
    log.warning("%s %s is corrupt (%s); moved to %s and recomputed", what, path, reason, target)
    return target


class Cache:
    """Stage outputs under ``root/<stage>/<key>.pt``; ``root=None`` disables the disk cache."""

    def __init__(self, root: Path | str | None):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0
        self.corrupt = 0

    def path(self, stage: str, key: str) -> Path | None:
        return None if self.root is None else self.root / stage / f"{key}.pt"

    def contains(self, stage: str, key: str) -> bool:
        path = self.path(stage, key)
        return path is not None and path.is_file()

    def load(self, stage: str, key: str) -> Any | None:
        """The stored value, or None if absent or untrusted (an untrusted entry is moved aside and recomputed)."""
        path = self.path(stage, key)
        if path is None or not path.is_file():
            self.misses += 1
            return None
        try:
            value = read_entry(path, stage, key)
        except FileNotFoundError:
            self.misses += 1
            return None
        except CorruptEntry as exc:
            assert self.root is not None
            move_aside(path, self.root / "corrupt" / stage, str(exc), "cache entry")
            self.corrupt += 1
            self.misses += 1
            return None
        self.hits += 1
        return value

    def save(self, stage: str, key: str, value: Any) -> None:
        path = self.path(stage, key)
        if path is not None:
            write_entry(path, value, stage, key)

    def lock(self, stage: str, key: str):
        """A context manager holding this entry's inter-process lock (a no-op without a disk cache)."""
        return entry_lock(None if self.root is None else self.root / ".locks" / stage / f"{key}.lock")
