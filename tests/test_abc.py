"""Attention-based clustering: loss values, blobs recovered, size bounds, architectures, errors, card."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _helpers import assert_rejects_degenerate_inputs, blobs, checked_card
from sklearn.metrics import adjusted_rand_score

import ussbench.dataset_clusterers.abc as abc_module
from ussbench.dataset_clusterers.abc import (
    ABCNet,
    AttentionClusterer,
    CrossAttention,
    FeedForward,
    abc_loss,
    bounded_offsets,
    cross_attend,
)
from ussbench.errors import ConfigError, NumericalError

pytestmark = pytest.mark.usefixtures("one_thread")


def _soft_sizes(model: AttentionClusterer, X: torch.Tensor) -> torch.Tensor:
    return F.relu(model.scores(X)).sum(0)


def test_loss_known_values():
    scores = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, -0.3]])
    # rows: sums 1, 1, 2, 0.5 -> mean(relu(1 - s)) = 0.5 / 4; columns: sums 2.5, 2 within [4/4, 4/sqrt(2)].
    # outᵀout off-diagonal: 2 * (1*1) = 2 -> "sum" 2, "per_point" 2 / 4.
    total, parts = abc_loss(scores, 2.0, 0.5, "sum")
    assert parts["coverage_rows"] == pytest.approx(0.125)
    assert parts["coverage_cols"] == pytest.approx(0.0)
    assert parts["disjointness"] == pytest.approx(2.0)
    assert float(total) == pytest.approx(2.125)
    _, parts = abc_loss(scores, 2.0, 0.5, "per_point")
    assert parts["disjointness"] == pytest.approx(0.5)
    # Tighter bounds: lower 4/2^1 = 2 (column 2 sum 2 ok), upper 4/2^1.5 = 1.414 -> excess (1.086 + 0.586) / 2.
    _, parts = abc_loss(scores, 1.0, 1.5, "sum")
    assert parts["coverage_cols"] == pytest.approx((2.5 - 4 / 2**1.5 + 2 - 4 / 2**1.5) / 2)
    _, parts = abc_loss(scores, 1.0, None, "sum")  # no upper bound
    assert parts["coverage_cols"] == pytest.approx(0.0)


def test_one_hot_balanced_assignment_has_zero_loss():
    scores = torch.eye(3).repeat(4, 1)  # 12 rows, each cluster 4 rows
    total, _ = abc_loss(scores, 2.0, 0.5, "per_point")
    assert float(total) == 0.0


@pytest.mark.parametrize("architecture", ["attn_mlp", "2attn_mlp", "identical", "mlp"])
def test_blobs_recovered_and_loss_decreases(architecture):
    X, y = blobs([50, 50, 50, 50], seed=0)
    model = AttentionClusterer(4, architecture=architecture, lr=1e-3, epochs=60, seed=0).fit(X)
    labels = model.predict(X)
    assert labels.dtype == torch.int64 and labels.shape == (200,)
    assert adjusted_rand_score(y, labels.numpy()) == 1.0
    assert torch.equal(labels, model.labels_)
    assert len(model.loss_history_) == 60
    assert model.loss_history_[-1] < 0.5 * model.loss_history_[0]
    sizes = torch.bincount(labels, minlength=4)
    assert sizes.min() >= 200 / 4**2 and sizes.max() <= 200 / 4**0.5


def test_soft_size_bounds_are_enforced_when_active():
    """The study's reading (sizes = soft sums of ReLU(cos)): the soft sums are pushed inside the bounds."""
    # Lower bound N/k^2 = 34.7 above a 12-point blob: the small cluster is pushed up to the bound.
    X, _ = blobs([150, 150, 12], seed=0)
    soft = {"size_bounds": "soft", "bound_assign": False}
    model = AttentionClusterer(3, lr=1e-3, epochs=60, seed=0, **soft).fit(X)
    assert _soft_sizes(model, X).min() >= 0.9 * 312 / 3**2
    # Upper bound N/sqrt(k) = 130 below a 200-point blob: its soft mass is pushed down to the bound.
    X, _ = blobs([200, 20, 20, 20], seed=0)
    model = AttentionClusterer(4, lr=1e-3, epochs=60, seed=0, **soft).fit(X)
    soft_sizes = _soft_sizes(model, X)
    assert soft_sizes.max() <= 1.05 * 260 / 4**0.5
    assert soft_sizes.min() >= 0.9 * 260 / 4**2
    # Without an upper bound the big blob keeps (about) all its mass.
    free = AttentionClusterer(4, lr=1e-3, epochs=60, seed=0, max_size_exponent=None, **soft).fit(X)
    assert _soft_sizes(free, X).max() > 1.2 * 260 / 4**0.5


