"""SmooSeg (Lan et al., NeurIPS 2023): smoothness prior between feature correlation and predictions.

Per step on full feature windows: z = projection(f) (linear + [1x1, SiLU, 1x1], Dropout2d 0.2);
teacher prototypes P_g (EMA of the student prototypes P_l, no gradient); p = softmax(cos(z, P_g) / T);
L_smooth = mean (Fc(f, f) - b_intra)(1 - corr(p, p)) + mean (Fc(f, f[pi]) - b_inter)(1 - corr(p, p[pi]))
with Fc the pointwise-centred feature correlation (no gradient) and pi a derangement of the batch;
L_data = CE(cos(sg(z), P_l), argmax cos(z, P_g)); loss = L_smooth + L_data; then P_g <- a P_g + (1-a) P_l.

Calibration (:mod:`.calibration`): a shift left at ``"auto"`` is the (1 - pull) quantile of the centred
intra- or inter-image feature correlations of training batches, with ``pull_intra`` / ``pull_inter`` the
fractions of pairs the energy pulls into one cluster; ``ema_momentum="auto"`` gives the teacher the
reference's half-life as a fraction of the run (0.998 over 3000 steps: 11.5%). The presets use the papers'
numbers exactly.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..base import FeatureSet, StageContext
from ..errors import ConfigError
from ..registry import register
from . import calibration
from ._heads import CosinePrototypes, ProjectionHead, channels_first, correlation, feature_correlation
from ._training import HeadLearner, ViewBank, derangement
from .omh import omh_variant

PAIR_TYPES = ("intra", "inter")
# The calibration rule, fixed on MSRC-v2 (DINOv2 ViT-S/14) and held for every other backbone and dataset.
DEFAULT_PULL = {"intra": 0.8, "inter": 0.1}


@torch.no_grad()
def smooseg_pair_correlations(feats: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The centred feature correlations of the intra- and inter-image energy terms on one batch (no dropout)."""
    out = {"intra": feature_correlation(feats, feats)}
    if feats.shape[0] > 1:
        out["inter"] = feature_correlation(feats, feats[derangement(feats.shape[0], feats.device, generator)])
    return out


def smooth_term(
    f1: torch.Tensor,
    f2: torch.Tensor,
    p1: torch.Tensor,
    p2: torch.Tensor,
    shift: float,
    pointwise: bool = True,
) -> torch.Tensor:
    """Element-wise energy (Fc - shift) * (1 - corr(p1, p2)), shape (B, h, w, i, j); Fc has no gradient."""
    fd = feature_correlation(f1, f2, pointwise)
    return (fd - shift) * (1.0 - correlation(p1, p2))


