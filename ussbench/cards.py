"""Registry cards: the catalogue in ``registry/<kind>/<name>.yaml`` (citation, defaults, published numbers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CARD_KEYS = (
    "name",
    "kind",
    "entry_point",
    "summary",
    "citation",
    "defaults",
    "presets",
    "deviations",
    "published",
)


def registry_dir() -> Path:
    """The repository's ``registry/`` folder (next to the package in a checkout)."""
    return Path(__file__).resolve().parent.parent / "registry"


def card_path(kind: str, name: str, root: Path | None = None) -> Path:
    return (root or registry_dir()) / kind / f"{name}.yaml"


def load_card(kind: str, name: str, root: Path | None = None) -> dict[str, Any] | None:
    """The card of a plugin, or None if it has none."""
    path = card_path(kind, name, root)
    if not path.is_file():
        return None
    card = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(card, dict):
        raise ValueError(f"registry card {path} must be a mapping")
    return card


def published_numbers(kind: str, name: str, root: Path | None = None) -> list[dict[str, Any]]:
    """The numbers a plugin's paper reports, as listed in its card."""
    card = load_card(kind, name, root) or {}
    return list(card.get("published") or [])
