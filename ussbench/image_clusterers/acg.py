"""Adaptive Concept Generator (ACSeg, Li et al., CVPR 2023) as a trainable image-level clusterer.

N learnable prototypes become image-adaptive concepts through T update steps, each a transformer-decoder
layer: the prototypes query the image's pixel features by scaled dot-product cross-attention (key/value
projections shared by the T steps), then self-attention among prototypes, then an FFN, with residuals
and post-LayerNorm. Each pixel goes to its most cosine-similar concept; concepts that win no pixel
vanish, so the number of segments adapts per image. Trained without labels by maximising the modularity
of the soft assignment on the image's cosine affinity graph, on cached features, in batches that mix
images of every size (zero-padded).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..base import FeatureSet, ImageClusterer, Segmentation, StageContext
from ..dataset_clusterers._common import adamw, autocast, resolve_precision
from ..determinism import ThreadInvariantLayerNorm as LayerNorm  # same numbers with 1 or N threads
from ..determinism import rowvec_linear
from ..errors import ConfigError, NumericalError
from ..registry import register
from ._common import dense_matrix, pick_feature, plugin_device, relabel_consecutive, require
from ._modularity import modularity_concept_major, modularity_graph, modularity_loss

__all__ = [
    "AdaptiveConceptGenerator",
    "ConceptGenerator",
    "assignment",
    "folded_self_attention",
    "modularity_loss",
    "self_attention",
    "self_attention_folds",
]
from ._pixel_attention import pixel_attention, valid_mask
from ._segment_vectors import check_segment_vector_params, segmentations

ACG_PRESETS = {
    # The semester study's training recipe (batch = images: the modularity graph is per image).
    "study": {
        "n_prototypes": 6,
        "n_rounds": 6,
        "epochs": 400,
        "batch_size": 1024,
        "lr": 3e-4,
        "weight_decay": 0.01,
        "segment_vector": "crop_cls",
    },
}


def self_attention(p: torch.Tensor, mha: nn.MultiheadAttention) -> torch.Tensor:
    """``mha(p, p, p)`` for a few tokens per image (B, N, C): plain batched products, which for N ~ 6 are much
    cheaper on the CPU than the fused attention kernel nn.MultiheadAttention dispatches to."""
    B, N, C = p.shape
    h = mha.num_heads
    d = C // h
    qkv = F.linear(p, mha.in_proj_weight, mha.in_proj_bias).reshape(B, N, 3, h, d).permute(2, 0, 3, 1, 4)
    att = ((qkv[0] @ qkv[1].transpose(-1, -2)).float() / math.sqrt(d)).softmax(-1).to(qkv.dtype)
    out = (att @ qkv[2]).transpose(1, 2).reshape(B, N, C)
    return F.linear(out, mha.out_proj.weight, mha.out_proj.bias)


def self_attention_folds(mha: nn.MultiheadAttention) -> tuple[torch.Tensor, ...] | None:
    """One head's four projections folded into two C x C matrices (float32, shared by all images), or None
    for several heads (folding costs heads x C^2 per token there, no less than the 2 C^2 it saves).

    With rows p: logits_ij = q_i . k_j = (p_i W_q^T W_k + b_q W_k) . p_j + (terms constant over j, which
    softmax drops), and out_i = (sum_j att_ij p_j) W_v^T W_o^T + (W_o b_v + b_o) since each row of att sums
    to one: 2 C^2 per prototype instead of 4 C^2, the same function and gradient."""
    if mha.num_heads != 1:
        return None
    C = mha.embed_dim
    w_q, w_k, w_v = mha.in_proj_weight.split(C)
    b_q, _, b_v = mha.in_proj_bias.split(C)
    scale = 1.0 / math.sqrt(C)
    logit_fold = (w_q.t() @ w_k) * scale
    logit_bias = rowvec_linear(b_q, w_k.t()) * scale  # b_q W_k, as a one-row GEMM (see rowvec_linear)
    out_fold = w_v.t() @ mha.out_proj.weight.t()
    out_bias = rowvec_linear(b_v, mha.out_proj.weight, mha.out_proj.bias)
    return logit_fold, logit_bias, out_fold, out_bias


def folded_self_attention(p: torch.Tensor, folds: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``self_attention(p, mha)`` for one head through ``self_attention_folds(mha)``."""
    logit_fold, logit_bias, out_fold, out_bias = folds
    u = p @ logit_fold + logit_bias  # (B, N, C); under autocast the products run in bf16, the sums in float32
    att = (u @ p.transpose(-1, -2)).float().softmax(-1)
    return (att @ p) @ out_fold + out_bias


