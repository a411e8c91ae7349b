"""Log-domain Sinkhorn (ussbench.ot) against POT's ot.sinkhorn, marginals, small temperatures, errors."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch

from ussbench.errors import NumericalError
from ussbench.ot import sinkhorn_log, sinkhorn_log_potentials, sinkhorn_scaling

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on 2 shared cores: one torch thread


def _problem(n: int, m: int, seed: int, uniform: bool):
    rng = np.random.default_rng(seed)
    cost = rng.random((n, m))
    if uniform:
        a, b = np.full(n, 1 / n), np.full(m, 1 / m)
    else:
        a, b = rng.dirichlet(np.ones(n)), rng.dirichlet(np.ones(m))
    return cost, a, b


@pytest.mark.parametrize("epsilon", [1.0, 0.1, 0.02, 0.005])
@pytest.mark.parametrize("uniform", [True, False])
def test_matches_pot(epsilon: float, uniform: bool):
    cost, a, b = _problem(9, 6, seed=0, uniform=uniform)
    ref, info = ot.sinkhorn(
        a, b, cost, epsilon, method="sinkhorn_log", numItermax=20000, stopThr=1e-13, log=True
    )
    assert info["niter"] < 19999, "POT reference did not converge"
    plan = sinkhorn_log(
        torch.from_numpy(cost),
        epsilon,
        n_iter=20000,
        a=None if uniform else torch.from_numpy(a),
        b=None if uniform else torch.from_numpy(b),
        tol=1e-13,
    )
    assert plan.dtype == torch.float64
    np.testing.assert_allclose(plan.numpy(), ref, atol=1e-9)
    np.testing.assert_allclose(plan.sum(1).numpy(), a, atol=1e-10)
    np.testing.assert_allclose(plan.sum(0).numpy(), b, atol=1e-12)


def test_float32_small_temperature_is_finite_and_close():
    """Below temp 0.02 a plain-exp Sinkhorn underflows in fp32; the log-domain one stays accurate."""
    cost, a, b = _problem(40, 7, seed=3, uniform=True)
    cost = cost * 2.0  # cost range like 1 - cos
    epsilon = 0.01
    assert np.exp(-cost / epsilon).astype(np.float32).min() == 0.0  # plain kernel underflows
    ref, info = ot.sinkhorn(
        a, b, cost, epsilon, method="sinkhorn_log", numItermax=20000, stopThr=1e-12, log=True
    )
    assert info["niter"] < 19999, "POT reference did not converge"
    plan = sinkhorn_log(torch.from_numpy(cost).float(), epsilon, n_iter=info["niter"] + 100)
    assert plan.dtype == torch.float32
    assert torch.isfinite(plan).all()
    np.testing.assert_allclose(plan.double().numpy(), ref, atol=1e-5)


def test_column_marginal_exact_after_truncated_run():
    cost, _, b = _problem(50, 5, seed=4, uniform=False)
    plan = sinkhorn_log(torch.from_numpy(cost), 0.02, n_iter=3, b=torch.from_numpy(b))
    np.testing.assert_allclose(plan.sum(0).numpy(), b, atol=1e-12)


def test_batched_equals_per_item():
    costs = torch.rand(3, 8, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    batched = sinkhorn_log(costs, 0.05, n_iter=200)
    for i in range(3):
        torch.testing.assert_close(batched[i], sinkhorn_log(costs[i], 0.05, n_iter=200))


def test_warm_start_continues_from_previous_potentials():
    cost = torch.from_numpy(_problem(30, 4, seed=5, uniform=True)[0]) * 2
    full, _, g_full = sinkhorn_log_potentials(cost, 0.02, n_iter=400)
    first, _, g = sinkhorn_log_potentials(cost, 0.02, n_iter=200)
    second, _, _ = sinkhorn_log_potentials(cost, 0.02, n_iter=200, g_init=g)
    torch.testing.assert_close(second, full)
    cold = sinkhorn_log(cost, 0.02, n_iter=200)
    torch.testing.assert_close(cold, first)


def test_gradients_flow_through_iterations():
    cost = torch.rand(6, 4, dtype=torch.float64, requires_grad=True)
    plan = sinkhorn_log(cost, 0.1, n_iter=50)
    (plan * cost).sum().backward()
    assert cost.grad is not None and torch.isfinite(cost.grad).all() and cost.grad.abs().sum() > 0


def test_errors_name_the_parameter():
    cost = torch.rand(4, 3)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_log(cost, 0.0)
    with pytest.raises(ValueError, match="n_iter"):
        sinkhorn_log(cost, 0.1, n_iter=0)
    with pytest.raises(ValueError, match="marginal a"):
        sinkhorn_log(cost, 0.1, a=torch.full((5,), 0.2))
    with pytest.raises(NumericalError, match="NaN"):
        sinkhorn_log(torch.full((4, 3), float("nan")), 0.1)


def _reference_sinkhorn(cost: np.ndarray, epsilon: float, n_iter: int) -> np.ndarray:
    """Exactly n_iter (row update, column update) pairs of log-domain Sinkhorn, uniform marginals (numpy)."""
    from scipy.special import logsumexp

    n, m = cost.shape
    log_k = -cost / epsilon
    f, g = np.zeros(n), np.zeros(m)
    for _ in range(n_iter):
        f = -np.log(n) - logsumexp(log_k + g[None, :], axis=1)
        g = -np.log(m) - logsumexp(log_k + f[:, None], axis=0)
    return np.exp(log_k + f[:, None] + g[None, :])


@pytest.mark.parametrize("n_iter", [1, 2, 3, 10])
def test_truncated_run_does_exactly_n_iter_iterations(n_iter):
    """A truncated run (OTC uses 10 iterations) equals the reference after exactly n_iter iterations; one
    iteration fewer or more would be a different plan (checked to differ by far more than the tolerance)."""
    cost = 2.0 * _problem(60, 5, seed=6, uniform=True)[0]
    want = _reference_sinkhorn(cost, 0.05, n_iter)
    got = sinkhorn_log(torch.from_numpy(cost), 0.05, n_iter=n_iter).numpy()
    np.testing.assert_allclose(got, want, atol=1e-12)
    for other in (n_iter - 1, n_iter + 1):
        if other >= 1:
            assert np.abs(_reference_sinkhorn(cost, 0.05, other) - want).max() > 1e-6


@pytest.mark.parametrize("n_iter", [1, 2, 3, 10])
def test_scaling_domain_does_exactly_n_iter_iterations(n_iter):
    """OTC's Sinkhorn: the plan after exactly n_iter iterations of the transposed problem (column update
    first, rows last), at OTC's temperature 0.02 on a cosine-like cost, with and without a warm start."""
    cost = 2.0 * _problem(80, 6, seed=7, uniform=True)[0]
    want = _reference_sinkhorn(cost.T, 0.02, n_iter).T
    plan, log_u, log_v = sinkhorn_scaling(torch.from_numpy(-cost / 0.02), n_iter)
    np.testing.assert_allclose(plan.numpy(), want, rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(plan.sum(1).numpy(), np.full(80, 1 / 80), rtol=1e-12)
    np.testing.assert_allclose(
        plan.numpy(), np.exp(log_u.numpy()[:, None] - cost / 0.02 + log_v.numpy()[None, :]), rtol=1e-9
    )
    # warm start: n_iter more iterations continue the same sequence as 2 * n_iter from scratch
    again, _, _ = sinkhorn_scaling(torch.from_numpy(-cost / 0.02), n_iter, log_u_init=log_u)
    np.testing.assert_allclose(again.numpy(), _reference_sinkhorn(cost.T, 0.02, 2 * n_iter).T, rtol=1e-9)
    if n_iter > 1:
        assert np.abs(_reference_sinkhorn(cost.T, 0.02, n_iter - 1).T - want).max() > 1e-6
