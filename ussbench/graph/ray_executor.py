"""The Ray executor: the same stage graph as the in-process executor, each node one Ray task.

Every node of the cells still to run is submitted once (shared nodes are one task that every dependent
reuses), with its inputs' object references as arguments, so Ray runs it once they are ready, on a worker
with the CPUs, GPUs and memory the node asks for. A cached stage (features, learned codes, segments) is
computed under its cache-entry lock and saved in the content-addressed cache, and its task returns only a
:class:`CacheRef` (dependents read the entry, once per worker process); small values (labels, assignments,
evaluations) travel in the object store. The driver writes every record through the same
:class:`~ussbench.graph.records.CellStore` and :func:`~ussbench.graph.executor.complete_row` as the
in-process executor, holds the same per-cell locks and writes the same failure records.

Retries: a task whose worker or node dies is retried ``max_retries`` times by Ray; an error that may be
transient (out of memory, an I/O error of a shared filesystem) is retried as often; any other stage error
is deterministic (each compute is seeded) and fails its cells at once, as in the in-process executor.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import pickle
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ..cache import stable_hash
from ..errors import ConfigError
from ..threads import configure_threads
from .evaluation import peak_rss_mb
from .executor import (
    CellOutcome,
    ExecutionSummary,
    Executor,
    RecordContext,
    complete_row,
    load_cached,
    materialize,
    stage_failure,
)
from .nodes import Inputs, Node
from .plan import Plan
from .records import CellStore
from .runtime import RunSettings, Runtime

log = logging.getLogger(__name__)

RAY_VERSION = "2.60.0"
INSTALL_HINT = f'pip install "ussbench[ray]" (ray=={RAY_VERSION})'
DEFAULT_MAX_RETRIES = 2
DEFAULT_OBJECT_STORE_MB = 1024  # local instance; override with USSBENCH_RAY_OBJECT_STORE_MB
WORKER_VALUE_SLOTS = 3  # cache entries a worker process keeps loaded for its next tasks


def import_ray() -> Any:
    """The ``ray`` module, or a one-line ConfigError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"--executor ray needs the optional dependency ray: {INSTALL_HINT}") from None
    return ray


# -- what travels between tasks --------------------------------------------------------------------------
@dataclass(frozen=True)
class CacheRef:
    """Stands for a cached node's value: dependents read it from the (shared) disk cache."""

    stage: str
    key: str


@dataclass(frozen=True)
class Packed:
    """A small value, pickled in the worker that computed it and unpickled only when a stage reads it: after
    the reading worker has imported the grid's plugin modules (a fitted plugin object needs its class)."""

    blob: bytes

    @classmethod
    def of(cls, value: Any) -> Packed:
        from ray import cloudpickle

        return cls(cloudpickle.dumps(value, protocol=5))

    def unpack(self) -> Any:
        return pickle.loads(self.blob)


@dataclass(frozen=True)
class NodeMeta:
    """How a node's task went: seconds (compute or cache load), computed or loaded, the worker's peaks."""

    seconds: float
    computed: bool
    peak_rss_mb: float
    peak_gpu_mb: float
    pid: int


class RemoteStageFailed(Exception):
    """A node's compute raised in a worker: names the node, keeps the error and its traceback as text."""

    def __init__(self, where: str, error: BaseException, tb: str):
        super().__init__(f"{where}: {type(error).__name__}: {error}")
        self.where, self.error, self.traceback = where, error, tb

    def __reduce__(self):
        return (type(self), (self.where, self.error, self.traceback))


class TransientStageFailed(RemoteStageFailed):
    """A stage error that may not recur (out of memory, a shared filesystem's I/O error): Ray retries it."""


class TaskLost(RuntimeError):
    """A node's task never finished: its worker (or node) died on every attempt."""


_TRANSIENT_ERRNOS = {errno.EIO, errno.ESTALE, errno.EAGAIN, errno.EBUSY, errno.ENOSPC, errno.ETIMEDOUT}


