"""Entropic optimal transport in the log domain (stable at small temperatures, differentiable in torch).

Shared by the OT clusterer (issue 4) and OMH's hierarchy plans (issue 5); tested against POT's
``ot.sinkhorn``. NaN/inf never pass silently: they raise NumericalError.
"""

from __future__ import annotations

import math

import torch

from .errors import NumericalError


def sinkhorn_log(
    cost: torch.Tensor,
    epsilon: float,
    n_iter: int = 100,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    tol: float | None = None,
) -> torch.Tensor:
    """Transport plan P (n, m) minimising <P, cost> - epsilon * H(P) with marginals a (n,) and b (m,).

    Uniform marginals when a / b are None. Works on (..., n, m) batches; gradients flow through the
    iterations. With ``tol`` set, stops early once the row-marginal error is below it. The last update is
    the column one, so the column marginals hold exactly and the rows carry the truncation error.
    """
    return sinkhorn_log_potentials(cost, epsilon, n_iter, a, b, tol)[0]


def sinkhorn_log_potentials(
    cost: torch.Tensor,
    epsilon: float,
    n_iter: int = 100,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    tol: float | None = None,
    g_init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As :func:`sinkhorn_log`, also returning the log-scalings f (..., n) and g (..., m).

    ``g_init`` warm-starts the column scaling (e.g. from the previous call of an outer loop whose cost
    changes slowly), so truncated runs keep converging across calls. P = exp(f + g - cost / epsilon).
    """
    if epsilon <= 0:
        raise ValueError(f"sinkhorn epsilon must be > 0, got {epsilon}")
    if n_iter < 1:
        raise ValueError(f"sinkhorn n_iter must be >= 1, got {n_iter}")
    *batch, n, m = cost.shape
    dtype = cost.dtype if cost.dtype in (torch.float32, torch.float64) else torch.float32
    dev = cost.device
    cost = cost.to(dtype)
    log_a = _log_marginal(a, n, "a", dtype, dev)
    log_b = _log_marginal(b, m, "b", dtype, dev)
    log_k = -cost / epsilon
    f = torch.zeros(*batch, n, dtype=dtype, device=dev)
    g = torch.zeros(*batch, m, dtype=dtype, device=dev)
    if g_init is not None:
        g = g + g_init.to(dtype=dtype, device=dev)
    for _ in range(n_iter):
        f = log_a - torch.logsumexp(log_k + g.unsqueeze(-2), dim=-1)
        g = log_b - torch.logsumexp(log_k + f.unsqueeze(-1), dim=-2)
        if tol is not None:
            row = torch.logsumexp(log_k + f.unsqueeze(-1) + g.unsqueeze(-2), dim=-1).exp()
            if float((row - log_a.exp()).abs().sum(-1).max()) < tol:
                break
    plan = (log_k + f.unsqueeze(-1) + g.unsqueeze(-2)).exp()
    if not torch.isfinite(plan).all():
        raise NumericalError(
            f"sinkhorn produced NaN/inf (epsilon={epsilon}, cost range [{float(cost.min()):.3g}, "
            f"{float(cost.max()):.3g}]); raise epsilon or use float64"
        )
    return plan, f, g


def _log_marginal(
    w: torch.Tensor | None, size: int, name: str, dtype: torch.dtype, dev: torch.device
) -> torch.Tensor:
    """log of a marginal (uniform when None), checked for length and negative entries."""
    if w is None:
        return torch.full((size,), -math.log(size), dtype=dtype, device=dev)
    w = w.to(dtype=dtype, device=dev)
    if w.shape[-1] != size:
        raise ValueError(f"sinkhorn marginal {name} has length {w.shape[-1]}, expected {size}")
    if bool((w < 0).any()):
        raise ValueError(f"sinkhorn marginal {name} has negative entries")
    return w.log()


def sinkhorn_scaling(
    logits: torch.Tensor,
    n_iter: int,
    log_u_init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform-marginal Sinkhorn on the kernel exp(logits) (n, m) in the scaling domain, float64.

    The same iterates as :func:`sinkhorn_log_potentials` on the transposed (m, n) problem (column update
    first, the row update last, so every row of the plan sums exactly to 1/n), but the kernel is
    exponentiated once per call instead of twice per iteration: K = exp(logits - rowmax) in float64 holds
    every entry of a temperature as small as 0.01 on cosine logits without underflow, and each iteration
    is two matrix-vector products. ``log_u_init`` (n,) warm-starts the row log-scalings (as returned).
    Returns (plan (n, m) float64, log_u (n,), log_v (m,)) with plan_ij = exp(log_u_i + logits_ij + log_v_j).
    """
    if n_iter < 1:
        raise ValueError(f"sinkhorn n_iter must be >= 1, got {n_iter}")
    n, m = logits.shape
    L = logits.double()
    rowmax = L.amax(1)
    K = (L - rowmax.unsqueeze(1)).exp_()  # (n, m), entries in (0, 1]: each row's largest is exactly 1
    # u_tilde = u * exp(rowmax): the row scaling of the stabilised kernel
    u = torch.zeros(n, dtype=torch.float64, device=L.device) if log_u_init is None else log_u_init.double()
    u = (u + rowmax).exp_()
    a, b = 1.0 / n, 1.0 / m
    for _ in range(n_iter):
        v = b / (u @ K)  # column (cluster) update
        u = a / (K @ v)  # row (point) update: rows exact
    log_v = v.log()
    log_u = u.log() - rowmax
    if not (torch.isfinite(log_u).all() and torch.isfinite(log_v).all()):
        raise NumericalError("sinkhorn (scaling domain) produced NaN/inf scalings; raise the temperature")
    return K.mul_(u.unsqueeze(1)).mul_(v.unsqueeze(0)), log_u, log_v
