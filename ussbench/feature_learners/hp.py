"""HP, Hidden Positives (Seong et al., CVPR 2023): contrastive head training with mined positives.

Per step (N = B * crop^2 patches): code s = head(f), z = l2n(proj(s)); task-agnostic positives P_ag[i, j]
when cos(f_i, f_j) exceeds the threshold of i or of j, thresholds = max similarity to a fixed reference
pool of backbone patches; task-specific positives P_sp the same with the EMA head's codes and a pool
renewed every ``renew_interval`` steps; denominators over P_ag plus a Bernoulli(``rho``) sample of the rest;
SupCon-style loss with weights P_ag + lambda(t) P_sp (lambda 0 until ``warmup``, then linear to 1),
anchors reweighted by their number of positives; the same loss on the 3x3 local-propagation branch
z_mix = l2n(proj(LHP(s))), LHP = attention-weighted mean over each patch's 3x3 neighbours.
Computed one view at a time as in the reference, with gradients accumulated chunk by chunk (exact).

``pool_size="auto"`` (:func:`.calibration.hp_pool_size_for`) scales the reference pool (2048 patches against
batches of 64 windows of 28x28) to the patches a batch holds, so that a random other-image patch passes an
anchor's threshold about as often as in the reference; the presets keep the papers' pools.
"""

from __future__ import annotations

import copy
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..base import FeatureSet, StageContext
from ..errors import ConfigError, DataError
from ..registry import register
from . import calibration
from ._heads import ProjectionHead, channels_first, channels_last_flat, ema_update
from ._training import HeadLearner, ViewBank
from .omh import omh_variant

BASE_TEMPERATURE = 0.07  # SupCon's base temperature in the reference loss (scales the loss by tau / 0.07)
NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


