"""HSG timings: training step cost and the hierarchy's inference overhead, transformer vs k-means.

Reference: the paper's Table 6 (one 640x640 image, hierarchy of 25/16/9/4 segments): no hierarchy 120 ms,
HSG 158 ms, KMeans 165 ms, i.e. a hierarchy overhead of 38 ms (transformer) vs 45 ms (k-means), ratio 0.84.
Here the overhead is measured on top of the projection head and base k-means (G0), on synthetic features
shaped like the shipped MSRC data (16x24 patch grids, 384-d) unless --features names a saved FeatureSet.

    python benchmarks/perf/hsg_hierarchy.py --small        # CPU, under 2 minutes
    python benchmarks/perf/hsg_hierarchy.py --device cuda  # full scale
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import torch

from ussbench.feature_learners._hsg_model import (
    HSGConfig,
    HSGModel,
    base_grouping,
    make_views,
    training_step,
)

PAPER_MS = {"none": 120.0, "transformer": 158.0, "kmeans": 165.0}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu} ({torch.get_num_threads()} threads), torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int) -> tuple[float, float]:
    """Median wall and process-CPU seconds of fn() over repeat runs after one warm-up (CPU time is the
    steadier figure on a shared machine)."""
    fn()
    sync(device)
    wall, cpu = [], []
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return sorted(wall)[len(wall) // 2], sorted(cpu)[len(cpu) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="reduced scale for a CPU run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--features", default=None, help="a features cache entry (or FeatureSet file) for the maps"
    )
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 avoids oversubscription)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n_images = args.images or (32 if args.small else 591)
    repeat = args.repeat or (3 if args.small else 10)
    if args.features:
        from ussbench.serialization import safe_load

        fs = safe_load(args.features)  # pickle-free; a cache entry holds the FeatureSet under "value"
        fs = fs["value"] if isinstance(fs, dict) else fs
        maps = [im.tokens for im in fs][:n_images]
    else:
        gen = torch.Generator().manual_seed(0)
        maps = [torch.randn(16, 24, 384, generator=gen).half() for _ in range(n_images)]
    print(f"machine: {machine(device)}; load average {os.getloadavg()[0]:.1f}")
    print(f"data: {len(maps)} maps of {tuple(maps[0].shape)}")

    # training step (default config): views, losses, backward, AdamW step
    config = HSGConfig()
    torch.manual_seed(0)
    model = HSGModel(int(maps[0].shape[-1]), config).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(0)
    batch = maps[: config.batch_size]

    def step():
        x, _ = make_views(batch, None, config, gen, device)
        loss = training_step(model, x, None)["total"]
        opt.zero_grad()
        loss.backward()
        opt.step()

    t_step, c_step = timed(step, device, repeat)
    steps = config.epochs * -(-591 // config.batch_size)
    print(
        f"train step (batch {config.batch_size} x {config.views} views, crop {config.crop}): "
        f"{t_step * 1e3:.1f} ms wall, {c_step * 1e3:.1f} ms process CPU"
    )
    print(f"  -> default fit on MSRC ({steps} steps, superpixels excluded): {t_step * steps:.1f} s wall")

    # inference: head + G0 alone, then + transformer / k-means hierarchy (per image, batch of one)
    x = maps[0].to(device).float().reshape(1, -1, maps[0].shape[-1])
    hw = (int(maps[0].shape[0]), int(maps[0].shape[1]))
    results = {}
    for grouping in ("none", "transformer", "kmeans"):
        cfg = HSGConfig(grouping="kmeans" if grouping == "none" else grouping)
        torch.manual_seed(0)
        m = HSGModel(int(maps[0].shape[-1]), cfg).to(device).eval()

        @torch.no_grad()
        def infer(m=m, cfg=cfg, grouping=grouping):
            v = m.project(x)
            _, x0, mask0 = base_grouping(v, hw, cfg.n0, cfg.kmeans_iters)
            if grouping != "none":
                m.hierarchy(x0, mask0)

        results[grouping] = timed(infer, device, repeat * 5)[0] * 1e3
    over_t = results["transformer"] - results["none"]
    over_k = results["kmeans"] - results["none"]
    paper_t = PAPER_MS["transformer"] - PAPER_MS["none"]
    paper_k = PAPER_MS["kmeans"] - PAPER_MS["none"]
    print(f"{'per image (ms)':<28}{'measured':>10}{'paper T6':>10}")
    print(f"{'head + G0 (no hierarchy)':<28}{results['none']:>10.2f}{'120 (CNN)':>10}")
    print(f"{'hierarchy overhead: transf.':<28}{over_t:>10.2f}{paper_t:>10.0f}")
    print(f"{'hierarchy overhead: k-means':<28}{over_k:>10.2f}{paper_k:>10.0f}")
    ratio = over_t / over_k if over_k > 0 else float("nan")
    print(f"ratio transformer / k-means overhead: measured {ratio:.2f}, paper {paper_t / paper_k:.2f}")


if __name__ == "__main__":
    main()
