"""Adaptive Concept Generator (ACSeg, Li et al., CVPR 2023) as a trainable image-level clusterer.

N learnable prototypes become image-adaptive concepts through T update steps, each a transformer-decoder
layer: the prototypes query the image's pixel features by scaled dot-product cross-attention (key/value
projections shared by the T steps), then self-attention among prototypes, then an FFN, with residuals
and post-LayerNorm. Each pixel goes to its most cosine-similar concept; concepts that win no pixel
vanish, so the number of segments adapts per image. Trained without labels by maximising the modularity
of the soft assignment on the image's cosine affinity graph, on cached features, in batches of images of
equal grid size.
"""

from __future__ import annotations

from collections import defaultdict
from functools import partial
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..base import FeatureSet, ImageClusterer, Segmentation, StageContext
from ..determinism import ThreadInvariantLayerNorm as LayerNorm  # same numbers with 1 or N threads
from ..errors import ConfigError, NumericalError
from ..registry import register
from ._common import dense_matrix, pick_feature, plugin_device, relabel_consecutive, require
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

    def forward(self, p: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """p (B, N, C) prototypes; k, v (B, heads, P, C / heads) the pixels' keys and values."""
        B, N, C = p.shape
        q = self.q(p).reshape(B, N, self.n_heads, -1).transpose(1, 2)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C)
        p = self.norm1(p + self.out(att))
        p = self.norm2(p + self.mix(p, p, p, need_weights=False)[0])
        return self.norm3(p + self.ffn(p))