# -- local hidden positives ---------------------------------------------------------------------------
def lhp_weights(attn: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Patch-to-patch attention (hw, hw) -> (h, w, 9) weights of each patch's 3x3 neighbours (row-major).

    Reference processing: clip each row to its [10%, 90%] quantiles, softmax over the row, times
    sigma = sqrt(h*w) (28 for the reference 28x28 crops), zero entries below the row mean.
    """
    a = attn.float()
    lo, hi = torch.quantile(a, torch.tensor([0.1, 0.9], device=a.device), dim=1, keepdim=True)
    a = torch.maximum(torch.minimum(a, hi), lo).softmax(dim=1) * math.sqrt(h * w)
    a = torch.where(a < a.mean(1, keepdim=True), torch.zeros_like(a), a)
    a = F.pad(a.reshape(h, w, h, w), (1, 1, 1, 1))  # pad the key axes: out-of-image neighbours weigh 0
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([a[ys, xs, ys + 1 + dy, xs + 1 + dx] for dy, dx in NEIGHBOURS], dim=-1)


def keys_attention(keys: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Approximate patch-to-patch attention from cached keys only: mean over heads of softmax(k k^T / sqrt(d))."""
    h, w, c = keys.shape
    k = keys.float().reshape(h * w, n_heads, c // n_heads).transpose(0, 1)  # heads, hw, d
    return (k @ k.transpose(1, 2) / math.sqrt(c // n_heads)).softmax(-1).mean(0)


def backbone_attention(ctx: StageContext, index: int, grid: tuple[int, int]) -> torch.Tensor:
    """Exact last-block patch-to-patch attention (CLS row and column dropped, mean over heads) of one image."""
    model = ctx.backbone.model(ctx.device)
    attn = model.vit.blocks[-1].attn
    captured: list[torch.Tensor] = []
    handle = attn.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    try:
        x = ctx.backbone.preprocess(ctx.dataset.load_image(index))[None].to(ctx.device)
        model(x)
    finally:
        handle.remove()
    qkv = captured[0].float()
    t = qkv.shape[1]
    hh, ww = x.shape[-2] // model.patch_size, x.shape[-1] // model.patch_size
    if (hh, ww) != tuple(grid):
        raise DataError(
            f"hp: backbone grid {hh}x{ww} of image {index} differs from the cached features' {grid}"
        )
    qkv = qkv.reshape(1, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    probs = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)  # 1, heads, t, t
    return probs[0, :, 1:, 1:].mean(0)


def lhp(code: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Local propagation: code (B, D, h, w), weights (B, h, w, 9) -> sum_j w_ij s_j / #neighbours in window."""
    b, d, h, w = code.shape
    cols = F.unfold(code, 3, padding=1).reshape(b, d, 9, h, w)  # zero outside the window
    inside = F.unfold(code.new_ones(1, 1, h, w), 3, padding=1).reshape(1, 9, h, w)
    wts = weights.permute(0, 3, 1, 2) * inside  # neighbours outside the crop window do not count
    return (cols * wts[:, None]).sum(2) / inside.sum(1)


# -- the loss -----------------------------------------------------------------------------------------
def _view_terms(
    z_rows: torch.Tensor, z_all: torch.Tensor, weights: torch.Tensor, denom: torch.Tensor, valid: torch.Tensor,
    tau: float, reweight: bool,
) -> torch.Tensor:  # fmt: skip
    """Sum over views of each view's mean anchor loss; z_rows (G, P, D), masks (G, P, N)."""
    logits = (z_rows @ z_all.t()) / tau
    logits = logits - logits.max(-1, keepdim=True).values.detach()
    log_prob = logits - torch.log((logits.exp() * denom).sum(-1, keepdim=True).clamp_min(1e-30))
    wsum = weights.sum(-1)
    mlpp = (weights * log_prob).sum(-1) / wsum.clamp_min(1e-12)
    n_valid = valid.sum(-1).clamp_min(1)
    if reweight:  # anchors weighted by their number of positives, normalised to mean 1 within the view
        pnm = wsum * valid / ((wsum * valid).sum(-1, keepdim=True) / n_valid[:, None]).clamp_min(1e-12)
    else:
        pnm = torch.ones_like(wsum)
    per_view = -((tau / BASE_TEMPERATURE) * mlpp * pnm * valid).sum(-1) / n_valid
    return per_view.sum()


def hp_loss(
    z: torch.Tensor,
    z_mix: torch.Tensor,
    f: torch.Tensor,
    s_ema: torch.Tensor,
    pool_ag: torch.Tensor,
    pool_sp: torch.Tensor,
    lam: float,
    tau: float,
    rho: float,
    view_size: int,
    reweight: bool = True,
    max_elements: int = 1 << 22,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """HP's loss on L2-normalised rows (N = views * view_size): z, z_mix (N, D), f (N, C), s_ema (N, D).

    Returns (loss, parts): the value equals the reference loss (mean over views of the z and z_mix terms,
    halved); its gradient w.r.t. z and z_mix is exact although each chunk of views is freed after use.
    """
    n = z.shape[0]
    if n % view_size:
        raise ValueError(f"hp: {n} rows are not a whole number of views of {view_size} patches")
    n_views = n // view_size
    with torch.no_grad():
        thr_ag = (f @ pool_ag.t()).max(1).values
        thr_sp = (s_ema @ pool_sp.t()).max(1).values
        keep = torch.rand(view_size, n, device=z.device) < rho  # sampled once per call, reused per view
    z_leaf = z.detach().requires_grad_(True)
    zm_leaf = z_mix.detach().requires_grad_(True)
    group = max(1, max_elements // (view_size * n))
    total, total_mix = z.new_zeros(()), z.new_zeros(())
    positives, same_view = z.new_zeros(()), z.new_zeros(())  # task-agnostic positives, those in the own view
    for g0 in range(0, n_views, group):
        g1 = min(n_views, g0 + group)
        rows = torch.arange(g0 * view_size, g1 * view_size, device=z.device).reshape(g1 - g0, view_size)
        with torch.no_grad():
            flat = rows.reshape(-1)
            idx = torch.arange(flat.numel(), device=z.device)
            # i~j when cos > min(thr_i, thr_j), i.e. above the threshold of i or of j; never i~i
            p_ag = (f[rows] @ f.t()) > torch.minimum(thr_ag[rows][..., None], thr_ag)
            p_ag.view(-1, n)[idx, flat] = False
            positives += p_ag.sum()
            own = p_ag.reshape(g1 - g0, view_size, n_views, view_size)[
                torch.arange(g1 - g0), :, torch.arange(g0, g1)
            ]
            same_view += own.sum()
            weights = p_ag.float()
            if lam > 0:  # task-specific positives only count once the ramp has started
                p_sp = (s_ema[rows] @ s_ema.t()) > torch.minimum(thr_sp[rows][..., None], thr_sp)
                p_sp.view(-1, n)[idx, flat] = False
                weights += lam * p_sp.float()
            denom = p_ag | keep
            denom.view(-1, n)[idx, flat] = False
            denom = denom.float()
            valid = p_ag.any(-1).float()
        with torch.enable_grad():
            part = _view_terms(z_leaf[rows], z_leaf, weights, denom, valid, tau, reweight) / (2 * n_views)
            part_mix = _view_terms(zm_leaf[rows], zm_leaf, weights, denom, valid, tau, reweight) / (
                2 * n_views
            )
            (part + part_mix).backward()
        total, total_mix = total + part.detach(), total_mix + part_mix.detach()
    value = total + total_mix
    surrogate = (z * z_leaf.grad).sum() + (z_mix * zm_leaf.grad).sum()
    loss = surrogate - surrogate.detach() + value
    cross = (positives - same_view) / positives.clamp_min(
        1
    )  # share of positives from other views (0 if none)
    return loss, {
        "hp": 2 * total,
        "hp_lhp": 2 * total_mix,
        "lambda": z.new_tensor(lam),
        "cross_view_share": cross,
    }


def ramp(step: int, warmup: int, n_steps: int) -> float:
    """lambda(t): 0 up to ``warmup``, then linear to 1 at the last step (the reference's schedule)."""
    if step <= warmup or n_steps <= warmup:
        return 0.0
    return (step - warmup) / (n_steps - warmup)


_PRESET = dict(crop_mode="five", crop_size=28, batch_size=64, lr=5e-4, weight_decay=0.1, grad_clip=10.0,
               dropout=0.1, local_attention="backbone")  # fmt: skip
HP_PRESETS: dict[str, dict] = {
    "cocostuff27_vits8": dict(_PRESET, dim=512, tau=0.8, rho=0.02, pool_size=2048, renew_interval=100,
                              ema_momentum=0.99, warmup=1000, epochs=3.0),
    "cityscapes27_vits8": dict(_PRESET, dim=512, tau=0.6, rho=0.02, pool_size=2048, renew_interval=20,
                               ema_momentum=0.999, warmup=50, epochs=30.0),
    "potsdam3_vitb8": dict(_PRESET, dim=256, tau=0.4, rho=1.0, pool_size=1024, renew_interval=20,
                           ema_momentum=0.999, warmup=100, epochs=10.0),
}  # fmt: skip


@register("feature_learner", "hp", presets=HP_PRESETS)
class HP(HeadLearner):
    """HP head trained with task-agnostic and task-specific hidden positives (EMA head, 3x3 LHP); optional OMH."""

    display = "hp"
    version = "3"  # 3: default steps 1,000 (was 300): where its MSRC-v2 curve flattens (reports/omh/NOTES.md)

    # explicit signature (registry reads it); the training and omh_* tail repeats STEGO's and SmooSeg's on purpose
    def __init__(
        self,
        num_classes: int | None = None,
        dim: int = 512,
        tau: float = 0.6,
        rho: float = 0.02,
        pool_size: int | Literal["auto"] = "auto",
        renew_interval: int = 20,
        ema_momentum: float = 0.99,
        warmup: int = 25,
        reweight: bool = True,
        local_attention: Literal["keys", "backbone"] = "keys",
        dropout: float = 0.1,
        lr: float = 5e-4,
        weight_decay: float = 0.1,
        grad_clip: float = 10.0,
        batch_size: int = 8,
        steps: int = 1000,
        epochs: float | None = None,
        crop_mode: Literal["random", "five"] = "random",
        crop_size: int = 12,
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
        if tau <= 0:
            raise ConfigError(f"hp: tau must be > 0, got {tau}")
        if not 0.0 <= rho <= 1.0:
            raise ConfigError(f"hp: rho must lie in [0, 1], got {rho}")
        if not calibration.is_auto(pool_size) and (not isinstance(pool_size, int) or pool_size < 1):
            raise ConfigError(f"hp: pool_size must be an integer >= 1 or 'auto', got {pool_size!r}")
        if renew_interval < 1:
            raise ConfigError(f"hp: renew_interval must be >= 1, got {renew_interval}")
        if not 0.0 <= ema_momentum <= 1.0:
            raise ConfigError(f"hp: ema_momentum must lie in [0, 1], got {ema_momentum}")
        if warmup < 0:
            raise ConfigError(f"hp: warmup must be >= 0, got {warmup}")
        if local_attention not in ("keys", "backbone"):
            raise ConfigError(f"hp: local_attention must be 'keys' or 'backbone', got {local_attention!r}")
        self._set_params(locals())

    # -- setup ----------------------------------------------------------------------------------------
    def _local_maps(self, bank: ViewBank, features: FeatureSet, ctx: StageContext) -> torch.Tensor:
        store = bank.tokens.device
        out = torch.zeros(*bank.tokens.shape[:3], 9, dtype=torch.float16, device=store)
        for i, im in enumerate(features):
            h, w = im.grid
            if self.local_attention == "backbone":
                if ctx.backbone is None or ctx.dataset is None:
                    raise ConfigError("hp: local_attention='backbone' needs ctx.backbone and ctx.dataset")
                attn = backbone_attention(ctx, i, (h, w))
            else:
                attn = keys_attention(im.keys.to(bank.device), int(im.attn.shape[0]))
            out[i, :h, :w] = lhp_weights(attn, h, w).to(store, torch.float16)
        return out

    def _sample_patches(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """n (image, y, x) patches: one random patch per randomly ordered view, cycling through the views."""
        bank, gen = self.bank_, self.generator_
        reps = math.ceil(n / bank.n_views)
        views = torch.cat([torch.randperm(bank.n_views, generator=gen) for _ in range(reps)])[:n]
        image, top, left = bank.windows(views, gen)
        dy, dx = torch.randint(bank.crop, (2, n), generator=gen)
        return image, top + dy, left + dx

    def _patch_tokens(self, image, y, x) -> torch.Tensor:
        src = self.bank_.tokens
        return src[image.to(src.device), y.to(src.device), x.to(src.device)].to(
            self.bank_.device, torch.float32
        )

    @torch.no_grad()
    def _renew_pool_sp(self) -> None:
        feats = self._patch_tokens(*self._sample_patches(self.pool_size_))
        self.ema_head_.eval()
        code = self.ema_head_(feats[:, :, None, None])[:, :, 0, 0]
        self.ema_head_.train()
        self.pool_sp_ = F.normalize(code, dim=1)

    def _setup(self, bank: ViewBank, features: FeatureSet, ctx: StageContext, n_classes: int, n_steps: int):
        device = bank.device
        self.pool_size_ = (
            calibration.hp_pool_size_for(self.sampler_.batch_size, bank.crop)
            if calibration.is_auto(self.pool_size)
            else int(self.pool_size)
        )
        self.head_ = ProjectionHead(bank.channels, self.dim, "relu", self.dropout).to(device).train()
        self.ema_head_ = copy.deepcopy(self.head_).requires_grad_(False)
        self.proj_ = nn.Linear(self.dim, self.dim).to(device)
        bank.extras["local"] = self._local_maps(bank, features, ctx)
        with torch.no_grad():
            self.pool_ag_ = F.normalize(self._patch_tokens(*self._sample_patches(self.pool_size_)), dim=1)
        self._renew_pool_sp()
        return [
            torch.optim.AdamW(self.head_.parameters(), lr=self.lr, weight_decay=self.weight_decay),
            torch.optim.Adam(self.proj_.parameters(), lr=self.lr),
        ]

    # -- one step -------------------------------------------------------------------------------------
    def _draw(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Feature windows (B, C, c, c) and their 3x3 local-attention weights; renews the task-specific pool."""
        if step > 0 and step % self.renew_interval == 0:
            self._renew_pool_sp()
        bank = self.bank_
        windows = bank.windows(self.sampler_.next(), self.generator_)
        return channels_first(bank.gather("tokens", *windows)), bank.gather("local", *windows)

    def _loss_on(self, batch: tuple[torch.Tensor, torch.Tensor], step: int):
        feats, local = batch
        drop = self.head_.drop
        code = self.head_(feats)
        with torch.no_grad():
            s_ema = F.normalize(channels_last_flat(drop(self.ema_head_(feats))), dim=1)
            f = F.normalize(channels_last_flat(drop(feats)), dim=1)
        z = F.normalize(self.proj_(channels_last_flat(code)), dim=1)
        z_mix = F.normalize(self.proj_(channels_last_flat(drop(lhp(code, local)))), dim=1)
        lam = ramp(step, self.warmup, self.n_steps_)
        loss, parts = hp_loss(
            z, z_mix, f, s_ema, self.pool_ag_, self.pool_sp_, lam, self.tau, self.rho,
            feats.shape[-2] * feats.shape[-1], self.reweight,
            max_elements=(1 << 26) if feats.device.type == "cuda" else (1 << 22),
        )  # fmt: skip
        return loss, code, parts

    def _calibrate(self) -> dict:
        return {"pool_size": self.pool_size_}

    def _before_step(self) -> None:
        nn.utils.clip_grad_norm_(self.head_.parameters(), self.grad_clip)

    def _after_step(self, step: int) -> None:
        ema_update(self.ema_head_, self.head_, self.ema_momentum)

    def _encode(self, feats: torch.Tensor) -> torch.Tensor:
        return self.head_.eval()(feats)


HPOMH = register("feature_learner", "hp_omh", presets=HP_PRESETS)(
    omh_variant(HP, "HP with OMH's parallel cluster heads and OT-matched hierarchy (omh=True).")
)
