"""Projection heads and cosine prototypes shared by STEGO, HP, SmooSeg and OMH, plus the EMA update and the
point-pair correlations of STEGO's and SmooSeg's losses.

Heads act on channel-first maps (B, C, h, w) with 1x1 convolutions, as in the reference code bases:
code = Conv1x1(C->D)(drop(f)) + [Conv1x1(C->C), act, Conv1x1(C->D)](drop(f)), where the two branches see
independent Dropout2d samples of the frozen features (act = ReLU in STEGO/HP, SiLU in SmooSeg).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """Linear + two-layer 1x1-conv projection head with channel dropout on its input (training only)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        activation: Literal["relu", "silu"] = "relu",
        dropout: float = 0.1,
        nonlinear: bool = True,
    ):
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"projection head dims must be >= 1, got in_dim={in_dim}, out_dim={out_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"projection head dropout must lie in [0, 1), got {dropout}")
        act: nn.Module = {"relu": nn.ReLU, "silu": nn.SiLU}[activation]()
        self.linear = nn.Conv2d(in_dim, out_dim, 1)
        self.nonlinear = (
            nn.Sequential(nn.Conv2d(in_dim, in_dim, 1), act, nn.Conv2d(in_dim, out_dim, 1))
            if nonlinear
            else None
        )
        self.drop = nn.Dropout2d(dropout)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """feats (B, C, h, w) -> code (B, D, h, w)."""
        code = self.linear(self.drop(feats))
        if self.nonlinear is not None:
            code = code + self.nonlinear(self.drop(feats))
        return code


class CosinePrototypes(nn.Module):
    """K learnable centres scored by cosine similarity (STEGO's cluster lookup, SmooSeg's predictor)."""

    def __init__(self, n_clusters: int, dim: int, init: Literal["randn", "xavier"] = "randn"):
        super().__init__()
        if n_clusters < 1:
            raise ValueError(f"number of prototypes must be >= 1, got {n_clusters}")
        weight = torch.randn(n_clusters, dim)
        if init == "xavier":  # SmooSeg: xavier-normal, then L2-normalised
            weight = F.normalize(nn.init.xavier_normal_(weight), dim=1)
        self.weight = nn.Parameter(weight)

    @property
    def n_clusters(self) -> int:
        return int(self.weight.shape[0])

    def normalised(self) -> torch.Tensor:
        return F.normalize(self.weight, dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> cosine similarities (..., K)."""
        return F.normalize(x, dim=-1) @ self.normalised().t()


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, momentum: float) -> None:
    """ema <- momentum * ema + (1 - momentum) * model, parameter by parameter; buffers are copied."""
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.mul_(momentum).add_(p.detach(), alpha=1.0 - momentum)
    for b_ema, b in zip(ema.buffers(), model.buffers()):
        b_ema.copy_(b)


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine correlation of every point pair: (B, C, h, w), (B, C, i, j) -> (B, h, w, i, j)."""
    return torch.einsum("bchw,bcij->bhwij", F.normalize(a, dim=1), F.normalize(b, dim=1))


@torch.no_grad()
def feature_correlation(f1: torch.Tensor, f2: torch.Tensor, pointwise: bool = True) -> torch.Tensor:
    """Feature correlation Fc without gradient; ``pointwise``: each point's row mean removed, global mean kept."""
    fd = correlation(f1, f2)
    if pointwise:
        old_mean = fd.mean()
        fd = fd - fd.mean((3, 4), keepdim=True)
        fd = fd - fd.mean() + old_mean
    return fd


def channels_first(x: torch.Tensor) -> torch.Tensor:
    """(B, h, w, C) -> (B, C, h, w), contiguous."""
    return x.permute(0, 3, 1, 2).contiguous()


def channels_last_flat(x: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B*h*w, C)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
