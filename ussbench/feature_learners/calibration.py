"""Label-free calibration of the learners' settings to the backbone and dataset at hand.

The papers tuned their loss shifts for DINO v1 features. On DINOv2 the pointwise-centred feature
correlations that the losses see are far higher (MSRC-v2, ViT-S/14: median about 0.65 for same-image
pairs, 0.60 for kNN pairs, 0.39 for random pairs), so DINO v1 shifts pull almost every pair together and
the codes collapse. Instead of hand-picking new numbers per backbone, a shift left at ``"auto"`` is set by
one rule, fixed once (on MSRC-v2) and held for every other backbone and dataset:

    shift = the (1 - pull) quantile of that pair type's centred feature correlations,

measured on a seeded sample of training batches drawn exactly as the loss draws them (same windows, sample
points, kNN positives and derangements; no dropout), before training. ``pull`` is the fraction of that pair
type the loss pulls together (correlation above the shift); the rest it pushes apart. The rule never sees a
label. Calibration draws its batches from its own generator, so training draws the same batches whether a
shift was calibrated or given.

The fraction of same-image pairs to pull is itself measured (``pull_self`` / ``pull_knn`` left at ``"auto"``):
pull = s^2, with s the own-image share of a patch's neighbourhood (:func:`own_image_share`), i.e. the chance
that both patches of a pair have their neighbourhood in their own image. A fixed 0.8 chosen on MSRC-v2 (object
photos, where a random image pair rarely shares a class) made STEGO pull together mostly different-class
same-image pairs on CamVid road scenes (every image shows road, sky, building, ...) and lose 7 mIoU to raw
tokens; s is 0.84-0.87 on MSRC-v2 (pull 0.71-0.76) and 0.48 on CamVid test (pull 0.23).

Other settings that the papers tied to their step counts are rescaled by a stated rule (see
:func:`ema_momentum_for` and :func:`hp_pool_size_for`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

AUTO = "auto"
CALIBRATION_BATCHES = 8  # training batches measured per calibration
MAX_VALUES = 1_000_000  # correlations kept per pair type for the quantile (seeded subsample)
CALIBRATION_SEED_OFFSET = 7919  # calibration generator = seed + offset (training draws stay untouched)

# SmooSeg reference: teacher EMA 0.998 over 3000 steps, i.e. a half-life of 346 steps = 11.5% of the run.
SMOOSEG_REF_MOMENTUM, SMOOSEG_REF_STEPS = 0.998, 3000
# HP reference (COCO json): a threshold pool of 2048 patches against batches of 64 windows of 28x28 patches.
HP_REF_POOL, HP_REF_OTHER_PATCHES = 2048, 63 * 28 * 28


# own-image share: neighbours per query patch, images in the pool, query patches (set once, before any score)
SHARE_NEIGHBOURS, SHARE_IMAGES, SHARE_QUERIES = 30, 200, 1000
SHARE_BOUNDS = (0.05, 0.95)  # a pull fraction must stay inside (0, 1)


def is_auto(value: object) -> bool:
    return isinstance(value, str) and value == AUTO


def check_fraction(name: str, value: float | str, allow_auto: bool = False) -> None:
    """A pull fraction must lie strictly between 0 and 1 (or be 'auto' where the learner measures it)."""
    from ..errors import ConfigError

    if allow_auto and is_auto(value):
        return
    if isinstance(value, (str, bool)) or not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise ConfigError(f"{name} must lie in (0, 1), got {value!r}")


def check_shift(name: str, value: object) -> None:
    """A shift is a number or 'auto'."""
    from ..errors import ConfigError

    if not (is_auto(value) or (isinstance(value, (int, float)) and not isinstance(value, bool))):
        raise ConfigError(f"{name} must be a number or 'auto', got {value!r}")


def check_shifts(
    who: str, params: dict, pair_types: tuple[str, ...], auto_pulls: tuple[str, ...] = ()
) -> None:
    """Check ``shift_<pair>`` (a number or 'auto') and ``pull_<pair>`` (in (0, 1); 'auto' for auto_pulls)."""
    for pair in pair_types:
        check_shift(f"{who}: shift_{pair}", params[f"shift_{pair}"])
        check_fraction(f"{who}: pull_{pair}", params[f"pull_{pair}"], allow_auto=pair in auto_pulls)


def quantile_shift(values: torch.Tensor, pull: float) -> float:
    """The shift that puts a fraction ``pull`` of ``values`` above it: their (1 - pull) quantile."""
    return float(torch.quantile(values.float().cpu(), 1.0 - float(pull)))


@torch.no_grad()
def own_image_share(
    tokens: torch.Tensor,
    grids: torch.Tensor,
    seed: int,
    neighbours: int = SHARE_NEIGHBOURS,
    n_images: int = SHARE_IMAGES,
    n_queries: int = SHARE_QUERIES,
) -> float:
    """Label-free: the mean share of a patch's nearest patches that lie in its own image.

    tokens (N, Hmax, Wmax, C) padded maps, grids (N, 2) their valid sizes. A pool of ``n_images`` seeded
    images (all when fewer); ``n_queries`` seeded patches of the pool; each query's ``neighbours`` most
    cosine-similar pool patches (itself excluded); the share of those from the query's image, averaged. High
    where images hold distinct content (object photos: MSRC-v2 0.84-0.87), low where every image shows the same
    classes (road scenes: CamVid test 0.48). Its square is the fraction of same-image pairs STEGO pulls together.
    """
    g = torch.Generator().manual_seed(int(seed) + CALIBRATION_SEED_OFFSET)
    images = torch.randperm(int(tokens.shape[0]), generator=g)[:n_images].tolist()
    grids_l = grids.tolist()
    pool = torch.cat(
        [tokens[i, : grids_l[i][0], : grids_l[i][1]].reshape(-1, tokens.shape[-1]) for i in images]
    )
    pool = torch.nn.functional.normalize(pool.float(), dim=1)
    owner = torch.cat(
        [torch.full((grids_l[i][0] * grids_l[i][1],), j, dtype=torch.long) for j, i in enumerate(images)]
    ).to(pool.device)
    k = min(int(neighbours), len(pool) - 1)
    if k < 1:
        raise ValueError("own_image_share needs at least 2 patches")
    queries = torch.randperm(len(pool), generator=g)[:n_queries].to(pool.device)
    shares = []
    for chunk in queries.split(256):
        sim = pool[chunk] @ pool.t()
        sim[torch.arange(len(chunk), device=pool.device), chunk] = -float("inf")
        top = sim.topk(k, dim=1).indices
        shares.append((owner[top] == owner[chunk][:, None]).float().mean(1))
    return float(torch.cat(shares).mean())


def share_to_pull(share: float) -> float:
    """Pull fraction of same-image pairs from the own-image share s: s^2 (both ends of a pair 'own' their
    image), clipped to SHARE_BOUNDS. The square was chosen with CamVid scores in view (see the STEGO card)."""
    return float(min(max(share * share, SHARE_BOUNDS[0]), SHARE_BOUNDS[1]))


def collect(
    draw: Callable[[torch.Generator], dict[str, torch.Tensor]],
    seed: int,
    n_batches: int = CALIBRATION_BATCHES,
) -> dict[str, torch.Tensor]:
    """Run ``draw`` (one batch's correlations per pair type) n_batches times with a dedicated generator.

    Returns the concatenated values per pair type (a seeded subsample of at most MAX_VALUES each).
    """
    g = torch.Generator().manual_seed(int(seed) + CALIBRATION_SEED_OFFSET)
    parts: dict[str, list[torch.Tensor]] = {}
    with torch.no_grad():
        for _ in range(n_batches):
            for name, values in draw(g).items():
                parts.setdefault(name, []).append(values.detach().flatten().float().cpu())
    out = {}
    for name, chunks in parts.items():
        values = torch.cat(chunks)
        if len(values) > MAX_VALUES:
            values = values[torch.randperm(len(values), generator=g)[:MAX_VALUES]]
        out[name] = values
    return out


def summary(values: torch.Tensor) -> dict[str, float]:
    """Median and 10/90% quantiles of a pair type's correlations (recorded beside the chosen shift)."""
    q = torch.quantile(values.float(), torch.tensor([0.1, 0.5, 0.9])).tolist()
    return {"q10": q[0], "median": q[1], "q90": q[2]}


def ema_momentum_for(n_steps: int, ref_momentum: float, ref_steps: int) -> float:
    """EMA momentum whose half-life is the same fraction of ``n_steps`` as ref_momentum's of ref_steps.

    A teacher that averages the student with the reference's momentum over a run 15x shorter barely leaves
    its initial value; this keeps how far it moves over the run.
    """
    half_life_fraction = math.log(0.5) / math.log(ref_momentum) / ref_steps
    return float(0.5 ** (1.0 / max(1.0, half_life_fraction * n_steps)))


def hp_pool_size_for(batch_size: int, crop: int) -> int:
    """HP threshold-pool size that keeps the reference's expected number of chance cross-image positives.

    A patch is a positive of an anchor when their similarity beats the anchor's maximum similarity over the
    pool, so a random other-image patch passes with probability about 1/pool_size. The reference compares
    each anchor with 63 x 784 other-image patches against a pool of 2048 (about 24 chance passes); with
    (batch - 1) x crop^2 other-image patches per batch the pool scales down in proportion.
    """
    other = (int(batch_size) - 1) * int(crop) ** 2
    return max(1, round(HP_REF_POOL * other / HP_REF_OTHER_PATCHES))
