"""Label-free health of learned codes: effective rank, spread around the mean direction, cluster usage.

A feature learner whose loss pulls (nearly) every pair of points together maps all patches to one
direction: its codes "collapse". That is visible without labels:

* ``effective_rank``: exp of the entropy of the normalised singular values of the L2-normalised codes of a
  fixed probe set of patches (Roy & Vetterli 2007). Uncentred on purpose: codes that all point one way have
  one dominant singular value, so the rank tends to 1 (centring would leave only the noise around that
  direction, whose rank is high). Between 1 and min(probe size, code dimension).
* ``mean_cosine``: mean cosine of the probe codes to their mean direction (1 = all identical).
* ``assignment_entropy``: entropy of the arg-max usage of K prototypes over the probe, divided by log K (1 =
  all clusters used equally, 0 = one cluster takes every patch); only for learners that have prototypes.

A run is flagged ``collapsed`` when training lost most of the code's rank: its final effective rank is
below ``COLLAPSE_FRACTION`` of a reference rank, or below ``COLLAPSE_RANK``. The reference is the rank of the
untrained head's codes on the same probe (the first point of the learning curve: what the projection keeps
before any loss acts), or, for learners without a curve, the smaller of the input tokens' rank and the code
dimension. (On MSRC-v2 with DINOv2 ViT-S/14, STEGO's DINO v1 shifts take the rank from 43 to 8 while the
mIoU drops from 11 to 7; calibrated runs end between 30 and 52.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

PROBE_PATCHES = 4096  # patches in the health probe (fixed, seeded sample of all patches of the set)
COLLAPSE_RANK = 3.0  # an effective rank below this is a collapse whatever the input
COLLAPSE_FRACTION = 0.3  # ... and so is one below 30% of the reference rank (untrained head, else input)
HEALTH_KEYS = ("effective_rank", "mean_cosine", "assignment_entropy")


def probe_indices(grids: Sequence[tuple[int, int]], n: int = PROBE_PATCHES, seed: int = 0) -> torch.Tensor:
    """(n, 3) int64 rows (image, y, x): a seeded uniform sample of all patches (all of them if fewer)."""
    sizes = torch.tensor([h * w for h, w in grids], dtype=torch.long)
    total = int(sizes.sum())
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(total, generator=g)[: min(n, total)].sort().values
    starts = torch.cumsum(sizes, 0) - sizes
    image = torch.searchsorted(starts, flat, right=True) - 1
    local = flat - starts[image]
    widths = torch.tensor([w for _, w in grids], dtype=torch.long)[image]
    return torch.stack([image, local // widths, local % widths], dim=1)


def gather_probe(maps: Sequence[torch.Tensor], index: torch.Tensor) -> torch.Tensor:
    """(P, D) float32 rows of per-image maps (h, w, D) at probe rows (image, y, x)."""
    return torch.stack([maps[int(i)][int(y), int(x)] for i, y, x in index.tolist()]).float()


def effective_rank(x: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) of the L2-normalised rows of x (P, D)."""
    s = torch.linalg.svdvals(F.normalize(x.float(), dim=1))
    p = s / s.sum().clamp_min(1e-12)
    return float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))


def mean_cosine(x: torch.Tensor) -> float:
    """Mean cosine similarity of the rows of x to their mean direction."""
    u = F.normalize(x.float(), dim=1)
    return float(F.cosine_similarity(u, u.mean(0, keepdim=True)).mean())


def assignment_entropy(x: torch.Tensor, prototypes: torch.Tensor) -> float:
    """Entropy of the arg-max cosine usage of K prototypes by the rows of x, over log K (1 for K = 1)."""
    k = int(prototypes.shape[0])
    if k < 2:
        return 1.0
    labels = (F.normalize(x.float(), dim=1) @ F.normalize(prototypes.float(), dim=1).t()).argmax(1)
    p = torch.bincount(labels, minlength=k).float() / len(labels)
    return float(-(p * p.clamp_min(1e-12).log()).sum() / math.log(k))


def code_health(x: torch.Tensor, prototypes: torch.Tensor | None = None) -> dict[str, float]:
    """Health of probe codes x (P, D): effective rank, mean cosine and (with prototypes) assignment entropy."""
    out = {"effective_rank": effective_rank(x), "mean_cosine": mean_cosine(x)}
    if prototypes is not None:
        out["assignment_entropy"] = assignment_entropy(x, prototypes)
    return out


def is_collapsed(rank: float, reference: float | None = None) -> bool:
    """The collapse rule: rank below COLLAPSE_RANK, or below COLLAPSE_FRACTION of the reference rank."""
    if not math.isfinite(rank):
        return True
    return rank < COLLAPSE_RANK or (reference is not None and rank < COLLAPSE_FRACTION * reference)


def reference_rank(initial_rank: float | None, input_rank: float, dim: int) -> float:
    """The rank a collapse is measured against: the untrained head's if known, else min(input rank, dim)."""
    if initial_rank is not None and math.isfinite(initial_rank):
        return float(initial_rank)
    return float(min(input_rank, dim))
