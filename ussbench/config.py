"""Grid files: YAML naming datasets, backbones, one plugin list per stage, seeds and the protocol.

Everything is validated before any work starts; each problem is one line naming the file, the key and
what was expected. A grid may name a ``base`` grid and override its top-level keys. Paths written in a
grid file (``data_root``, ``plugins``, ``base``) are relative to that file's folder; paths given on the
command line are relative to the current folder; ``output`` and ``cache_dir`` are relative to the current
folder. Without any ``data_root`` the project's shipped ``data/`` folder is used (see :mod:`.paths`).
"""

from __future__ import annotations

import difflib
import itertools
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from . import registry
from .errors import ConfigError, PluginError
from .paths import default_data_root, resolve_grid_path
from .yaml_loader import load_yaml_file

log = logging.getLogger(__name__)

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
    "name", "description", "base", "data_root", "output", "cache_dir", "device", "seeds", "plugins", "protocol",
    "exclude", "baseline", *STAGE_KEYS,
}  # fmt: skip
NOT_INHERITED = ("name", "description", "output")  # each grid file names itself and its report folder
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
PROTOCOL_MINIMUM = {"n_clusters": 1, "panels": 0, "res": 1}  # panels 0: no qualitative panels


def _as_tuple(types_: type | tuple[type, ...]) -> tuple[type, ...]:
    return types_ if isinstance(types_, tuple) else (types_,)


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
    """A validated grid file (after its ``base`` chain, command-line flags and ``--set`` overrides)."""

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
    sources: list[Path] = field(default_factory=list)  # the grid file, then its base, its base's base, ...
    sets: list[str] = field(default_factory=list)  # --set KEY=VALUE overrides, in order


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def load_grid(
    path: str | Path, overrides: dict[str, Any] | None = None, sets: list[str] | None = None
) -> Grid:
    """Read and validate a grid file (a path, or a bare name of a shipped grid).

    ``overrides`` (the CLI's dedicated flags) replace top-level keys; ``sets`` are ``KEY=VALUE`` strings
    (``--set``) applied after them. Both are validated exactly like keys written in the file.
    """
    from .overrides import apply_set

    path = resolve_grid_path(path)
    raw, sources, origins = read_composed(path)
    exclude_before = raw.get("exclude")
    for key, value in (overrides or {}).items():
        if value is not None:
            raw[key] = _cli_path(value) if key == "data_root" else value
    for text in sets or []:
        apply_set(raw, text)
    where = str(path) + (" (with --set)" if sets else "")
    # a base grid's exclude rules may name entries this grid replaced; such a rule matches no cell either way
    exclude_origin = origins.get("exclude")
    inherited_exclude = exclude_origin not in (None, sources[0]) and raw.get("exclude") is exclude_before
    registry.load_builtins()  # first: a user plugin that takes a built-in name is then the one refused
    for i, module in enumerate(_as_list(raw.get("plugins", []) or [], f"{where}: key 'plugins'", str)):
        try:
            registry.import_plugin_module(module, base_dir=Path.cwd())
        except PluginError as exc:
            raise PluginError(f"{where}: plugins[{i}]: {exc}") from None
    name = raw.get("name") or path.stem
    if not isinstance(name, str):
        raise ConfigError(f"{where}: key 'name' expects a string, got {name!r}")
    if name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
        raise ConfigError(f"{where}: key 'name' ({name!r}) names the report folder reports/<name>: use no "
                          "'/', '\\' or '..' (set 'output' to write elsewhere)")  # fmt: skip
    flagged = {key for key, value in (overrides or {}).items() if value is not None}
    seeds = _parse_seeds(raw.get("seeds", [0]), _blame("seeds", flagged, where))
    device = raw.get("device", "auto")
    if device not in ("auto", "cpu", "cuda") and not (isinstance(device, str) and device.startswith("cuda:")):
        raise ConfigError(
            f"{_blame('device', flagged, where)} expects auto, cpu, cuda or cuda:N, got {device!r}"
        )
    stages: dict[str, list[StageEntry]] = {}
    for key, kind in STAGE_KEYS.items():
        entries = raw.get(key, ["none"] if key in OPTIONAL_STAGES else None)
        if entries is None:
            raise ConfigError(f"{where}: missing key {key!r} (a list of {kind} plugins)")
        items = _as_list(entries, f"{where}: key {key!r}", (str, dict))
        if not items:
            raise ConfigError(f"{where}: key {key!r} must list at least one {kind} plugin")
        stages[key] = _distinct_entries(
            [_parse_entry(item, kind, f"{where}: {key}[{i}]") for i, item in enumerate(items)],
            f"{where}: {key}",
        )
    protocol = _parse_protocol(raw.get("protocol", {}) or {}, f"{where}: protocol")
    if protocol.get("crf"):
        for i, entry in enumerate(stages["postprocess"]):
            if entry.name != "none":
                raise ConfigError(
                    f"{where}: postprocess[{i}] ({entry.name}) with protocol.crf on would post-process twice; "
                    "set postprocess: [none] or protocol.crf: false"
                )
    exclude = _parse_exclude(
        raw.get("exclude", []) or [],
        stages,
        f"{exclude_origin} (base of {path}): exclude" if inherited_exclude else f"{where}: exclude",
        inherited=inherited_exclude,
    )
    if raw.get("baseline") is not None:
        _check_baseline(raw["baseline"], stages, f"{where}: baseline")
    data_root = _data_root(raw, _blame("data_root", flagged, where))
    for key in ("output", "cache_dir"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise ConfigError(f"{_blame(key, flagged, where)} expects a path string, got {raw[key]!r}")
    output = Path(raw.get("output") or Path("reports") / name).expanduser()
    cache_dir = Path(raw.get("cache_dir") or ".cache/ussbench").expanduser()
    for key, folder in (("output", output), ("cache_dir", cache_dir)):
        check_writable_folder(folder, _blame(key, flagged, where))
    return Grid(
        path=path,
        name=name,
        description=str(raw.get("description", "")),
        data_root=data_root,
        output=output,
        cache_dir=cache_dir,
        device=device,
        seeds=seeds,
        plugins=list(raw.get("plugins", []) or []),
        stages=stages,
        protocol=protocol,
        exclude=exclude,
        raw=raw,
        sources=sources,
        sets=list(sets or []),
    )


def read_composed(path: Path) -> tuple[dict[str, Any], list[Path], dict[str, Path]]:
    """The grid file's top-level keys over those of its ``base`` chain, with file-relative paths made absolute;
    also the chain (grid file first) and, for each key, the file whose own text set it.

    Every top-level key a grid sets replaces its base's value as a whole (lists and the protocol mapping
    included), except ``name``, ``description`` and ``output``, which are never inherited.
    """
    chain: list[Path] = []
    layers: list[dict[str, Any]] = []
    current: Path | None = path
    while current is not None:
        resolved = current.resolve()
        if resolved in chain:
            cycle = " -> ".join(str(p) for p in [*chain, resolved])
            raise ConfigError(f"{chain[-1]}: key 'base' makes a cycle: {cycle}")
        chain.append(resolved)
        raw = _read_one(current)
        layers.append(raw)
        base = raw.pop("base", None)
        if base is not None and not isinstance(base, str):
            raise ConfigError(f"{current}: key 'base' expects a grid file name, got {base!r}")
        current = _resolve_base(base, current) if base is not None else None
    merged: dict[str, Any] = {}
    origins: dict[str, Path] = {}
    for depth, (layer, source) in enumerate(zip(reversed(layers), reversed(chain))):
        inherited = {k: v for k, v in merged.items() if k not in NOT_INHERITED}
        merged = {**inherited, **layer} if depth else dict(layer)
        origins = {**{k: v for k, v in origins.items() if k in inherited}, **dict.fromkeys(layer, source)}
    return merged, chain, origins


def _resolve_base(base: str, grid_file: Path) -> Path:
    """The grid file a ``base`` key names (never the grid itself: ``my/msrc_grid.yaml`` may extend the shipped
    ``msrc_grid.yaml``); a base that only names the grid itself is a ConfigError saying so."""
    try:
        return resolve_grid_path(base, relative_to=grid_file.parent, skip=grid_file)
    except ConfigError:
        named = grid_file.parent / Path(base).expanduser()
        if any(
            p.is_file() and p.resolve() == grid_file.resolve()
            for p in (named, named.with_name(named.name + ".yaml"))
        ):
            raise ConfigError(
                f"{grid_file}: key 'base' ({base!r}) names this grid file itself; name the grid it extends"
            ) from None
        raise


def _read_one(path: Path) -> dict[str, Any]:
    """One grid file's keys (checked against the known top-level keys), its relative paths made absolute."""
    raw = load_yaml_file(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}{_suggest(str(key), TOP_LEVEL_KEYS)}; "
                              f"expected some of {', '.join(sorted(TOP_LEVEL_KEYS))}")  # fmt: skip
    folder = path.resolve().parent
    data_root = raw.get("data_root")
    if isinstance(data_root, str):
        raw["data_root"] = str((folder / Path(data_root).expanduser()).resolve())
    plugins = raw.get("plugins")
    if isinstance(plugins, list):
        raw["plugins"] = [_plugin_path(p, folder) for p in plugins]
    return raw


