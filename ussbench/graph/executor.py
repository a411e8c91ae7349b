"""Executors run a plan's graph and write every cell through the :class:`~ussbench.graph.records.CellStore`.

:class:`Executor` is the interface (a Ray executor implements the same ``run`` on the same graph and
writes the same files through the same store and :func:`complete_row`). :class:`InProcessExecutor` walks
the cells in the grid's order, each depth first (a topological order), with a memo that drops a value as
soon as its last consumer is done and the on-disk cache for cached stages. Per-cell and per-entry file
locks let two processes on one output folder share the work; a failing stage fails only the cells that
need it (recorded, one line on stderr, traceback in ``errors.log``) and the grid goes on.
"""

from __future__ import annotations

import abc
import logging
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from .evaluation import peak_rss_mb
from .nodes import Graph, Inputs, Node, compute_node
from .plan import Plan
from .records import CellStore
from .runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class RecordContext:
    """What every cell row records besides its own results: the grid's name and the run's environment."""

    grid_name: str
    environment: dict[str, Any]


@dataclass
class CellOutcome:
    """How one cell ended in this run: 'run', 'resumed' (finished before), 'shared' (another run finished
    it meanwhile) or 'failed' (with its one-line error)."""

    cell_id: str
    status: str
    error: str | None = None


@dataclass
class ExecutionSummary:
    """Per-cell outcomes and how many nodes of each stage kind were computed or loaded from the cache."""

    outcomes: list[CellOutcome] = field(default_factory=list)
    computed: Counter = field(default_factory=Counter)
    loaded: Counter = field(default_factory=Counter)
    peak_held: int = 0  # most stage values held in memory at once
    held_at_end: int = 0

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[CellOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]


class Executor(abc.ABC):
    """Runs a plan: computes each cell's sink node once and writes its record (or its failure)."""

    name: str = ""

    @abc.abstractmethod
    def run(self, plan: Plan, store: CellStore, rt: Runtime, record: RecordContext) -> ExecutionSummary:
        """Run every unfinished cell of ``plan``; finished cells (valid records in ``store``) are resumed."""


