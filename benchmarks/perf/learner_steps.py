"""Training steps per second of the feature learners on cached features vs recomputing the backbone.

The reference code bases (STEGO, HP, SmooSeg) run the frozen ViT on every training batch (STEGO twice:
image and kNN positive). ussbench trains on cached tokens. Both loops here are the same learner code,
same head, loss and batch: the "recompute" loop only swaps the feature bank for one that runs the
backbone on the pixel crops of the requested windows at every step (bf16 autocast on CUDA, as in
extraction). HP's local-attention maps stay cached in both loops (this favours the reference loop).

    python benchmarks/perf/learner_steps.py --small            # CPU, random ViT-S/16, ~1-2 minutes
    python benchmarks/perf/learner_steps.py                    # GPU, random ViT-S/8 at 224 (28x28 grid)
    python benchmarks/perf/learner_steps.py --backbone dino_vits8 --weights dino_deitsmall8_300ep_pretrain.pth
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
        name += f" ({torch.get_num_threads()} threads)"
    return f"{name}; torch {torch.__version__}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_loop(learner_cls, params: dict, features, ctx, recompute: bool, images, model, patch: int) -> float:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="reduced CPU scale (random ViT-S/16, 112 px)")
    ap.add_argument("--backbone", default="random_vit", help="backbone plugin name")
    ap.add_argument("--weights", default=None, help="weights file for a checkpoint backbone")
    ap.add_argument("--learners", default="stego,hp,smooseg,stego_omh", help="comma-separated learner names")
    ap.add_argument("--images", type=int, default=None, help="number of images in the training set")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 16; 4 with --small)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per loop")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    device = torch.device(args.device)
    size = 112 if args.small else 224
    n_images = args.images or (16 if args.small else 256)
    batch = args.batch or (4 if args.small else 16)
    steps = args.steps or (6 if args.small else 50)
    bparams: dict[str, Any] = {"resolution": size}
    if args.backbone == "random_vit":
        bparams["arch"] = "vit_small_patch16_224" if args.small else "vit_small_patch8_224"
    if args.weights:
        bparams["weights"] = args.weights
    backbone = registry.instantiate(registry.get("backbone", args.backbone), bparams)
    data = RandomImages(n_images, size)
    features = backbone.extract(data, device, progress=False)
    patch = backbone.patch_size
    grid = size // patch
    images = torch.stack([backbone.preprocess(im) for im in data.images]).to(device)
    model = backbone.model(device)
    ctx = StageContext(device, 0, data, backbone, 27, progress=False)

    print(f"machine: {machine()}")
    print(
        f"backbone {args.backbone} ({getattr(backbone, 'arch', '')}) at {size}px -> {grid}x{grid} tokens; "
        f"{n_images} images, batch {batch}, {steps} timed steps after 2 warm-up steps"
    )
    print(f"{'learner':<12} {'cached steps/s':>15} {'recompute steps/s':>18} {'ratio':>7}")
    for name in args.learners.split(","):
        spec = registry.get("feature_learner", name)
        params = {"batch_size": batch, "crop_size": grid, "crop_mode": "random", "num_classes": 27}
        if name.startswith("hp"):
            params["pool_size"] = min(2048, n_images)
        rates = []
        for recompute in (False, True):
            time_loop(spec.cls, {**params, "steps": 2}, features, ctx, recompute, images, model, patch)
            rates.append(
                time_loop(
                    spec.cls, {**params, "steps": steps}, features, ctx, recompute, images, model, patch
                )
            )
        print(f"{name:<12} {rates[0]:>15.2f} {rates[1]:>18.2f} {rates[0] / rates[1]:>6.1f}x")


if __name__ == "__main__":
    main()
