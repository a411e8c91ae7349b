"""What a stage's compute may use in the process that runs it: settings (picklable) and live instances.

:class:`RunSettings` travels to any worker; :class:`Runtime` is rebuilt from it in each process and keeps
that process's dataset and backbone instances (a backbone holds its loaded network) and the disk cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import registry
from ..base import Backbone, Dataset
from ..cache import Cache, stable_hash
from ..config import StageEntry
from ..evaluation.protocols import ProtocolSpec
from .cells import build_plugin
from .evaluation import resolve_protocol


@dataclass(frozen=True)
class RunSettings:
    """Everything besides the graph that a process needs to compute nodes of one grid run."""

    device: str
    protocol: dict[str, Any]
    data_root: str | None
    cache_root: str | None
    progress: bool = True
    crf_workers: int | None = None  # protocol CRF pool size; None: serial on <= 2 CPUs, else up to 8
    plugin_modules: tuple[str, ...] = ()  # grid 'plugins:' to import in a fresh worker process
    plugin_base_dir: str | None = None


@dataclass
class Runtime:
    """Per-process state: the torch device, the protocol, the disk cache and reusable plugin instances."""

    settings: RunSettings
    _datasets: dict[str, Dataset] = field(default_factory=dict)
    _backbones: dict[str, Backbone] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.device = torch.device(self.settings.device)
        self.spec: ProtocolSpec = resolve_protocol(self.settings.protocol)
        self.cache = Cache(self.settings.cache_root)

    @classmethod
    def in_worker(cls, settings: RunSettings) -> Runtime:
        """A runtime for a fresh process: imports the grid's plugin modules first."""
        base = Path(settings.plugin_base_dir) if settings.plugin_base_dir else None
        for module in settings.plugin_modules:
            registry.import_plugin_module(module, base_dir=base)
        return cls(settings)

    @property
    def protocol(self) -> dict[str, Any]:
        return self.settings.protocol

    @property
    def progress(self) -> bool:
        return self.settings.progress

    def raw_dataset(self, entry: StageEntry) -> Dataset:
        """The dataset plugin (one instance per entry in this process)."""
        key = stable_hash(entry.identity())
        if key not in self._datasets:
            self._datasets[key] = build_plugin(entry, {"data_root": self.settings.data_root})
        return self._datasets[key]

    def dataset(self, entry: StageEntry, flip: bool = False) -> Dataset:
        """The dataset as the protocol evaluates it (optionally its mirror image, for flip TTA)."""
        raw = self.raw_dataset(entry)
        return self.spec.view(raw, flip=True) if flip else self.spec.view(raw)

    def backbone(self, entry: StageEntry) -> Backbone:
        """The backbone plugin (one instance per entry in this process: its network loads once)."""
        key = stable_hash(entry.identity())
        if key not in self._backbones:
            root = self.settings.cache_root
            self._backbones[key] = build_plugin(entry, {"cache_dir": str(root)} if root else {})
        return self._backbones[key]
