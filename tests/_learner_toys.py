"""Synthetic feature sets for the feature-learner tests: patch tokens drawn around K class prototypes."""

from __future__ import annotations

import torch

from ussbench.base import FeatureSet, ImageFeatures, StageContext


def toy_features(
    n: int = 8, channels: int = 16, classes: int = 3, seed: int = 0, noise: float = 0.6
) -> FeatureSet:
    """n images (8x8 and 8x10 grids) cut into vertical bands of random classes; tokens = prototype + noise."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, channels, generator=g) * 2
    images = []
    for i in range(n):
        h, w = (8, 8) if i % 2 else (8, 10)
        cut = int(torch.randint(2, w - 2, (1,), generator=g))
        a, b = torch.randperm(classes, generator=g)[:2].tolist()
        label = torch.full((h, w), a)
        label[:, cut:] = b
        tokens = protos[label] + noise * torch.randn(h, w, channels, generator=g)
        attn = torch.rand(2, h, w, generator=g)
        images.append(
            ImageFeatures(
                f"toy{i}",
                tokens.half(),
                tokens.half(),
                tokens.mean((0, 1)).half(),
                attn.half(),
                (h * 8, w * 8),
            )
        )
    return FeatureSet(images, "toy", 8, channels)


def toy_ctx(num_classes: int = 3, seed: int = 0) -> StageContext:
    return StageContext(torch.device("cpu"), seed, None, None, num_classes, progress=False)  # type: ignore[arg-type]


def early_late(values: list[float], n: int = 10) -> tuple[float, float]:
    """Mean of the first and of the last n logged values."""
    return sum(values[:n]) / n, sum(values[-n:]) / n
