"""Machine facts recorded with every result: library versions, CPU model and ISA, thread counts.

Floating-point results can depend on the CPU's vector kernels and on how many threads split a reduction
(see docs/reproducibility.md), so every row says which CPU and how many threads produced it.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

import torch

from .. import __version__
from ..cpuinfo import cpu_flag_set, cpu_model
from ..threads import numpy_blas_threads

# ISA extensions that select different BLAS / oneDNN / faiss kernels (and so different rounding)
_ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def cpu_isa() -> str:
    """The vector ISA extensions of the CPU that change numeric kernels, e.g. 'avx2 fma avx512f'."""
    flags = cpu_flag_set()
    return " ".join(f for f in _ISA_FLAGS if f in flags)


def _blas_threads_probe() -> tuple[int | None, str]:
    """(most threads of any loaded BLAS, its implementation) via threadpoolctl (~10 ms)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None, ""
    blas = [p for p in threadpool_info() if p.get("user_api") == "blas"]
    if not blas:
        return None, ""
    top = max(blas, key=lambda p: int(p.get("num_threads", 0)))
    return int(top.get("num_threads", 0)) or None, str(top.get("internal_api", ""))


def thread_counts() -> dict[str, Any]:
    """Threads each numeric library will use now: torch intra-op, OpenMP (faiss), BLAS (numpy/scipy)."""
    out: dict[str, Any] = {"threads_torch": torch.get_num_threads()}
    try:
        import faiss

        out["threads_omp"] = int(faiss.omp_get_max_threads())
    except (ImportError, AttributeError):
        out["threads_omp"] = None
    out["threads_blas"] = numpy_blas_threads()  # numpy's own pool, not faiss's bundled one
    return out


def row_machine_facts() -> dict[str, Any]:
    """The per-row facts: CPU model, its vector ISA, and the thread counts at the time of the cell."""
    return {"cpu_model": cpu_model(), "cpu_isa": cpu_isa(), **thread_counts()}


def environment_info(device: torch.device) -> dict[str, Any]:
    """Library versions and machine facts recorded with every result."""
    versions = {"ussbench": __version__, "python": platform.python_version()}
    for dist in (
        "torch",
        "timm",
        "numpy",
        "scipy",
        "scikit-learn",
        "faiss-cpu",
        "faiss-gpu",
        "pot",
        "pandas",
    ):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    info = {"versions": versions, "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_model": cpu_model(), "cpu_isa": cpu_isa(), "cpu_count": os.cpu_count(), "device": str(device),
            "blas": _blas_threads_probe()[1], **thread_counts()}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