class UpdateStep(nn.Module):
    """One ACG round: cross-attention of the prototypes over the pixels' keys/values, self-attention among
    prototypes, FFN; post-norm residuals."""

    def __init__(self, dim: int, n_heads: int, ffn_dim: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)
        self.mix = nn.MultiheadAttention(dim, n_heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.norm1, self.norm2, self.norm3 = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)

    def forward(
        self, p: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Reference form: p (B, N, C) prototypes; k, v (B, heads, P, C / heads) the pixels' keys and values;
        mask (B, P) the valid pixels (None: all)."""
        B, N, C = p.shape
        q = self.q(p).reshape(B, N, self.n_heads, -1).transpose(1, 2)
        attn_mask = None if mask is None else mask[:, None, None, :]
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask).transpose(1, 2).reshape(B, N, C)
        return self.after_cross(p, self.out(att))

    def after_cross(
        self, p: torch.Tensor, cross: torch.Tensor, mix_folds: tuple[torch.Tensor, ...] | None = None
    ) -> torch.Tensor:
        """The rest of the round once the cross-attention output (B, N, C) is known; ``mix_folds`` (from
        ``self_attention_folds``) computes the self-attention folded."""
        p = self.norm1(p + cross.float())
        mixed = self_attention(p, self.mix) if mix_folds is None else folded_self_attention(p, mix_folds)
        p = self.norm2(p + mixed.float())
        return self.norm3(p + self.ffn(p).float())


class ConceptGenerator(nn.Module):
    """Prototypes (N, C) -> image-adaptive concepts (B, N, C) for pixel features (B, P, C).

    The pixels pass a LayerNorm (affine gamma, beta) and one key/value projection shared by the T rounds (as
    in slot attention). ``forward`` computes each round's cross-attention through the prototypes instead of
    projecting every pixel: with x^ the pixels normalised without the affine part, a head's logits are
    q_h . k_j = (gamma * W_k,h^T q_h) . x^_j + (a constant over pixels, which softmax drops), and its output is
    W_v,h (gamma * sum_j att_j x^_j) + const, so the projections act on the N prototypes (O(N C^2) per image)
    and the pixels only meet two (N x C) x (C x P) products per round, not an O(P C^2) projection.
    ``forward_reference`` is the direct computation (the same function; tested equal).
    """

    def __init__(self, dim: int, n_prototypes: int, n_rounds: int, n_heads: int, ffn_dim: int):
        super().__init__()
        self.n_heads = n_heads
        self.prototypes = nn.Parameter(torch.randn(n_prototypes, dim))
        self.memory_norm = LayerNorm(dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.steps = nn.ModuleList(UpdateStep(dim, n_heads, ffn_dim) for _ in range(n_rounds))
        self.precision = "fp32"  # 'bf16': the prototype-side linears and the pixel products in bfloat16

    def forward_reference(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """The direct computation: every pixel projected to keys and values once, then the T rounds."""
        B, P, C = x.shape
        kv = self.kv(self.memory_norm(x.float())).reshape(B, P, 2, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        mask = None if lengths is None else valid_mask(lengths, B, P, x.device)
        p = self.prototypes.unsqueeze(0).expand(B, -1, -1)
        for step in self.steps:
            p = step(p, k, v, mask)
        return p

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        """x^ = (x - mean) / sqrt(var + eps) per pixel: memory_norm without its affine part (fixed data)."""
        return F.layer_norm(x.float(), x.shape[-1:], eps=self.memory_norm.eps)

    def forward(
        self,
        x: torch.Tensor | None,
        x_hat: torch.Tensor | None = None,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Concepts (B, N, C) for pixels x (B, P, C), zero-padded after lengths[b] (None: all valid);
        ``x_hat`` = ``standardise(x)`` (precompute it when x is fixed, as in training). A batch too small to
        pay for the per-step C x C folds (B * P < rounds * C) takes the direct form."""
        if x_hat is None:
            x_hat = self.standardise(x)
        B, P, C = x_hat.shape
        if x is not None and B * P < len(self.steps) * C:
            with autocast(x_hat.device, self.precision):
                return self.forward_reference(x, lengths).float()
        h = self.n_heads
        d = C // h
        gamma = self.memory_norm.weight
        w_k, w_v = self.kv.weight[:C].reshape(h, d, C), self.kv.weight[C:].reshape(h, d, C)
        # one-row product, not `kv.weight[C:] @ bias`: MKL's gemv backward splits its sum over threads (Xeon)
        value_bias = rowvec_linear(self.memory_norm.bias, self.kv.weight[C:], self.kv.bias[C:])  # (C,)
        p = self.prototypes.unsqueeze(0).expand(B, -1, -1)
        for step in self.steps:
            N = p.shape[1]
            # per-step folds (C x C, shared by all images), in float32
            w_q = step.q.weight.reshape(h, d, C)
            scale = gamma / math.sqrt(d)
            fold_q = torch.einsum("hdi,hdj->hij", w_q, w_k) * scale  # (h, C_in, C)
            bias_q = torch.einsum("hd,hdj->hj", step.q.bias.reshape(h, d), w_k) * scale
            fold_o = torch.einsum("ohd,hdj->hjo", step.out.weight.reshape(C, h, d), w_v * gamma)
            const = step.out(value_bias)
            mix_folds = self_attention_folds(step.mix)
            with autocast(x_hat.device, self.precision):  # prototype side: O(N C^2) per image
                q = torch.einsum("bni,hij->bhnj", p, fold_q)
            q = q.float() + bias_q[None, :, None, :]
            # pixel side in float32: the attention-weighted pixels (B, h, N, C), one fused pass per image
            r = pixel_attention(q.reshape(B, h * N, C), x_hat, lengths).reshape(B, h, N, C)
            with autocast(x_hat.device, self.precision):
                cross = torch.einsum("bhnj,hjo->bno", r, fold_o).float() + const
                p = step.after_cross(p, cross, mix_folds)
        return p.float()


def assignment(x: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """Soft assignment S (B, P, N) = max(cos(pixel, concept), 0)."""
    return (F.normalize(x, dim=-1) @ F.normalize(concepts, dim=-1).transpose(1, 2)).clamp_min(0)


@register("image_clusterer", "acg", presets=ACG_PRESETS)
class AdaptiveConceptGenerator(ImageClusterer):
    """ACSeg's adaptive concept generator: attention-updated prototypes, modularity loss, adaptive #segments."""

    # 2: centre_features; 3: batches mix image sizes (zero-padded), precision (bf16 where native);
    # 4: thread-invariant LayerNorm gradients (core's ussbench.determinism);
    # 5: numba kernels with fastmath {reassoc, contract}: compiled and cache-loaded kernels agree (_jit.py)
    # 6: the value bias as a one-row GEMM, numba on its workqueue pool (thread- and history-invariant on Intel)
    # 7: one head's self-attention folded into two C x C products (self_attention_folds): 11% fewer FLOPs
    # 8: the soft assignment concept-major (concepts @ pixels^T), the modularity kernel's layout: its gradient
    #    reads the pixels row-major; the loss and its gradient to rounding (the products' order changed)
    version = "8"

    # explicit signature (registry reads it); the segment-vector parameters repeat DSM's on purpose
    def __init__(
        self,
        feature: Literal["auto", "keys", "tokens", "code"] = "auto",
        n_prototypes: int = 6,
        n_rounds: int = 6,
        n_heads: int = 1,
        ffn_ratio: float = 4.0,
        intensity: Literal["max", "sum"] = "max",
        centre_features: bool = True,
        epochs: int = 10,
        batch_size: int = 64,
        lr: float = 3e-4,
        weight_decay: float = 0.01,
        segment_vector: Literal["crop_cls", "mean", "masked_attention_cls"] = "crop_cls",
        mean_feature: Literal["auto", "tokens", "keys", "code"] = "auto",
        n_erode: int = 2,
        n_dilate: int = 5,
        crop_batch_size: int = 64,
        background: Literal["none", "border"] = "none",
        precision: Literal["auto", "fp32", "bf16"] = "auto",
        seed: int = 0,
        device: str = "cpu",
    ):
        need = partial(require, "acg")
        need(precision in ("auto", "fp32", "bf16"), "precision", precision, "'auto', 'fp32' or 'bf16'")
        need(n_prototypes >= 1, "n_prototypes", n_prototypes, ">= 1 (zero prototypes give zero segments)")
        need(n_rounds >= 1, "n_rounds", n_rounds, ">= 1")
        need(n_heads >= 1, "n_heads", n_heads, ">= 1")
        need(ffn_ratio > 0, "ffn_ratio", ffn_ratio, "> 0")
        need(epochs >= 0, "epochs", epochs, ">= 0")
        need(batch_size >= 1, "batch_size", batch_size, ">= 1")
        need(lr > 0, "lr", lr, "> 0")
        need(weight_decay >= 0, "weight_decay", weight_decay, ">= 0")
        check_segment_vector_params("acg", n_erode, n_dilate, crop_batch_size)
        self.feature = feature
        self.n_prototypes = n_prototypes
        self.n_rounds = n_rounds
        self.n_heads = n_heads
        self.ffn_ratio = ffn_ratio
        self.intensity = intensity
        self.centre_features = centre_features
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.segment_vector = segment_vector
        self.mean_feature = mean_feature
        self.n_erode = n_erode
        self.n_dilate = n_dilate
        self.crop_batch_size = crop_batch_size
        self.background = background
        self.precision = precision
        self.seed = seed
        self.device = device

    def _torch_device(self) -> torch.device:
        return plugin_device(self.device, "acg")

    def _padded(self, features: FeatureSet, name: str, dev: torch.device, rows: list[int] | None = None):
        """Pixel features of the images (all, or ``rows``) zero-padded to the largest patch count, centred per
        image over its own pixels if asked: ((n, Pmax, C) float32 on dev, lengths (n,))."""
        rows = list(range(len(features))) if rows is None else rows
        mats = [dense_matrix(features[i], name) for i in rows]
        lengths = torch.tensor([m.shape[0] for m in mats], dtype=torch.long)
        x = torch.zeros(len(mats), int(lengths.max()), mats[0].shape[1], device=dev)
        for j, m in enumerate(mats):
            m = m.to(dev)
            # Deviation (see the card): without centring, DINOv2 keys have a mean pairwise cosine of 0.89, the
            # affinity graph is nearly complete and its modularity carries no signal.
            x[j, : m.shape[0]] = m - m.mean(0, keepdim=True) if self.centre_features else m
        return x, lengths

    def fit(self, features: FeatureSet, ctx: StageContext | None = None) -> AdaptiveConceptGenerator:
        if len(features) == 0:
            raise ValueError("acg: cannot fit on an empty feature set")
        name = pick_feature(features, self.feature, "keys")
        dim = int(features[0].dense(name).shape[-1])
        if dim % self.n_heads:
            raise ConfigError(f"acg: n_heads={self.n_heads} does not divide the {name!r} feature dim {dim}")
        dev = self._torch_device()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.seed))
            model = ConceptGenerator(
                dim, self.n_prototypes, self.n_rounds, self.n_heads, max(1, round(self.ffn_ratio * dim))
            )
        model = model.to(dev).train()
        self.precision_ = model.precision = resolve_precision(self.precision, dev, "acg")
        opt = adamw(model.parameters(), self.lr, self.weight_decay)
        # fixed for the whole training: the pixels (zero-padded, so a batch mixes images of any size), their
        # standardised and unit forms and each image's modularity graph (zero on padding)
        x, lengths = self._padded(features, name, dev)
        x_hat, x_unit = model.standardise(x), F.normalize(x, dim=-1)
        graph = torch.cat([modularity_graph(c) for c in x.split(64)])
        n = len(features)
        gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + 17)
        curve: list[float] = []
        epochs = tqdm(range(self.epochs), desc="acg epochs", leave=False, disable=not (ctx and ctx.progress))
        for _ in epochs:
            perm = torch.randperm(n, generator=gen)
            total = 0.0
            for start in range(0, n, self.batch_size):
                rows = perm[start : start + self.batch_size]
                if len(rows) == n:  # the whole set (the study's batch of 1024 >= MSRC's 591): no gather
                    xb, xh, xu, gb, lb = x, x_hat, x_unit, graph, lengths
                else:
                    r = rows.to(dev)
                    xb, xh, xu, gb, lb = x[r], x_hat[r], x_unit[r], graph[r], lengths[rows]
                concepts = F.normalize(model(xb, xh, lb), dim=-1)
                # concept-major (B, N, P), the modularity kernel's layout: its gradient reads the pixels
                # row-major (the pixel-major product's was x^T dS, half as fast on the CPU)
                St = (concepts @ xu.transpose(1, 2)).clamp_min(0)  # zero on padded pixels
                loss = -modularity_concept_major(St, gb, self.intensity, lb).mean()
                if not torch.isfinite(loss):
                    raise NumericalError(f"acg: modularity loss became {float(loss)} during training")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(rows)
            curve.append(total / n)
        self.model_ = model.eval()
        self.feature_name_ = name
        self.loss_curve_ = curve
        return self

    @torch.no_grad()
    def segment(self, features: FeatureSet) -> list[torch.Tensor]:
        """(h, w) int64 segment maps (consecutive ids; empty concepts dropped), one per image."""
        if not hasattr(self, "model_"):
            raise RuntimeError("acg: call fit() before predict()")
        name = pick_feature(features, self.feature, "keys")
        dev = self._torch_device()
        maps: list[torch.Tensor] = []
        for start in range(0, len(features), self.batch_size):
            rows = list(range(start, min(start + self.batch_size, len(features))))
            x, lengths = self._padded(features, name, dev, rows)
            labels = assignment(x, self.model_(x, None, lengths)).argmax(-1).cpu()
            for j, i in enumerate(rows):
                own = labels[j, : int(lengths[j])]
                maps.append(relabel_consecutive(own)[0].reshape(features[i].grid))
        return maps

    def predict(self, features: FeatureSet, ctx: StageContext) -> list[Segmentation]:
        out = segmentations(self, features, self.segment(features), ctx, self._torch_device())
        self.n_segments_ = [s.n_segments for s in out]
        return out

    def artifacts(self) -> dict:
        return {
            "loss_curve": getattr(self, "loss_curve_", None),
            "n_segments": getattr(self, "n_segments_", None),
            "precision": getattr(self, "precision_", None),
            "segment_vectors": getattr(self, "segment_vector_stats_", None),
        }
