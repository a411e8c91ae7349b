"""Grid runner: validate everything, expand the cells, plan their stage graph, execute it, write the report.

Each finished cell is written atomically to ``<output>/cells/<cell_id>.json`` (+ ``.npz`` panels), so an
interrupted grid resumes where it stopped; a failing cell is recorded and the grid goes on; the report is
rebuilt from the finished cells at the end. See :mod:`ussbench.graph` for the graph and the executors.
"""

from __future__ import annotations

import itertools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import provenance
from .atomic import clean_orphans
from .config import STAGE_KEYS, Grid, StageEntry
from .errors import ConfigError, UssbenchError
from .graph.cells import STAGE_ORDER, Cell, build_plugin
from .graph.committed import restore_committed_cells
from .graph.executor import ExecutionSummary, Executor, InProcessExecutor, RecordContext
from .graph.machine import environment_info
from .graph.plan import Plan, plan_cells
from .graph.records import CellStore, load_cells, load_failed
from .graph.runtime import RunSettings, Runtime
from .threads import configure_threads, crf_workers

log = logging.getLogger(__name__)
_STAGE_KEY_OF = {kind: key for key, kind in STAGE_KEYS.items()}

__all__ = ["RunSummary", "expand_cells", "load_cells", "load_failed", "plan_grid", "resolve_device", "run_grid",
           "validate_grid"]  # fmt: skip


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; an explicit CUDA request without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is available (use device: auto or cpu)")
    return torch.device(name)


def expand_cells(grid: Grid) -> list[Cell]:
    """All cells in an order that keeps shared stages adjacent (dataset, backbone, seed, learner, ...)."""
    s = grid.stages
    cells = []
    for ds, bb in itertools.product(s["datasets"], s["backbones"]):
        for seed in grid.seeds:
            for fl, ic, dc, pp in itertools.product(
                s["feature_learners"], s["image_clusterers"], s["dataset_clusterers"], s["postprocess"]
            ):
                cell = Cell((ds, bb, fl, ic, dc, pp), seed)
                if not any(_excluded(cell, rule) for rule in grid.exclude):
                    cells.append(cell)
    return cells


def _excluded(cell: Cell, rule: dict[str, str]) -> bool:
    return all(
        cell.entry(kind).label == value or cell.entry(kind).name == value for kind, value in rule.items()
    )


def validate_grid(grid: Grid) -> None:
    """Instantiate every plugin once, then check data roots and weight files, then the cluster counts
    against the vectors there can be (:func:`ussbench.limits.check_grid`), before any work starts.

    Two passes: every plugin's parameters are checked before any ``check()`` runs, because a backbone's check
    may convert its weights into the cache (seconds, 44 MB) and a typo in a later stage should not wait on it.
    """
    built = []
    for key, entries in grid.stages.items():
        for i, entry in enumerate(entries):
            if not entry.skipped:
                where = f"{grid.path}{' (with --set)' if grid.sets else ''}: {key}[{i}] ({entry.name})"
                with _blamed(where, entry.name):
                    built.append(
                        (where, entry.name, build_plugin(entry, _validation_injections(entry, grid)))
                    )
    for where, name, plugin in built:
        check = getattr(plugin, "check", None)
        if callable(check):
            with _blamed(where, name):
                check()
    from .limits import check_grid, clipping_summary

    clipped = check_grid(grid)  # after the plugins' own checks: a typo is reported before any clipping note
    if clipped:
        log.warning(clipping_summary(clipped))


@contextmanager
def _blamed(where: str, plugin_name: str | None = None):
    """Re-raise a plugin's configuration, file or value error as one ConfigError line that starts with ``where``
    (which names the plugin, so a message that starts with the plugin's name loses that prefix)."""
    try:
        yield
    except Exception as exc:  # a user plugin's own error too (TypeError of an abstract class, ...): one line
        lines = str(exc).strip().splitlines()
        message = str(exc) if isinstance(exc, UssbenchError) else lines[0] if lines else type(exc).__name__
        if plugin_name and message.startswith(f"{plugin_name}: "):
            message = message[len(plugin_name) + 2 :]
        if not isinstance(exc, (UssbenchError, FileNotFoundError, ValueError)):
            message = f"{type(exc).__name__}: {message}"
        raise (type(exc) if isinstance(exc, ConfigError) else ConfigError)(f"{where}: {message}") from exc


def _validation_injections(entry: StageEntry, grid: Grid) -> dict[str, Any]:
    return {"data_root": grid.data_root, "cache_dir": str(grid.cache_dir), "seed": grid.seeds[0], "device": "cpu",
            "n_clusters": 2, "num_classes": 2}  # fmt: skip


