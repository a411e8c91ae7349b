"""One thread policy for a run: torch intra-op, OpenMP (faiss), BLAS (numpy/scipy) and ussbench's own pools.

Every numeric library here brings its own pool (torch's OpenMP, faiss's separate OpenMP runtime and
OpenBLAS, numpy's and scipy's OpenBLAS), each sized to the machine by default. They run one after the
other, so sizing the compute pools (torch, faiss) to the usable CPUs uses them all; numpy's and scipy's
OpenBLAS get one thread, because their idle threads busy-wait after each call and slow down whatever runs
next on the same cores (see :func:`configure_threads`); ussbench's own pools (decode threads, CRF
processes) never run beside a full-size pool. An explicit user setting wins: ``USSBENCH_THREADS``, else
``OMP_NUM_THREADS``; without either, the CPUs this process may run on (its affinity mask, which
``taskset`` and container limits narrow).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .determinism import mkl_strict_reproducibility

log = logging.getLogger(__name__)

ENV_THREADS = "USSBENCH_THREADS"


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def requested_threads() -> int | None:
    """The user's explicit thread count: ``USSBENCH_THREADS``, else ``OMP_NUM_THREADS``; None if unset."""
    for name in (ENV_THREADS, "OMP_NUM_THREADS"):
        raw = os.environ.get(name, "").strip()
        if not raw:
            continue
        try:
            value = int(raw.split(",")[0])
        except ValueError:
            log.warning("%s=%r is not a thread count; ignored", name, raw)
            continue
        if value >= 1:
            return value
        log.warning("%s=%r is not a positive thread count; ignored", name, raw)
    return None


def run_threads() -> int:
    """Threads every numeric pool of a run gets: the user's setting, else the usable CPUs."""
    return requested_threads() or available_cpus()


def decode_workers(device: str = "cpu") -> int:
    """Background threads that decode and resize images while the backbone runs (0: in the caller's thread).

    On the CPU none: the forward already keeps every core busy, and a decode thread beside it made
    extraction 3.5% slower on 2 cores (MSRC-v2, ViT-S/14, bf16: 12.6 vs 13.0 images/s) for decoding that
    costs ~2% of the forward. On a GPU one thread, when a CPU thread is to spare: the CPU is idle there.
    """
    return 1 if torch.device(device).type == "cuda" and run_threads() > 1 else 0


def crf_workers() -> int:
    """Processes of the dense-CRF pool: one per thread of the run (pydensecrf is single-threaded), at most 8."""
    return max(1, min(8, run_threads()))


def configure_threads(threads: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """Size torch's and faiss's pools to ``threads`` (default :func:`run_threads`), numpy's BLAS to one; returns
    the record.

    An explicit ``threads`` becomes the run's setting (``USSBENCH_THREADS``), so ussbench's own pools and
    worker processes follow it too. torch's inter-op pool is left alone (it can only be set before first
    use, and ussbench runs no inter-op parallel work).
    """
    n = int(threads) if threads is not None else run_threads()
    if n < 1:
        raise ValueError(f"thread count must be >= 1, got {n}")
    if threads is not None:
        os.environ[ENV_THREADS] = str(n)
    torch.set_num_threads(n)
    try:
        import faiss

        faiss.omp_set_num_threads(n)
    except (ImportError, AttributeError):
        pass
    _size_native_pools(n)
    if n > 1 and mkl_strict_reproducibility() is False:
        log.warning(
            "MKL_CBWR=%r is not in MKL's strict mode (MKL had run before ussbench was imported?): trained "
            "clusterers and learners may depend on the thread count; import ussbench first or set "
            "MKL_CBWR=AUTO,STRICT",
            os.environ.get("MKL_CBWR"),
        )
    return thread_record(device)


def spinning_blas(lib) -> bool:
    """Whether a threadpoolctl library controller is an OpenBLAS built on its own pthreads pool (numpy's,
    scipy's), whose idle threads busy-wait after each call (OpenBLAS's thread timeout, ~0.1 s)."""
    return lib.internal_api == "openblas" and getattr(lib, "threading_layer", None) == "pthreads"


def _size_native_pools(n: int) -> None:
    """OpenMP runtimes (torch's, faiss's) and faiss's OpenMP OpenBLAS get ``n`` threads; pthreads OpenBLAS 1.

    Measured on 2 cores: a torch matmul right after a numpy one took 2.3x its time (105 vs 46 ms) and a
    faiss k-means 11x (42 vs 3.7 ms), because numpy's OpenBLAS threads kept spinning on the cores; with that
    pool at one thread nothing spins. ussbench's own numpy/scipy linear algebra is small (sklearn's k-means
    limits BLAS to one thread inside its OpenMP loops anyway), so it loses little.
    """
    try:
        import numpy  # noqa: F401  (load numpy's and scipy's BLAS, so that they are sized now)
        import scipy.linalg  # noqa: F401
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return
    for lib in ThreadpoolController().lib_controllers:
        lib.set_num_threads(1 if spinning_blas(lib) else n)


def thread_record(device: str = "cpu") -> dict[str, Any]:
    """The thread counts in force now, as recorded in every result row."""
    record: dict[str, Any] = {"threads_torch": torch.get_num_threads()}
    try:
        import faiss

        record["threads_omp"] = int(faiss.omp_get_max_threads())
    except (ImportError, AttributeError):
        record["threads_omp"] = None
    record["threads_blas"] = numpy_blas_threads()
    record["threads_decode"] = decode_workers(device)
    record["threads_crf"] = crf_workers()
    return record


def numpy_blas_threads() -> int | None:
    """Threads of numpy's BLAS (the pthreads OpenBLAS pools; None when threadpoolctl or BLAS is missing)."""
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:
        return None
    counts = [lib.num_threads for lib in ThreadpoolController().lib_controllers if lib.user_api == "blas"]
    spinning = [lib.num_threads for lib in ThreadpoolController().lib_controllers if spinning_blas(lib)]
    return max(spinning or counts) if (spinning or counts) else None
