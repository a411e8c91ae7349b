"""A strict YAML reader for grid files and ``--set`` values: duplicate keys refused, ``2e-2`` a float.

PyYAML follows YAML 1.1, where a float needs a dot (``2e-2`` is the string ``'2e-2'``) and a repeated key
silently keeps the last value. Both are refused or fixed here (YAML 1.2 floats, as Hydra/OmegaConf read
them); syntax errors keep their line and column in the one-line message.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError

from .errors import ConfigError

# YAML 1.2 floats that YAML 1.1's resolver misses: an exponent without a dot or sign ("2e-2", "1E5",
# "1.5e3"); plain "1.5", ".inf" and ".nan" are already floats in YAML 1.1.
_FLOAT_12 = re.compile(
    r"""^(?:[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys and reads YAML 1.2 floats."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: let the base class raise its own error
                continue
            if first is not None:
                raise ConstructorError(
                    None, None, f"duplicate key {key!r} (first set on line {first})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)


# copy the class-level resolver table before adding to it, so plain yaml.SafeLoader is left untouched
StrictLoader.yaml_implicit_resolvers = {
    k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _one_line(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None and context_mark is not mark:
        problem += f" ({context} on line {context_mark.line + 1})"
    return f"{where}{problem}"


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text strictly; errors are a ConfigError ``<where>: line L, column C: <problem>``."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {_one_line(exc)}") from None


def load_yaml_file(path: Path) -> Any:
    """Read and strictly parse a YAML file (errors name the file, line and column)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    return parse_yaml(text, str(path))
