"""``--set KEY=VALUE``: change any grid key or plugin parameter from the command line (like Hydra overrides
or mmsegmentation's ``--cfg-options``). VALUE is read as YAML, exactly like the grid file.

KEY forms:
  ``seeds``, ``name``, ``data_root``, ``image_clusterers`` ... any top-level key (replaced as a whole);
  ``protocol.KEY``                         one protocol key, e.g. ``protocol.crf=false``;
  ``STAGE.ENTRY.PARAM``                    one parameter of the entries of a stage list, where ENTRY is an
                                           entry's label, its plugin name (every entry of that plugin), its
                                           index (``0``) or ``*`` (all); PARAM ``preset`` or ``label`` sets
                                           the entry's preset or label instead, e.g.
                                           ``image_clusterers.acg.epochs=5``.
Labels may contain dots (the first dot ends STAGE, the last starts PARAM) but not ``=``: select such an
entry by plugin name or index.
"""

from __future__ import annotations

from typing import Any

from .config import STAGE_KEYS, TOP_LEVEL_KEYS, _suggest
from .errors import ConfigError
from .yaml_loader import parse_yaml

ENTRY_FIELDS = ("preset", "label")
EXAMPLE = "e.g. seeds=[0,1] or image_clusterers.acg.epochs=5"


def parse_set(text: str) -> tuple[list[str], Any]:
    """``KEY=VALUE`` -> (key path, value read as YAML); a missing ``=`` or key is a one-line ConfigError."""
    key, sep, value = text.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE ({EXAMPLE})")
    return parts, parse_yaml(value, f"--set {key.strip()}")


def apply_set(raw: dict[str, Any], text: str) -> None:
    """Apply one ``--set`` to a grid's raw top-level mapping (in place); the grid is validated afterwards."""
    parts, value = parse_set(text)
    top = parts[0]
    where = f"--set {'.'.join(parts)}"
    if top not in TOP_LEVEL_KEYS or top == "base":
        keys = sorted(TOP_LEVEL_KEYS - {"base"})
        raise ConfigError(
            f"{where}: unknown grid key {top!r}{_suggest(top, keys)}; expected one of {', '.join(keys)}"
        )
    if len(parts) == 1:
        raw[top] = value
    elif top == "protocol" and len(parts) == 2:
        protocol = raw.get("protocol") or {}
        if not isinstance(protocol, dict):
            raise ConfigError(f"{where}: the grid's protocol is not a mapping ({protocol!r})")
        raw["protocol"] = {**protocol, parts[1]: value}
    elif top in STAGE_KEYS and len(parts) >= 3:
        _set_entry_field(raw, top, ".".join(parts[1:-1]), parts[-1], value, where)
    else:
        form = "protocol.KEY" if top == "protocol" else f"{top}.ENTRY.PARAM" if top in STAGE_KEYS else top
        raise ConfigError(f"{where}: expected {form}=VALUE ({EXAMPLE})")


def _set_entry_field(
    raw: dict[str, Any], stage: str, selector: str, field: str, value: Any, where: str
) -> None:
    items = raw.get(stage)
    if items is None:
        raise ConfigError(f"{where}: the grid has no {stage!r} list to select {selector!r} from")
    items = [
        dict(item) if isinstance(item, dict) else {"name": item}
        for item in (items if isinstance(items, list) else [items])
    ]
    chosen = _select(items, stage, selector, where)
    for item in chosen:
        if field in ENTRY_FIELDS:
            item[field] = value
        else:
            params = item.get("params") or {}
            if not isinstance(params, dict):
                raise ConfigError(f"{where}: params of {item.get('name')!r} are not a mapping ({params!r})")
            item["params"] = {**params, field: value}
    raw[stage] = items


def _select(items: list[dict[str, Any]], stage: str, selector: str, where: str) -> list[dict[str, Any]]:
    if selector == "*":
        return [it for it in items if not (stage == "feature_learners" and it.get("name") == "none")]
    if selector.isdigit():
        index = int(selector)
        if index >= len(items):
            raise ConfigError(f"{where}: {stage} has {len(items)} entries, no index {index}")
        return [items[index]]
    chosen = [it for it in items if selector in (it.get("label"), it.get("name"))]
    if not chosen:
        have = ", ".join(dict.fromkeys(repr(it.get("label") or it.get("name")) for it in items))
        raise ConfigError(f"{where}: no entry of {stage} is labelled or named {selector!r} (entries: {have})")
    return chosen