@pytest.mark.parametrize(
    ("sizes", "k"), [([300, 30, 30, 30], 4), ([150, 150, 12], 3), ([400, 100, 50, 20, 10], 5)]
)
def test_size_bounds_hold_on_the_argmax_counts(sizes, k):
    """Unequal blobs: the study's soft sums sit inside the bounds while the argmax breaks them; the default
    (hard-count sizes + calibrated assignment) puts every cluster's hard count in [N/k^2, N/sqrt(k)]."""
    X, _ = blobs(sizes, seed=0)
    n = sum(sizes)
    lower, upper = n / k**2, n / k**0.5
    study = AttentionClusterer(k, lr=1e-3, epochs=40, seed=0, size_bounds="soft", bound_assign=False).fit(X)
    counts = torch.bincount(study.predict(X), minlength=k)
    assert ((counts < lower) | (counts > upper)).any(), counts  # the flaw the hard bounds fix
    model = AttentionClusterer(k, lr=1e-3, epochs=40, seed=0).fit(X)
    counts = torch.bincount(model.predict(X), minlength=k)
    assert counts.min() >= lower and counts.max() <= upper, counts
    assert model.fraction_within_bounds() == 1.0
    assert model.artifacts()["within_bounds"] == 1.0
    assert torch.equal(model.predict(X), model.labels_)


def test_hard_size_loss_tracks_argmax_counts():
    """'hard' sizes are a low-temperature softmax of the scores: close to the argmax counts, unlike the soft
    sums of ReLU(cos) (here every row scores about 0.3 for every cluster and prefers one by 0.05)."""
    g = torch.Generator().manual_seed(0)
    scores = 0.3 + 0.01 * torch.rand(200, 4, generator=g)
    scores[:150, 0] += 0.05  # 150 rows prefer cluster 0
    hard_counts = torch.bincount(scores.argmax(1), minlength=4).float()
    assert hard_counts[0] >= 150
    tempered = (scores / 0.005).softmax(1).sum(0)
    assert (tempered - hard_counts).abs().max() < 20
    assert F.relu(scores).sum(0).max() < 80  # soft sums: all clusters look alike
    # upper bound 200 / 4^0.5 = 100 < 150: only the hard reading sees the violation
    _, soft_parts = abc_loss(scores, 2.0, 0.5, "per_point", "soft")
    _, hard_parts = abc_loss(scores, 2.0, 0.5, "per_point", "hard", 0.005)
    assert soft_parts["coverage_cols"] == 0.0
    assert hard_parts["coverage_cols"] > 5


def test_bounded_offsets_reach_the_constrained_optimum():
    """The calibrated argmax is the score-maximising assignment under the size bounds (checked against the
    linear program, whose optimum is integral), with every count inside the bounds."""
    from scipy.optimize import linprog

    g = torch.Generator().manual_seed(3)
    n, k, lower, upper = 60, 4, 8.0, 20.0
    scores = torch.rand(n, k, generator=g)
    scores[:40, 0] += 0.5  # cluster 0 is everyone's favourite
    offsets, rounds = bounded_offsets(scores, lower, upper)
    labels = (scores.double() + offsets).argmax(1)
    counts = torch.bincount(labels, minlength=k)
    assert counts.min() >= lower and counts.max() <= upper and rounds > 0
    got = float(scores.double()[torch.arange(n), labels].sum())
    A_eq = torch.zeros(n, n * k)
    for i in range(n):
        A_eq[i, i * k : (i + 1) * k] = 1
    cols = torch.zeros(k, n * k)
    for j in range(k):
        cols[j, j::k] = 1
    res = linprog(
        -scores.double().reshape(-1).numpy(),
        A_ub=torch.cat([cols, -cols]).numpy(),
        b_ub=[upper] * k + [-lower] * k,
        A_eq=A_eq.numpy(),
        b_eq=[1] * n,
        bounds=(0, 1),
    )
    assert res.status == 0
    assert got == pytest.approx(-res.fun, abs=1e-6)


def test_folded_cross_attention_equals_multihead_attention():
    g = torch.Generator().manual_seed(0)
    for heads in (1, 4):
        mha = torch.nn.MultiheadAttention(16, heads, batch_first=True).double()
        with torch.no_grad():
            for p in mha.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
        y = torch.randn(50, 16, generator=g, dtype=torch.float64)
        m = torch.randn(7, 16, generator=g, dtype=torch.float64)
        ref = mha(y[None], m[None], m[None], need_weights=False)[0][0]
        torch.testing.assert_close(cross_attend(y, m, mha), ref)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precisions_recover_blobs(precision):
    X, y = blobs([40, 40, 40], seed=5)
    model = AttentionClusterer(3, lr=1e-3, epochs=30, seed=0, precision=precision).fit(X)
    assert adjusted_rand_score(y, model.labels_.numpy()) == 1.0
    assert model.artifacts()["precision"] == precision