def run_settings(grid: Grid, device: torch.device, progress: bool) -> RunSettings:
    """What every process computing this grid's nodes needs to know."""
    return RunSettings(device=str(device), protocol=grid.protocol, data_root=grid.data_root,
                       cache_root=str(grid.cache_dir), progress=progress, crf_workers=crf_workers(),
                       plugin_modules=tuple(grid.plugins),
                       plugin_base_dir=str(Path.cwd()))  # fmt: skip


def plan_grid(
    grid: Grid, progress: bool = False, limit_cells: int | None = None, remember: bool = True
) -> tuple[Plan, Runtime]:
    """The validated grid's stage graph (no work done) and the runtime it was planned with.

    ``remember=False`` plans without writing file digests to the cache (``--dry-run``).
    """
    validate_grid(grid)
    device = resolve_device(grid.device)
    # one thread policy for torch, faiss/OpenMP and BLAS (ussbench.threads)
    configure_threads(device=str(device))
    cells = expand_cells(grid)
    if limit_cells is not None:
        cells = cells[:limit_cells]
    rt = Runtime(run_settings(grid, device, progress))
    return plan_cells(cells, rt, remember), rt


@dataclass
class RunSummary:
    grid: Grid
    output: Path
    n_cells: int
    n_run: int
    n_resumed: int
    seconds: float  # computing the cells (the executor's graph)
    n_failed: int = 0
    failures: list[str] = field(default_factory=list)
    execution: ExecutionSummary | None = None
    total_seconds: float = 0.0  # the whole run: planning (data fingerprints, weights), cells and the report


def _report_cells(out: Path, planned: list[str]) -> tuple[set[str], str | None]:
    """(the cells a run's report covers, which runs they come from): this run's cells, plus those of the latest
    run of every other grid file that ran into the same folder (a sub-grid such as ``study_*_full_abc.yaml``)
    where ``run.json`` records them; the cells of earlier runs of this grid file are left out."""
    from .reports.records import scope_phrase

    cell_ids, grid_files = provenance.current_cell_ids(provenance.read_run(out))
    if cell_ids is None or len(grid_files) < 2 or not set(planned) <= cell_ids:
        return set(planned), None
    return cell_ids, scope_phrase(grid_files)


def run_grid(
    grid: Grid,
    progress: bool = True,
    report: bool = True,
    limit_cells: int | None = None,
    executor: Executor | None = None,
    reuse_committed: bool = False,
) -> RunSummary:
    """Run every cell of a validated grid (skipping finished ones), record failures, and write the report.

    ``reuse_committed``: in a folder without cell records, resume the cells its committed results hold
    (:mod:`ussbench.graph.committed`); off by default, so a fresh clone's run recomputes what it reports."""
    run_start = time.perf_counter()
    out = grid.output
    plan, rt = plan_grid(grid, progress, limit_cells)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    for folder, recursive in (
        (out, False),
        (out / "cells", True),
        (grid.cache_dir, True),
    ):  # our folders only
        for path in clean_orphans(folder, recursive):
            log.info("removed %s (left by a killed run)", path)
    store = CellStore(out)
    if reuse_committed:
        restore_committed_cells(plan, store)
    executor = executor or InProcessExecutor()
    env, run_index = provenance.start_run(
        out, grid, environment_info(rt.device), len(plan.cells), extra={"executor": executor.name}, cell_ids=plan.cell_ids
    )  # fmt: skip  # run.json history (provenance.py)
    start = time.perf_counter()
    result = executor.run(plan, store, rt, RecordContext(grid.name, env))
    failures = [o.error or "" for o in result.failed]
    summary = RunSummary(grid, out, len(plan.cells), result.count("run"),
                         result.count("resumed") + result.count("shared"), time.perf_counter() - start,
                         len(failures), failures, result)  # fmt: skip
    # recorded now (a report that fails still leaves the cells' time); again with the total at the end
    provenance.finish_run(out, run_index, summary.n_run, summary.n_resumed, summary.seconds, summary.n_failed)
    if report:
        if len(failures) == len(plan.cells):
            log.warning("no cell of grid %s finished; report not written", grid.name)
        else:
            from .reports.build import build_report

            cell_ids, scope = _report_cells(out, plan.cell_ids)
            build_report(out, grid_name=grid.name, stage_order=[_STAGE_KEY_OF[k] for k in STAGE_ORDER],
                         cell_ids=cell_ids, scope=scope)  # fmt: skip
    summary.total_seconds = time.perf_counter() - run_start
    provenance.finish_run(out, run_index, summary.n_run, summary.n_resumed, summary.seconds, summary.n_failed,
                          total_seconds=summary.total_seconds)  # fmt: skip
    return summary
