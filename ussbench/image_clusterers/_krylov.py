"""Batched block-Krylov eigensolver for DSM: the k smallest pairs of (D - W) v = lam D v for a stack of graphs.

The smallest eigenvalues of the normalised Laplacian I - A, A = D^-1/2 W D^-1/2, are the largest of A, an
extremal end of its spectrum, which a block Krylov space reaches in a few steps. Per image (all images of a
stack at once, as batched matrix products):

1. start block: u0 = D^1/2 1 / |.| (A's exact top eigenvector, eigenvalue 1) and ``block`` random columns,
2. ``steps`` block-Lanczos steps: Z = A Q_i, orthogonalised against the whole basis twice (classical
   Gram-Schmidt, twice is enough; once for the last block, whose remainder only gives the residual
   estimate) and normalised by Cholesky QR twice (Gram matrices in float64);
   A's projection H = V^T A V is filled from the same coefficients, so the basis is multiplied by A once,
3. Rayleigh-Ritz: the k largest eigenpairs of H (float64, the batch split over threads on a CPU, where one
   LAPACK call per image runs on one core), Ritz vectors u = V y, v = D^-1/2 u (so v^T D v = 1),
4. a convergence check: images with a Ritz residual above ``tol`` are solved densely instead.

The products with W (the only O(P^2) work) run in W's dtype (float32 in DSM's krylov path); the random
start comes from a CPU generator seeded by ``seed``, so the start is the same on any device (float32
arithmetic still differs between a CPU and a GPU). A
stack too small for the basis, or an image whose Krylov space degenerates (fewer distinct eigenvalues than
the basis needs) or does not converge, is solved densely instead. Accuracy and speed against scipy's eigsh are
measured by ``benchmarks/perf/clusterers_study.py`` (section dsm_eigs); most of DSM's 20 eigenvalues sit in
a cluster near 1 with gaps down to 1e-6, which a too small basis leaves unresolved (see KRYLOV_BLOCK).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch

from ..errors import NumericalError

# Block size and steps (a basis of 1 + 10 * 8 = 81 vectors for DSM's K = 20): on MSRC-v2's 591 graphs (keys,
# the reference preset) every one of the 11,229 non-constant eigenvectors came within 1e-4 of eigsh's (the
# largest difference 3.2e-5; CamVid test: all 4,427); with 6 steps 1 to 3 of them did not (seeds 0-2), with
# blocks of 24 and 3 steps 24, with blocks of 16 and 4 steps 12.
KRYLOV_BLOCK = 10
KRYLOV_STEPS = 7
# An image with a Ritz pair whose residual |A u - theta u| (the Lanczos estimate) exceeds KRYLOV_TOL is solved
# densely (LAPACK MRRR, float64). On MSRC-v2's 591 graphs every estimate was below 1e-7; on random graphs whose
# wanted eigenvalues sit at the edge of a continuous bulk, the images with vectors off by more than 1e-4 had
# estimates above 1e-5.
KRYLOV_TOL = 1e-6


def _orthonormal_rows(Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of Z (B, b, P) -> (Q, ok): orthonormal rows spanning Z's by Cholesky QR twice (Gram matrices in
    float64); ok (B,) False where Z's rows were (numerically) dependent."""
    ok = torch.ones(Z.shape[0], dtype=torch.bool, device=Z.device)
    eye = torch.eye(Z.shape[1], dtype=torch.float64, device=Z.device).expand(Z.shape[0], -1, -1)
    for _ in range(2):
        G = (Z @ Z.transpose(1, 2)).double()
        L, info = torch.linalg.cholesky_ex(G)
        ok &= info == 0
        L = torch.where(ok[:, None, None], L, eye)
        # L^-1 of the small (b x b) factor, then one product: a batched triangular solve with the (b x P)
        # rows cost 8x more here (per-matrix LAPACK calls and layout copies)
        Z = torch.linalg.solve_triangular(L, eye, upper=False).to(Z.dtype) @ Z
    return Z, ok


def _eigh_threads(H: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.linalg.eigh of a stack; on a CPU the stack is split over torch's threads (the batched call runs
    one LAPACK call per matrix after another; measured for 64 x (97 x 97): 0.56 -> 0.33 ms per matrix on 2 cores)."""
    n_threads = torch.get_num_threads()
    if H.device.type != "cpu" or n_threads < 2 or H.shape[0] < 2:
        return torch.linalg.eigh(H)
    parts = H.tensor_split(min(n_threads, H.shape[0]))
    with ThreadPoolExecutor(len(parts)) as pool:
        done = list(pool.map(torch.linalg.eigh, parts))
    return torch.cat([d[0] for d in done]), torch.cat([d[1] for d in done])


def _dense_smallest(W: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 dense fallback: batched eigh on a GPU, LAPACK MRRR for the k wanted pairs on a CPU."""
    from . import _spectral as sp

    if W.device.type == "cuda":
        return sp.eigh_smallest(W.double(), k)
    return sp.lapack_smallest(W.double(), k)


def krylov_basis_size(block: int, steps: int) -> int:
    """Columns of the Krylov basis: u0 plus ``block`` per block (the start block and one per step)."""
    return 1 + block * (steps + 1)


