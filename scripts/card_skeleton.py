"""Print a registry card skeleton for a plugin (defaults and presets read from the code).

Usage: python scripts/card_skeleton.py KIND NAME > registry/KIND/NAME.yaml, then fill in the prose.
"""

from __future__ import annotations

import sys

import yaml

from ussbench import registry


def skeleton(kind: str, name: str) -> dict:
    spec = registry.get(kind, name)
    return {
        "name": name,
        "kind": kind,
        "entry_point": f"{spec.cls.__module__}:{spec.cls.__qualname__}",
        "summary": spec.summary,
        "citation": "",
        "defaults": spec.defaults(),
        "presets": spec.presets,
        "deviations": [],
        "published": [],
    }


if __name__ == "__main__":
    print(yaml.safe_dump(skeleton(sys.argv[1], sys.argv[2]), sort_keys=False, width=110), end="")
