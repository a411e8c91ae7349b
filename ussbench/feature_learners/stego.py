"""STEGO (Hamilton et al., ICLR 2022): correspondence distillation of frozen features into a small code.

Loss per pair type (self, kNN, random image), on S x S points sampled bilinearly from each map:
L = -clamp(corr(z1, z2), min 0) * (Fc - b), with corr the cosine correlation of all point pairs and Fc the
feature correlation "pointwise"-centred (each point's row mean removed, global mean restored). Total =
lambda_self * mean L_self + lambda_knn * mean L_knn + lambda_rand * mean over ``neg_samples`` derangements
of L_rand. kNN positives: one of the ``num_neighbors`` nearest views (pooled features). The reference's
cluster and linear probes are not part of the learner (the dataset-level clusterer replaces them).

A shift left at ``"auto"`` is calibrated before training (:mod:`.calibration`): the (1 - pull) quantile of
that pair type's centred feature correlations on batches drawn as the loss draws them, with
``pull_self`` / ``pull_knn`` / ``pull_rand`` the fractions of self / kNN / random pairs pulled together.
``pull_self`` / ``pull_knn`` left at ``"auto"`` are s^2, s the measured own-image share of a patch's 30 nearest
patches (:func:`.calibration.own_image_share`): pull about 0.74 on MSRC-v2 object photos, 0.23 on CamVid roads.
The presets carry the papers' numbers and use them exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..base import FeatureSet, StageContext
from ..errors import ConfigError
from ..registry import register
from . import calibration
from ._heads import ProjectionHead, channels_first, correlation, feature_correlation
from ._training import HeadLearner, ViewBank, derangement, knn_table
from .omh import omh_variant

PAIR_TYPES = ("self", "knn", "rand")
# The calibration rule, fixed on MSRC-v2 (DINOv2 ViT-S/14) and held for every other backbone and dataset:
# self and kNN pairs pulled in the square of the measured own-image share of a patch's neighbourhood ('auto'),
# random pairs 3%.
DEFAULT_PULL = {"self": "auto", "knn": "auto", "rand": 0.03}
AUTO_PULLS = ("self", "knn")


def sample_points(t: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of a map (B, C, h, w) at coords (B, S, S, 2) in [-1, 1] -> (B, C, S, S)."""
    return F.grid_sample(t, coords.permute(0, 2, 1, 3), padding_mode="border", align_corners=True)


def stego_term(
    f1: torch.Tensor,
    f2: torch.Tensor,
    c1: torch.Tensor,
    c2: torch.Tensor,
    shift: float,
    pointwise: bool = True,
    zero_clamp: bool = True,
    stabilize: bool = False,
) -> torch.Tensor:
    """Element-wise loss -clamp(corr(c1, c2)) * (corr(f1, f2) - shift), shape (B, h, w, i, j)."""
    fd = feature_correlation(f1, f2, pointwise)
    cd = correlation(c1, c2)
    if zero_clamp or stabilize:
        cd = cd.clamp(min=0.0 if zero_clamp else None, max=0.8 if stabilize else None)
    return -cd * (fd - shift)


