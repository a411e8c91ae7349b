"""Error types: every user-facing failure is one clear line naming the file, key or value at fault."""

from __future__ import annotations


class UssbenchError(Exception):
    """Base class for errors that ussbench reports to the user as a single line."""


class ConfigError(UssbenchError, ValueError):
    """A grid file or plugin parameter is malformed; the message names file, key and what was expected."""


class PluginError(UssbenchError, LookupError):
    """A plugin name is unknown or a plugin could not be registered or imported."""


class DataError(UssbenchError, FileNotFoundError):
    """A data root, image or label file is missing or unreadable."""


class BackboneWeightsError(UssbenchError, FileNotFoundError):
    """A weight file the backbone needs is missing; the message says how to provide it."""


class NumericalError(UssbenchError, FloatingPointError):
    """A numerical routine produced NaN/inf or failed to converge and no fallback was allowed."""
