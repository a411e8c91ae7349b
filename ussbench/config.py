"""Grid files: YAML naming datasets, backbones, one plugin list per stage, seeds and the protocol.

Everything is validated before any work starts; each problem is one line naming the file, the key and
what was expected. Relative paths are resolved against the current working directory (run from the repo
root, as the README does).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import registry
from .errors import ConfigError

STAGE_KEYS = {
    "datasets": "dataset",
    "backbones": "backbone",
    "feature_learners": "feature_learner",
    "image_clusterers": "image_clusterer",
    "dataset_clusterers": "dataset_clusterer",
    "postprocess": "postprocess",
}
OPTIONAL_STAGES = {"feature_learners", "postprocess"}  # "none" means the stage is skipped
TOP_LEVEL_KEYS = {
    "name", "description", "data_root", "output", "cache_dir", "device", "seeds", "plugins", "protocol", "exclude",
    "baseline", *STAGE_KEYS,
}  # fmt: skip
ENTRY_KEYS = {"name", "params", "preset", "label"}
PROTOCOL_KEYS = {
    "name": (str, "default"),
    "matching": (str, "auto"),
    "objective": (str, "pixels"),
    "n_clusters": ((int, type(None)), None),
    "panels": (int, 4),
    "res": ((int, type(None)), None),
    "flip_tta": ((bool, type(None)), None),  # None: as the named protocol says
    "crf": ((bool, type(None)), None),
    "linear_probe": ((bool, type(None)), None),  # None: on (ussbench.evaluation.probe); kept out of cell ids
}
BOOL_PROTOCOL_KEYS = ("flip_tta", "crf")
OPTIONAL_BOOL_KEYS = ("linear_probe",)
PROTOCOL_CHOICES = {"name": ("default", "dsm_voc", "stego"), "matching": ("auto", "hungarian", "many_to_one"),
                    "objective": ("pixels", "iou")}  # fmt: skip
# Parameters the runner fills in per cell when a plugin accepts them and the grid did not set them.
INJECTED = {"seed", "device", "n_clusters", "num_classes", "data_root", "cache_dir"}


@dataclass(frozen=True)
class StageEntry:
    """One plugin choice for one stage, with validated parameters and a display label."""

    kind: str
    name: str
    params: dict[str, Any]
    preset: str | None
    label: str

    @property
    def skipped(self) -> bool:
        return self.name == "none" and self.kind in ("feature_learner",)

    def identity(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "params": self.params, "preset": self.preset}


@dataclass
class Grid:
    """A validated grid file."""

    path: Path
    name: str
    description: str
    data_root: str | None
    output: Path
    cache_dir: Path
    device: str
    seeds: list[int]
    plugins: list[str]
    stages: dict[str, list[StageEntry]]
    protocol: dict[str, Any]
    exclude: list[dict[str, str]] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_grid(path: str | Path, overrides: dict[str, Any] | None = None) -> Grid:
    """Read and validate a grid file; ``overrides`` (from the CLI) replace top-level keys."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = value
    where = str(path)
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(key, TOP_LEVEL_KEYS)}; "
                              f"expected some of {', '.join(sorted(TOP_LEVEL_KEYS))}")  # fmt: skip
    for module in _as_list(raw.get("plugins", []), f"{where}: key 'plugins'", str):
        registry.import_plugin_module(module, base_dir=Path.cwd())
    name = raw.get("name") or path.stem
    if not isinstance(name, str):
        raise ConfigError(f"{where}: key 'name' expects a string, got {name!r}")
    seeds = _as_list(raw.get("seeds", [0]), f"{where}: key 'seeds'", int)
    if not seeds:
        raise ConfigError(f"{where}: key 'seeds' must list at least one integer seed")
    device = raw.get("device", "auto")
    if device not in ("auto", "cpu", "cuda") and not (isinstance(device, str) and device.startswith("cuda:")):
        raise ConfigError(f"{where}: key 'device' expects auto, cpu, cuda or cuda:N, got {device!r}")
    stages: dict[str, list[StageEntry]] = {}
    for key, kind in STAGE_KEYS.items():
        entries = raw.get(key, ["none"] if key in OPTIONAL_STAGES else None)
        if entries is None:
            raise ConfigError(f"{where}: missing key {key!r} (a list of {kind} plugins)")
        items = _as_list(entries, f"{where}: key {key!r}", (str, dict))
        if not items:
            raise ConfigError(f"{where}: key {key!r} must list at least one {kind} plugin")
        stages[key] = _unique_labels(
            [_parse_entry(item, kind, f"{where}: {key}[{i}]") for i, item in enumerate(items)]
        )
    protocol = _parse_protocol(raw.get("protocol", {}) or {}, f"{where}: protocol")
    if protocol.get("crf"):
        for i, entry in enumerate(stages["postprocess"]):
            if entry.name != "none":
                raise ConfigError(
                    f"{where}: postprocess[{i}] ({entry.name}) with protocol.crf on would post-process twice; "
                    "set postprocess: [none] or protocol.crf: false"
                )
    exclude = _parse_exclude(raw.get("exclude", []) or [], f"{where}: exclude")
    if raw.get("baseline") is not None:
        _check_baseline(raw["baseline"], stages, f"{where}: baseline")
    data_root = raw.get("data_root")
    if data_root is not None and not isinstance(data_root, str):
        raise ConfigError(f"{where}: key 'data_root' expects a path string, got {data_root!r}")
    if data_root is not None and not Path(data_root).expanduser().is_dir():
        raise ConfigError(f"{where}: data_root {data_root!r} does not exist (pass --data-root DIR)")
    return Grid(
        path=path,
        name=name,
        description=str(raw.get("description", "")),
        data_root=data_root,
        output=Path(raw.get("output") or Path("reports") / name),
        cache_dir=Path(raw.get("cache_dir") or ".cache/ussbench").expanduser(),
        device=device,
        seeds=seeds,
        plugins=list(raw.get("plugins", []) or []),
        stages=stages,
        protocol=protocol,
        exclude=exclude,
        raw=raw,
    )


