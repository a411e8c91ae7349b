"""k-means at scale: faiss (GPU when present) and the torch engine vs scikit-learn MiniBatchKMeans.

Default: 1,000,000 x 384 float32 vectors, k = 27, every method run for the same number of passes over
the data from the same seeded k-means++ centroids; prints time and inertia side by side with the ratios
to MiniBatchKMeans. Then Sinkhorn OT clustering (torch, GPU when present) on the same data.
``--small``: 50,000 x 384 on CPU in about a minute.

    python benchmarks/perf/kmeans_scale.py [--small] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import faiss
    import sklearn

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "cpu": f"{cpu} ({torch.get_num_threads()} torch threads)",
        "gpu": gpu,
        "torch": torch.__version__,
        "faiss": f"{faiss.__version__} ({'GPU' if faiss_gpu() else 'CPU-only build'})",
        "sklearn": sklearn.__version__,
    }


def faiss_gpu() -> bool:
    from ussbench.dataset_clusterers.kmeans import faiss_gpu_available

    return faiss_gpu_available()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_data(n: int, dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """A Gaussian mixture with 100 unequal components (more structure than k), float32, on device."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    centres = torch.randn(100, dim, generator=gen) * 1.5
    probs = torch.rand(100, generator=gen) + 0.2
    comp = torch.multinomial(probs / probs.sum(), n, replacement=True, generator=gen)
    X = torch.empty(n, dim, dtype=torch.float32, device=device)
    for s in range(0, n, 200_000):
        e = min(n, s + 200_000)
        noise = torch.randn(e - s, dim, generator=gen)
        X[s:e] = (centres[comp[s:e]] + noise).to(device)
    return X


def inertia(X: torch.Tensor, C: torch.Tensor) -> float:
    from ussbench.dataset_clusterers.kmeans import assign

    return float(assign(X, C.to(X.device), "l2")[1].double().sum())


def timed(fn, device: torch.device):
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="50,000 vectors on CPU (CI scale)")
    ap.add_argument(
        "--n", type=int, default=None, help="number of vectors (default 1,000,000; 50,000 with --small)"
    )
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--k", type=int, default=27)
    ap.add_argument("--iters", type=int, default=20, help="passes over the data for every k-means method")
    ap.add_argument("--batch-size", type=int, default=4096, help="MiniBatchKMeans batch (DSM's value)")
    ap.add_argument(
        "--otc-iters", type=int, default=None, help="OTC outer iterations (default 200; 50 with --small)"
    )
    ap.add_argument(
        "--device", default=None, help="cuda or cpu (default: cuda when present, cpu with --small)"
    )
    ap.add_argument("--skip-minibatch", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the results here as JSON")
    args = ap.parse_args()

    from sklearn.cluster import MiniBatchKMeans

    from ussbench.dataset_clusterers._common import kmeans_plusplus
    from ussbench.dataset_clusterers.kmeans import lloyd_torch
    from ussbench.dataset_clusterers.otc import OTClusterer

    n = args.n or (50_000 if args.small else 1_000_000)
    otc_iters = args.otc_iters or (50 if args.small else 200)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.small else "cpu"))
    info = machine()
    print("machine:", json.dumps(info))
    print(f"data: {n:,} x {args.dim} float32 (100-component Gaussian mixture), k={args.k}, "
          f"{args.iters} passes, device {device}")  # fmt: skip

    X, t_data = timed(lambda: make_data(n, args.dim, args.seed, device), device)
    C0, t_init = timed(lambda: kmeans_plusplus(X, args.k, np.random.default_rng(args.seed)), device)
    print(
        f"data generated in {t_data:.1f}s; shared k-means++ init in {t_init:.2f}s (not in the timings below)"
    )
    Xnp = np.ascontiguousarray(X.cpu().numpy())
    C0np = np.ascontiguousarray(C0.cpu().numpy())
    rows: list[dict] = []

    import faiss

    gpu = device.type == "cuda" and faiss_gpu()

    def run_faiss():
        km = faiss.Kmeans(args.dim, args.k, niter=args.iters, nredo=1, seed=args.seed, gpu=gpu, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=1 << 30)  # fmt: skip
        km.train(Xnp, init_centroids=C0np)
        return torch.from_numpy(km.centroids)

    C, t = timed(run_faiss, device)
    rows.append({"method": f"faiss k-means ({'GPU' if gpu else 'CPU'})", "iters": args.iters, "time_s": t,
                 "inertia": inertia(X, C)})  # fmt: skip

    (C, it), t = timed(lambda: lloyd_torch(X, C0, "l2", args.iters, 0.0), device)
    rows.append(
        {"method": f"torch Lloyd ({device.type})", "iters": it, "time_s": t, "inertia": inertia(X, C)}
    )

    if not args.skip_minibatch:

        def run_minibatch():
            km = MiniBatchKMeans(args.k, init=C0np, n_init=1, max_iter=args.iters, batch_size=args.batch_size,
                                 random_state=args.seed, compute_labels=False, tol=0.0, max_no_improvement=None)  # fmt: skip
            km.fit(Xnp)
            return torch.from_numpy(km.cluster_centers_.astype(np.float32)), km.n_iter_

        (C, it), t = timed(run_minibatch, torch.device("cpu"))
        rows.append({"method": f"sklearn MiniBatchKMeans (CPU, batch {args.batch_size})", "iters": int(it),
                     "time_s": t, "inertia": inertia(X, C)})  # fmt: skip

    ref = rows[-1] if not args.skip_minibatch else rows[0]
    print(
        f"\n{'method':48s} {'passes':>6s} {'time s':>9s} {'inertia':>14s} {'speed-up':>9s} {'inertia/ref':>11s}"
    )
    for r in rows:
        r["speedup_vs_ref"] = ref["time_s"] / r["time_s"]
        r["inertia_ratio_vs_ref"] = r["inertia"] / ref["inertia"]
        print(f"{r['method']:48s} {r['iters']:>6d} {r['time_s']:>9.2f} {r['inertia']:>14.6g} "
              f"{r['speedup_vs_ref']:>8.1f}x {r['inertia_ratio_vs_ref']:>11.4f}")  # fmt: skip
    print(f"(reference: {ref['method']}; speed-up = its time / method time; inertia/ref < 1 is better)")

    otc = OTClusterer(args.k, n_iter=otc_iters, seed=args.seed, device=str(device))
    _, t = timed(lambda: otc.fit(X), device)
    mass = otc.cluster_mass_
    otc_row = {"method": f"OTC Sinkhorn ({device.type})", "iters": otc_iters, "sinkhorn_iter": otc.sinkhorn_iter,
               "epsilon": otc.epsilon, "time_s": t, "ms_per_iter": 1000 * t / otc_iters,
               "marginal_error": otc.marginal_error_, "cluster_mass_min_max": [float(mass.min()), float(mass.max())]}  # fmt: skip
    print(f"\nOTC (study settings: temp {otc.epsilon}, {otc.sinkhorn_iter} Sinkhorn iters) x {otc_iters} "
          f"outer iterations on the same data: {t:.2f}s ({otc_row['ms_per_iter']:.1f} ms/iteration), "
          f"cluster-mass L1 error {otc.marginal_error_:.2e}, masses {mass.min():.0f}..{mass.max():.0f} "
          f"(target {n / args.k:.0f})")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "n": n, "dim": args.dim, "k": args.k,
                                               "kmeans": rows, "otc": otc_row}, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
