"""The files of a grid's output folder that hold cells: finished records, failures, locks, the error log.

``cells/<id>.json`` (the record, written last) with ``<id>.npz`` (panel arrays) and ``<id>.artifacts.pt``
(pickle-free, see :mod:`ussbench.cache`); ``cells/failed/<id>.json`` for a cell whose computation raised
(retried by the next run); ``cells/corrupt/`` for records that could not be read (moved aside, then
recomputed); ``cells/.locks/`` for the per-cell inter-process locks; ``errors.log`` with full tracebacks.
Every executor writes cells through :class:`CellStore`, so they all write the same files.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_write, atomic_write_json
from ..cache import CorruptEntry, move_aside, read_entry, write_entry
from ..evaluation.per_image import npz_problem
from ..locks import CellLock, entry_lock

log = logging.getLogger(__name__)
ARTIFACTS_STAGE = "cell-artifacts"


class CellStore:
    """Reads and writes the cell files of one output folder."""

    def __init__(self, output: Path | str):
        self.output = Path(output)
        self.cells = self.output / "cells"

    def record_path(self, cell_id: str) -> Path:
        return self.cells / f"{cell_id}.json"

    def failed_path(self, cell_id: str) -> Path:
        return self.cells / "failed" / f"{cell_id}.json"

    @property
    def error_log(self) -> Path:
        return self.output / "errors.log"

    def lock(self, cell_id: str) -> CellLock:
        return CellLock(self.cells / ".locks" / f"{cell_id}.lock")

    def problem(self, cell_id: str) -> tuple[str, str] | None:
        """Why the cell's files cannot be trusted, as (file kind, reason), or None when the record and its
        arrays read (also None when there is no record: nothing to distrust). Reads, moves nothing."""
        path = self.record_path(cell_id)
        try:
            record = read_record(path)
            if record["row"].get("cell_id") != cell_id:
                raise ValueError(f"it holds cell {record['row'].get('cell_id')!r}")
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError) as exc:
            return "record", _one_line(exc)
        arrays = self.cells / f"{cell_id}.npz"
        reason = npz_problem(arrays) if arrays.is_file() else None
        return ("arrays", reason) if reason else None

    def finished(self, cell_id: str) -> bool:
        """Whether a trustworthy record of the cell exists; an unreadable one is moved aside (recomputed)."""
        path = self.record_path(cell_id)
        if not path.is_file():
            return False
        found = self.problem(cell_id)
        if found is None:
            return path.is_file()
        what, reason = found
        if what == "arrays":  # the record is only as good as its arrays (panels, per-image counts): redo both
            move_aside(self.cells / f"{cell_id}.npz", self.cells / "corrupt", reason, "cell arrays")
            reason = f"its arrays {cell_id}.npz are damaged"
        move_aside(path, self.cells / "corrupt", reason, "cell record")
        return False

    def write(
        self, cell_id: str, row: dict[str, Any], extras: dict[str, Any], identity: dict[str, Any]
    ) -> None:
        """Write a finished cell: panel arrays and artifacts first, the JSON record last (it marks it done)."""
        extras = dict(extras)
        panels = {f"pred_{k}": v for k, v in extras.pop("panels", {}).items()}
        panels.update({f"level_{k}": v for k, v in extras.pop("level_panels", {}).items()})
        panels.update(extras.pop("per_image", {}))  # per-image confusion counts (evaluation/per_image.py)
        artifacts = extras.pop("artifacts", {})
        if panels:
            atomic_write(self.cells / f"{cell_id}.npz", lambda tmp: _save_npz(tmp, panels))
        if any(artifacts.values()):
            write_entry(self.cells / f"{cell_id}.artifacts.pt", artifacts, ARTIFACTS_STAGE, cell_id)
        atomic_write_json(self.record_path(cell_id), {"row": row, **extras, "identity": identity})
        self.failed_path(cell_id).unlink(missing_ok=True)

    def write_failure(self, cell_id: str, row: dict[str, Any], identity: dict[str, Any], exc: BaseException,
                      where: str, describe: str, tb: str | None = None) -> str:  # fmt: skip
        """Record a failed cell (its error in ``cells/failed/``, the traceback in ``errors.log``).

        ``where`` names the stage that raised, ``describe`` the cell; returns the one-line error.
        """
        message = f"{where}: {type(exc).__name__}: {_one_line(exc)}"
        if tb is None:
            tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        failed = {**row, "cell_id": cell_id, "status": "failed", "error": message}
        atomic_write_json(self.failed_path(cell_id), {"row": failed, "identity": identity, "traceback": tb})
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with entry_lock(self.cells / ".locks" / "errors.log.lock"):
            with open(self.error_log, "a", encoding="utf-8") as f:
                f.write(f"[{stamp}] pid {os.getpid()} cell {cell_id} ({describe})\n{message}\n{tb}\n")
                f.flush()
                os.fsync(f.fileno())
        return message


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _save_npz(tmp: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def read_record(path: Path) -> dict[str, Any]:
    """A cell record (JSON with ``row`` and ``identity``); ValueError naming the file when it is unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"cell record {path} is not text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"cell record {path} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(record, dict) or not isinstance(record.get("row"), dict) or "identity" not in record:
        raise ValueError(f"cell record {path} lacks its 'row' or 'identity'")
    return record


def load_cells(output: Path | str) -> list[dict[str, Any]]:
    """Every readable finished cell record of an output folder; unreadable ones are skipped with a warning."""
    cells = []
    for path in sorted((Path(output) / "cells").glob("*.json")):
        try:
            cells.append(read_record(path))
        except (OSError, ValueError) as exc:
            log.warning("skipping %s", _one_line(exc))
    return cells


def load_failed(output: Path | str) -> list[dict[str, Any]]:
    """The failure records of an output folder's cells that have no finished record (newest failure each)."""
    folder = Path(output) / "cells" / "failed"
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if (Path(output) / "cells" / path.name).is_file():
            continue  # it succeeded later
        try:
            out.append(read_record(path))
        except (OSError, ValueError) as exc:
            log.warning("skipping %s", _one_line(exc))
    return out


def load_artifacts(path: Path | str) -> dict[str, Any] | None:
    """A cell's saved artifacts (pickle-free); None with a one-line warning when the file cannot be trusted."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        value = read_entry(path, ARTIFACTS_STAGE)
    except CorruptEntry as exc:
        try:  # a file of an earlier ussbench: a plain dict, loaded with the same pickle-free loader
            from ..serialization import UnsafeFileError, safe_load

            legacy = safe_load(path)
        except (UnsafeFileError, OSError):
            legacy = None
        if isinstance(legacy, dict) and "format" not in legacy:
            return legacy
        log.warning("cell artifacts %s skipped: %s", path, exc)
        return None
    return value if isinstance(value, dict) else None