@torch.no_grad()
def stego_pair_correlations(
    feats: torch.Tensor, feats_pos: torch.Tensor, samples: int, pointwise: bool, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """The centred feature correlations the loss's self, kNN and random terms see on one batch (no dropout)."""
    b, device = feats.shape[0], feats.device
    shape = (b, samples, samples, 2)
    coords1 = (torch.rand(shape, generator=generator) * 2 - 1).to(device)
    coords2 = (torch.rand(shape, generator=generator) * 2 - 1).to(device)
    f, fp = sample_points(feats, coords1), sample_points(feats_pos, coords2)
    out = {"self": feature_correlation(f, f, pointwise), "knn": feature_correlation(f, fp, pointwise)}
    if b > 1:
        fn = sample_points(feats[derangement(b, device, generator)], coords2)
        out["rand"] = feature_correlation(f, fn, pointwise)
    return out


def stego_loss(
    feats: torch.Tensor,
    feats_pos: torch.Tensor,
    code: torch.Tensor,
    code_pos: torch.Tensor,
    weights: tuple[float, float, float],
    shifts: tuple[float, float, float],
    samples: int = 11,
    neg_samples: int = 5,
    pointwise: bool = True,
    zero_clamp: bool = True,
    stabilize: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """STEGO's correspondence loss; weights and shifts ordered (self, knn, random). Returns (total, parts)."""
    b = feats.shape[0]
    shape = (b, samples, samples, 2)
    coords1 = torch.rand(shape, device=feats.device) * 2 - 1
    coords2 = torch.rand(shape, device=feats.device) * 2 - 1
    f, z = sample_points(feats, coords1), sample_points(code, coords1)
    fp, zp = sample_points(feats_pos, coords2), sample_points(code_pos, coords2)
    opts = dict(pointwise=pointwise, zero_clamp=zero_clamp, stabilize=stabilize)
    self_l = stego_term(f, f, z, z, shifts[0], **opts).mean()
    knn_l = stego_term(f, fp, z, zp, shifts[1], **opts).mean()
    rand_l = feats.new_zeros(())
    if neg_samples > 0 and b > 1:
        neg = []
        for _ in range(neg_samples):
            perm = derangement(b, feats.device)
            fn, zn = sample_points(feats[perm], coords2), sample_points(code[perm], coords2)
            neg.append(stego_term(f, fn, z, zn, shifts[2], **opts))
        rand_l = torch.cat(neg).mean()
    total = weights[0] * self_l + weights[1] * knn_l + weights[2] * rand_l
    return total, {"self": self_l, "knn": knn_l, "rand": rand_l}


_COMMON = dict(feature_samples=11, neg_samples=5, num_neighbors=7, lr=5e-4, batch_size=16, dropout=0.1,
               crop_mode="five", crop_size=28, steps=5000)  # fmt: skip
STEGO_PRESETS: dict[str, dict] = {
    "cocostuff27_vits8": dict(_COMMON, dim=70, weight_rand=0.63, weight_knn=0.25, weight_self=0.67,
                              shift_rand=0.66, shift_knn=0.02, shift_self=0.08),
    "cocostuff27_vitb8": dict(_COMMON, dim=90, weight_rand=0.1538, weight_knn=1.0, weight_self=0.1,
                              shift_rand=1.0, shift_knn=0.2, shift_self=0.12),
    "cityscapes27_vitb8": dict(_COMMON, dim=90, weight_rand=0.9059, weight_knn=0.5775, weight_self=1.0,
                               shift_rand=0.3136, shift_knn=0.1754, shift_self=0.4583),
    "potsdam3_vits8": dict(_COMMON, dim=70, weight_rand=0.63, weight_knn=0.25, weight_self=0.67,
                           shift_rand=0.46, shift_knn=0.02, shift_self=0.08),
}  # fmt: skip


@register("feature_learner", "stego", presets=STEGO_PRESETS)
class STEGO(HeadLearner):
    """STEGO head (linear + 2-layer 1x1 conv) trained by correspondence distillation; optional OMH terms."""

    display = "stego"
    version = "3"  # 3: pull_self / pull_knn 'auto' (the squared measured own-image share; was 0.8)

    # explicit signature (registry reads it); the training and omh_* tail repeats HP's and SmooSeg's on purpose
    def __init__(
        self,
        num_classes: int | None = None,
        dim: int = 70,
        weight_self: float = 0.67,
        weight_knn: float = 0.25,
        weight_rand: float = 0.63,
        shift_self: float | Literal["auto"] = "auto",
        shift_knn: float | Literal["auto"] = "auto",
        shift_rand: float | Literal["auto"] = "auto",
        pull_self: float | Literal["auto"] = DEFAULT_PULL["self"],
        pull_knn: float | Literal["auto"] = DEFAULT_PULL["knn"],
        pull_rand: float = DEFAULT_PULL["rand"],
        feature_samples: int = 11,
        neg_samples: int = 5,
        num_neighbors: int = 7,
        pointwise: bool = True,
        zero_clamp: bool = True,
        stabilize: bool = False,
        dropout: float = 0.1,
        lr: float = 5e-4,
        batch_size: int = 8,
        steps: int = 300,
        epochs: float | None = None,
        crop_mode: Literal["random", "five"] = "random",
        crop_size: int = 16,
        curve_every: int = 25,
        checkpoints: int = 4,
        seed: int = 0,
        omh: bool = False,
        omh_levels: int = 3,
        omh_expansion: float = 2.0,
        omh_epsilon: float = 0.02,
        omh_sparsity: float = 0.01,
        omh_structure: float = 0.3,
        omh_match: bool = True,
        omh_sinkhorn_iters: int = 100,
        omh_lr: float = 5e-3,
        omh_balance: Literal["paper", "mean"] = "mean",
    ):
        calibration.check_shifts("stego", locals(), PAIR_TYPES, AUTO_PULLS)
        if feature_samples < 1:
            raise ConfigError(f"stego: feature_samples must be >= 1, got {feature_samples}")
        if neg_samples < 0:
            raise ConfigError(f"stego: neg_samples must be >= 0, got {neg_samples}")
        if num_neighbors < 1:
            raise ConfigError(f"stego: num_neighbors must be >= 1, got {num_neighbors}")
        if batch_size < 2 and neg_samples > 0:
            raise ConfigError(f"stego: batch_size must be >= 2 for random-image negatives, got {batch_size}")
        self._set_params(locals())

    def _setup(self, bank: ViewBank, features: FeatureSet, ctx: StageContext, n_classes: int, n_steps: int):
        self.head_ = ProjectionHead(bank.channels, self.dim, "relu", self.dropout).to(bank.device).train()
        self.knn_ = knn_table(bank.pooled(), bank.device)
        return [torch.optim.Adam(self.head_.parameters(), lr=self.lr)]

    def _batch(self, views: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature windows (B, C, c, c) of the views and of one of each view's num_neighbors kNN positives."""
        bank = self.bank_
        n_nb = min(self.num_neighbors, self.knn_.shape[1])
        pos = self.knn_[views, torch.randint(n_nb, (len(views),), generator=gen)]
        feats = channels_first(bank.gather("tokens", *bank.windows(views, gen)))
        feats_pos = channels_first(bank.gather("tokens", *bank.windows(pos, gen)))
        return feats, feats_pos

    def _calibrate(self) -> dict:
        """Shifts as given, or calibrated where 'auto' (with the measured correlation quantiles)."""
        given = {pair: getattr(self, f"shift_{pair}") for pair in PAIR_TYPES}
        resolved: dict = {f"shift_{p}": float(v) for p, v in given.items() if not calibration.is_auto(v)}
        if len(resolved) == len(PAIR_TYPES):
            return resolved
        batch = self.sampler_.batch_size

        def draw(g: torch.Generator) -> dict[str, torch.Tensor]:
            views = torch.randperm(self.bank_.n_views, generator=g)[:batch]
            return stego_pair_correlations(*self._batch(views, g), self.feature_samples, self.pointwise, g)

        values = calibration.collect(draw, self.seed)
        pulls = {pair: getattr(self, f"pull_{pair}") for pair in PAIR_TYPES}
        if any(calibration.is_auto(given[p]) and calibration.is_auto(pulls[p]) for p in PAIR_TYPES):
            share = calibration.own_image_share(self.bank_.tokens, self.bank_.grids, self.seed)
            resolved["own_image_share"] = share
            pulls = {
                p: calibration.share_to_pull(share) if calibration.is_auto(v) else v for p, v in pulls.items()
            }
        for pair in PAIR_TYPES:
            if calibration.is_auto(given[pair]) and pair in values:
                resolved[f"pull_{pair}"] = float(pulls[pair])
                resolved[f"shift_{pair}"] = calibration.quantile_shift(values[pair], pulls[pair])
                resolved[f"correlation_{pair}"] = calibration.summary(values[pair])
            resolved.setdefault(f"shift_{pair}", 0.0)  # no random pairs (batch of 1): the term is unused
        return resolved

    def _draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._batch(self.sampler_.next(), self.generator_)

    def _loss_on(self, batch: tuple[torch.Tensor, torch.Tensor], step: int):
        feats, feats_pos = batch
        code, code_pos = self.head_(feats), self.head_(feats_pos)
        drop = self.head_.drop  # the reference correlates dropped-out features too
        loss, parts = stego_loss(
            drop(feats), drop(feats_pos), code, code_pos,
            (self.weight_self, self.weight_knn, self.weight_rand),
            tuple(self.resolved_[f"shift_{pair}"] for pair in PAIR_TYPES),
            self.feature_samples, self.neg_samples, self.pointwise, self.zero_clamp, self.stabilize,
        )  # fmt: skip
        return loss, code, parts

    def _encode(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head_.eval()(feats)


STEGOOMH = register("feature_learner", "stego_omh", presets=STEGO_PRESETS)(
    omh_variant(STEGO, "STEGO with OMH's parallel cluster heads and OT-matched hierarchy (omh=True).")
)
