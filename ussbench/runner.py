"""Grid runner: validate everything, expand the cartesian product of stages x seeds, run each cell once.

Each finished cell is written atomically to ``<output>/cells/<cell_id>.json`` (+ ``.npz`` panels), so an
interrupted grid resumes where it stopped; the report is rebuilt from those files at the end.
"""

from __future__ import annotations

import itertools
import json
import logging
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__
from .atomic import atomic_write, atomic_write_json
from .cache import Cache
from .config import STAGE_KEYS, Grid, StageEntry
from .errors import ConfigError
from .pipeline import STAGE_ORDER, Cell, CellRunner, build_plugin
from .threads import configure_threads

log = logging.getLogger(__name__)
_STAGE_KEY_OF = {kind: key for key, kind in STAGE_KEYS.items()}


def resolve_device(name: str) -> torch.device:
    """'auto' -> CUDA when available, else CPU; an explicit CUDA request without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is available (use device: auto or cpu)")
    return torch.device(name)


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
            "cpu_count": __import__("os").cpu_count(), "device": str(device)}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def expand_cells(grid: Grid) -> list[Cell]:
    """All cells in an order that keeps shared stages adjacent (dataset, backbone, seed, learner, ...)."""
    s = grid.stages
    cells = []
    for ds, bb in itertools.product(s["datasets"], s["backbones"]):
        for seed in grid.seeds:
            for fl, ic, dc, pp in itertools.product(
                s["feature_learners"], s["image_clusterers"], s["dataset_clusterers"], s["postprocess"]
            ):
                cell = Cell((ds, bb, fl, ic, dc, pp), seed)
                if not any(_excluded(cell, rule) for rule in grid.exclude):
                    cells.append(cell)
    return cells


def _excluded(cell: Cell, rule: dict[str, str]) -> bool:
    return all(
        cell.entry(kind).label == value or cell.entry(kind).name == value for kind, value in rule.items()
    )


def validate_grid(grid: Grid) -> None:
    """Instantiate every plugin once and check data roots and weight files before any work starts."""
    for key, entries in grid.stages.items():
        for i, entry in enumerate(entries):
            if entry.skipped:
                continue
            where = f"{grid.path}: {key}[{i}] ({entry.name})"
            try:
                plugin = build_plugin(entry, _validation_injections(entry, grid))
                check = getattr(plugin, "check", None)
                if callable(check):
                    check()
            except (ConfigError, FileNotFoundError, ValueError) as exc:
                raise (
                    type(exc)(f"{where}: {exc}")
                    if isinstance(exc, ConfigError)
                    else ConfigError(f"{where}: {exc}")
                ) from exc


def _validation_injections(entry: StageEntry, grid: Grid) -> dict[str, Any]:
    return {"data_root": grid.data_root, "cache_dir": str(grid.cache_dir), "seed": grid.seeds[0], "device": "cpu",
            "n_clusters": 2, "num_classes": 2}  # fmt: skip


@dataclass
class RunSummary:
    grid: Grid
    output: Path
    n_cells: int
    n_run: int
    n_resumed: int
    seconds: float


def run_grid(
    grid: Grid, progress: bool = True, report: bool = True, limit_cells: int | None = None
) -> RunSummary:
    """Run every cell of a validated grid (skipping finished ones) and write the report."""
    validate_grid(grid)
    device = resolve_device(grid.device)
    cells = expand_cells(grid)
    if limit_cells is not None:
        cells = cells[:limit_cells]
    out = grid.output
    (out / "cells").mkdir(parents=True, exist_ok=True)
    env = environment_info(device)
    atomic_write_json(out / "run.json", {"grid": grid.raw, "grid_file": str(grid.path), "environment": env,
                                         "started": time.strftime("%Y-%m-%d %H:%M:%S"), "n_cells": len(cells)})  # fmt: skip
    threads = configure_threads(
        device=str(device)
    )  # one thread policy for torch, faiss/OpenMP and BLAS (ussbench.threads)
    runner = CellRunner(
        Cache(grid.cache_dir), device, grid.protocol, grid.data_root, progress, threads["threads_crf"]
    )
    start = time.perf_counter()
    n_run = n_resumed = 0
    bar = tqdm(cells, desc=f"grid {grid.name}", disable=not progress, unit="cell")
    for cell in bar:
        cid = cell.cell_id(grid.protocol)
        path = out / "cells" / f"{cid}.json"
        if path.is_file():
            n_resumed += 1
            continue
        bar.set_postfix_str(
            " | ".join(cell.entry(k).label for k in STAGE_ORDER[2:5]) + f" | seed {cell.seed}"
        )
        row, extras = runner.run(cell)
        row.update(cell_id=cid, grid=grid.name, environment=env, **threads)
        panels = {f"pred_{k}": v for k, v in extras.pop("panels").items()}
        panels.update({f"level_{k}": v for k, v in extras.pop("level_panels", {}).items()})
        artifacts = extras.pop("artifacts")
        if panels:
            atomic_write(out / "cells" / f"{cid}.npz", lambda tmp, p=panels: _save_npz(tmp, p))
        if any(artifacts.values()):
            atomic_write(out / "cells" / f"{cid}.artifacts.pt", lambda tmp, a=artifacts: torch.save(a, tmp))
        atomic_write_json(path, {"row": row, **extras, "identity": cell.identity(grid.protocol)})
        n_run += 1
        log.info("cell %s: mIoU %.2f", cid, row["miou"])
    summary = RunSummary(grid, out, len(cells), n_run, n_resumed, time.perf_counter() - start)
    if report:
        from .reports.build import build_report

        build_report(out, grid_name=grid.name, stage_order=[_STAGE_KEY_OF[k] for k in STAGE_ORDER],
                     cell_ids={cell.cell_id(grid.protocol) for cell in cells})  # fmt: skip
    return summary


def _save_npz(tmp: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_cells(output: Path) -> list[dict[str, Any]]:
    """Every finished cell record of a grid output folder."""
    return [json.loads(p.read_text()) for p in sorted((Path(output) / "cells").glob("*.json"))]
