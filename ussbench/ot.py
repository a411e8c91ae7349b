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
    iterations. With ``tol`` set, stops early once the row-marginal error is below it.
    """
    if epsilon <= 0:
        raise ValueError(f"sinkhorn epsilon must be > 0, got {epsilon}")
    if n_iter < 1:
        raise ValueError(f"sinkhorn n_iter must be >= 1, got {n_iter}")
    *batch, n, m = cost.shape
    dtype = cost.dtype if cost.dtype in (torch.float32, torch.float64) else torch.float32
    cost = cost.to(dtype)
    log_a = (
        a.to(dtype).log()
        if a is not None
        else torch.full((n,), -math.log(n), dtype=dtype, device=cost.device)
    )
    log_b = (
        b.to(dtype).log()
        if b is not None
        else torch.full((m,), -math.log(m), dtype=dtype, device=cost.device)
    )
    log_k = -cost / epsilon
    f = torch.zeros(*batch, n, dtype=dtype, device=cost.device)
    g = torch.zeros(*batch, m, dtype=dtype, device=cost.device)
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
    return plan
