"""Content-addressed on-disk cache for stage outputs (features, learned codes, segmentations).

Keys hash the upstream configuration and code version, so a 100-cell grid computes each shared stage
once and a re-run or resumed grid reuses it. Entries are written atomically (temp file + rename).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write

log = logging.getLogger(__name__)


def stable_hash(obj: Any, length: int = 20) -> str:
    """Hex digest of a JSON-serialisable description (keys sorted; non-JSON values via str)."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


class Cache:
    """Stage outputs under ``root/<stage>/<key>.pt``; ``root=None`` disables the disk cache."""

    def __init__(self, root: Path | None):
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    def path(self, stage: str, key: str) -> Path | None:
        return None if self.root is None else self.root / stage / f"{key}.pt"

    def load(self, stage: str, key: str) -> Any | None:
        """The stored object, or None if absent or unreadable (a corrupt entry is removed and recomputed)."""
        path = self.path(stage, key)
        if path is None or not path.is_file():
            self.misses += 1
            return None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # truncated or foreign file: never trust it
            log.warning("cache entry %s is unreadable (%s); recomputing", path, exc)
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return obj

    def save(self, stage: str, key: str, obj: Any) -> None:
        path = self.path(stage, key)
        if path is not None:
            atomic_write(path, lambda tmp: torch.save(obj, tmp))
