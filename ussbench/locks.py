"""Inter-process file locks (``filelock``) for cache entries and grid cells.

Two runs that share an output folder or a cache take the same lock before computing the same entry or
cell, so the work is done once and the second run reuses it. Lock files are empty and stay in ``.locks/``
folders (removing a lock file another process may be about to open would break the exclusion).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout


@contextlib.contextmanager
def entry_lock(path: Path | None) -> Iterator[None]:
    """Hold the lock at ``path`` (blocking) for the duration of the block; ``None``: no locking."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path)):
        yield


class CellLock:
    """A grid cell's lock: try it without waiting (to do other cells first), or wait for it."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(path))

    def try_acquire(self) -> bool:
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            return False
        return True

    def acquire(self) -> None:
        self._lock.acquire()

    def release(self) -> None:
        if self._lock.is_locked:
            self._lock.release()
