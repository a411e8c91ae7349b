"""The Ray executor against the in-process one: README grid, per-task overhead, and N-GPU scaling on paper.

``readme``: the README grid (``msrc_grid.yaml``) through both executors with a warm stage cache (each run
writes a fresh output folder, so every cell is recomputed from the cached features and segments); wall
time of the whole command (Ray's start included) and the ratio ray / local, runs alternated.
``overhead``: a 1,000-cell grid of a trivial dataset clusterer (registered below; this file is the grid's
plugin module) on a tiny synthetic dataset: execution seconds of both executors, and the difference per
Ray task. ``simulate``: the study grid on N GPUs, list-scheduled from per-stage seconds measured in the
README grid's cell records (CPU-measured: the table shows how wall time scales with N, not GPU seconds).

    scripts/cpujob --both .venv/bin/python benchmarks/perf/executor.py readme --cache-dir C [--json F]
    scripts/cpujob --both .venv/bin/python benchmarks/perf/executor.py overhead [--cells 1000]
    .venv/bin/python benchmarks/perf/executor.py simulate --records reports/msrc/cells [--gpus 1 2 4 8 16]
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ussbench.base import DatasetClusterer
from ussbench.registry import register

REPO = Path(__file__).resolve().parents[2]


@register("dataset_clusterer", "trivial_bench")
class TrivialClusterer(DatasetClusterer):
    """Labels vector i with (i + variant) mod n_clusters: no work, so a cell measures the executor only."""

    def __init__(self, n_clusters: int = 3, variant: int = 0, seed: int = 0, device: str = "cpu"):
        self.n_clusters, self.variant, self.seed, self.device = n_clusters, variant, seed, device

    def fit(self, X: torch.Tensor) -> TrivialClusterer:
        return self

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        return (torch.arange(X.shape[0]) + self.variant) % self.n_clusters


def load() -> str:
    return f"load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} (1, 5 min), {os.cpu_count()} CPUs"


# -- readme --------------------------------------------------------------------------------------------
def run_cli(grid: str, cache: Path, output: Path, executor: str, extra: list[str]) -> float:
    shutil.rmtree(output, ignore_errors=True)
    cmd = [sys.executable, "-m", "ussbench", "run", "--grid", grid, "--cache-dir", str(cache), "--output",
           str(output), "--executor", executor, "--no-progress", "--no-report", *extra]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{executor} run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    print(f"  {executor:5s} {seconds:7.1f} s  {proc.stdout.strip()}  [{load()}]", flush=True)
    return seconds


def readme(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.work) / "readme"
    times: dict[str, list[float]] = {"local": [], "ray": []}
    for rep in range(args.repeats):  # alternate which goes first
        for executor in ("local", "ray") if rep % 2 == 0 else ("ray", "local"):
            times[executor].append(
                run_cli(args.grid, Path(args.cache_dir), out / executor, executor, args.extra)
            )
    ratio = [r / l for r, l in zip(times["ray"], times["local"])]
    print(f"README grid, warm cache: local {times['local']} s, ray {times['ray']} s; ray/local {ratio}")
    return {"local_s": times["local"], "ray_s": times["ray"], "ratio": ratio}


# -- overhead ------------------------------------------------------------------------------------------
def toy_data(root: Path, n_images: int = 4) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        label = np.repeat(np.arange(3, dtype=np.uint8), 11)[None, :].repeat(32, 0)[:, :32]
        image = (label[..., None] * 80 + rng.integers(0, 10, (32, 32, 3))).astype(np.uint8)
        Image.fromarray(image).save(root / "images" / f"i{i}.png")
        Image.fromarray(label, mode="L").save(root / "labels" / f"i{i}.png")
    return root


def overhead_grid(work: Path, cells: int) -> dict[str, Any]:
    return {
        "name": "overhead", "seeds": [0], "device": "cpu", "plugins": [str(Path(__file__).resolve())],
        "data_root": str(toy_data(work / "toy")), "cache_dir": str(work / "cache"),
        "datasets": [{"name": "image_folder", "params": {"num_classes": 3}}],
        "backbones": [{"name": "random_vit", "params": {"depth": 1, "resolution": 32,
                                                        "arch": "vit_small_patch16_224"}}],
        "image_clusterers": ["none"],
        "dataset_clusterers": [{"name": "trivial_bench", "params": {"variant": i}, "label": f"t{i}"}
                               for i in range(cells)],
        "protocol": {"panels": 0},
    }  # fmt: skip


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    from ussbench.config import load_grid
    from ussbench.graph.ray_executor import RayExecutor
    from ussbench.runner import plan_grid, run_grid

    work = Path(args.work) / "overhead"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    raw = overhead_grid(work, args.cells)
    result: dict[str, Any] = {"cells": args.cells}
    ray_executor = RayExecutor()
    runs = [("local", None), ("ray", ray_executor), ("ray_warm", ray_executor)]
    for name, executor in runs:
        raw["output"] = str(work / f"out-{name}")
        path = work / f"grid-{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        grid = load_grid(path)
        if name == "local":
            plan, _ = plan_grid(grid)
            result["tasks"] = len(plan.graph)
        if name == "ray":  # Ray's start, timed apart; the first run then starts its worker processes
            start = time.perf_counter()
            ray_executor.connect()
            result["ray_start_s"] = time.perf_counter() - start
        summary = run_grid(grid, progress=False, report=False, executor=executor)
        assert summary.n_run == args.cells and not summary.n_failed, summary.failures[:3]
        result[f"{name}_s"] = summary.seconds
        print(f"  {name:8s} execution {summary.seconds:7.1f} s  [{load()}]", flush=True)
    import ray

    ray.shutdown()
    for name in ("ray", "ray_warm"):
        extra = result[f"{name}_s"] - result["local_s"]
        result[f"{name}_overhead_per_task_ms"] = 1000 * extra / result["tasks"]
        result[f"{name}_overhead_per_cell_ms"] = 1000 * extra / args.cells
    print(f"{args.cells} cells, {result['tasks']} Ray tasks: Ray's start {result['ray_start_s']:.1f} s; execution "
          f"local {result['local_s']:.1f} s, ray {result['ray_s']:.1f} s (first run: worker processes start), "
          f"ray again {result['ray_warm_s']:.1f} s; overhead per task {result['ray_overhead_per_task_ms']:.1f} ms "
          f"(first run), {result['ray_warm_overhead_per_task_ms']:.1f} ms (warm workers)")  # fmt: skip
    return result


# -- simulate ------------------------------------------------------------------------------------------
STAGE_FIELDS = {"image_clusterer": "time_image_clusterer_s", "dataset_clusterer": "time_dataset_clusterer_s"}


def measured_stage_seconds(records: Path) -> dict[str, Any]:
    """Per-stage seconds from a grid's cell records: features, each image clusterer (per seed), each
    dataset clusterer (mean over cells), evaluation + NFCovering (mean); first-use times only."""
    rows = [json.loads(p.read_text())["row"] for p in sorted(records.glob("*.json"))]
    if not rows:
        raise SystemExit(f"no cell records in {records}")
    features = max(r["time_features_s"] for r in rows)
    ic: dict[str, float] = {}
    for r in rows:
        ic[r["image_clusterer"]] = max(ic.get(r["image_clusterer"], 0.0), r["time_image_clusterer_s"])
    dc: dict[str, list[float]] = {}
    for r in rows:
        dc.setdefault(r["dataset_clusterer"], []).append(r["time_dataset_clusterer_s"])
    evaluation = float(np.mean([r["time_eval_s"] + r.get("time_nfcov_s", 0.0) for r in rows]))
    return {"features": features, "image_clusterer": ic, "dataset_clusterer": {k: float(np.mean(v))
            for k, v in dc.items()}, "evaluation": evaluation, "n_images": rows[0].get("n_images")}  # fmt: skip


def study_tasks(stage: dict[str, Any], datasets: int, backbones: int, learners: int, seeds: int,
                learner_s: float) -> list[tuple[str, float, list[int]]]:  # fmt: skip
    """The study grid as (resource, seconds, inputs) tasks: features per dataset x backbone (GPU), a learner
    per seed (GPU; learners > 1 only with a learner time), image clusterers (GPU), dataset clusterers and
    evaluations (CPU)."""
    tasks: list[tuple[str, float, list[int]]] = []
    for _ in range(datasets * backbones):
        tasks.append(("gpu", stage["features"], []))
        feat = len(tasks) - 1
        for _seed in range(seeds):
            for learner in range(learners):
                up = feat
                if learner > 0:
                    tasks.append(("gpu", learner_s, [feat]))
                    up = len(tasks) - 1
                for ic_s in stage["image_clusterer"].values():
                    tasks.append(("gpu", ic_s, [up]))
                    seg = len(tasks) - 1
                    for dc_s in stage["dataset_clusterer"].values():
                        tasks.append(("cpu", dc_s, [seg]))
                        tasks.append(("cpu", stage["evaluation"], [len(tasks) - 1]))
    return tasks


def makespan(tasks: list[tuple[str, float, list[int]]], gpus: int, cpus: int) -> float:
    """Event simulation of Ray's dispatch: a task becomes ready when its inputs are done; a free worker of its
    kind (GPU or CPU slot) takes the earliest-submitted ready task. Transfer and scheduling costs ignored."""
    children: list[list[int]] = [[] for _ in tasks]
    waiting = [len(inputs) for _, _, inputs in tasks]
    for i, (_, _, inputs) in enumerate(tasks):
        for j in inputs:
            children[j].append(i)
    ready: dict[str, list[int]] = {"gpu": [], "cpu": []}
    for i, (kind, _, inputs) in enumerate(tasks):
        if not inputs:
            heapq.heappush(ready[kind], i)
    free = {"gpu": gpus, "cpu": cpus}
    running: list[tuple[float, int]] = []
    now = 0.0
    while True:
        for kind in ready:
            while free[kind] and ready[kind]:
                i = heapq.heappop(ready[kind])
                free[kind] -= 1
                heapq.heappush(running, (now + tasks[i][1], i))
        if not running:
            return now
        now, i = heapq.heappop(running)
        free[tasks[i][0]] += 1
        for child in children[i]:
            waiting[child] -= 1
            if waiting[child] == 0:
                heapq.heappush(ready[tasks[child][0]], child)


def simulate(args: argparse.Namespace) -> dict[str, Any]:
    stage = measured_stage_seconds(Path(args.records))
    tasks = study_tasks(stage, args.datasets, args.backbones, args.learners, args.seeds, args.learner_s)
    serial = sum(t[1] for t in tasks)
    finish: list[float] = []
    for _, seconds, inputs in tasks:  # inputs come first: the longest chain of dependent stages
        finish.append(seconds + max((finish[j] for j in inputs), default=0.0))
    critical = max(finish)
    print(f"study grid: {args.datasets} datasets x {args.backbones} backbones x {args.learners} learner "
          f"settings x {len(stage['image_clusterer'])} image x {len(stage['dataset_clusterer'])} dataset "
          f"clusterers x {args.seeds} seeds = {args.datasets * args.backbones * args.learners * args.seeds * len(stage['image_clusterer']) * len(stage['dataset_clusterer'])} cells, "
          f"{len(tasks)} tasks; one process: {serial / 3600:.2f} h")  # fmt: skip
    print(f"per-stage seconds measured in {args.records}: features {stage['features']:.1f}; image clusterers "
          + ", ".join(f"{k} {v:.1f}" for k, v in stage["image_clusterer"].items())
          + "; dataset clusterers " + ", ".join(f"{k} {v:.1f}" for k, v in stage["dataset_clusterer"].items())
          + f"; evaluation {stage['evaluation']:.2f}")  # fmt: skip
    print(f"longest chain of dependent stages (no number of GPUs goes below it): {critical / 3600:.3f} h")
    print(f"\n| GPUs | CPUs ({args.cpus_per_gpu}/GPU) | wall time (h) | speed-up | efficiency |")
    print("|---:|---:|---:|---:|---:|")
    table = []
    one = makespan(tasks, 1, args.cpus_per_gpu)
    for n in args.gpus:
        wall = makespan(tasks, n, n * args.cpus_per_gpu)
        speedup = one / wall
        table.append({"gpus": n, "wall_h": wall / 3600, "speedup": speedup, "efficiency": speedup / n})
        print(f"| {n} | {n * args.cpus_per_gpu} | {wall / 3600:.2f} | {speedup:.2f}x | {speedup / n:.0%} |")
    return {"stage_seconds": stage, "tasks": len(tasks), "serial_h": serial / 3600, "critical_h": critical / 3600,
            "table": table}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default=str(REPO / ".cache" / "perf-executor"), help="scratch folder")
    p.add_argument("--json", help="write the results here")
    sub = p.add_subparsers(dest="part", required=True)
    r = sub.add_parser("readme")
    r.add_argument("--grid", default="msrc_grid.yaml")
    r.add_argument("--cache-dir", required=True, help="a warm stage cache of the grid")
    r.add_argument("--repeats", type=int, default=1)
    r.add_argument("extra", nargs="*", help="more run flags after --, e.g. -- --seeds 0")
    o = sub.add_parser("overhead")
    o.add_argument("--cells", type=int, default=1000)
    s = sub.add_parser("simulate")
    s.add_argument("--records", required=True, help="a grid output's cells/ folder (README grid)")
    s.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    s.add_argument("--cpus-per-gpu", type=int, default=8)
    s.add_argument("--datasets", type=int, default=3)
    s.add_argument("--backbones", type=int, default=2)
    s.add_argument("--learners", type=int, default=1, help="learner settings (1: none only)")
    s.add_argument(
        "--learner-s", type=float, default=0.0, help="seconds of one learner fit (measured elsewhere)"
    )
    s.add_argument("--seeds", type=int, default=5)
    args = p.parse_args()
    print(f"[{time.strftime('%H:%M:%S')}] {args.part} [{load()}]")
    result = {"readme": readme, "overhead": overhead, "simulate": simulate}[args.part](args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
