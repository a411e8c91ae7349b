"""Time DSM's eigen step on the shipped data: batched torch eigh (GPU when present) vs scipy eigsh per image.

Both solvers get the same affinity matrices (keys of every image of MSRC-v2 and CamVid test); the script
prints the time of each, their ratio, and their agreement: the largest eigenvalue difference and the
fraction of images whose k-means segmentation (same seed) is identical up to a permutation of ids.

    python benchmarks/perf/dsm_eigs.py --small                     # CPU, random ViT, a subset
    python benchmarks/perf/dsm_eigs.py --backbone dinov2_vits14_imgfocus --device cuda
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from ussbench.base import StageContext
from ussbench.cpuinfo import cpu_model
from ussbench.image_clusterers import _spectral as sp
from ussbench.image_clusterers.dsm import DeepSpectral

REPO = Path(__file__).resolve().parents[2]


def machine(device: torch.device) -> str:
    cpu = cpu_model()
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return f"CPU {cpu} ({torch.get_num_threads()} torch threads), GPU {gpu}, torch {torch.__version__}"


def load_dataset(name: str, data_root: Path, limit: int | None):
    if name == "msrc_v2":
        from ussbench.datasets.msrc import MSRCv2

        return MSRCv2(data_root=str(data_root), limit=limit)
    if name == "camvid":
        from ussbench.datasets.camvid import CamVid

        return CamVid(split="test", data_root=str(data_root), limit=limit)
    raise SystemExit(f"--datasets: unknown dataset {name!r} (msrc_v2, camvid)")


def load_backbone(name: str, resolution: int, depth: int | None):
    if name == "random_vit":
        from ussbench.backbones.dino import RandomViT

        return RandomViT(arch="vit_small_patch14_dinov2", depth=depth, resolution=resolution)
    from ussbench import registry

    return registry.get("backbone", name).cls(resolution=resolution)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_torch(stacks, K: int, dtype: torch.dtype, device: torch.device, repeats: int):
    """Best-of-repeats wall time of the batched solver over all stacks, and its outputs (on CPU)."""
    moved = [W.to(device, dtype) for W in stacks]
    sp.eigh_smallest(moved[0][:1], K)  # warm-up (solver initialisation, first-call overheads)
    best = float("inf")
    for _ in range(repeats):
        outs = []
        sync(device)
        t0 = time.perf_counter()
        for W in moved:
            evals, vecs = sp.eigh_smallest(W, K)
            outs.append((evals, sp.fix_signs(vecs)))
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, [(e.double().cpu(), v.double().cpu()) for e, v in outs]


def time_scipy(stacks, K: int):
    """Wall time of the reference per-image scipy eigsh loop over all images, and its outputs."""
    mats = [W.double().cpu().numpy() for W in stacks]
    outs = []
    t0 = time.perf_counter()
    for stack in mats:
        ev, vs = zip(*(sp.eigsh_smallest(w, K) for w in stack))
        outs.append((torch.from_numpy(np.stack(ev)), sp.fix_signs(torch.from_numpy(np.stack(vs)))))
    return time.perf_counter() - t0, outs


def agreement(a, b, n_segments: int, n_init: int, seed: int = 0) -> tuple[float, float, int]:
    """Max eigenvalue difference and fraction of images whose k-means segmentations match."""
    diff, same, n = 0.0, 0, 0
    for (ea, va), (eb, vb) in zip(a, b):
        diff = max(diff, float((ea - eb).abs().max()))
        for i in range(va.shape[0]):
            la = sp.kmeans_sklearn(va[i, :, 1:].numpy(), n_segments, n_init, 300, seed)
            lb = sp.kmeans_sklearn(vb[i, :, 1:].numpy(), n_segments, n_init, 300, seed)
            same += sp.same_partition(la, lb)
            n += 1
    return diff, same / max(n, 1), n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--small", action="store_true", help="CPU-sized run: a subset of each dataset, 4-block ViT"
    )
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data"))
    ap.add_argument("--datasets", default="msrc_v2,camvid")
    ap.add_argument("--backbone", default="random_vit", help="random_vit or a registered backbone name")
    ap.add_argument("--resolution", type=int, default=224)
    ap.add_argument(
        "--limit", type=int, default=None, help="images per dataset (default: all; --small: 48/24)"
    )
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--n-eigenvectors", type=int, default=20)
    ap.add_argument("--n-segments", type=int, default=15)
    ap.add_argument("--color-lambda", type=float, default=0.0)
    ap.add_argument("--batch", type=int, default=64, help="images per batched eigh call")
    ap.add_argument(
        "--repeats", type=int, default=None, help="timed repeats of the torch path (default 3; --small 1)"
    )
    ap.add_argument(
        "--kmeans-n-init",
        type=int,
        default=None,
        help="k-means restarts for the agreement check (10; --small 3)",
    )
    args = ap.parse_args()

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    print(f"machine: {machine(device)}")
    backbone = load_backbone(args.backbone, args.resolution, 4 if args.small else None)
    dsm = DeepSpectral(n_eigenvectors=args.n_eigenvectors, color_lambda=args.color_lambda)
    K = args.n_eigenvectors
    repeats = args.repeats or (1 if args.small else 3)
    n_init = args.kmeans_n_init or (3 if args.small else 10)
    dtypes = [torch.float64] if device.type == "cpu" else [torch.float32, torch.float64]
    for name in args.datasets.split(","):
        limit = args.limit or ((48 if name == "msrc_v2" else 24) if args.small else None)
        dataset = load_dataset(name, Path(args.data_root), limit)
        t0 = time.perf_counter()
        feats = backbone.extract(dataset, device, progress=False)
        t_feat = time.perf_counter() - t0
        ctx = StageContext(device, 0, dataset, backbone, dataset.num_classes, progress=False)
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, im in enumerate(feats):
            groups[im.grid].append(i)
        stacks = []
        for members in groups.values():
            for s in range(0, len(members), args.batch):
                chunk = members[s : s + args.batch]
                stacks.append(dsm.affinities(feats, chunk, "keys", ctx, torch.device("cpu"), torch.float64))
        sizes = ", ".join(f"{h}x{w}={h * w} nodes: {len(m)}" for (h, w), m in sorted(groups.items()))
        print(f"\n{name}: {len(feats)} images ({backbone.report_name or backbone.plugin_name}, features "
              f"{t_feat:.1f} s); grids {sizes}; K={K}, lambda_color={args.color_lambda}")  # fmt: skip
        t_ref, ref = time_scipy(stacks, K)
        print(
            f"  scipy eigsh per image (reference): {t_ref:8.3f} s  ({1000 * t_ref / len(feats):.1f} ms/image)"
        )
        for dtype in dtypes:
            t_fast, fast = time_torch(stacks, K, dtype, device, repeats)
            diff, frac, n = agreement(fast, ref, args.n_segments, n_init)
            print(
                f"  torch eigh batched {device.type} {str(dtype).split('.')[-1]}: {t_fast:8.3f} s  "
                f"({1000 * t_fast / len(feats):.2f} ms/image)  speed-up x{t_ref / t_fast:.1f}  "
                f"max |eigval diff| {diff:.2e}  identical segmentations {frac * 100:.1f}% of {n}"
            )


if __name__ == "__main__":
    main()