def is_transient(exc: BaseException) -> bool:
    """Whether a stage error is worth retrying (it depends on the machine's state, not on the inputs)."""
    if isinstance(exc, (MemoryError, TimeoutError, ConnectionError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.dumps(exc)
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure: keep the text
        return RuntimeError(f"{type(exc).__name__}: {exc}")


# -- the worker side ---------------------------------------------------------------------------------------
class _WorkerState:
    """Per worker process: one Runtime per run's settings (backbones load once) and recently used entries."""

    def __init__(self) -> None:
        self.runtimes: dict[str, Runtime] = {}
        self.values: OrderedDict[tuple[str, str], Any] = OrderedDict()

    def runtime(self, settings: RunSettings) -> Runtime:
        key = stable_hash(dataclasses.asdict(settings))
        if key not in self.runtimes:
            self.runtimes[key] = Runtime.in_worker(settings)
        return self.runtimes[key]

    def keep(self, ref: CacheRef, value: Any) -> None:
        self.values[(ref.stage, ref.key)] = value
        self.values.move_to_end((ref.stage, ref.key))
        while len(self.values) > WORKER_VALUE_SLOTS:
            self.values.popitem(last=False)

    def value(self, ref: CacheRef, rt: Runtime) -> Any:
        """A cached node's value: kept in this process, else read from the disk cache."""
        slot = (ref.stage, ref.key)
        if slot in self.values:
            self.values.move_to_end(slot)
            return self.values[slot]
        value = rt.cache.load(ref.stage, ref.key)
        if value is None:
            raise FileNotFoundError(
                f"cache entry {ref.stage}/{ref.key} is not in {rt.cache.root} on this node: the cache folder "
                "must be on a filesystem that every Ray node shares (see docs/ray.md)"
            )
        self.keep(ref, value)
        return value


_STATE = _WorkerState()


class _LazyValues(dict):
    """Input values read only when the stage asks for them: a cached input from the cache (the sink never
    reads features), a packed one unpickled."""

    def __init__(self, values: dict[str, Any], rt: Runtime):
        super().__init__(values)
        self._rt = rt

    def __getitem__(self, name: str) -> Any:
        value = super().__getitem__(name)
        if isinstance(value, Packed):
            value = value.unpack()
            super().__setitem__(name, value)
        return _STATE.value(value, self._rt) if isinstance(value, CacheRef) else value

    def get(self, name: str, default: Any = None) -> Any:
        return self[name] if name in self else default


def warm_up(node: Node, rt: Runtime) -> None:
    """Build the dataset and backbone a stage uses before it is timed (the in-process executor builds them
    while planning), so a worker's first task does not count the network's construction as compute."""
    for attr in ("dataset", "backbone"):
        entry = getattr(node.stage, attr, None)
        if entry is not None and not isinstance(entry, str):
            (rt.raw_dataset if attr == "dataset" else rt.backbone)(entry)
    cell = getattr(node.stage, "cell", None)
    if cell is not None:
        rt.raw_dataset(cell.entry("dataset"))
        rt.backbone(cell.entry("backbone"))


def task_cpus() -> int:
    """Whole CPUs Ray granted the running task (1 outside a task or for a fractional grant)."""
    try:
        import ray

        granted = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
    except Exception:  # noqa: BLE001 - not in a Ray task: one thread, as Ray's workers default to
        granted = 1.0
    return max(1, int(granted))


def run_node(node: Node, settings: RunSettings, names: tuple[str, ...], owned: tuple[bool, ...],
             *args: Any) -> tuple[Any, NodeMeta]:  # fmt: skip
    """A node's task: its value (a CacheRef for a cached stage) and its meta. ``args`` are the inputs' values
    (then, for a cell's sink, the inputs' metas: its row records their seconds and whether they were reused;
    ``owned[i]``: this cell is the first of the run to use input i)."""
    if settings.device.startswith("cuda") and not torch.cuda.is_available():
        settings = dataclasses.replace(settings, device="cpu")  # a CPU-only task: Ray hid the GPUs from it
    configure_threads(task_cpus(), settings.device)  # the task's CPUs, not the node's: no oversubscription
    rt = _STATE.runtime(settings)
    device = rt.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    values = _LazyValues(dict(zip(names, args[: len(names)])), rt)
    metas: tuple[NodeMeta, ...] = args[len(names) :]
    inputs = Inputs(values)
    if metas:
        inputs.seconds = {n: m.seconds for n, m in zip(names, metas)}
        inputs.reused = {n: not (m.computed and own) for n, m, own in zip(names, metas, owned)}
    warm_up(node, rt)
    try:
        got = load_cached(node, rt)
        if got is None:
            got = materialize(node, inputs, rt)
    except Exception as exc:  # noqa: BLE001 - any stage error fails the cells that need this node
        failure = stage_failure(node, exc)
        kind = TransientStageFailed if is_transient(exc) else RemoteStageFailed
        raise kind(failure.where, _picklable(failure.error), failure.traceback) from None
    value = got.value
    if node.cached and rt.cache.root is not None:
        ref = CacheRef(node.stage.cache_stage, node.key)
        _STATE.keep(ref, value)
        value = ref
    elif node.cell is None:  # a cell's row and extras go to the driver as they are
        value = Packed.of(value)
    gpu = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0
    return value, NodeMeta(got.seconds, got.computed, peak_rss_mb(), gpu, os.getpid())


# -- the driver side ---------------------------------------------------------------------------------------
@dataclass
class _Limits:
    """What the cluster can give one task (requests above it would wait forever, so they are clipped)."""

    gpus: float
    memory_bytes: float
    cpus: float


class RayExecutor(Executor):
    """Runs the graph as Ray tasks on a local Ray instance (``address=None``) or an existing cluster."""

    name = "ray"

    def __init__(self, address: str | None = None, max_retries: int = DEFAULT_MAX_RETRIES,
                 num_cpus: int | None = None, object_store_mb: int | None = None,
                 window: int | None = None):  # fmt: skip
        if max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {max_retries}")
        self.address = address
        self.max_retries = max_retries
        self.num_cpus = num_cpus
        self.object_store_mb = object_store_mb
        self.window = window

    # -- connecting ----------------------------------------------------------------------------------------
    def connect(self) -> bool:
        """Join the cluster at ``address`` or start a local instance; True when this call started Ray."""
        ray = import_ray()
        if ray.is_initialized():
            return False
        if self.address is not None:
            ray.init(address=self.address, configure_logging=False, log_to_driver=True)
            return True
        cpus = self.num_cpus or len(os.sched_getaffinity(0))
        store = self.object_store_mb or int(
            os.environ.get("USSBENCH_RAY_OBJECT_STORE_MB", DEFAULT_OBJECT_STORE_MB)
        )
        ray.init(num_cpus=cpus, object_store_memory=store * 2**20, include_dashboard=False,
                 configure_logging=False, log_to_driver=True)  # fmt: skip
        return True

    def run(self, plan: Plan, store: CellStore, rt: Runtime, record: RecordContext) -> ExecutionSummary:
        started = self.connect()
        try:
            return _Run(self, plan, store, rt, record).run()
        finally:
            if started:
                import_ray().shutdown()


def cluster_limits(ray: Any) -> _Limits:
    """The largest GPU count, memory and CPU count of any one alive node."""
    gpus = memory = cpus = 0.0
    for node in ray.nodes():
        if node.get("Alive", True):
            res = node.get("Resources", {})
            gpus, memory = max(gpus, res.get("GPU", 0.0)), max(memory, res.get("memory", 0.0))
            cpus = max(cpus, res.get("CPU", 0.0))
    return _Limits(gpus, memory, cpus)


class _Run:
    """One run of a plan on Ray: submission window, per-cell locks, records and failures."""

    def __init__(self, ex: RayExecutor, plan: Plan, store: CellStore, rt: Runtime, record: RecordContext):
        self.ray = import_ray()
        self.ex, self.plan, self.store, self.rt, self.record = ex, plan, store, rt, record
        self.limits = cluster_limits(self.ray)
        self.task = self.ray.remote(run_node)
        self.settings = self.ray.put(dataclasses.replace(rt.settings, progress=False))
        self.refs: dict[str, tuple[Any, Any]] = {}  # key -> (value ref, meta ref), while a consumer needs it
        self.metas: dict[str, Any] = {}  # key -> meta ref (small; kept for the records and statistics)
        self.remaining: dict[str, int] = {}
        self.owner: dict[str, int] = {}  # key -> the first cell of this run that needs the node
        self.counted: set[str] = set()
        self.got: dict[str, NodeMeta | None] = {}  # metas fetched so far (None: the node failed)
        self.summary = ExecutionSummary()
        self.window = ex.window or max(8, 4 * int(self.ray.cluster_resources().get("CPU", 1)))

    # -- planning ----------------------------------------------------------------------------------------
    def _ancestors(self, sink: Node) -> list[Node]:
        """The sink's node and every node it needs, inputs first (topological)."""
        order: list[Node] = []
        seen: set[str] = set()

        def visit(node: Node) -> None:
            if node.key in seen:
                return
            seen.add(node.key)
            for inp in node.inputs.values():
                visit(inp)
            order.append(node)

        visit(sink)
        return order

    def _prepare(self, todo: list[int]) -> None:
        self.ancestors = {i: self._ancestors(self.plan.sinks[i]) for i in todo}
        for i in todo:
            for node in self.ancestors[i]:
                self.owner.setdefault(node.key, i)
        needed = {n.key: n for i in todo for n in self.ancestors[i]}
        self.remaining = {key: 0 for key in needed}
        for node in needed.values():
            for inp in node.inputs.values():
                self.remaining[inp.key] += 1

    def _options(self, node: Node) -> dict[str, Any]:
        res = node.resources
        cpus = max(1.0, res.cpus)  # whole CPUs: a fractional request makes Ray start more worker processes
        opts: dict[str, Any] = {
            "num_cpus": min(cpus, self.limits.cpus) if self.limits.cpus else cpus,
            "num_gpus": res.gpus if self.limits.gpus >= res.gpus else 0,
            "num_returns": 2,
            "max_retries": self.ex.max_retries,
            "retry_exceptions": [TransientStageFailed],
            "name": f"{node.kind}:{node.key[:8]}",
        }
        if res.memory_mb and self.limits.memory_bytes:
            opts["memory"] = min(res.memory_mb * 2**20, 0.8 * self.limits.memory_bytes)
        return opts

    # -- submitting ----------------------------------------------------------------------------------------
    def _submit(self, node: Node, cell: int | None = None) -> tuple[Any, Any]:
        if node.key in self.refs:
            return self.refs[node.key]
        names = tuple(node.inputs)
        inputs = [self._submit(inp) for inp in node.inputs.values()]
        args = [ref for ref, _ in inputs]
        owned: tuple[bool, ...] = ()
        if cell is not None:  # a cell's sink: its row needs its inputs' metas too
            args += [meta for _, meta in inputs]
            owned = tuple(self.owner.get(inp.key) == cell for inp in node.inputs.values())
        bare = Node(node.key, node.stage, {}, node.cell)  # the task needs no upstream nodes
        value, meta = self.task.options(**self._options(node)).remote(
            bare, self.settings, names, owned, *args
        )
        self.refs[node.key] = (value, meta)
        self.metas[node.key] = meta
        for inp in node.inputs.values():
            self.remaining[inp.key] -= 1
            if self.remaining[inp.key] <= 0:
                self.refs.pop(inp.key, None)  # every consumer holds it now: Ray frees it after them
        return value, meta

    # -- the loop ------------------------------------------------------------------------------------------
    def run(self) -> ExecutionSummary:
        plan, store = self.plan, self.store
        todo = []
        for i, cid in enumerate(plan.cell_ids):
            if store.finished(cid):
                self.summary.outcomes.append(CellOutcome(cid, "resumed"))
            else:
                todo.append(i)
        self._prepare(todo)
        self.bar = tqdm(total=len(plan.cells), initial=len(plan.cells) - len(todo), unit="cell",
                        desc=f"grid {self.record.grid_name} (ray)", disable=not self.rt.progress)  # fmt: skip
        self.inflight: dict[Any, tuple[int, Any]] = {}  # sink value ref -> (cell, its lock)
        deferred: list[int] = []
        queue = list(todo)
        while queue or self.inflight:
            while queue and len(self.inflight) < self.window:
                i = queue.pop(0)
                lock = store.lock(plan.cell_ids[i])
                if not lock.try_acquire():  # another run computes it now: do other cells first
                    deferred.append(i)
                    continue
                self._start(i, lock)
            self._progress()
            if self.inflight:
                self._wait()
        for i in deferred:
            lock = store.lock(plan.cell_ids[i])
            lock.acquire()
            self._start(i, lock)
            while self.inflight:
                self._wait()
        self.bar.close()
        return self.summary

    def _start(self, i: int, lock: Any) -> None:
        cid = self.plan.cell_ids[i]
        if self.store.finished(cid):  # finished by another run while we waited for its lock
            lock.release()
            self.summary.outcomes.append(CellOutcome(cid, "shared"))
            self.bar.update()
            return
        value, _ = self._submit(self.plan.sinks[i], cell=i)
        self.inflight[value] = (i, lock)

    def _wait(self) -> None:
        done, _ = self.ray.wait(list(self.inflight), num_returns=1)
        for ref in done:
            i, lock = self.inflight.pop(ref)
            try:
                self.summary.outcomes.append(self._finish(i, ref))
            finally:
                lock.release()
                self.refs.pop(self.plan.sinks[i].key, None)
            self.bar.update()
            self._progress()

    def _progress(self) -> None:
        failed = self.summary.count("failed")
        done = len(self.summary.outcomes) - failed
        self.bar.set_postfix_str(f"done {done} | running {len(self.inflight)} | failed {failed}")

    # -- records -------------------------------------------------------------------------------------------
    def _meta(self, node: Node) -> NodeMeta | None:
        if node.key in self.got:
            return self.got[node.key]
        try:
            meta = self.ray.get(self.metas[node.key])
        except Exception:  # noqa: BLE001 - the node failed: the caller records why
            meta = None
        self.got[node.key] = meta
        return meta

    def _count(self, nodes: list[Node]) -> list[tuple[Node, NodeMeta]]:
        got = []
        for node in nodes:
            meta = self._meta(node) if node.key in self.metas else None
            if meta is None:
                continue
            got.append((node, meta))
            if node.key not in self.counted:
                self.counted.add(node.key)
                log.debug("%s %s in %.3f s (worker pid %d)", "computed" if meta.computed else "loaded",
                          node.describe(), meta.seconds, meta.pid)  # fmt: skip
                (self.summary.computed if meta.computed else self.summary.loaded)[node.kind] += 1
        return got

    def _finish(self, i: int, ref: Any) -> CellOutcome:
        plan, cid, cell = self.plan, self.plan.cell_ids[i], self.plan.cells[i]
        nodes = self.ancestors[i]
        try:
            row, extras = self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - a stage failed or its worker died: record the cell
            self._count(nodes)
            where, error, tb = self._failure(nodes, exc)
            base = {"seed": cell.seed, **cell.labels()}
            message = self.store.write_failure(
                cid, base, plan.identities[i], error, where, cell.describe(), tb
            )
            log.error("cell %s (%s) failed in %s; traceback in %s", cid, cell.describe(), message,
                      self.store.error_log)  # fmt: skip
            return CellOutcome(cid, "failed", message)
        metas = self._count(nodes)
        seconds = sum(m.seconds for n, m in metas if self.owner.get(n.key) == i)
        row = complete_row(dict(row), cid, self.record, seconds, torch.device("cpu"))
        row["device"] = self.rt.settings.device  # the run's device (its CPU-only stages ran on CPU workers)
        row["peak_rss_mb"] = max(m.peak_rss_mb for _, m in metas)
        row["peak_gpu_mb"] = max(m.peak_gpu_mb for _, m in metas)
        self.store.write(cid, row, extras, plan.identities[i])
        log.info("cell %s: mIoU %.2f", cid, row["miou"])
        return CellOutcome(cid, "run")

    def _failure(self, nodes: list[Node], exc: BaseException) -> tuple[str, BaseException, str]:
        """The stage that failed first (inputs before consumers), its error and traceback text."""
        origin = next((n for n in nodes if self._meta(n) is None), nodes[-1])
        cause = getattr(exc, "cause", None) or exc
        if isinstance(cause, RemoteStageFailed):
            return cause.where, cause.error, cause.traceback
        attempts = self.ex.max_retries + 1
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        lost = TaskLost(f"the Ray task failed on all {attempts} attempt(s) (max_retries={self.ex.max_retries}): "
                        f"{type(cause).__name__}: {first}")  # fmt: skip
        return origin.stage.describe(), lost, f"{type(cause).__name__}: {cause}\n"


def make_executor(name: str, address: str | None = None, max_retries: int = DEFAULT_MAX_RETRIES) -> Executor:
    """The executor named on the command line ('local' or 'ray')."""
    from .executor import InProcessExecutor

    if name == "ray":
        import_ray()
        return RayExecutor(address=address, max_retries=max_retries)
    if address is not None:
        raise ConfigError("--address is for --executor ray (the local executor runs in this process)")
    return InProcessExecutor()