def krylov_smallest(
    W: torch.Tensor,
    k: int,
    block: int = KRYLOV_BLOCK,
    steps: int = KRYLOV_STEPS,
    seed: int = 0,
    tol: float = KRYLOV_TOL,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest k eigenpairs of (D - W) v = lam D v for a stack W (B, P, P) by block Krylov + Rayleigh-Ritz.

    Returns eigvals (B, k) ascending (float64) and vecs (B, P, k) in W's dtype with v^T D v = 1, like
    ``_spectral.eigh_smallest``. Falls back to a dense solver for stacks too small for the basis
    (P < 1 + block * (steps + 1)) and for the images whose basis degenerates or whose Ritz residuals exceed
    ``tol`` (a spectrum the basis cannot resolve).
    """
    if W.ndim != 3 or W.shape[-1] != W.shape[-2]:
        raise ValueError(f"expected a (B, P, P) stack of affinities, got shape {tuple(W.shape)}")
    B, P, _ = W.shape
    if not 1 <= k <= P:
        raise ValueError(f"cannot take {k} eigenvectors of a {P}-node graph")
    if block < 1 or steps < 0:
        raise ValueError(f"krylov: block must be >= 1 and steps >= 0, got block={block}, steps={steps}")
    m = krylov_basis_size(block, steps)
    if m > P or k > m:
        evals, vecs = _dense_smallest(W, k)
        return evals, vecs.to(W.dtype)
    dt = W.dtype
    row_sums = W.sum(-1).double()  # (sum(dtype=float64) would first copy all of W to float64)
    deg = torch.where(row_sums < 1e-12, torch.ones_like(row_sums), row_sums)  # as sp.degrees
    dm = deg.rsqrt().to(dt)[:, None, :]  # (B, 1, P): scales rows of the basis (kept as rows, see below)
    # The basis is stored as rows (B, m, P): a block is a contiguous slice, and since W is symmetric
    # (A Q)^T = Q^T A is a plain product of the rows with W.
    V = torch.empty(B, m, P, dtype=dt, device=W.device)
    H = torch.zeros(B, m, m, dtype=torch.float64, device=W.device)
    u0 = deg.sqrt()
    V[:, 0] = (u0 / u0.norm(dim=1, keepdim=True)).to(dt)
    gen = torch.Generator().manual_seed(int(seed))
    X = torch.randn(B, block, P, generator=gen, dtype=torch.float32).to(W.device, dt)
    v0 = V[:, :1]
    X = X - (X @ v0.transpose(1, 2)) @ v0
    V[:, 1 : 1 + block], ok = _orthonormal_rows(X)
    # u0^T A u0 = sum(W 1) / sum(deg) (1 unless a node is isolated), with no product with W
    H[:, 0, 0] = row_sums.sum(1) / deg.sum(1)
    for i in range(steps + 1):
        lo, hi = 1 + i * block, 1 + (i + 1) * block
        Z = ((V[:, lo:hi] * dm) @ W) * dm  # rows of A Q_i
        basis = V[:, :hi]
        C = Z @ basis.transpose(1, 2)  # (B, block, hi): H's rows lo:hi up to column hi
        Z = torch.baddbmm(Z, C, basis, alpha=-1)
        if i < steps:
            C2 = Z @ basis.transpose(1, 2)
            Z = torch.baddbmm(Z, C2, basis, alpha=-1)
            C = C + C2
        H[:, lo:hi, :hi] = C
        H[:, :hi, lo:hi] = C.transpose(1, 2)
        if i == steps:
            break
        V[:, hi : hi + block], ok_i = _orthonormal_rows(Z)
        ok &= ok_i
    # with no isolated node A u0 = u0 exactly, so H's first row and column are (1, 0, ..., 0): set them so
    # (their float32 values are rounding noise that would tilt the constant eigenvector by about 1e-5)
    connected = (row_sums >= 1e-12).all(1)
    H[:, 0, 1:] = torch.where(connected[:, None], 0.0, H[:, 0, 1:])
    H[:, 1:, 0] = H[:, 0, 1:]
    theta, Y = _eigh_threads(H)
    theta, Y = theta[:, -k:].flip(-1), Y[:, :, -k:].flip(-1)
    # Convergence: A V - V H = R e_last^T, R (rows Z) the last block's product less its projection on the
    # basis, so a Ritz pair's residual |A u - theta u| is |R^T y_last| (y's last block): as ARPACK's estimate,
    # it is not swamped by the float32 rounding of a product with W (about 1e-6 on DINOv2's near-constant W).
    residual = (Y[:, -block:].transpose(1, 2).to(dt) @ Z).norm(dim=-1)  # (B, k)
    ok &= residual.amax(1) <= tol
    U = Y.to(dt).transpose(1, 2) @ V  # (B, k, P): the Ritz vectors u (unit rows)
    vecs = (U * dm).transpose(1, 2)  # (B, P, k), v = D^-1/2 u
    evals = 1.0 - theta
    if not bool(ok.all()):  # unconverged or degenerate Krylov space: solve those images densely
        bad = (~ok).nonzero().squeeze(1)
        e_bad, v_bad = _dense_smallest(W[bad], k)
        evals[bad], vecs[bad] = e_bad, v_bad.to(dt)
    if not bool(torch.isfinite(evals).all()) or not math.isfinite(float(vecs.abs().max())):
        raise NumericalError("krylov eigensolver returned NaN or inf")
    return evals, vecs.contiguous()
