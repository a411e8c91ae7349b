"""ACG's max-intensity modularity on the torch path (GPU, or CPU without numba): chunks of images against the
previous per-image loop, on one training step's shapes (591 MSRC-v2 images, 6 concepts, up to 400 pixels).

Prints the machine, seconds per call and the number of torch operators each call dispatches (on a GPU each is
at least one kernel launch, which is where a per-image loop's time goes), side by side as ratios, and checks
that both give the same q and H.

    .venv/bin/python benchmarks/perf/acg_modularity_torch.py [--rev 1c364d2] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine, old_package, timed  # noqa: E402

from ussbench.image_clusterers import _modularity  # noqa: E402


def step_inputs(device: str, n_images: int = 591, n_concepts: int = 6, max_pixels: int = 400):
    """Concept-major soft assignments (B, N, P) and padded graphs (B, P, P), pixels per image 300..400."""
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(300, max_pixels + 1, (n_images,), generator=g)
    x = torch.randn(n_images, max_pixels, 64, generator=g)
    valid = torch.arange(max_pixels)[None] < lengths[:, None]
    x = x * valid[:, :, None]
    graph = _modularity.modularity_graph(x) * (valid[:, :, None] & valid[:, None, :])
    St = torch.rand(n_images, n_concepts, max_pixels, generator=g) * valid[:, None, :]
    return St.to(device), graph.to(device)


def operator_count(fn) -> int:
    """Torch operators one call dispatches (aten ops at the top level of the profiler's event list)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rev", default="1c364d2", help="git revision of the previous (per-image) implementation"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    old = old_package(args.rev).image_clusterers._modularity._max_intensity_torch
    new = _modularity._max_intensity_torch
    St, graph = step_inputs(args.device)
    chunk_mb = _modularity.CHUNK_BYTES["cuda" if args.device == "cuda" else "cpu"] >> 20
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def run(fn):
        out = fn(St, graph)
        sync()
        return out

    run(old), run(new)  # warm-up
    t_old, (q_old, h_old) = timed(lambda: run(old), args.repeat)
    t_new, (q_new, h_new) = timed(lambda: run(new), args.repeat)
    ops_old, ops_new = operator_count(lambda: run(old)), operator_count(lambda: run(new))
    torch.testing.assert_close(q_new, q_old, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h_new, h_old, atol=1e-6, rtol=1e-5)
    result = {
        "machine": machine(),
        "device": args.device,
        "shapes": {"images": St.shape[0], "concepts": St.shape[1], "max_pixels": St.shape[2]},
        "previous": {"rev": args.rev, "seconds": round(t_old, 4), "torch_ops": ops_old},
        "chunked": {"seconds": round(t_new, 4), "torch_ops": ops_new, "chunk_mb": chunk_mb},
        "speedup": round(t_old / t_new, 2),
        "ops_ratio": round(ops_old / ops_new, 1),
        "same_q_and_H": True,
    }
    print(json.dumps(result, indent=2))
    print(f"\nACG max-intensity modularity, torch path, one step (591 images x 6 concepts x <=400 pixels) on "
          f"{args.device} ({result['machine']['cpu']}, {result['machine']['torch_threads']} threads):")  # fmt: skip
    print(f"  previous per-image loop ({args.rev}): {t_old:.3f} s, {ops_old} torch ops")
    print(f"  chunked ({chunk_mb} MB chunks):      {t_new:.3f} s, {ops_new} torch ops")
    print(f"  ratio: x{t_old / t_new:.2f} time, x{ops_old / ops_new:.0f} fewer ops; same q and H")


if __name__ == "__main__":
    main()