def _as_list(value: Any, where: str, item_type) -> list:
    if not isinstance(value, list):
        value = [value]
    for i, item in enumerate(value):
        if not isinstance(item, item_type) or isinstance(item, bool) and item_type is int:
            expected = getattr(item_type, "__name__", None) or " or ".join(t.__name__ for t in item_type)
            raise ConfigError(f"{where}[{i}]: expected {expected}, got {item!r}")
    return value


def _parse_entry(item: str | dict, kind: str, where: str) -> StageEntry:
    if isinstance(item, str):
        item = {"name": item}
    for key in item:
        if key not in ENTRY_KEYS:
            raise ConfigError(
                f"{where}: unknown key {key!r}{_suggest(key, ENTRY_KEYS)}; expected name, params, preset, label"
            )
    name = item.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: key 'name' expects a {kind} plugin name, got {name!r}")
    params = item.get("params") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{where}.params: expected a mapping of parameter names to values, got {params!r}")
    preset = item.get("preset")
    if kind == "feature_learner" and name == "none":
        if params or preset:
            raise ConfigError(f"{where}: 'none' (no feature learner) takes no params or preset")
        return StageEntry(kind, "none", {}, None, str(item.get("label") or "none"))
    try:
        spec = registry.get(kind, name)
    except registry.PluginError as exc:
        known = list(registry.available(kind)[kind])
        raise ConfigError(f"{where}: {exc}{_suggest(name, known)}") from None
    resolved = registry.resolve_params(spec, params, preset, where=f"{where}.params")
    label = item.get("label") or _default_label(name, params, preset)
    return StageEntry(kind, name, resolved, preset, str(label))


def _default_label(name: str, params: dict[str, Any], preset: str | None) -> str:
    parts = [name] + ([f"[{preset}]"] if preset else [])
    parts += [f"{k}={v}" for k, v in sorted(params.items()) if k not in INJECTED]
    return " ".join(parts)


def _unique_labels(entries: list[StageEntry]) -> list[StageEntry]:
    seen: dict[str, int] = {}
    for e in entries:
        seen[e.label] = seen.get(e.label, 0) + 1
    dupes = [label for label, n in seen.items() if n > 1]
    if dupes:
        raise ConfigError(
            f"two entries of the same stage share the label {dupes[0]!r}; give each a distinct 'label'"
        )
    return entries


