"""Modularity of a soft pixel-to-concept assignment on each image's cosine affinity graph (ACG's loss).

Q = 1/2m sum_ij (A_ij - k_i k_j / 2m) delta_ij with A = max(cos, 0), k its degrees, 2m = sum(A), and the
same-concept intensity delta_ij = max_n S_in S_jn ('max') or sum_n S_in S_jn ('sum', DMoN's trace form).
The graph term B = (A - k k^T / 2m) / 2m depends only on the (frozen) features, so a trainer computes it
once per image (:func:`modularity_graph`) and evaluates Q for every new S against it.

The 'max' intensity has no matrix-product form: every pair (i, j) needs its own max over the N concepts.
It runs in one fused numba kernel per image (P^2 N multiply-compares, vectorised over j, images in
parallel) that returns Q and the gradient 2 H with H_in = sum_j B_ij S_jn [argmax_m S_im S_jm = n]; the
autograd fallback without numba materialises the (P, P, N) products image by image.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F

from ._jit import FASTMATH, match_torch_threads

log = logging.getLogger(__name__)

try:  # numba is a dependency; keep a torch fallback so a broken install degrades instead of failing
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None


def modularity_graph(x: torch.Tensor) -> torch.Tensor:
    """(B, P, C) features -> (B, P, P) float32 B / 2m with B = A - k k^T / 2m, A = max(cos, 0)."""
    xn = F.normalize(x.float(), dim=-1)
    A = (xn @ xn.transpose(1, 2)).clamp_min_(0)
    k = A.sum(-1)
    two_m = k.sum(-1).clamp_min(1e-12)[:, None, None]
    return (A - k.unsqueeze(2) * k.unsqueeze(1) / two_m) / two_m


if numba is not None:

    @njit(parallel=True, fastmath=set(FASTMATH), cache=True)
    def _max_intensity_kernel(S, G, lengths, H, q):  # pragma: no cover - compiled
        """S (b, N, P) concept-major, G (b, P, P) symmetric graph, lengths[t] valid pixels -> H (b, N, P) (zero
        on padding), q (b,) (outputs)."""
        b, N, Pmax = S.shape
        for t in prange(b):
            P = lengths[t]
            best = np.empty(P, dtype=np.float32)
            arg = np.empty(P, dtype=np.int32)
            for n in range(N):
                for i in range(P, Pmax):
                    H[t, n, i] = 0.0
            qt = 0.0
            for i in range(P):
                s0 = S[t, 0, i]
                for j in range(P):
                    best[j] = s0 * S[t, 0, j]
                    arg[j] = 0
                for n in range(1, N):
                    s = S[t, n, i]
                    for j in range(P):
                        p = s * S[t, n, j]
                        if p > best[j]:
                            best[j] = p
                            arg[j] = n
                qi = np.float32(0.0)
                for j in range(P):
                    qi += G[t, i, j] * best[j]
                qt += qi
                for n in range(N):
                    acc = np.float32(0.0)
                    for j in range(P):
                        if arg[j] == n:
                            acc += G[t, i, j] * S[t, n, j]
                    H[t, n, i] = acc
            q[t] = qt


def _max_intensity_numba(
    St: torch.Tensor, G: torch.Tensor, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B,) and H (B, N, P) for concept-major St (B, N, P), the kernel's own layout (no transposes)."""
    Sn = np.ascontiguousarray(St.detach().float().cpu().numpy())
    Gn = np.ascontiguousarray(G.detach().float().cpu().numpy())
    if lengths is None:
        ln = np.full(Sn.shape[0], Sn.shape[2], dtype=np.int64)
    else:
        ln = np.ascontiguousarray(lengths.cpu().numpy().astype(np.int64))
    H = np.empty_like(Sn)
    q = np.empty(Sn.shape[0], dtype=np.float64)
    match_torch_threads()
    _max_intensity_kernel(Sn, Gn, ln, H, q)
    dev = St.device
    return torch.from_numpy(q).to(dev, St.dtype), torch.from_numpy(H).to(dev, St.dtype)


