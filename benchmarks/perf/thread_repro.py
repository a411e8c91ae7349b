"""Where do results change with the thread count? Same grid, seed and data with 1 vs N threads, stage by stage.

The closest a single machine gets to "another machine": the numbers of a seeded cell may depend on how many
threads split a reduction (BLAS/LAPACK kernels, OpenMP loops in faiss and scikit-learn). This script
runs one grid seed with 1 thread (cache A), then with N threads three times: (B) from A's features,
(C) from A's features and segments, and compares feature entries, segmentations, dataset-level labels and
the cells' mIoU, so each difference is attributed to the stage that first produced it. Features are
compared on a subset extracted with both thread counts.

    python benchmarks/perf/thread_repro.py --grid benchmarks/msrc_grid.yaml --data-root data --work .cache/repro
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch


def set_threads(n: int) -> dict:
    """Every thread pool a cell uses: torch intra-op, faiss OpenMP, BLAS and scikit-learn's OpenMP."""
    import faiss
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    threadpool_limits(n)
    from ussbench.graph.machine import thread_counts

    return thread_counts()


def run(
    grid_path: str, data_root: str, cache: Path, out: Path, threads: int, seeds: list[int], limit: int | None
):
    from ussbench.config import limit_images, load_grid
    from ussbench.runner import run_grid

    print(f"threads {threads}: {set_threads(threads)}", flush=True)
    grid = load_grid(
        grid_path, {"data_root": data_root, "cache_dir": str(cache), "output": str(out), "seeds": seeds}
    )
    if limit:
        grid = limit_images(grid, limit)
    t = time.perf_counter()
    summary = run_grid(grid, progress=False, report=False)
    print(f"  {summary.n_run} cells in {time.perf_counter() - t:.0f} s", flush=True)
    return {
        json.loads(p.read_text())["row"]["cell_id"]: json.loads(p.read_text())
        for p in (out / "cells").glob("*.json")
    }


def compare_segments(a: Path, b: Path) -> list[str]:
    from ussbench.cache import read_entry
    from ussbench.image_clusterers._spectral import same_partition

    lines = []
    for pa in sorted(a.glob("*.pt")):
        pb = b / pa.name
        if not pb.is_file():
            continue
        sa, sb = read_entry(pa)["segments"], read_entry(pb)["segments"]
        differ = [
            i for i, (x, y) in enumerate(zip(sa, sb)) if not same_partition(x.segment_map, y.segment_map)
        ]
        vec = max(float((x.vectors - y.vectors).abs().max()) if x.vectors.shape == y.vectors.shape else float("inf")
                  for x, y in zip(sa, sb))  # fmt: skip
        lines.append(f"  segments {pa.stem}: {len(differ)}/{len(sa)} images partitioned differently; "
                     f"max |vector diff| {vec:.2e}")  # fmt: skip
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="benchmarks/msrc_grid.yaml")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--work", default=".cache/thread_repro")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--feature-images", type=int, default=48, help="images extracted with both thread counts")
    args = ap.parse_args()
    from ussbench.graph.machine import cpu_isa, cpu_model

    work = Path(args.work)
    print(f"machine: {cpu_model()} [{cpu_isa()}]")
    # features: extracted with 1 and N threads on a subset
    from ussbench import registry
    from ussbench.config import load_grid

    grid = load_grid(args.grid, {"data_root": args.data_root})
    bb_entry, ds_entry = grid.stages["backbones"][0], grid.stages["datasets"][0]
    ds = registry.instantiate(registry.get("dataset", ds_entry.name),
                              {**ds_entry.params, "data_root": args.data_root, "limit": args.feature_images})  # fmt: skip
    feats = {}
    for n in (1, args.threads):
        set_threads(n)
        bb = registry.instantiate(
            registry.get("backbone", bb_entry.name), {**bb_entry.params, "cache_dir": str(work / "weights")}
        )
        feats[n] = bb.extract(ds, torch.device("cpu"), progress=False)
    for name in ("tokens", "keys", "cls", "attn"):
        diffs = [
            float((getattr(x, name).float() - getattr(y, name).float()).abs().max())
            for x, y in zip(feats[1], feats[args.threads])
        ]
        same = sum(
            torch.equal(getattr(x, name), getattr(y, name)) for x, y in zip(feats[1], feats[args.threads])
        )
        print(f"features {name}: {same}/{len(diffs)} images bitwise equal, max |diff| {max(diffs):.2e}")

    a = run(args.grid, args.data_root, work / "A", work / "out_A", 1, args.seeds, args.limit)
    for tag, stages in (("B", ("features",)), ("C", ("features", "segments"))):
        cache = work / tag
        shutil.rmtree(cache, ignore_errors=True)
        for stage in stages:
            shutil.copytree(work / "A" / stage, cache / stage)
        shutil.rmtree(work / f"out_{tag}", ignore_errors=True)
        b = run(args.grid, args.data_root, cache, work / f"out_{tag}", args.threads, args.seeds, args.limit)
        print(f"-- {tag}: {args.threads} threads from 1-thread {' + '.join(stages)}")
        if tag == "B":
            print("\n".join(compare_segments(work / "A" / "segments", cache / "segments")))
        for cid in sorted(
            a, key=lambda c: (a[c]["row"]["image_clusterer"], a[c]["row"]["dataset_clusterer"])
        ):
            ra, rb = a[cid]["row"], b[cid]["row"]
            same = a[cid]["confusion"] == b[cid]["confusion"]
            print(f"  {ra['image_clusterer']:28s} {ra['dataset_clusterer']:16s} seed {ra['seed']}: "
                  f"mIoU {ra['miou']:.3f} vs {rb['miou']:.3f} (diff {rb['miou'] - ra['miou']:+.3f})"
                  f"{'  identical' if same else ''}")  # fmt: skip
    np.set_printoptions(precision=3)


if __name__ == "__main__":
    main()