def _parse_protocol(raw: dict, where: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    out = {}
    for key, (types_, default) in PROTOCOL_KEYS.items():
        value = raw.get(key, default)
        if key in BOOL_PROTOCOL_KEYS or key in OPTIONAL_BOOL_KEYS:
            if value is not None and not isinstance(value, bool):
                raise ConfigError(f"{where}.{key}: expected true or false, got {value!r}")
        elif not isinstance(value, types_) or isinstance(value, bool):
            raise ConfigError(f"{where}.{key}: expected {types_}, got {value!r}")
        if key in PROTOCOL_CHOICES and value not in PROTOCOL_CHOICES[key]:
            raise ConfigError(
                f"{where}.{key}: expected one of {', '.join(PROTOCOL_CHOICES[key])}, got {value!r}"
            )
        out[key] = value
    for key in raw:
        if key not in PROTOCOL_KEYS:
            raise ConfigError(
                f"{where}: unknown key {key!r}{_suggest(key, PROTOCOL_KEYS)}; expected {', '.join(PROTOCOL_KEYS)}"
            )
    from .evaluation.protocols import get_protocol

    # A named protocol fixes matching/objective/flip TTA/CRF unless the grid overrides them. flip_tta and crf
    # enter the protocol dict (and so the cell ids) only where they can matter: protocols that upsample codes
    # (stego) or a grid that sets them; other grids keep the cell ids they had before these keys existed.
    overrides = {k: out[k] for k in ("res", *BOOL_PROTOCOL_KEYS) if out[k] is not None}
    spec = get_protocol(out["name"], **overrides)
    if out["name"] != "default":
        if out["res"] is None:
            out["res"] = spec.res
        for key in ("matching", "objective"):
            if key not in raw:
                out[key] = getattr(spec, key)
    for key in BOOL_PROTOCOL_KEYS:
        if out[key] is None:
            out[key] = getattr(spec, key) if spec.upsample == "bilinear_code" else None
        if out[key] is None:
            del out[key]
    if spec.flip_tta and spec.resize == "original":
        raise ConfigError(f"{where}.flip_tta: protocol {spec.name!r} evaluates at the original resolution, where "
                          "flipped codes are not averaged; flip TTA needs protocol name: stego")  # fmt: skip
    if spec.crf and not spec.crf_preset:
        raise ConfigError(
            f"{where}.crf: protocol {spec.name!r} has no CRF preset; use postprocess: [crf] instead"
        )
    for key in OPTIONAL_BOOL_KEYS:
        if out[key] is None:
            del out[key]
    if out["n_clusters"] is not None and out["n_clusters"] < 1:
        raise ConfigError(f"{where}.n_clusters: expected a positive integer, got {out['n_clusters']}")
    return out


def _parse_exclude(raw: list, where: str) -> list[dict[str, str]]:
    stage_names = {v: k for k, v in STAGE_KEYS.items()}
    out = []
    for i, rule in enumerate(_as_list(raw, where, dict)):
        for key, value in rule.items():
            if key not in stage_names:
                raise ConfigError(f"{where}[{i}]: unknown stage {key!r}{_suggest(key, stage_names)}")
            if not isinstance(value, str):
                raise ConfigError(
                    f"{where}[{i}].{key}: expected a label or plugin name string, got {value!r}"
                )
        out.append(dict(rule))
    return out


def _check_baseline(raw: Any, stages: dict[str, list[StageEntry]], where: str) -> None:
    """The grid's baseline row for the report's Δ column: stage -> a label or plugin name of that stage's entries."""
    keys = {kind: key for key, kind in STAGE_KEYS.items()}
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            f"{where}: expected a mapping of stage to label, e.g. {{image_clusterer: none}}, got {raw!r}"
        )
    for kind, value in raw.items():
        if kind not in keys:
            raise ConfigError(f"{where}: unknown stage {kind!r}{_suggest(kind, keys)}")
        entries = stages[keys[kind]]
        if not isinstance(value, str) or not any(e.label == value or e.name == value for e in entries):
            known = ", ".join(sorted({e.label for e in entries}))
            raise ConfigError(f"{where}.{kind}: {value!r} names no entry of {keys[kind]} (labels: {known})")


def limit_images(grid: Grid, limit: int) -> Grid:
    """Restrict every dataset of the grid to its first ``limit`` images (quick runs and tests)."""
    from dataclasses import replace

    if limit < 1:
        raise ConfigError(f"--limit expects a positive number of images, got {limit}")
    limited = []
    for entry in grid.stages["datasets"]:
        spec = registry.get("dataset", entry.name)
        if "limit" not in spec.params:
            raise ConfigError(f"dataset {entry.name!r} takes no 'limit' parameter")
        limited.append(replace(entry, params={**entry.params, "limit": limit}))
    grid.stages["datasets"] = limited
    return grid
