"""A grid cell (one plugin choice per stage plus a seed) and the plugin helpers every stage uses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import registry
from ..cache import stable_hash
from ..config import StageEntry
from ..registry import KINDS

STAGE_ORDER = KINDS  # a cell has one choice per plugin kind, in the registry's order


@dataclass(frozen=True)
class Cell:
    """One choice per stage plus a seed."""

    entries: tuple[StageEntry, ...]  # in STAGE_ORDER
    seed: int

    def entry(self, kind: str) -> StageEntry:
        return self.entries[STAGE_ORDER.index(kind)]

    def labels(self) -> dict[str, str]:
        return {e.kind: e.label for e in self.entries}

    def describe(self) -> str:
        """One line naming the cell: every stage's label and the seed."""
        return " | ".join(e.label for e in self.entries) + f" | seed {self.seed}"

    def identity(self, protocol: dict[str, Any], inputs: dict[str, Any] | None = None) -> dict[str, Any]:
        """What a finished cell's result depends on: stage choices, plugin code versions, seed, protocol, inputs.

        The plugin versions make a grid re-run a cell whose plugin changed behaviour (its ``version`` bumped)
        instead of resuming a result the current code would not produce; ``inputs`` (fingerprints of the data
        and of the backbone, see :mod:`ussbench.graph.plan`) do the same when the data or weights change.
        """
        stages = [{**e.identity(), "version": plugin_version(e)} for e in self.entries]
        ident = {"stages": stages, "seed": self.seed, "protocol": protocol}
        if inputs is not None:
            ident["inputs"] = inputs
        return ident

    def cell_id(self, protocol: dict[str, Any], inputs: dict[str, Any] | None = None) -> str:
        return stable_hash(self.identity(protocol, inputs), 16)


def plugin_version(entry: StageEntry) -> str | None:
    """The registered plugin class's ``version`` (None for a skipped stage)."""
    if entry.skipped:
        return None
    return str(getattr(registry.get(entry.kind, entry.name).cls, "version", "1"))


def build_plugin(entry: StageEntry, injections: dict[str, Any]) -> Any:
    """Instantiate a stage's plugin, filling runner-provided params the grid left unset."""
    spec = registry.get(entry.kind, entry.name)
    params = dict(entry.params)
    for key, value in injections.items():
        if key in spec.params and key not in params:
            params[key] = value
    return registry.instantiate(spec, params)


def plugin_identity(plugin: Any) -> dict[str, Any]:
    """Cache identity of a plugin: name, effective params (device excluded) and code version."""
    params = {k: v for k, v in plugin.get_params().items() if k != "device"}
    return {"plugin": plugin.plugin_name, "params": params, "version": getattr(plugin, "version", "1")}


def build_params_for_record(entry: StageEntry, plugin: Any) -> dict[str, Any]:
    """Effective parameters of a stage as recorded in results (preset name included)."""
    return {"name": entry.name, "preset": entry.preset, "params": plugin.get_params()}
