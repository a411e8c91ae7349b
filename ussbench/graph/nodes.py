"""Stage nodes and the graph a grid expands into: same content key = one node, however many cells use it.

A :class:`Node` is a stage's content key, its inputs (other nodes, by name), its :class:`Stage` (the
picklable description of its compute), whether its value lives in the on-disk cache, and the resources it
asks for. Executors (:mod:`ussbench.graph.executor`) walk the graph; every executor calls
:func:`compute_node`, so a node computes the same value in any process given its inputs' values.
"""

from __future__ import annotations

import abc
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from .cells import Cell
    from .runtime import Runtime


@dataclass(frozen=True)
class Resources:
    """What a node's compute asks for: CPU cores, GPUs (fractions allowed) and a memory hint in MB."""

    cpus: float = 1.0
    gpus: float = 0.0
    memory_mb: int | None = None


@dataclass
class Inputs:
    """What a stage's compute receives: its inputs' values, and (for the cell record) how they were obtained.

    seconds[name]: the input's compute (or cache load) time at its first use in this run; reused[name]: the
    value was not computed for this cell (it came from the memo of an earlier cell or from the disk cache).
    """

    values: dict[str, Any]
    seconds: dict[str, float] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)


class Stage(abc.ABC):
    """The compute of one node: a picklable object holding the stage choices it needs (no live plugins).

    ``kind`` names the stage in keys, logs and the cache folder; ``cache_stage`` is the on-disk cache
    folder (None: the value lives in the memo only, e.g. a fitted dataset clusterer); ``seed`` seeds the
    global RNGs before the compute so a value never depends on what ran before it in the process.
    """

    kind: str = ""
    cache_stage: str | None = None
    seed: int = 0
    resources: Resources = Resources()

    @abc.abstractmethod
    def compute(self, inputs: Inputs, rt: Runtime) -> Any:
        """The node's value from its inputs' values."""

    def describe(self) -> str:
        """A short human-readable name (logs and error lines)."""
        return self.kind

    def rng_seed(self) -> int:
        """The seed of the global RNGs during the compute (the node's key must cover it)."""
        return int(self.seed)


def takes_seed(entry: Any) -> bool:
    """Whether a stage entry's plugin has a ``seed`` parameter (its node's key then includes the seed)."""
    from .. import registry

    return not entry.skipped and "seed" in registry.get(entry.kind, entry.name).params


@dataclass(eq=False)
class Node:
    """One stage computation in the graph, identified by its content key."""

    key: str
    stage: Stage
    inputs: dict[str, Node] = field(default_factory=dict)
    cell: Cell | None = None  # set on a cell's sink node

    @property
    def kind(self) -> str:
        return self.stage.kind

    @property
    def cached(self) -> bool:
        return self.stage.cache_stage is not None

    @property
    def resources(self) -> Resources:
        return self.stage.resources

    def describe(self) -> str:
        return f"{self.stage.describe()} [{self.key[:8]}]"


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def compute_node(node: Node, inputs: Inputs, rt: Runtime) -> Any:
    """Run a node's compute with the global RNGs seeded from its seed (the same in every executor)."""
    seed_everything(node.stage.rng_seed())
    return node.stage.compute(inputs, rt)


class Graph:
    """Nodes merged by key, plus one sink node per cell in the grid's order."""

    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {}
        self.sinks: list[Node] = []

    def add(self, node: Node) -> Node:
        """The graph's node with ``node.key``: ``node`` itself if new, else the one already there (merged)."""
        existing = self.nodes.get(node.key)
        if existing is not None:
            if existing.kind != node.kind:
                raise ValueError(f"key collision between {existing.describe()} and {node.describe()}")
            return existing
        self.nodes[node.key] = node
        return node

    def add_sink(self, node: Node) -> Node:
        node = self.add(node)
        if node not in self.sinks:
            self.sinks.append(node)
        return node

    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def consumers(self) -> dict[str, int]:
        """How many nodes read each node's value (a sink counts one more: its record is written)."""
        counts = {key: 0 for key in self.nodes}
        for node in self.nodes.values():
            for inp in node.inputs.values():
                counts[inp.key] += 1
        for sink in self.sinks:
            counts[sink.key] += 1
        return counts

    def topological(self) -> list[Node]:
        """Every node after its inputs (depth first from the sinks, in cell order)."""
        order: list[Node] = []
        seen: set[str] = set()

        def visit(node: Node) -> None:
            stack = [(node, iter(node.inputs.values()))]
            seen.add(node.key)
            while stack:
                current, children = stack[-1]
                nxt = next((c for c in children if c.key not in seen), None)
                if nxt is None:
                    stack.pop()
                    order.append(current)
                else:
                    seen.add(nxt.key)
                    stack.append((nxt, iter(nxt.inputs.values())))

        for sink in self.sinks:
            if sink.key not in seen:
                visit(sink)
        return order

    def counts_by_kind(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for node in self.nodes.values():
            out[node.kind] = out.get(node.kind, 0) + 1
        return out
