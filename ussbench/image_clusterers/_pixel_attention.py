"""Attention of a few queries over an image's pixels: r = softmax(q x^T) x, per image, with its gradient.

ACG's cross-attention, computed through the prototypes (see ``acg.ConceptGenerator``), leaves the pixels in
two products per round with only M = heads x prototypes (~6) queries: (M x C) x (C x P) and back. As batched
matrix products these are skinny and memory-bound (each reads an image's P x C pixels to do 2M flops per
value), and separate logits / softmax / weighted-sum calls read the pixels from memory twice. On the CPU the
numba kernels below do one image at a time in one pass (logits, softmax and weighted sum while the image's
pixels stay in cache), images in parallel; on a GPU (or without numba) the same is done with torch ops.
The pixels are data (no gradient); the gradient flows to the queries.
"""

from __future__ import annotations

import numpy as np
import torch

from ._jit import FASTMATH, match_torch_threads

try:
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None


if numba is not None:

    @njit(parallel=True, fastmath=set(FASTMATH), cache=True)
    def _attend_kernel(q, x, lengths, att, r):  # pragma: no cover - compiled
        """q (b, M, C), x (b, P, C) with lengths[t] valid pixels -> att (b, M, P) softmax weights (0 on padding)
        and r (b, M, C) = att @ x (outputs)."""
        b, M, C = q.shape
        for t in prange(b):
            P = lengths[t]
            for m in range(M):
                for p in range(P, x.shape[1]):
                    att[t, m, p] = 0.0
            for p in range(P):
                for m in range(M):
                    acc = np.float32(0.0)
                    for c in range(C):
                        acc += q[t, m, c] * x[t, p, c]
                    att[t, m, p] = acc
            for m in range(M):
                top = att[t, m, 0]
                for p in range(1, P):
                    top = max(top, att[t, m, p])
                total = np.float32(0.0)
                for p in range(P):
                    e = np.exp(att[t, m, p] - top)
                    att[t, m, p] = e
                    total += e
                inv = np.float32(1.0) / total
                for p in range(P):
                    att[t, m, p] *= inv
                for c in range(C):
                    r[t, m, c] = 0.0
            for p in range(P):
                for m in range(M):
                    a = att[t, m, p]
                    for c in range(C):
                        r[t, m, c] += a * x[t, p, c]

    @njit(parallel=True, fastmath=set(FASTMATH), cache=True)
    def _attend_backward_kernel(dr, att, x, lengths, dq):  # pragma: no cover - compiled
        """dr (b, M, C), att (b, M, P), x (b, P, C) -> dq (b, M, C) (output); the pixels get no gradient."""
        b, M, C = dr.shape
        for t in prange(b):
            P = lengths[t]
            g = np.empty((M, P), dtype=np.float32)
            for p in range(P):
                for m in range(M):
                    acc = np.float32(0.0)
                    for c in range(C):
                        acc += dr[t, m, c] * x[t, p, c]
                    g[m, p] = acc
            for m in range(M):
                inner = np.float32(0.0)
                for p in range(P):
                    inner += att[t, m, p] * g[m, p]
                for p in range(P):
                    g[m, p] = att[t, m, p] * (g[m, p] - inner)
                for c in range(C):
                    dq[t, m, c] = 0.0
            for p in range(P):
                for m in range(M):
                    a = g[m, p]
                    for c in range(C):
                        dq[t, m, c] += a * x[t, p, c]


def _np(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy())


class _PixelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        qn, xn = _np(q), _np(x)
        ln = np.ascontiguousarray(lengths.cpu().numpy().astype(np.int64))
        att = np.empty((qn.shape[0], qn.shape[1], xn.shape[1]), dtype=np.float32)
        r = np.empty_like(qn)
        match_torch_threads()
        _attend_kernel(qn, xn, ln, att, r)
        ctx.save_for_backward(torch.from_numpy(att), x, torch.from_numpy(ln))
        return torch.from_numpy(r).to(q.dtype)

    @staticmethod
    def backward(ctx, dr: torch.Tensor):
        att, x, ln = ctx.saved_tensors
        dq = np.empty((dr.shape[0], dr.shape[1], dr.shape[2]), dtype=np.float32)
        match_torch_threads()
        _attend_backward_kernel(_np(dr), att.numpy(), _np(x), ln.numpy(), dq)
        return torch.from_numpy(dq).to(dr.dtype), None, None


def valid_mask(lengths: torch.Tensor | None, B: int, P: int, device: torch.device) -> torch.Tensor:
    """(B, P) True on each image's first lengths[b] pixels (all when lengths is None)."""
    if lengths is None:
        return torch.ones(B, P, dtype=torch.bool, device=device)
    return torch.arange(P, device=device)[None] < lengths.to(device)[:, None]


def pixel_attention(q: torch.Tensor, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q x^T) x per image over its valid pixels: q (B, M, C) queries, x (B, P, C) pixels (constant,
    zero-padded after lengths[b]) -> (B, M, C)."""
    B, P = x.shape[0], x.shape[1]
    if numba is not None and q.device.type == "cpu" and not x.requires_grad:
        if lengths is None:
            lengths = torch.full((B,), P, dtype=torch.long)
        return _PixelAttention.apply(q.float(), x, lengths)
    logits = q.float() @ x.float().transpose(1, 2)
    logits = logits.masked_fill(~valid_mask(lengths, B, P, q.device)[:, None, :], float("-inf"))
    return logits.softmax(-1) @ x.float()
