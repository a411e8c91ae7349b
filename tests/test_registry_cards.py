"""Every built-in plugin has a catalogue card whose defaults and presets match the code."""

from __future__ import annotations

import importlib

import pytest

from ussbench import registry
from ussbench.cards import CARD_KEYS, card_path, load_card

BUILTINS = [
    (kind, name)
    for kind, specs in registry.available().items()
    for name, spec in specs.items()
    if spec.cls.__module__.startswith("ussbench.")
]


@pytest.mark.parametrize("kind, name", BUILTINS, ids=[f"{k}/{n}" for k, n in BUILTINS])
def test_card_matches_code(kind, name):
    card = load_card(kind, name)
    assert card is not None, f"missing card {card_path(kind, name)}"
    assert set(CARD_KEYS) <= set(card), f"{card_path(kind, name)} lacks {set(CARD_KEYS) - set(card)}"
    spec = registry.get(kind, name)
    assert card["name"] == name and card["kind"] == kind
    module, _, attr = card["entry_point"].partition(":")
    assert getattr(importlib.import_module(module), attr) is spec.cls
    assert card["defaults"] == spec.defaults(), (
        f"{card_path(kind, name)}: defaults differ from the constructor"
    )
    assert (card["presets"] or {}) == spec.presets, f"{card_path(kind, name)}: presets differ from the code"
    for ref in card["published"] or []:
        assert {"dataset", "metric", "value", "source"} <= set(ref), ref
        assert isinstance(ref["value"], (int, float))