# the (b, N, P, P) products of one chunk of images in the torch path: large on a GPU (a few kernels per chunk);
# on a CPU a few images, whose products stay in cache (measured: 256 MB chunks ran 2.5x slower than 16 MB)
CHUNK_BYTES = {"cuda": 256 << 20, "cpu": 16 << 20}


def _max_intensity_torch(
    St: torch.Tensor, G: torch.Tensor, lengths: torch.Tensor | None = None, chunk_bytes: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same q and H (B, N, P) with (b, N, P, P) tensors over chunks of images (GPU, or CPU without numba):
    a handful of kernels per chunk instead of per image, which on a GPU is what the time goes to. Padded pixels
    (zero rows of G) contribute nothing, so lengths only saves work in the kernel."""
    B, N, P = St.shape
    if chunk_bytes is None:
        chunk_bytes = CHUNK_BYTES["cuda" if St.device.type == "cuda" else "cpu"]
    step = max(1, chunk_bytes // max(1, N * P * P * St.element_size()))
    q = St.new_zeros(B)
    H = torch.zeros_like(St)
    for start in range(0, B, step):
        S, g = St[start : start + step], G[start : start + step]
        best, arg = (S.unsqueeze(3) * S.unsqueeze(2)).max(1)  # (b, P, P): max_n S_in S_jn, its n
        q[start : start + step] = (g * best).sum((1, 2))
        s_j = S.gather(1, arg)  # (b, P, P): S_{arg_ij, j}
        # H_{arg_ij, i} += G_ij S_{j, arg_ij}, built as H^T (b, P, N)
        Ht = S.new_zeros(S.shape[0], P, N).scatter_add_(2, arg, (g * s_j).to(S.dtype))
        H[start : start + step] = Ht.transpose(1, 2)
    return q, H


class _MaxIntensityQuadratic(torch.autograd.Function):
    """q_b = sum_ij G_ij max_n S_in S_jn for symmetric G (B, P, P) and concept-major St (B, N, P) = S^T;
    dq/dSt_ni = 2 H_ni (G and argmax symmetric)."""

    @staticmethod
    def forward(ctx, St: torch.Tensor, G: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
        if numba is not None and St.device.type == "cpu":
            q, H = _max_intensity_numba(St.detach(), G, lengths)
        else:
            q, H = _max_intensity_torch(St.detach(), G)
        ctx.save_for_backward(H)
        return q

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor):
        (H,) = ctx.saved_tensors
        return 2.0 * H * grad_q[:, None, None], None, None


def modularity_concept_major(
    St: torch.Tensor, graph: torch.Tensor, intensity: str = "max", lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Modularity Q (B,) of concept-major soft assignments St (B, N, P) (a trainer computes them as
    concepts @ pixels^T, whose gradient then reads the pixels row-major) on graphs (B, P, P) = B / 2m."""
    if intensity == "max":
        return _MaxIntensityQuadratic.apply(St, graph, lengths)
    if intensity == "sum":
        return (St * (St @ graph)).sum((1, 2))  # graph symmetric: S^T G = (G S)^T
    raise ValueError(f"intensity must be 'max' or 'sum', got {intensity!r}")


def modularity(
    S: torch.Tensor, graph: torch.Tensor, intensity: str = "max", lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Modularity Q (B,) of soft assignments S (B, P, N) on precomputed graphs (B, P, P) = B / 2m (zero rows
    and columns on padded pixels; ``lengths`` lets the kernel skip them)."""
    return modularity_concept_major(S.transpose(1, 2), graph, intensity, lengths)


def modularity_loss(x: torch.Tensor, S: torch.Tensor, intensity: str = "max") -> torch.Tensor:
    """Negative modularity -Q, averaged over the batch, of soft assignment S (B, P, N) on the graph of x."""
    with torch.no_grad():
        graph = modularity_graph(x)
    return -modularity(S, graph, intensity).mean()
