"""SmooSeg (Lan et al., NeurIPS 2023): smoothness prior between feature correlation and predictions.

Per step on full feature windows: z = projection(f) (linear + [1x1, SiLU, 1x1], Dropout2d 0.2);
teacher prototypes P_g (EMA of the student prototypes P_l, no gradient); p = softmax(cos(z, P_g) / T);
L_smooth = mean (Fc(f, f) - b_intra)(1 - corr(p, p)) + mean (Fc(f, f[pi]) - b_inter)(1 - corr(p, p[pi]))
with Fc the pointwise-centred feature correlation (no gradient) and pi a derangement of the batch;
L_data = CE(cos(sg(z), P_l), argmax cos(z, P_g)); loss = L_smooth + L_data; then P_g <- a P_g + (1-a) P_l.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from ..base import FeatureSet, StageContext
from ..errors import ConfigError
from ..registry import register
from ._heads import CosinePrototypes, ProjectionHead, channels_first, correlation, feature_correlation
from ._training import HeadLearner, ViewBank, derangement
from .omh import omh_variant


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

    # explicit signature (registry reads it); the training and omh_* tail repeats STEGO's and HP's on purpose
    def __init__(
        self,
        num_classes: int | None = None,
        dim: int = 64,
        shift_inter: float = 0.5,
        shift_intra: float = -0.02,
        temperature: float = 0.1,
        ema_momentum: float = 0.998,
        pointwise: bool = True,
        output: Literal["code", "scores"] = "code",
        dropout: float = 0.2,
        lr: float = 1e-4,
        prototype_lr: float = 5e-4,
        batch_size: int = 8,
        steps: int = 200,
        epochs: float | None = None,
        crop_mode: Literal["random", "five"] = "random",
        crop_size: int = 16,
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
    ):
        if temperature <= 0:
            raise ConfigError(f"smooseg: temperature must be > 0, got {temperature}")
        if not 0.0 <= ema_momentum <= 1.0:
            raise ConfigError(f"smooseg: ema_momentum must lie in [0, 1], got {ema_momentum}")
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
        return [
            torch.optim.Adam(
                [{"params": self.head_.parameters(), "lr": self.lr},
                 {"params": self.prototypes_.parameters(), "lr": self.prototype_lr}]
            )
        ]  # fmt: skip

    def _loss(self, step: int):
        bank, gen = self.bank_, self.generator_
        feats = channels_first(bank.gather("tokens", *bank.windows(self.sampler_.next(), gen)))
        z = self.head_(feats)
        loss, parts = smooseg_loss(
            self.head_.drop(feats), z, self.prototypes_.weight, self.teacher_,
            self.shift_intra, self.shift_inter, self.temperature, self.pointwise,
        )  # fmt: skip
        return loss, z, parts

    @torch.no_grad()
    def _after_step(self, step: int) -> None:
        m = self.ema_momentum
        self.teacher_.mul_(m).add_(self.prototypes_.weight.detach(), alpha=1.0 - m)

    def _encode(self, feats: torch.Tensor) -> torch.Tensor:
        z = self.head_.eval()(feats)
        return prototype_scores(z, self.teacher_) if self.output == "scores" else z

    def artifacts(self) -> dict:
        out = super().artifacts()
        if hasattr(self, "teacher_"):
            out["prototypes"] = F.normalize(self.teacher_, dim=1).cpu().numpy()
        return out


SmooSegOMH = register("feature_learner", "smooseg_omh", presets=SMOOSEG_PRESETS)(
    omh_variant(SmooSeg, "SmooSeg with OMH's parallel cluster heads and OT-matched hierarchy (omh=True).")
)
