"""Where do a seeded cell's numbers change between machines? Same grid, seed and data; other threads or ISA.

The closest one machine gets to "another machine": (1) another thread count (reductions split across
threads: BLAS/LAPACK, OpenMP loops in faiss and scikit-learn, torch's CPU kernels); (2) other vector
kernels: MKL, oneDNN, ATen and OpenBLAS forced to AVX2 as on a CPU without AVX-512. Run A uses 1 thread
and the default ISA; each variant runs (B) from A's features and (C) from A's features and segments, in
a fresh process with the variant's environment, so every difference is attributed to the stage that first
produced it. Features themselves are compared on a subset extracted under both settings.

    python benchmarks/perf/thread_repro.py --grid benchmarks/msrc_grid.yaml --data-root data --work .cache/repro
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "USSBENCH_THREADS")
AVX2 = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
        "OPENBLAS_CORETYPE": "Haswell", "FAISS_OPT_LEVEL": "avx2"}  # fmt: skip


def variant_env(threads: int, isa: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARS and k not in AVX2}
    env.update({k: str(threads) for k in THREAD_VARS}, PYTHONPATH=str(REPO), **(isa or {}))
    return env


def run(args, cache: Path, out: Path, env: dict[str, str]) -> dict[str, dict]:
    """One grid run in a fresh process under ``env``; returns its cell records by id."""
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "ussbench", "run", "--grid", args.grid, "--data-root", args.data_root,
           "--cache-dir", str(cache), "--output", str(out), "--seeds", *map(str, args.seeds), "--no-progress",
           "--no-report"] + (["--limit", str(args.limit)] if args.limit else [])  # fmt: skip
    t = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, cwd=REPO)
    records = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    row = next(iter(records.values()))["row"]
    print(f"  {len(records)} cells in {time.perf_counter() - t:.0f} s; threads torch {row['threads_torch']}, "
          f"OpenMP {row['threads_omp']}, BLAS {row['threads_blas']}", flush=True)  # fmt: skip
    return records


def compare_segments(a: Path, b: Path) -> list[str]:
    """Per segments entry present in both caches: images whose partition differs, largest vector difference."""
    sys.path.insert(0, str(REPO))
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


FEATURES = """
import sys, torch
from ussbench import registry
from ussbench.config import load_grid
grid = load_grid(sys.argv[1], {"data_root": sys.argv[2]})
bb, ds = grid.stages["backbones"][0], grid.stages["datasets"][0]
data = registry.instantiate(registry.get("dataset", ds.name), {**ds.params, "data_root": sys.argv[2], "limit": int(sys.argv[3])})
model = registry.instantiate(registry.get("backbone", bb.name), {**bb.params, "cache_dir": sys.argv[4]})
fs = model.extract(data, torch.device("cpu"), progress=False)
torch.save({k: [getattr(im, k) for im in fs] for k in ("tokens", "keys", "cls", "attn")}, sys.argv[5])
"""


def compare_features(args, work: Path, variants: dict[str, dict[str, str]]) -> None:
    import torch

    saved = {}
    for name, env in variants.items():
        path = work / f"features_{name}.pt"
        subprocess.run([sys.executable, "-c", FEATURES, args.grid, args.data_root, str(args.feature_images),
                        str(work / "A"), str(path)], env=env, check=True, cwd=REPO)  # fmt: skip
        saved[name] = torch.load(path, weights_only=True)
    base = saved.pop("A")
    for name, other in saved.items():
        for key in base:
            same = sum(torch.equal(x, y) for x, y in zip(base[key], other[key]))
            diff = max(float((x.float() - y.float()).abs().max()) for x, y in zip(base[key], other[key]))
            print(
                f"features {key} ({name} vs A): {same}/{len(base[key])} images bitwise equal, max |diff| {diff:.2e}"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="benchmarks/msrc_grid.yaml")
    ap.add_argument("--data-root", default="data")
    ap.add_argument("--work", default=".cache/thread_repro")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--feature-images", type=int, default=48, help="images extracted under every setting")
    ap.add_argument("--variants", nargs="+", default=["threads", "avx2"], choices=["threads", "avx2"])
    args = ap.parse_args()
    work = Path(args.work).resolve()
    args.grid = str(Path(args.grid).resolve())
    args.data_root = str(Path(args.data_root).resolve())
    sys.path.insert(0, str(REPO))
    from ussbench.graph.machine import cpu_isa, cpu_model

    print(f"machine: {cpu_model()} [{cpu_isa()}]")
    variants = {"A": variant_env(1)}
    if "threads" in args.variants:
        variants[f"{args.threads} threads"] = variant_env(args.threads)
    if "avx2" in args.variants:
        variants["AVX2 kernels"] = variant_env(1, AVX2)
    print("-- A: 1 thread, default kernels")
    a = run(args, work / "A", work / "out_A", variants["A"])
    compare_features(args, work, variants)
    for name, env in list(variants.items())[1:]:
        for tag, stages in (("B", ("features",)), ("C", ("features", "segments"))):
            cache = work / f"{name.replace(' ', '_')}_{tag}"
            shutil.rmtree(cache, ignore_errors=True)
            for stage in stages:
                shutil.copytree(work / "A" / stage, cache / stage)
            print(f"-- {name} ({tag}) from A's {' + '.join(stages)}")
            b = run(args, cache, work / f"out_{cache.name}", env)
            if tag == "B":
                print("\n".join(compare_segments(work / "A" / "segments", cache / "segments")))
            for cid in sorted(
                a, key=lambda c: (a[c]["row"]["image_clusterer"], a[c]["row"]["dataset_clusterer"])
            ):
                ra, rb = a[cid]["row"], b[cid]["row"]
                same = a[cid]["confusion"] == b[cid]["confusion"]
                print(f"  {ra['image_clusterer']:28s} {ra['dataset_clusterer']:16s} seed {ra['seed']}: "
                      f"mIoU {ra['miou']:.3f} vs {rb['miou']:.3f} (diff {rb['miou'] - ra['miou']:+.3f})"
                      f"{'  identical' if same else ''}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
