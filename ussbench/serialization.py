"""Stage outputs on disk without pickle's code execution: ``torch.load(weights_only=True)`` and an allow-list.

Only tensors, numpy arrays and scalars, the builtin containers and scalars, and ussbench's own data
containers (:class:`~ussbench.base.FeatureSet`, :class:`~ussbench.base.ImageFeatures`,
:class:`~ussbench.base.Segmentation`) can come back from a file; anything else in a file (a planted
``os.system`` reduce, a foreign class) makes the load fail with :class:`UnsafeFileError` before it runs.
:func:`storable` turns values a plugin returns (e.g. artifacts) into that vocabulary before saving, so
what is written can always be read back.
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def data_classes() -> tuple[type, ...]:
    """ussbench's own containers that stored files may hold (imported late: base imports the cache)."""
    from .base import FeatureSet, ImageFeatures, Segmentation

    return (FeatureSet, ImageFeatures, Segmentation)


def _numpy_globals() -> list[Any]:
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    multiarray = core.multiarray
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25: the dtype classes a pickled dtype BUILDs
    classes = [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")] if dtypes is not None else []
    classes += [type(np.dtype(c)) for c in "?bBhHiIlLqQefdgFDGSUV"]
    return [multiarray._reconstruct, multiarray.scalar, np.ndarray, np.dtype, *dict.fromkeys(classes)]


def allowed_globals() -> list[Any]:
    """The classes and functions a stored file may name besides torch's own safe set."""
    return [*data_classes(), *_numpy_globals()]


class UnsafeFileError(Exception):
    """A file holds something other than the allow-listed types (or is not a torch file at all)."""


def safe_load(path: Path | str) -> Any:
    """Load a file written by :func:`safe_save` (or any torch file of allow-listed types), never unpickling code."""
    try:
        with torch.serialization.safe_globals(allowed_globals()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's advice on foreign pickles; we say why
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError,
            KeyError, IndexError, UnicodeDecodeError, ImportError) as exc:  # fmt: skip
        raise UnsafeFileError(_reason(exc)) from None


def _reason(exc: BaseException) -> str:
    """The informative line of a loader error (torch's weights-only errors bury it in advice)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if "Unsupported global" in line or "Can only build" in line:
            return line
        if line.endswith("WeightsUnpickler error:") and i + 1 < len(lines):
            return lines[i + 1]
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()
    return lines[0] if lines else type(exc).__name__


def safe_save(obj: Any, path: Path | str) -> None:
    """``torch.save`` of a value made of allow-listed types (see :func:`storable`)."""
    torch.save(obj, path)


def storable(value: Any, where: str = "value") -> Any:
    """``value`` with every leaf that :func:`safe_load` could not read back replaced by its ``repr``.

    Tensors, numpy arrays (not of dtype object), numpy scalars, builtin scalars and containers (dict with
    str/int keys, list, tuple, set) and ussbench's data containers are kept as they are; anything else (a
    plugin object, a Path) becomes a string, logged once per call, so a cache entry or artifact file always
    loads again.
    """
    replaced: list[str] = []
    out = _storable(value, where, replaced, data_classes())
    if replaced:
        log.warning("%s: %d value(s) stored as text (not tensors, arrays or plain data): %s", where,
                    len(replaced), ", ".join(replaced[:3]) + (" ..." if len(replaced) > 3 else ""))  # fmt: skip
    return out


def _storable(value: Any, where: str, replaced: list[str], classes: tuple[type, ...]) -> Any:
    if isinstance(value, _SCALARS) or isinstance(
        value, (torch.Tensor, torch.dtype, torch.device, torch.Size)
    ):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            replaced.append(f"{where} (object array)")
            return repr(value.tolist())
        return value
    if isinstance(value, np.generic):
        return value
    if isinstance(value, classes):
        changes = {}
        for f in dataclasses.fields(value):
            item = getattr(value, f.name)
            new = _storable(item, f"{where}.{f.name}", replaced, classes)
            if new is not item:
                changes[f.name] = new
        return dataclasses.replace(value, **changes) if changes else value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            key = k if isinstance(k, (str, int)) else str(k)
            out[key] = _storable(v, f"{where}[{k!r}]", replaced, classes)
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_storable(v, f"{where}[{i}]", replaced, classes) for i, v in enumerate(value)]
        if isinstance(value, list):
            return items
        return tuple(items) if isinstance(value, tuple) else set(items)
    replaced.append(f"{where} ({type(value).__name__})")
    return repr(value)
