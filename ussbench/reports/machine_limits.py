"""The machine's measured limits: fp32 and bf16 matmul GFLOP/s and memory bandwidth GB/s, and its description.

A stage's speed means little alone; divided by what the machine can do at best it says how far the stage
is from its limit. Limits are measured, not taken from a datasheet: a square matmul large enough to reach
the BLAS/oneDNN kernels' steady state, and a copy of arrays far larger than the last-level cache.
Best of a few repeats, since a shared machine only slows a measurement down.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from ..cpuinfo import cpu_flag_set, cpu_model
from ..threads import available_cpus

# the vector ISA extensions that matter for matmul speed, as a machine string lists them
MATMUL_FLAGS: tuple[str, ...] = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_flags(wanted: tuple[str, ...] = MATMUL_FLAGS) -> list[str]:
    """Which of the vector ISA extensions that matter for matmul speed this CPU has."""
    have = cpu_flag_set()
    return [flag for flag in wanted if flag in have]


def load_average() -> tuple[float, float, float]:
    """The 1, 5 and 15 minute load averages (zeros where the OS has none)."""
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


def describe_machine() -> str:
    """One line: CPU model, usable CPUs, relevant ISA flags, torch threads and version, GPU if any."""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    flags = " ".join(cpu_flags()) or "no AVX"
    return (
        f"{cpu_model()}, {available_cpus()} usable CPUs ({flags}), torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads{gpu}"
    )


@dataclass
class MachineLimits:
    """Best measured rates on this machine with the current thread settings (CPU)."""

    fp32_gflops: float
    bf16_gflops: float
    bandwidth_gbs: float
    threads: int
    machine: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm up: first calls pick kernels and fault pages in
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_gflops(dtype: torch.dtype, n: int = 1536, repeats: int = 5) -> float:
    """Best GFLOP/s of an n x n x n matmul on the CPU in ``dtype`` (bf16 via autocast, as the backbone runs)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen)
    b = torch.randn(n, n, generator=gen)
    if dtype == torch.bfloat16:

        def run():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                a @ b

    else:

        def run():
            a @ b

    return 2.0 * n**3 / _best_seconds(run, repeats) / 1e9


def copy_bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """Best GB/s of copying a float32 array of ``megabytes`` MB (read + write counted)."""
    src = torch.ones(megabytes * 2**20 // 4)
    dst = torch.empty_like(src)
    seconds = _best_seconds(lambda: dst.copy_(src), repeats)
    return 2.0 * src.numel() * 4 / seconds / 1e9


def measure_limits(repeats: int = 5) -> MachineLimits:
    """fp32 and bf16 matmul GFLOP/s and copy bandwidth GB/s of this machine (about 2 seconds on 2 cores)."""
    return MachineLimits(
        fp32_gflops=matmul_gflops(torch.float32, repeats=repeats),
        bf16_gflops=matmul_gflops(torch.bfloat16, repeats=repeats),
        bandwidth_gbs=copy_bandwidth_gbs(repeats=repeats),
        threads=torch.get_num_threads(),
        machine=describe_machine(),
    )
