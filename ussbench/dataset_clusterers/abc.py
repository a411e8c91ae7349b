"""Attention-based clustering (ABC, semester study §3.2.1): cross-attention to learnable cluster centres.

Segment vectors X (queries) attend to a learnable (k, D) matrix M (keys and values) through N update
steps of [cross-attention + FFN] (multi-head attention, post-norm residuals as in the transformer);
the output Y is scored against M: output = ReLU(cos(Y, M)). Trained without labels on
coverage (every row sums to >= 1; every cluster's size between B/k^a and B/k^b) + disjointness (off-diagonal
of outputᵀ·output -> 0); labels = argmax over clusters.

Cluster sizes: the study measures a cluster's size by its soft sum Σ_i ReLU(cos) (``size_bounds='soft'``,
preset ``study``); those sums can sit inside the bounds while the argmax puts 38% of the segments in one
cluster. ``size_bounds='hard'`` (default) measures sizes by a low-temperature softmax that tracks the argmax
counts, and ``bound_assign`` calibrates one offset per cluster after training so that the argmax counts on
the fitted vectors lie within [N/k^a, N/k^b] (the dual of the capacity-constrained assignment).

Speed: the cross-attention is computed in the centres' space (queries projected through the k keys:
O(B·D·k) instead of O(B·D²) per step, the same function), and the FFN runs in bf16 where the CPU or GPU
has native bf16 (``precision='auto'``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..base import DatasetClusterer
from ..errors import ConfigError, NumericalError
from ..registry import register
from ._common import (
    adamw,
    autocast,
    check_choice,
    check_matrix,
    check_positive,
    kmeans_plusplus,
    normalise_rows,
    random_points,
    resolve_device,
    resolve_precision,
)

log = logging.getLogger(__name__)

ARCHITECTURES = ("attn_mlp", "2attn_mlp", "identical", "mlp")
# Blocks of one update step per architecture (Table 2 of the study).
_LAYOUT = {
    "attn_mlp": ("attn", "ffn"),
    "2attn_mlp": ("attn", "attn", "ffn"),
    "identical": (),
    "mlp": ("ffn",),
}

_STUDY = {"lr": 3e-5, "epochs": 500, "batch_size": 4096, "weight_decay": 0.01, "n_steps": 1,
          "architecture": "attn_mlp", "min_size_exponent": 2.0, "max_size_exponent": 0.5}  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    # §4.2.1: AdamW lr 3e-5, 500 epochs, batch 4096, one attention + MLP, bounds N/k^2 .. N/sqrt(k), and
    # the loss exactly as written: sizes as soft sums, disjointness = plain sum of the off-diagonal.
    "study": {**_STUDY, "disjointness": "sum", "size_bounds": "soft", "bound_assign": False},
    # The same schedule with the bounds on the argmax counts (ussbench's default loss and assignment).
    "study_hard_bounds": {**_STUDY, "disjointness": "per_point", "size_bounds": "hard", "bound_assign": True},
}


def cross_attend(y: torch.Tensor, centres: torch.Tensor, mha: nn.MultiheadAttention) -> torch.Tensor:
    """``mha(query=y, key=centres, value=centres)`` (B, D), computed through the k centres.

    Per head h: softmax((y W_q,h^T + b_q,h) K_h^T / sqrt(d)) V_h W_o,h^T with K_h, V_h the projected centres.
    The query projection is folded into the keys (y @ (W_q,h^T K_h^T): D x k) and the output projection
    into the values (V_h W_o,h^T: k x D), so a batch costs O(B·D·k·heads) instead of O(B·D²).
    """
    B, D = y.shape
    k = centres.shape[0]
    h = mha.num_heads
    d = D // h
    w_q, w_k, w_v = mha.in_proj_weight.split(D)
    b_q, b_k, b_v = mha.in_proj_bias.split(D)
    keys = (centres @ w_k.T + b_k).reshape(k, h, d)
    values = (centres @ w_v.T + b_v).reshape(k, h, d)
    scale = 1.0 / math.sqrt(d)
    fold_q = torch.einsum("hdD,khd->Dhk", w_q.reshape(h, d, D), keys).reshape(D, h * k) * scale
    bias_q = torch.einsum("hd,khd->hk", b_q.reshape(h, d), keys).reshape(h * k) * scale
    attn = torch.addmm(bias_q, y, fold_q).reshape(B, h, k).softmax(-1)
    w_o = mha.out_proj.weight.reshape(D, h, d)
    fold_o = torch.einsum("khd,Dhd->hkD", values, w_o).reshape(h * k, D)
    return torch.addmm(mha.out_proj.bias, attn.reshape(B, h * k), fold_o)


class CrossAttention(nn.Module):
    """Y <- LayerNorm(Y + MultiHeadAttention(query=Y, key=M, value=M)); nn.MultiheadAttention holds the
    parameters (same initialisation), :func:`cross_attend` computes it."""

    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, n_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        # Zero-initialised residual branch: at initialisation Y = LayerNorm(X), so the seeded centres
        # start out scoring the segments they were drawn from (see ABCNet).
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, y: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        return self.norm(y + cross_attend(y, centres, self.attn).to(y.dtype))


class FeedForward(nn.Module):
    """Y <- LayerNorm(Y + Linear(GELU(Linear(Y))))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.norm = nn.LayerNorm(dim)
        nn.init.zeros_(self.net[2].weight)  # zero-initialised residual branch, as in CrossAttention
        nn.init.zeros_(self.net[2].bias)

    def forward(self, y: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
        return self.norm(y + self.net(y).float())


class ABCNet(nn.Module):
    """The learnable centres M (k, D) and the update steps mapping X (B, D) to Y (B, D)."""

    def __init__(
        self, centres: torch.Tensor, architecture: str, n_steps: int, n_heads: int, mlp_ratio: float
    ):
        super().__init__()
        dim = centres.shape[1]
        hidden = max(1, int(round(dim * mlp_ratio)))
        blocks: list[nn.Module] = []
        for _ in range(n_steps):
            for kind in _LAYOUT[architecture]:
                blocks.append(CrossAttention(dim, n_heads) if kind == "attn" else FeedForward(dim, hidden))
        self.blocks = nn.ModuleList(blocks)
        if blocks:
            # With zero-initialised residual branches Y starts as LayerNorm(X): centre the seed vectors the
            # same way so that cos(Y, M) at initialisation is the correlation of each segment with a seed.
            centres = F.normalize(centres - centres.mean(1, keepdim=True), dim=1)
        self.centres = nn.Parameter(centres.clone())
        self.precision = "fp32"  # set by the clusterer: 'bf16' runs the FFN matmuls in bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """cos(Y, M): (B, k) similarities of the updated vectors to the centres."""
        y = x
        for block in self.blocks:
            if isinstance(block, FeedForward):
                with autocast(y.device, self.precision):
                    y = block(y, self.centres)
            else:
                y = block(y, self.centres)
        return F.normalize(y.float(), dim=1) @ F.normalize(self.centres, dim=1).T


def size_bounds(n: int, k: int, min_exp: float | None, max_exp: float | None) -> tuple[float, float]:
    """(lower, upper) cluster-size bounds n/k^min_exp and n/k^max_exp (0 and n where not set)."""
    lower = n / k**min_exp if min_exp is not None else 0.0
    upper = n / k**max_exp if max_exp is not None else float(n)
    return lower, upper


def abc_loss(
    scores: torch.Tensor,
    min_size_exponent: float | None,
    max_size_exponent: float | None,
    disjointness: str,
    sizes: str = "soft",
    count_temperature: float = 0.05,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Coverage + disjointness of output = ReLU(scores) on one batch of B rows (bounds use B and k).

    coverage = mean_i relu(1 - Σ_j out_ij) + mean_j relu(B/k^a - size_j) + mean_j relu(size_j - B/k^b) with
    size_j = Σ_i out_ij ('soft', the study) or Σ_i softmax(scores_i / count_temperature)_j ('hard': tracks the
    argmax counts); disjointness "sum": the study's sum of the off-diagonal of outputᵀ·output (grows with B
    and dominates the other terms, driving every output to 0 on real features); "per_point": that sum / B.
    """
    out = F.relu(scores)
    b, k = out.shape
    cover_rows = F.relu(1.0 - out.sum(1)).mean()
    col = out.sum(0) if sizes == "soft" else (scores / count_temperature).softmax(1).sum(0)
    lower, upper = size_bounds(b, k, min_size_exponent, max_size_exponent)
    cover_cols = torch.zeros((), device=out.device)
    if min_size_exponent is not None:
        cover_cols = cover_cols + F.relu(lower - col).mean()
    if max_size_exponent is not None:
        cover_cols = cover_cols + F.relu(col - upper).mean()
    gram = out.T @ out
    off = gram.sum() - gram.diagonal().sum()
    disjoint = off / b if disjointness == "per_point" else off
    total = cover_rows + cover_cols + disjoint
    parts = {
        name: float(v.detach())
        for name, v in (
            ("coverage_rows", cover_rows),
            ("coverage_cols", cover_cols),
            ("disjointness", disjoint),
        )
    }
    return total, parts


def bounded_offsets(
    scores: torch.Tensor, lower: float, upper: float, max_rounds: int = 2000
) -> tuple[torch.Tensor, int]:
    """Per-cluster offsets b (k,) such that the counts of argmax_j (scores_ij + b_j) lie in [lower, upper].

    The offsets are the dual variables of the assignment that maximises the summed scores under the size
    bounds: repeatedly the most violating cluster is shifted by exactly the margin that moves its excess
    (its lowest-margin members out, or the nearest outsiders in). Returns (offsets, rounds used); stops
    early when every count is within bounds (always reachable when k * lower <= n <= k * upper, barring ties).
    """
    s = scores.double()
    n, k = s.shape
    lo, hi = math.ceil(lower - 1e-9), math.floor(upper + 1e-9)
    offsets = torch.zeros(k, dtype=torch.float64, device=s.device)
    if k < 2:
        return offsets, 0
    scale = float(s.abs().max().clamp_min(1e-12))
    eps = 1e-9 * scale
    for rounds in range(max_rounds):
        z = s + offsets
        top = z.topk(2, dim=1)
        labels = top.indices[:, 0]
        counts = torch.bincount(labels, minlength=k)
        excess = (counts - hi).clamp_min(0)
        deficit = (lo - counts).clamp_min(0)
        if int(excess.max()) == 0 and int(deficit.max()) == 0:
            return offsets, rounds
        if int(excess.max()) >= int(deficit.max()):
            j = int(excess.argmax())
            members = labels == j
            margin = z[members, j] - top.values[members, 1]  # how far each member is ahead of its 2nd choice
            need = int(excess[j])
            offsets[j] -= margin.kthvalue(need).values + eps
        else:
            j = int(deficit.argmax())
            outside = labels != j
            gap = top.values[outside, 0] - z[outside, j]  # how far each outsider is from choosing j
            need = min(int(deficit[j]), int(outside.sum()))
            offsets[j] += gap.kthvalue(need).values + eps
    return offsets, max_rounds


@register("dataset_clusterer", "abc", presets=PRESETS)
class AttentionClusterer(DatasetClusterer):
    """Attention-based clustering: cross-attention to learnable centres, coverage + disjointness loss, argmax."""

    version = "2"  # 2: size bounds on argmax counts (size_bounds, bound_assign), folded attention, precision

    def __init__(
        self,
        n_clusters: int = 21,
        architecture: Literal["attn_mlp", "2attn_mlp", "identical", "mlp"] = "attn_mlp",
        n_steps: int = 1,
        n_heads: int = 1,
        mlp_ratio: float = 4.0,
        min_size_exponent: float | None = 2.0,
        max_size_exponent: float | None = 0.5,
        size_bounds: Literal["soft", "hard"] = "hard",
        count_temperature: float = 0.05,
        bound_assign: bool = True,
        disjointness: Literal["sum", "per_point"] = "per_point",
        lr: float = 1e-4,
        weight_decay: float = 0.01,
        epochs: int = 100,
        batch_size: int = 4096,
        init: Literal["points", "k-means++", "random"] = "k-means++",
        normalise_input: bool = True,
        precision: Literal["auto", "fp32", "bf16"] = "auto",
        seed: int = 0,
        device: str = "cpu",
    ):
        check_positive(
            "abc", n_clusters=n_clusters, n_steps=n_steps, n_heads=n_heads, mlp_ratio=mlp_ratio, lr=lr,
            epochs=epochs, batch_size=batch_size, count_temperature=count_temperature,
        )  # fmt: skip
        check_choice("abc", "architecture", architecture, ARCHITECTURES)
        check_choice("abc", "disjointness", disjointness, ("sum", "per_point"))
        check_choice("abc", "size_bounds", size_bounds, ("soft", "hard"))
        check_choice("abc", "init", init, ("points", "k-means++", "random"))
        check_choice("abc", "precision", precision, ("auto", "fp32", "bf16"))
        if weight_decay < 0:
            raise ConfigError(f"abc: weight_decay must be >= 0, got {weight_decay}")
        if (
            min_size_exponent is not None
            and max_size_exponent is not None
            and max_size_exponent >= min_size_exponent
        ):
            raise ConfigError(
                f"abc: max_size_exponent ({max_size_exponent}) must be smaller than min_size_exponent "
                f"({min_size_exponent}) so that N/k^min < N/k^max"
            )
        if min_size_exponent is not None and min_size_exponent < 1:
            raise ConfigError(
                f"abc: min_size_exponent must be >= 1 (k clusters of N/k^a points must fit in N), got "
                f"{min_size_exponent}"
            )
        if max_size_exponent is not None and max_size_exponent > 1:
            raise ConfigError(
                f"abc: max_size_exponent must be <= 1 (k clusters of N/k^b points must cover N), got "
                f"{max_size_exponent}"
            )
        self.n_clusters = n_clusters
        self.architecture = architecture
        self.n_steps = n_steps
        self.n_heads = n_heads
        self.mlp_ratio = mlp_ratio
        self.min_size_exponent = min_size_exponent
        self.max_size_exponent = max_size_exponent
        self.size_bounds = size_bounds
        self.count_temperature = count_temperature
        self.bound_assign = bound_assign
        self.disjointness = disjointness
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.init = init
        self.normalise_input = normalise_input
        self.precision = precision
        self.seed = seed
        self.device = device

    def _prepare(self, X: torch.Tensor, n_clusters: int, dev: torch.device) -> torch.Tensor:
        X = check_matrix(X, n_clusters, "abc").to(dev)
        return normalise_rows(X, "abc") if self.normalise_input else X

    def _initial_centres(self, Z: torch.Tensor) -> torch.Tensor:
        rng = np.random.default_rng(self.seed)
        if self.init == "points":
            return random_points(Z, self.n_clusters, rng)
        if self.init == "k-means++":
            return kmeans_plusplus(Z, self.n_clusters, rng)
        gen = torch.Generator().manual_seed(self.seed)
        return torch.randn(self.n_clusters, Z.shape[1], generator=gen).to(Z.device)

    def fit(self, X: torch.Tensor) -> AttentionClusterer:
        dev = resolve_device(self.device, "abc")
        Z = self._prepare(X, self.n_clusters, dev)
        n, dim = Z.shape
        if dim % self.n_heads:
            raise ConfigError(f"abc: n_heads={self.n_heads} must divide the feature dimension {dim}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net_ = ABCNet(
                self._initial_centres(Z), self.architecture, self.n_steps, self.n_heads, self.mlp_ratio
            ).to(dev)
        self.precision_ = resolve_precision(self.precision, dev, "abc")
        self.net_.precision = self.precision_
        opt = adamw(self.net_.parameters(), self.lr, self.weight_decay)
        gen = torch.Generator().manual_seed(self.seed + 1)
        n_batches = math.ceil(n / self.batch_size)
        self.loss_history_: list[float] = []
        self.net_.train()
        for epoch in range(self.epochs):
            perm = torch.randperm(n, generator=gen).to(dev)
            total = 0.0
            for idx in torch.tensor_split(perm, n_batches):
                loss, parts = abc_loss(
                    self.net_(Z[idx]), self.min_size_exponent, self.max_size_exponent, self.disjointness,
                    self.size_bounds, self.count_temperature,
                )  # fmt: skip
                if not torch.isfinite(loss):
                    raise NumericalError(f"abc: loss became NaN/inf at epoch {epoch} ({parts}); lower lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach())
            self.loss_history_.append(total / n_batches)
        self.net_.eval()
        scores = self._scores_prepared(Z)
        lower, upper = size_bounds(n, self.n_clusters, self.min_size_exponent, self.max_size_exponent)
        self.size_limits_ = (lower, upper)
        self.argmax_sizes_ = torch.bincount(scores.argmax(1), minlength=self.n_clusters).cpu()
        self.offsets_ = torch.zeros(self.n_clusters, dtype=torch.float64)
        self.calibration_rounds_ = 0
        if self.bound_assign:
            offsets, self.calibration_rounds_ = bounded_offsets(scores, lower, upper)
            self.offsets_ = offsets.cpu()
        self.labels_ = self._assign(scores)
        self.cluster_sizes_ = torch.bincount(self.labels_, minlength=self.n_clusters)
        return self

    @torch.no_grad()
    def _scores_prepared(self, Z: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net_(chunk) for chunk in Z.split(self.batch_size)])

    def _assign(self, scores: torch.Tensor) -> torch.Tensor:
        # argmax of cos(Y, M) (+ the calibrated offsets) = argmax of ReLU(cos) whenever a score is positive
        # and no offsets are set, and still defined (instead of always cluster 0) when all scores are <= 0.
        return (scores.double() + self.offsets_.to(scores.device)).argmax(1).long().cpu()

    @torch.no_grad()
    def scores(self, X: torch.Tensor) -> torch.Tensor:
        """cos(Y, M) (N, k) for new vectors; output = ReLU of it (offsets not included)."""
        if not hasattr(self, "net_"):
            raise RuntimeError("abc: call fit before predict")
        dev = next(self.net_.parameters()).device
        return self._scores_prepared(self._prepare(X, 1, dev)).cpu()

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        return self._assign(self.scores(X))

    def fraction_within_bounds(self, sizes: torch.Tensor | None = None) -> float:
        """Fraction of clusters whose hard count lies in [N/k^a, N/k^b] (default: the fitted labels)."""
        lower, upper = self.size_limits_
        sizes = self.cluster_sizes_ if sizes is None else sizes
        ok = (sizes >= math.ceil(lower - 1e-9)) & (sizes <= math.floor(upper + 1e-9))
        return float(ok.float().mean())

    def artifacts(self) -> dict[str, Any]:
        if not hasattr(self, "loss_history_"):
            return {}
        return {
            "loss_history": self.loss_history_,
            "cluster_sizes": self.cluster_sizes_.tolist(),
            "argmax_sizes": self.argmax_sizes_.tolist(),
            "size_limits": list(self.size_limits_),
            "within_bounds": self.fraction_within_bounds(),
            "argmax_within_bounds": self.fraction_within_bounds(self.argmax_sizes_),
            "offsets": self.offsets_.tolist(),
            "calibration_rounds": self.calibration_rounds_,
            "precision": self.precision_,
        }