def _plugin_path(ref: Any, folder: Path) -> Any:
    """A plugin file named relative to the grid's folder (else to the current folder) as an absolute path."""
    if not isinstance(ref, str) or not (ref.endswith(".py") or "/" in ref):
        return ref  # a dotted module name (or a bad value that validation reports)
    path = Path(ref).expanduser()
    if path.is_absolute():
        return ref
    beside = folder / path
    return str(beside if beside.is_file() or not path.is_file() else path.resolve())


def _cli_path(value: Any) -> Any:
    return str(Path(value).expanduser().resolve()) if isinstance(value, str) else value


def _blame(key: str, flagged: set[str], where: str) -> str:
    """Who set a top-level key: its command-line flag (``--output``) or the grid file's key."""
    return f"--{key.replace('_', '-')}" if key in flagged else f"{where}: key {key!r}"


def check_writable_folder(folder: Path, where: str) -> None:
    """Refuse, before any work, a results or cache folder that cannot be created or written: a file on its
    path, or a read-only parent (otherwise a run fails with a traceback once its first cell finishes)."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        what = "is" if existing == folder else f"lies under {str(existing)!r}, which is"
        raise ConfigError(f"{where}: {str(folder)!r} {what} a file, not a folder; name a folder")
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        part = "" if existing == folder else f" (its parent {str(existing)!r})"
        raise ConfigError(
            f"{where}: folder {str(folder)!r}{part} is not writable; name a folder you can write"
        )


def _data_root(raw: dict[str, Any], where: str) -> str | None:
    """The grid's data root: as set (must exist), else the project's shipped ``data/`` (None if there is none)."""
    data_root = raw.get("data_root")
    if data_root is None:
        default = default_data_root()
        return str(default) if default is not None else None
    if not isinstance(data_root, str):
        raise ConfigError(f"{where} expects a path string, got {data_root!r}")
    folder = Path(data_root).expanduser()
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{where}: {data_root!r} is a file, not a data folder (pass --data-root DIR)")
    if not folder.is_dir():
        raise ConfigError(f"{where}: data folder {data_root!r} does not exist (pass --data-root DIR)")
    return data_root


def _parse_seeds(value: Any, where: str) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        raise ConfigError(f"{where} expects a list of seeds, got the number {value}: write [{value}] for that one "
                          f"seed, or [{', '.join(map(str, range(max(1, min(value, 5)))))}] for {max(1, min(value, 5))} seeds")  # fmt: skip
    seeds = _as_list(value, where, int)
    if not seeds:
        raise ConfigError(f"{where} must list at least one integer seed")
    for i, seed in enumerate(seeds):
        if not 0 <= seed < 2**32:
            raise ConfigError(f"{where}[{i}]: expected an integer seed in 0..2**32-1, got {seed}")
    dupes = sorted({s for s in seeds if seeds.count(s) > 1})
    if dupes:
        raise ConfigError(f"{where}: seed {dupes[0]} is listed twice; each seed gives one run of every cell")
    return seeds


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


def _distinct_entries(entries: list[StageEntry], where: str) -> list[StageEntry]:
    """Refuse two entries of one stage with the same label, or the same plugin with the same parameters."""
    for (i, a), (j, b) in itertools.combinations(enumerate(entries), 2):
        if a.label == b.label:
            raise ConfigError(
                f"{where}[{i}] and [{j}] share the label {a.label!r}; give each a distinct 'label'"
            )
        if a.identity() == b.identity():
            raise ConfigError(
                f"{where}[{i}] ({a.label!r}) and [{j}] ({b.label!r}) are the same plugin with the same "
                "parameters; every cell would be computed twice"
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
            expected = " or ".join("null" if t is type(None) else t.__name__ for t in _as_tuple(types_))
            raise ConfigError(f"{where}.{key}: expected {expected}, got {value!r}")
        if key in PROTOCOL_MINIMUM and value is not None and value < PROTOCOL_MINIMUM[key]:
            raise ConfigError(f"{where}.{key}: expected at least {PROTOCOL_MINIMUM[key]}, got {value!r}")
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


def _parse_exclude(
    raw: Any, stages: dict[str, list[StageEntry]], where: str, inherited: bool = False
) -> list[dict[str, str]]:
    """Exclude rules: each names, per stage, a label or plugin name that the stage has (refused otherwise).

    ``inherited`` (the rules come from a base grid): a rule naming an entry this grid does not have matches no
    cell, so it is dropped with a warning instead of refused (the base file was checked on its own).
    """
    stage_names = {v: k for k, v in STAGE_KEYS.items()}
    out = []
    for i, rule in enumerate(_as_list(raw, where, dict)):
        if not rule:
            raise ConfigError(f"{where}[{i}]: an empty rule would exclude every cell")
        for key, value in rule.items():
            if key not in stage_names:
                raise ConfigError(f"{where}[{i}]: unknown stage {key!r}{_suggest(str(key), stage_names)}")
            if not isinstance(value, str):
                raise ConfigError(
                    f"{where}[{i}].{key}: expected a label or plugin name string, got {value!r}"
                )
            entries = stages[stage_names[key]]
            if not any(value in (e.label, e.name) for e in entries):
                if inherited:
                    log.warning(
                        f"{where}[{i}] names {key} {value!r}, which this grid does not have: rule dropped"
                    )
                    break
                have = ", ".join(dict.fromkeys(repr(e.label) for e in entries))
                raise ConfigError(
                    f"{where}[{i}].{key}: {value!r} is no label or plugin name of {stage_names[key]} "
                    f"(labels: {have}), so the rule matches no cell"
                )
        else:
            out.append(dict(rule))
    if out and _every_cell_excluded(stages, out):
        raise ConfigError(f"{where}: the rules exclude every cell of the grid")
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


def _every_cell_excluded(stages: dict[str, list[StageEntry]], rules: list[dict[str, str]]) -> bool:
    kinds = list(STAGE_KEYS.values())
    for combo in itertools.product(*(stages[key] for key in STAGE_KEYS)):
        by_kind = dict(zip(kinds, combo))
        if not any(all(v in (by_kind[k].label, by_kind[k].name) for k, v in rule.items()) for rule in rules):
            return False
    return True


def limit_images(grid: Grid, limit: int) -> Grid:
    """Restrict every dataset of the grid to its first ``limit`` images (quick runs and tests).

    A limited dataset also lets a cell clip a cluster count above its number of vectors (with a note in
    its results, see :mod:`.limits`) instead of refusing it.
    """
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"--limit expects a positive number of images, got {limit}")
    limited = []
    for entry in grid.stages["datasets"]:
        spec = registry.get("dataset", entry.name)
        if "limit" not in spec.params:
            raise ConfigError(f"dataset {entry.name!r} takes no 'limit' parameter")
        whole = _image_count(entry, grid.data_root)
        if whole is not None and limit >= whole:  # cuts nothing: the full run (same cells, cache, refusals)
            log.info(
                "--limit %d covers all %d images of %s: the whole dataset is used", limit, whole, entry.label
            )
            limited.append(replace(entry, params={k: v for k, v in entry.params.items() if k != "limit"}))
        else:
            limited.append(replace(entry, params={**entry.params, "limit": limit}))
    grid.stages["datasets"] = limited
    return grid


def _image_count(entry: StageEntry, data_root: str | None) -> int | None:
    """Images of a dataset entry without any limit, or None when it cannot be listed yet (the grid's
    validation then reports why)."""
    from .errors import UssbenchError
    from .graph.cells import build_plugin

    try:
        whole = replace(entry, params={k: v for k, v in entry.params.items() if k != "limit"})
        return len(build_plugin(whole, {"data_root": data_root}))
    except (UssbenchError, OSError, ValueError, TypeError):
        return None