def prototype_scores(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of a code map (B, D, h, w) to prototypes (K, D) -> (B, K, h, w)."""
    return torch.einsum("bdhw,kd->bkhw", F.normalize(z, dim=1), F.normalize(prototypes, dim=1))


def smooseg_loss(
    feats: torch.Tensor,
    z: torch.Tensor,
    local: torch.Tensor,
    teacher: torch.Tensor,
    shift_intra: float,
    shift_inter: float,
    temperature: float = 0.1,
    pointwise: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SmooSeg's loss for features (B, C, h, w), code z (B, D, h, w), student and teacher prototypes (K, D)."""
    inner_local = prototype_scores(z.detach(), local)
    inner_global = prototype_scores(z, teacher.detach())
    probs = torch.softmax(inner_global / temperature, dim=1)
    intra = smooth_term(feats, feats, probs, probs, shift_intra, pointwise).mean()
    perm = derangement(feats.shape[0], feats.device)
    inter = smooth_term(feats, feats[perm], probs, probs[perm], shift_inter, pointwise).mean()
    target = inner_global.argmax(1)
    data = F.cross_entropy(inner_local, target)
    return intra + inter + data, {"smooth_intra": intra, "smooth_inter": inter, "data": data}


_PRESET = dict(dim=64, batch_size=32, steps=3000, lr=1e-4, prototype_lr=5e-4, temperature=0.1,
               ema_momentum=0.998, dropout=0.2, crop_mode="five", crop_size=28)  # fmt: skip
SMOOSEG_PRESETS: dict[str, dict] = {
    "cityscapes27_vits8": dict(_PRESET, shift_inter=0.5, shift_intra=-0.02),
    "cocostuff27_vits8": dict(_PRESET, shift_inter=0.48, shift_intra=-0.02),
    "potsdam3_vitb8": dict(_PRESET, shift_inter=0.5, shift_intra=0.1),
    "potsdam3_dinov2_vitb14": dict(_PRESET, shift_inter=0.5, shift_intra=0.32),
}


@register("feature_learner", "smooseg", presets=SMOOSEG_PRESETS)
class SmooSeg(HeadLearner):
    """SmooSeg projection trained by smoothness energy + EMA-prototype pseudo-labels; optional OMH terms."""

    display = "smooseg"
    _omh_init = "xavier"  # OMH uses SmooSeg's predictor as its cluster heads (paper Sec. 4.3)
    _snapshot_attrs = ("head_", "teacher_")

    # explicit signature (registry reads it); the training and omh_* tail repeats STEGO's and HP's on purpose
    def __init__(
        self,
        num_classes: int | None = None,
        dim: int = 64,
        shift_inter: float | Literal["auto"] = "auto",
        shift_intra: float | Literal["auto"] = "auto",
        pull_intra: float = DEFAULT_PULL["intra"],
        pull_inter: float = DEFAULT_PULL["inter"],
        temperature: float = 0.1,
        ema_momentum: float | Literal["auto"] = "auto",
        pointwise: bool = True,
        output: Literal["code", "scores"] = "code",
        dropout: float = 0.2,
        lr: float = 1e-4,
        prototype_lr: float = 5e-4,
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
        omh_lr: float = 5e-4,
        omh_balance: Literal["paper", "mean"] = "mean",
    ):
        calibration.check_shifts("smooseg", locals(), PAIR_TYPES)
        if temperature <= 0:
            raise ConfigError(f"smooseg: temperature must be > 0, got {temperature}")
        if not (
            calibration.is_auto(ema_momentum)
            or (isinstance(ema_momentum, (int, float)) and 0.0 <= ema_momentum <= 1.0)
        ):
            raise ConfigError(f"smooseg: ema_momentum must lie in [0, 1] or be 'auto', got {ema_momentum!r}")
        if prototype_lr <= 0:
            raise ConfigError(f"smooseg: prototype_lr must be > 0, got {prototype_lr}")
        if batch_size < 2:
            raise ConfigError(f"smooseg: batch_size must be >= 2 (inter-image pairs), got {batch_size}")
        if output not in ("code", "scores"):
            raise ConfigError(f"smooseg: output must be 'code' or 'scores', got {output!r}")
        self._set_params(locals())

    def _setup(self, bank: ViewBank, features: FeatureSet, ctx: StageContext, n_classes: int, n_steps: int):
        device = bank.device
        self.head_ = ProjectionHead(bank.channels, self.dim, "silu", self.dropout).to(device).train()
        self.prototypes_ = CosinePrototypes(n_classes, self.dim, "xavier").to(device)
        self.teacher_ = self.prototypes_.weight.detach().clone()
        self.teacher_init_ = self.teacher_.clone()
        return [
            torch.optim.Adam(
                [{"params": self.head_.parameters(), "lr": self.lr},
                 {"params": self.prototypes_.parameters(), "lr": self.prototype_lr}]
            )
        ]  # fmt: skip

    def _batch(self, views: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return channels_first(self.bank_.gather("tokens", *self.bank_.windows(views, gen)))

    def _calibrate(self) -> dict:
        """Shifts and teacher momentum as given, or calibrated where 'auto' (with the measured quantiles)."""
        given = {pair: getattr(self, f"shift_{pair}") for pair in PAIR_TYPES}
        resolved: dict = {f"shift_{p}": float(v) for p, v in given.items() if not calibration.is_auto(v)}
        if len(resolved) < len(PAIR_TYPES):
            batch = self.sampler_.batch_size

            def draw(g: torch.Generator) -> dict[str, torch.Tensor]:
                views = torch.randperm(self.bank_.n_views, generator=g)[:batch]
                return smooseg_pair_correlations(self._batch(views, g), g)

            values = calibration.collect(draw, self.seed)
            for pair in PAIR_TYPES:
                if calibration.is_auto(given[pair]):
                    resolved[f"shift_{pair}"] = calibration.quantile_shift(
                        values[pair], getattr(self, f"pull_{pair}")
                    )
                    resolved[f"correlation_{pair}"] = calibration.summary(values[pair])
        resolved["ema_momentum"] = (
            calibration.ema_momentum_for(
                self.n_steps_, calibration.SMOOSEG_REF_MOMENTUM, calibration.SMOOSEG_REF_STEPS
            )
            if calibration.is_auto(self.ema_momentum)
            else float(self.ema_momentum)
        )
        return resolved

    def _draw(self, step: int) -> torch.Tensor:
        return self._batch(self.sampler_.next(), self.generator_)

    def _loss_on(self, feats: torch.Tensor, step: int):
        z = self.head_(feats)
        loss, parts = smooseg_loss(
            self.head_.drop(feats), z, self.prototypes_.weight, self.teacher_,
            self.resolved_["shift_intra"], self.resolved_["shift_inter"], self.temperature, self.pointwise,
        )  # fmt: skip
        return loss, z, parts

    @torch.no_grad()
    def _after_step(self, step: int) -> None:
        m = self.resolved_["ema_momentum"]
        self.teacher_.mul_(m).add_(self.prototypes_.weight.detach(), alpha=1.0 - m)

    def _prototypes(self) -> torch.Tensor | None:
        return self.teacher_.detach() if self.output == "code" else None  # scores: the code is the assignment

    def _encode(self, feats: torch.Tensor) -> torch.Tensor:
        z = self.head_.eval()(feats)
        return prototype_scores(z, self.teacher_) if self.output == "scores" else z

    def artifacts(self) -> dict:
        out = super().artifacts()
        if hasattr(self, "teacher_"):
            out["prototypes"] = F.normalize(self.teacher_, dim=1).cpu()
            # how far the teacher left its random initialisation: mean cosine of each prototype to its start
            out["teacher_cosine_to_init"] = float(
                F.cosine_similarity(self.teacher_, self.teacher_init_).mean()
            )
        return out


SmooSegOMH = register("feature_learner", "smooseg_omh", presets=SMOOSEG_PRESETS)(
    omh_variant(SmooSeg, "SmooSeg with OMH's parallel cluster heads and OT-matched hierarchy (omh=True).")
)
