"""Arithmetic precision of a backbone's forward: ``auto``, ``fp32`` or ``bf16`` (autocast), resolved per device.

``auto`` picks bf16 only where the hardware computes it natively (CPUs with AVX512-BF16 or AMX, CUDA GPUs
with bf16 support) and fp32 elsewhere, so the same grid gives the same precision on the same kind of
machine; the resolved value (never ``auto``) goes into the feature cache key and every result row.
Features are stored as float16 whatever the precision.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Literal

import torch

from ..errors import ConfigError

Precision = Literal["auto", "fp32", "bf16"]
PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX tiles) that oneDNN uses."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_device(device: torch.device | str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; anything else as given."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_precision(requested: str, device: torch.device | str, who: str = "backbone") -> str:
    """The precision ``who`` runs at on ``device``: 'fp32' or 'bf16' ('auto' resolved as described above).
    An explicit 'bf16' on a CPU without native bf16 is kept, with a warning: oneDNN emulates it there (an AMD
    EPYC with AVX2 only: 0.27 GFLOP/s for a bf16 2048^3 matmul against 106 in fp32)."""
    if requested not in PRECISIONS:
        raise ConfigError(f"{who}: precision must be one of {', '.join(PRECISIONS)}; got {requested!r}")
    device = resolve_device(device)
    if requested != "auto":
        if requested == "bf16" and device.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn(
                f"{who}: precision='bf16' on a CPU without AVX512-BF16 or AMX: bf16 matmuls are emulated, "
                "hundreds of times slower than fp32 here; 'auto' picks fp32 on this CPU",
                stacklevel=2,
            )
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context of a resolved precision on ``device`` (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
