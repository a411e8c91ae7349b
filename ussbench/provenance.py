"""Provenance of a report folder: ``run.json`` keeps the history of every run into it (appended, never lost).

Each run entry records the code (git commit and whether the tree was dirty, ussbench version), the command
line with its ``--limit`` and ``--set`` values, the machine (CPU model from /proc/cpuinfo, cores, thread
counts), library versions, the cells it ran or resumed, and its start/end. The run's code and machine facts
are also added to every cell row's ``environment``, so a report can flag rows that come from different code
versions or machines.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .atomic import atomic_write_json
from .cpuinfo import cpu_model

log = logging.getLogger(__name__)
RUN_FILE = "run.json"


def thread_counts() -> dict[str, Any]:
    """Threads this process computes with: torch intra-op, OMP/MKL settings, faiss's OpenMP pool, affinity."""
    out: dict[str, Any] = {}
    try:
        out["usable_cores"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        out["usable_cores"] = os.cpu_count()
    if "torch" in sys.modules:
        out["torch"] = sys.modules["torch"].get_num_threads()
    if "faiss" in sys.modules and hasattr(sys.modules["faiss"], "omp_get_max_threads"):
        out["faiss_omp"] = int(sys.modules["faiss"].omp_get_max_threads())
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "USSBENCH_THREADS"):
        if os.environ.get(var):
            out[var] = os.environ[var]
    return out


def machine_info() -> dict[str, Any]:
    return {"cpu_model": cpu_model(), "cores": os.cpu_count(), "threads": thread_counts(),
            "hostname_hash": _short_hash(platform.node())}  # fmt: skip


def code_info() -> dict[str, Any]:
    """The git commit of the ussbench checkout (None when not a git checkout) and whether it had edits."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10, check=True).stdout.strip()  # fmt: skip
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", "ussbench"],
                                capture_output=True, text=True, timeout=10, check=True).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {"git_commit": None, "git_dirty": None}
    return {"git_commit": commit or None, "git_dirty": bool(status.strip())}


def command_info(argv: list[str] | None = None) -> dict[str, Any]:
    """The command line and the options that change what a run computes (``--limit``, ``--set``)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name == "__main__.py" and Path(argv[0]).parent.name == "ussbench":
        argv = ["python", "-m", "ussbench", *argv[1:]]  # how `python -m ussbench ...` was typed
    limit, sets = None, []
    for i, arg in enumerate(argv):
        value = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--limit":
            limit = value
        elif arg.startswith("--limit="):
            limit = arg.split("=", 1)[1]
        elif arg == "--set" and value is not None:
            sets.append(value)
        elif arg.startswith("--set="):
            sets.append(arg.split("=", 1)[1])
    return {"command": shlex.join(argv), "cwd": os.getcwd(), "limit": limit, "set": sets}


def _short_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:8]


@contextmanager
def _locked(output: Path):
    """Serialise read-modify-write of run.json between processes sharing one output folder."""
    lock_dir = Path(output) / "cells"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / ".run-history.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_run(output: Path, set_aside_corrupt: bool = False) -> dict[str, Any]:
    """run.json of a report folder ({} if absent); a file from before the history gets it as one entry.

    An unreadable file reads as {} with a warning; ``set_aside_corrupt`` (a run about to rewrite it) first
    renames it to ``run.json.corrupt-<time>``, so the broken history is kept for inspection, not overwritten."""
    path = Path(output) / RUN_FILE
    if not path.is_file():
        return {}
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(run, dict) or not isinstance(run.get("history", []), list):
            raise ValueError("expected a mapping with a 'history' list")
    except (ValueError, UnicodeDecodeError) as exc:
        reason = " ".join(str(exc).split())
        if set_aside_corrupt:
            kept = path.with_name(f"{RUN_FILE}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(path, kept)
            log.warning(
                "%s is unreadable (%s); kept as %s, a new run history starts", path, reason, kept.name
            )
        else:
            log.warning("%s is unreadable (%s); the report shows no run history", path, reason)
        return {}
    if "history" not in run and run:
        legacy = {k: run[k] for k in ("started", "grid_file", "n_cells", "environment") if k in run}
        run["history"] = [{**legacy, "legacy": True}]
    return run


def start_run(output: Path, grid: Any, environment: dict[str, Any], n_cells: int,
              argv: list[str] | None = None, extra: dict[str, Any] | None = None,
              cell_ids: list[str] | None = None) -> tuple[dict[str, Any], int]:  # fmt: skip
    """Append this run to ``output/run.json``; returns (the environment rows record, the entry's index).

    ``extra``: more facts of the run for its entry and the top level (e.g. the executor's name).
    ``cell_ids``: the cells this run planned, so ``ussbench report`` knows which cells are current
    (:func:`current_cell_ids`).

    The top-level keys (grid, grid_file, environment, started, n_cells) describe the latest run, as before.
    """
    env = {**environment, **code_info(), "machine": machine_info()}
    limits = sorted(
        {str(e.params["limit"]) for e in grid.stages.get("datasets", []) if e.params.get("limit")}
    )
    entry = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "ended": None,
        **command_info(argv),
        "dataset_limit": limits[0] if len(limits) == 1 else (limits or None),
        "grid_file": str(grid.path),
        "grid_name": grid.name,
        "seeds": list(grid.seeds),
        "n_cells": n_cells,
        "environment": env,
        **(extra or {}),
    }
    if cell_ids is not None:
        entry["cell_ids"] = sorted(cell_ids)
    with _locked(output):
        run = read_run(output, set_aside_corrupt=True)
        history = run.get("history", [])
        history.append(entry)
        run.update(grid=grid.raw, grid_file=str(grid.path), environment=env, started=entry["started"],
                   n_cells=n_cells, history=history, **(extra or {}))  # fmt: skip
        atomic_write_json(Path(output) / RUN_FILE, run)
    return env, len(history) - 1