def complete_row(row: dict[str, Any], cell_id: str, record: RecordContext, seconds: float,
                 device: torch.device) -> dict[str, Any]:  # fmt: skip
    """The last fields of a finished cell's row (identical in every executor)."""
    row.update(
        time_total_s=seconds,
        peak_gpu_mb=(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else 0.0,
        peak_rss_mb=peak_rss_mb(),
        cell_id=cell_id,
        grid=record.grid_name,
        environment=record.environment,
    )
    return row


class StageFailed(Exception):
    """A node's compute raised: names the node; keeps the original error and its traceback as text."""

    def __init__(self, where: str, error: BaseException, tb: str):
        super().__init__(f"{where}: {type(error).__name__}: {error}")
        self.where = where
        self.error = error
        self.traceback = tb


@dataclass
class Materialized:
    """A node's value and how it was obtained in this process: computed (fresh) or loaded, and the seconds."""

    value: Any
    seconds: float
    computed: bool


def load_cached(node: Node, rt: Runtime) -> Materialized | None:
    """The node's value from the disk cache (None if it is not cached or the entry is absent/untrusted)."""
    if not node.cached:
        return None
    start = time.perf_counter()
    value = rt.cache.load(node.stage.cache_stage, node.key)
    return None if value is None else Materialized(value, time.perf_counter() - start, False)


def materialize(node: Node, inputs: Inputs, rt: Runtime) -> Materialized:
    """Compute a node from its inputs' values in any process; a cached stage is computed under its entry lock
    (another process that computed it meanwhile is read instead) and saved. Errors propagate."""
    if not node.cached:
        start = time.perf_counter()
        value = compute_node(node, inputs, rt)
        return Materialized(value, time.perf_counter() - start, True)
    with rt.cache.lock(node.stage.cache_stage, node.key):
        hit = load_cached(node, rt)
        if hit is not None:
            return hit
        start = time.perf_counter()
        value = compute_node(node, inputs, rt)
        seconds = time.perf_counter() - start
        rt.cache.save(node.stage.cache_stage, node.key, value)
        return Materialized(value, seconds, True)


def stage_failure(node: Node, exc: BaseException) -> StageFailed:
    """Wrap a node's error: names the node, keeps the traceback as text and drops the frames (their tensors)."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    exc.__traceback__ = None
    return StageFailed(node.stage.describe(), exc, tb)


class _Walk:
    """The in-process walk's state: memo with consumer counts, first-use timings, failures, statistics."""

    def __init__(self, graph: Graph, rt: Runtime):
        self.rt = rt
        self.remaining = graph.consumers()
        self.memo: dict[str, Any] = {}
        self.seconds: dict[str, float] = {}
        self.done: set[str] = set()  # nodes whose inputs have been released (computed, loaded or failed)
        self.failed: dict[str, StageFailed] = {}
        self.fresh: set[str] = set()  # nodes computed for the current cell (not reused)
        self.computed: Counter = Counter()
        self.loaded: Counter = Counter()
        self.peak_held = 0

    def begin_cell(self) -> None:
        self.fresh = set()

    def release(self, node: Node) -> None:
        """A consumer is done with ``node``: drop its value after the last one; pass it on if never used."""
        self.remaining[node.key] -= 1
        if self.remaining[node.key] > 0:
            return
        self.memo.pop(node.key, None)
        if node.key not in self.done:  # never computed: its inputs lose a consumer too
            self.done.add(node.key)
            for inp in node.inputs.values():
                self.release(inp)

    def _note(self, node: Node, got: Materialized) -> Any:
        self.seconds.setdefault(node.key, got.seconds)
        if got.computed:
            self.fresh.add(node.key)
            self.computed[node.kind] += 1
            if node.cell is None:
                log.info("computed %s in %.2f s", node.describe(), got.seconds)
        else:
            self.loaded[node.kind] += 1
            log.info("loaded %s from the cache", node.describe())
        return got.value

    def _load(self, node: Node) -> Any | None:
        hit = load_cached(node, self.rt)
        return None if hit is None else self._note(node, hit)

    def resolve(self, node: Node) -> Any:
        """The node's value: memo, else disk cache, else computed from its inputs (under its entry lock)."""
        key = node.key
        if key in self.memo:
            return self.memo[key]
        if key in self.failed:
            raise self.failed[key]
        value = self._load(node)
        if value is None:
            try:
                value = self._compute(node)
            finally:
                self.done.add(key)
                for inp in node.inputs.values():
                    self.release(inp)
        else:
            self.done.add(key)
            for inp in node.inputs.values():
                self.release(inp)
        self.memo[key] = value
        self.peak_held = max(self.peak_held, len(self.memo))
        return value

    def _compute(self, node: Node) -> Any:
        key = node.key
        try:
            values = {name: self.resolve(inp) for name, inp in node.inputs.items()}
        except StageFailed as exc:
            self.failed[key] = exc
            raise
        inputs = Inputs(values, {n: self.seconds.get(i.key, 0.0) for n, i in node.inputs.items()},
                        {n: i.key not in self.fresh for n, i in node.inputs.items()})  # fmt: skip
        try:
            return self._note(node, materialize(node, inputs, self.rt))
        except Exception as exc:  # noqa: BLE001 - any stage error fails the cells that need this node
            failure = stage_failure(node, exc)
            self.failed[key] = failure
            raise failure from None


class InProcessExecutor(Executor):
    """Runs the graph in this process, cell after cell in the grid's order, each cell's record as it finishes."""

    name = "local"

    def run(self, plan: Plan, store: CellStore, rt: Runtime, record: RecordContext) -> ExecutionSummary:
        walk = _Walk(plan.graph, rt)
        summary = ExecutionSummary()
        deferred: list[int] = []
        finished = {cid for cid in plan.cell_ids if store.finished(cid)}
        # resumed cells start the bar (initial=): counted as updates they would make its rate and ETA instant
        bar = tqdm(total=len(plan.cells), initial=len(finished), desc=f"grid {record.grid_name}",
                   disable=not rt.progress, unit="cell")  # fmt: skip
        for i, cid in enumerate(plan.cell_ids):
            if cid in finished:
                summary.outcomes.append(CellOutcome(cid, "resumed"))
                walk.release(plan.sinks[i])
                continue
            lock = store.lock(cid)
            if not lock.try_acquire():  # another run computes it now: do other cells first
                deferred.append(i)
                continue
            try:
                summary.outcomes.append(self._cell(i, plan, store, walk, record, bar))
            finally:
                lock.release()
            bar.update()
        for i in deferred:
            lock = store.lock(plan.cell_ids[i])
            lock.acquire()
            try:
                summary.outcomes.append(self._cell(i, plan, store, walk, record, bar))
            finally:
                lock.release()
            bar.update()
        bar.close()
        summary.computed, summary.loaded = walk.computed, walk.loaded
        summary.peak_held, summary.held_at_end = walk.peak_held, len(walk.memo)
        return summary

    def _cell(self, i: int, plan: Plan, store: CellStore, walk: _Walk, record: RecordContext,
              bar: tqdm) -> CellOutcome:  # fmt: skip
        cid, sink, cell = plan.cell_ids[i], plan.sinks[i], plan.cells[i]
        if store.finished(cid):  # finished by another run while we waited for its lock
            walk.release(sink)
            return CellOutcome(cid, "shared")
        bar.set_postfix_str(" | ".join(cell.entries[k].label for k in (2, 3, 4)) + f" | seed {cell.seed}")
        device = walk.rt.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        walk.begin_cell()
        start = time.perf_counter()
        try:
            row, extras = walk.resolve(sink)
        except StageFailed as exc:
            base = {"seed": cell.seed, **cell.labels()}
            message = store.write_failure(
                cid, base, plan.identities[i], exc.error, exc.where, cell.describe(), exc.traceback
            )
            log.error(
                "cell %s (%s) failed in %s; traceback in %s", cid, cell.describe(), message, store.error_log
            )
            log.info("traceback of cell %s:\n%s", cid, exc.traceback)
            exc.__traceback__ = None
            return CellOutcome(cid, "failed", message)
        finally:
            walk.release(sink)
        row = complete_row(dict(row), cid, record, time.perf_counter() - start, device)
        store.write(cid, row, extras, plan.identities[i])
        log.info("cell %s: mIoU %.2f", cid, row["miou"])
        return CellOutcome(cid, "run")
