"""Atomic, durable file writes: write a temporary file in the target folder, fsync it, rename it over the target.

A crash, a SIGKILL or bad input mid-write therefore never leaves a truncated cache entry or results file
behind: readers see the old file or the new one. Files get the permissions the umask allows (0666 & ~umask,
like ``open``), not mkstemp's 0600. Temporary names carry the host and process id, so
:func:`clean_orphans` can remove the ones a killed process left without touching a live writer's.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"
_HOST = socket.gethostname().replace(".", "_") or "host"
# a temporary file of another host (a shared folder) is only assumed orphaned after this long
FOREIGN_TMP_AGE_S = 24 * 3600.0


def _tmp_path(path: Path) -> Path:
    return path.parent / f".{path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path | str, write: Callable[[Path], None], durable: bool = True) -> Path:
    """Call ``write(tmp_path)``, fsync the file (``durable``), and atomically rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the umask applies, as for open()
    try:
        write(tmp)
        if durable:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        _fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path | str, text: str, durable: bool = True) -> Path:
    """Atomically write a text file."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), durable)


def atomic_write_json(path: Path | str, obj: Any, durable: bool = True) -> Path:
    """Atomically write an object as indented JSON (non-JSON values are written with ``str``)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", durable)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def is_orphan(tmp: Path, now: float | None = None) -> bool:
    """Whether a temporary file of :func:`atomic_write` was left by a process that no longer runs.

    Ours (this host): its writer's pid is gone. Another host's (shared folder): older than a day. A name
    in the old format (no host/pid) is an orphan once it is an hour old.
    """
    parts = tmp.name[: -len(TMP_SUFFIX)].rsplit(".", 3)
    try:
        age = (now or time.time()) - tmp.stat().st_mtime
    except FileNotFoundError:
        return False
    if len(parts) == 4 and parts[2].isdigit():
        host, pid = parts[1], int(parts[2])
        if host == _HOST:
            return not _pid_alive(pid)
        return age > FOREIGN_TMP_AGE_S
    return age > 3600.0


def clean_orphans(folder: Path | str, recursive: bool = True) -> list[Path]:
    """Remove the temporary files that killed writers left in ``folder``; returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    pattern = f".*{TMP_SUFFIX}"
    found = folder.rglob(pattern) if recursive else folder.glob(pattern)
    removed = []
    for tmp in found:
        if tmp.is_file() and is_orphan(tmp):
            try:
                tmp.unlink()
                removed.append(tmp)
            except FileNotFoundError:
                pass
    return removed