def finish_run(
    output: Path,
    index: int,
    n_run: int,
    n_resumed: int,
    seconds: float,
    n_failed: int = 0,
    total_seconds: float | None = None,
) -> None:
    """Close this run's entry: end time, cells run, resumed and failed, seconds computing cells and (once the
    report is written) ``total_seconds`` of the whole run, planning and report included."""
    with _locked(output):
        run = read_run(output)
        history = run.get("history", [])
        if 0 <= index < len(history):
            history[index].update(ended=time.strftime("%Y-%m-%d %H:%M:%S"), n_run=n_run, n_resumed=n_resumed,
                                  n_failed=n_failed, seconds=round(seconds, 2))  # fmt: skip
            if total_seconds is not None:
                history[index]["total_seconds"] = round(total_seconds, 2)
            atomic_write_json(Path(output) / RUN_FILE, run)


def grid_key(entry: dict[str, Any]) -> str:
    """Which grid a history entry ran: its grid file's name (a clone elsewhere keeps it), else its grid name."""
    grid_file = entry.get("grid_file")
    return Path(grid_file).name if grid_file else str(entry.get("grid_name") or "?")


def current_cell_ids(run: dict[str, Any]) -> tuple[set[str] | None, list[str]]:
    """(the cells a folder's report covers, the grid files they come from): for each grid file that ran into
    the folder, the cells of its latest run.

    A rerun of a grid with fewer seeds or entries thus drops the cells it no longer plans, while a sub-grid
    run into the same folder (``study_msrc_full_abc.yaml`` beside ``study_msrc_full.yaml``) adds its cells.
    None (every cell in the folder) when a latest run predates the record of cell ids, or there is no history.
    """
    latest: dict[str, dict[str, Any]] = {}
    for entry in run.get("history") or []:
        if isinstance(entry, dict) and not entry.get("legacy"):
            latest[grid_key(entry)] = entry
    if not latest or any(not isinstance(e.get("cell_ids"), list) for e in latest.values()):
        return None, sorted(latest)
    return {str(c) for e in latest.values() for c in e["cell_ids"]}, sorted(latest)


def environment_signature(env: dict[str, Any]) -> tuple[str, str]:
    """(code, machine) of a cell row's environment, as short strings for grouping rows in a report."""
    versions = env.get("versions", {})
    commit = env.get("git_commit")
    code = f"ussbench {versions.get('ussbench', '?')}" + (f" @ {commit[:10]}" if commit else "") + (
        " (dirty)" if env.get("git_dirty") else "")  # fmt: skip
    libs = ", ".join(
        f"{k} {versions[k]}" for k in ("torch", "numpy", "faiss-cpu", "scikit-learn") if k in versions
    )
    machine_info_ = env.get("machine") or {}
    cpu = (
        machine_info_.get("cpu_model") or env.get("cpu_model") or env.get("gpu") or env.get("processor", "?")
    )
    cores = machine_info_.get("cores") or env.get("cpu_count", "?")
    threads = (machine_info_.get("threads") or {}).get("torch")
    machine = f"{cpu} ({cores} cores" + (f", torch threads {threads}" if threads else "") + ")"
    if env.get("gpu"):
        machine += f", {env['gpu']}"
    return f"{code}; {libs}", machine