class ConceptGenerator(nn.Module):
    """Prototypes (N, C) -> image-adaptive concepts (B, N, C) for pixel features (B, P, C).

    The pixels' keys and values are projected once per image and shared by the T rounds (as in slot
    attention), so a round costs O(N * P) rather than another O(P * C^2) projection of every pixel.
    """

    def __init__(self, dim: int, n_prototypes: int, n_rounds: int, n_heads: int, ffn_dim: int):
        super().__init__()
        self.n_heads = n_heads
        self.prototypes = nn.Parameter(torch.randn(n_prototypes, dim))
        self.memory_norm = LayerNorm(dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.steps = nn.ModuleList(UpdateStep(dim, n_heads, ffn_dim) for _ in range(n_rounds))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, P, C = x.shape
        kv = self.kv(self.memory_norm(x)).reshape(B, P, 2, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        p = self.prototypes.unsqueeze(0).expand(B, -1, -1)
        for step in self.steps:
            p = step(p, k, v)
        return p


def assignment(x: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """Soft assignment S (B, P, N) = max(cos(pixel, concept), 0)."""
    return (F.normalize(x, dim=-1) @ F.normalize(concepts, dim=-1).transpose(1, 2)).clamp_min(0)


class _MaxIntensityQuadratic(torch.autograd.Function):
    """q_b = sum_ij B_ij S_i,a(ij) S_j,a(ij) with a(ij) = argmax_n S_in S_jn, for symmetric B (B, P, P).

    The gradient is d q / d S_in = 2 sum_j B_ij [a(ij) = n] S_j,a(ij) (B and a are symmetric), gathered and
    scattered one image at a time: memory O(P^2 N) per image and a few passes over P^2, instead of building a
    masked P x P matrix per concept in the autograd graph (5.7x faster for 64 images of 336 patches on one CPU thread; same value and gradient).
    """

    @staticmethod
    def forward(ctx, S: torch.Tensor, B_mod: torch.Tensor) -> torch.Tensor:
        q = S.new_zeros(S.shape[0])
        grad = torch.zeros_like(S)
        for b in range(S.shape[0]):
            best, arg = (S[b].unsqueeze(1) * S[b].unsqueeze(0)).max(-1)  # (P, P): max_n S_in S_jn, its n
            q[b] = (B_mod[b] * best).sum()
            s_j = S[b].unsqueeze(0).expand(arg.shape[0], -1, -1).gather(2, arg.unsqueeze(-1)).squeeze(-1)
            grad[b].scatter_add_(1, arg, B_mod[b] * s_j)
        ctx.save_for_backward(grad)
        return q

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return 2.0 * grad * grad_q[:, None, None], None


def modularity_loss(x: torch.Tensor, S: torch.Tensor, intensity: str = "max") -> torch.Tensor:
    """Negative modularity -Q, averaged over the batch, of soft assignment S (B, P, N) on the graph of x.

    A = max(cos(x_i, x_j), 0), k = degrees, 2m = sum(A); Q = 1/2m sum_ij (A_ij - k_i k_j / 2m) delta_ij with
    the same-concept intensity delta_ij = max_n S_in S_jn ('max', the paper's form) or sum_n S_in S_jn
    ('sum', DMoN's trace form Tr(S^T B S)).
    """
    with torch.no_grad():
        xn = F.normalize(x, dim=-1)
        A = (xn @ xn.transpose(1, 2)).clamp_min(0)
        k = A.sum(-1)
        two_m = k.sum(-1).clamp_min(1e-12)
    if intensity == "max":
        B_mod = A - k.unsqueeze(2) * k.unsqueeze(1) / two_m[:, None, None]
        q = _MaxIntensityQuadratic.apply(S, B_mod) / two_m
    elif intensity == "sum":
        within = (S * (A @ S)).sum((1, 2))
        null = ((k.unsqueeze(1) @ S) ** 2).sum((1, 2)) / two_m
        q = (within - null) / two_m
    else:
        raise ValueError(f"intensity must be 'max' or 'sum', got {intensity!r}")
    return -q.mean()


@register("image_clusterer", "acg", presets=ACG_PRESETS)
class AdaptiveConceptGenerator(ImageClusterer):
    """ACSeg's adaptive concept generator: attention-updated prototypes, modularity loss, adaptive #segments."""

    version = "3"  # 2: centre_features; 3: thread-invariant LayerNorm gradients

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
        seed: int = 0,
        device: str = "cpu",
    ):
        need = partial(require, "acg")
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
        self.seed = seed
        self.device = device

    def _torch_device(self) -> torch.device:
        return plugin_device(self.device, "acg")

    def _grouped(self, features: FeatureSet, name: str, dev: torch.device):
        """Features stacked per grid size, centred per image if asked: {grid: (indices, (n, P, C) float32 on dev)}."""
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, im in enumerate(features):
            groups[im.grid].append(i)
        out = {}
        for g, idx in groups.items():
            x = torch.stack([dense_matrix(features[i], name) for i in idx]).to(dev)
            # Deviation (see the card): without centring, DINOv2 keys have a mean pairwise cosine of 0.89, the
            # affinity graph is nearly complete and its modularity carries no signal.
            out[g] = (idx, x - x.mean(1, keepdim=True) if self.centre_features else x)
        return out

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
        opt = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        groups = self._grouped(features, name, dev)
        gen = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + 17)
        curve: list[float] = []
        epochs = tqdm(range(self.epochs), desc="acg epochs", leave=False, disable=not (ctx and ctx.progress))
        for _ in epochs:
            batches = []
            for g, (idx, _x) in groups.items():
                perm = torch.randperm(len(idx), generator=gen)
                batches += [(g, perm[s : s + self.batch_size]) for s in range(0, len(idx), self.batch_size)]
            total, count = 0.0, 0
            for b in torch.randperm(len(batches), generator=gen).tolist():
                g, rows = batches[b]
                x = groups[g][1][rows.to(dev)]
                loss = modularity_loss(x, assignment(x, model(x)), self.intensity)
                if not torch.isfinite(loss):
                    raise NumericalError(f"acg: modularity loss became {float(loss)} during training")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(rows)
                count += len(rows)
            curve.append(total / max(count, 1))
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
        maps: list[torch.Tensor | None] = [None] * len(features)
        for grid, (idx, x) in self._grouped(features, name, dev).items():
            for s in range(0, len(idx), self.batch_size):
                xb = x[s : s + self.batch_size]
                labels = assignment(xb, self.model_(xb)).argmax(-1).cpu()
                for j, i in enumerate(idx[s : s + self.batch_size]):
                    maps[i] = relabel_consecutive(labels[j])[0].reshape(grid)
        return maps  # type: ignore[return-value]

    def predict(self, features: FeatureSet, ctx: StageContext) -> list[Segmentation]:
        out = segmentations(self, features, self.segment(features), ctx, self._torch_device())
        self.n_segments_ = [s.n_segments for s in out]
        return out

    def artifacts(self) -> dict:
        return {
            "loss_curve": getattr(self, "loss_curve_", None),
            "n_segments": getattr(self, "n_segments_", None),
        }