def test_architecture_layouts():
    centres = torch.randn(5, 8)
    counts = {}
    for arch in ("attn_mlp", "2attn_mlp", "identical", "mlp"):
        net = ABCNet(centres, arch, n_steps=2, n_heads=2, mlp_ratio=2.0)
        counts[arch] = (
            sum(isinstance(b, CrossAttention) for b in net.blocks),
            sum(isinstance(b, FeedForward) for b in net.blocks),
        )
    assert counts == {"attn_mlp": (2, 2), "2attn_mlp": (4, 2), "identical": (0, 0), "mlp": (0, 2)}
    assert [n for n, _ in ABCNet(centres, "identical", 1, 1, 4.0).named_parameters()] == ["centres"]


def test_initial_scores_are_correlations_with_the_seeds():
    """Zero-initialised residual branches: before training Y = LayerNorm(X)."""
    gen = torch.Generator().manual_seed(0)
    x, centres = torch.randn(7, 8, generator=gen), torch.randn(3, 8, generator=gen)
    net = ABCNet(centres, "attn_mlp", 1, 1, 4.0)
    expected = (
        F.normalize(x - x.mean(1, keepdim=True), dim=1)
        @ F.normalize(centres - centres.mean(1, keepdim=True), dim=1).T
    )
    torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=1e-5)
    identical = ABCNet(centres, "identical", 1, 1, 4.0)
    torch.testing.assert_close(identical(x), F.normalize(x, dim=1) @ F.normalize(centres, dim=1).T)


def test_seeded_and_deterministic():
    X, _ = blobs([30, 30, 30], seed=2)
    a = AttentionClusterer(3, epochs=5, seed=4).fit(X)
    b = AttentionClusterer(3, epochs=5, seed=4).fit(X)
    assert a.loss_history_ == b.loss_history_
    assert torch.equal(a.labels_, b.labels_)
    c = AttentionClusterer(3, epochs=5, seed=5).fit(X)
    assert a.loss_history_ != c.loss_history_


def test_nan_loss_raises(monkeypatch):
    X, _ = blobs([20, 20], seed=3)

    def nan_loss(*args, **kwargs):
        return torch.tensor(float("nan"), requires_grad=True), {}

    monkeypatch.setattr(abc_module, "abc_loss", nan_loss)
    with pytest.raises(NumericalError, match="epoch 0"):
        AttentionClusterer(2, epochs=2).fit(X)


def test_degenerate_inputs_raise_clear_errors():
    X, _ = blobs([10, 10], seed=8)
    model = AttentionClusterer(5, epochs=1)
    assert_rejects_degenerate_inputs(model.fit, X, 5, bad_entry=(7, 3, float("nan")), zero_row=1)
    with pytest.raises(RuntimeError, match="fit"):
        AttentionClusterer(2).predict(X)


def test_bad_parameters_raise():
    with pytest.raises(ConfigError, match="architecture"):
        AttentionClusterer(architecture="transformer")
    with pytest.raises(ConfigError, match="max_size_exponent"):
        AttentionClusterer(min_size_exponent=0.5, max_size_exponent=2.0)
    with pytest.raises(ConfigError, match="disjointness"):
        AttentionClusterer(disjointness="mean")
    with pytest.raises(ConfigError, match="size_bounds"):
        AttentionClusterer(size_bounds="argmax")
    with pytest.raises(ConfigError, match="min_size_exponent"):
        AttentionClusterer(min_size_exponent=0.8, max_size_exponent=None)
    with pytest.raises(ConfigError, match="precision"):
        AttentionClusterer(precision="fp16")
    with pytest.raises(ConfigError, match="lr"):
        AttentionClusterer(lr=0)
    X, _ = blobs([10, 10], seed=9)
    with pytest.raises(ConfigError, match="n_heads=3"):
        AttentionClusterer(2, n_heads=3, epochs=1).fit(X)


def test_card_matches_registry():
    card = checked_card("dataset_clusterer", "abc", "ussbench.dataset_clusterers.abc:AttentionClusterer")
    assert {p["value"] for p in card["published"]} >= {30.42, 25.64, 13.47, 26.38, 25.1895, 26.72, 27.11}


def test_multi_tensor_adamw_changes_no_bits(monkeypatch):
    """ABC steps AdamW 'foreach' (faster): the trained weights equal the default per-tensor loop's bit for bit,
    so results (and committed reports' cell ids) do not depend on it."""
    X, _ = blobs([40, 25, 30], seed=6)
    fast = AttentionClusterer(3, epochs=4, batch_size=32, seed=1).fit(X)
    monkeypatch.setattr(abc_module, "adamw", lambda p, lr, wd: torch.optim.AdamW(p, lr=lr, weight_decay=wd))
    loop = AttentionClusterer(3, epochs=4, batch_size=32, seed=1).fit(X)
    assert fast.loss_history_ == loop.loss_history_
    for a, b in zip(fast.net_.parameters(), loop.net_.parameters(), strict=True):
        assert torch.equal(a, b)
