"""STEGO learner: the correspondence term against hand-computed values, the view bank, kNN, training."""

from __future__ import annotations

import pytest
import torch
from _learner_toys import early_late, toy_ctx, toy_features

from ussbench import registry
from ussbench.errors import ConfigError
from ussbench.feature_learners._training import (
    build_bank,
    derangement,
    five_crop_views,
    knn_table,
    resolve_steps,
)
from ussbench.feature_learners.stego import STEGO, stego_loss, stego_term

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on 2 shared cores: one torch thread


def _points(*vectors):
    """Vectors (each C values) as a (1, C, 1, n) map: one image, one row of n points."""
    return torch.tensor(vectors, dtype=torch.float32).t()[None, :, None, :]


def test_stego_term_matches_hand_computation():
    # features a=(1,0), b=(1,0), c=(0,1): Fc = [[1,1,0],[1,1,0],[0,0,1]]; pointwise centring removes the row
    # means (2/3, 2/3, 1/3) and restores the global mean 5/9 -> [[8,8,-1],[8,8,-1],[2,2,11]] / 9.
    f = _points((1, 0), (1, 0), (0, 1))
    # codes (1,0), (0,1), (0,1): Sc = [[1,0,0],[0,1,1],[0,1,1]] (no negatives, clamp inactive)
    z = _points((1, 0), (0, 1), (0, 1))
    b = 0.1
    loss = stego_term(f, f, z, z, shift=b).reshape(3, 3)
    expected = -torch.tensor(
        [[8 / 9 - b, 0, 0], [0, 8 / 9 - b, -1 / 9 - b], [0, 2 / 9 - b, 11 / 9 - b]], dtype=torch.float32
    ) * torch.tensor([[1, 0, 0], [0, 1, 1], [0, 1, 1]])
    torch.testing.assert_close(loss, expected)
    assert float(loss.mean()) == pytest.approx((-28 / 9 + 0.5) / 9, abs=1e-6)


def test_stego_term_zero_clamp_and_raw_correlation():
    f = _points((1, 0), (0, 1))  # Fc = I, not centred: pointwise=False
    z = _points((1, 0), (-1, 0))  # Sc = [[1,-1],[-1,1]]
    clamped = stego_term(f, f, z, z, 0.0, pointwise=False).reshape(2, 2)
    torch.testing.assert_close(clamped, torch.tensor([[-1.0, 0.0], [0.0, -1.0]]))
    raw = stego_term(f, f, z, z, 0.5, pointwise=False, zero_clamp=False).reshape(2, 2)
    # -Sc * (Fc - 0.5): diagonal -(1)(0.5), off-diagonal -(-1)(-0.5)
    torch.testing.assert_close(raw, torch.tensor([[-0.5, -0.5], [-0.5, -0.5]]))


def test_stego_loss_weights_and_pair_types():
    torch.manual_seed(0)
    feats = torch.randn(3, 4, 5, 5)
    code = torch.randn(3, 6, 5, 5, requires_grad=True)
    total, parts = stego_loss(feats, feats, code, code, (0.5, 0.25, 2.0), (0.1, 0.2, 0.3), samples=4)
    expected = 0.5 * parts["self"] + 0.25 * parts["knn"] + 2.0 * parts["rand"]
    torch.testing.assert_close(total, expected)
    total.backward()
    assert code.grad is not None and torch.isfinite(code.grad).all() and code.grad.abs().sum() > 0


def test_derangement_has_no_fixed_points():
    torch.manual_seed(0)
    for n in (2, 3, 7, 16):
        perm = derangement(n, torch.device("cpu"))
        assert sorted(perm.tolist()) == list(range(n))
        assert (perm != torch.arange(n)).all()


def test_knn_excludes_self_and_caps_k():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    nn = knn_table(x, torch.device("cpu"))
    assert nn.shape == (4, 3)  # k = min(30, N - 1)
    assert nn[:, 0].tolist() == [1, 0, 3, 2]
    assert all(i not in row for i, row in enumerate(nn.tolist()))
    with pytest.raises(ValueError, match="at least 2 views"):
        knn_table(x[:1], torch.device("cpu"))


def test_five_crop_with_a_window_spanning_the_grid_warns_and_keeps_distinct_views(caplog):
    fs = toy_features(n=2)  # grids 8x10 and 8x8: an 8-patch window spans both heights
    with caplog.at_level("WARNING"):
        bank = build_bank(fs, crop_size=8, crop_mode="five", device=torch.device("cpu"))
    assert bank.n_views == 3 + 1  # 8x10: left, right, centre; 8x8: the whole grid once
    assert "4 distinct views instead of 10" in caplog.text


def test_view_bank_windows_and_five_crop():
    fs = toy_features(n=2)  # grids 8x10 and 8x8
    bank = build_bank(fs, crop_size=20, crop_mode="five", device=torch.device("cpu"))
    assert bank.crop == 8  # clipped to the smallest grid side
    views = five_crop_views(torch.tensor([[8, 10]]), 6)
    assert views.tolist() == [[0, 0, 0], [0, 0, 4], [0, 2, 0], [0, 2, 4], [0, 1, 2]]
    # a window spanning a side: coinciding corners are one view (repeats were duplicate training views)
    assert five_crop_views(torch.tensor([[6, 6]]), 6).tolist() == [[0, 0, 0]]
    assert five_crop_views(torch.tensor([[6, 9]]), 6).tolist() == [[0, 0, 0], [0, 0, 3], [0, 0, 1]]
    bank = build_bank(fs, crop_size=4, crop_mode="five", device=torch.device("cpu"))
    assert bank.n_views == 10
    img, top, left = bank.windows(torch.tensor([1, 4]), torch.Generator())
    win = bank.gather("tokens", img, top, left)
    assert win.shape == (2, 4, 4, 16) and win.dtype == torch.float32
    torch.testing.assert_close(win[1], fs[0].tokens[2:6, 3:7].float())  # centre window of 8x10
    rnd = build_bank(fs, crop_size=5, crop_mode="random", device=torch.device("cpu"))
    img, top, left = rnd.windows(torch.tensor([0, 0, 0, 1]), torch.Generator().manual_seed(0))
    assert (top <= 3).all() and (left[:3] <= 5).all() and (left[3] <= 3)
    assert resolve_steps(100, 2.0, 10, 4) == 5 and resolve_steps(100, None, 10, 4) == 100


def _fixed_batch_loss(learner: STEGO, fs) -> float:
    """STEGO loss of the trained head (eval mode) on fixed 8x8 windows, fixed positives and sample points."""
    feats = torch.stack([im.tokens[:, :8].float() for im in fs]).permute(0, 3, 1, 2)
    head = learner.head_.eval()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(123)
        code = head(feats)
        weights = (learner.weight_self, learner.weight_knn, learner.weight_rand)
        shifts = tuple(learner.resolved_[f"shift_{p}"] for p in ("self", "knn", "rand"))
        total, _ = stego_loss(feats, feats.roll(2, 0), code, code.roll(2, 0), weights, shifts, samples=8)
    return float(total)


def test_stego_training_lowers_loss_and_is_deterministic():
    fs, ctx = toy_features(), toy_ctx()
    start = STEGO(steps=1, batch_size=4, crop_size=8, lr=5e-3).fit(fs, ctx)  # same seeded initialisation
    learner = STEGO(steps=50, batch_size=4, crop_size=8, lr=5e-3).fit(fs, ctx)
    log = learner.artifacts()["loss"]
    assert len(log["loss"]) == 50 and set(log) == {"loss", "base", "self", "knn", "rand"}
    assert _fixed_batch_loss(learner, fs) < _fixed_batch_loss(start, fs) - 0.01
    first, last = early_late(log["loss"])
    assert last < first
    out = learner.transform(fs, ctx)
    assert out[1].code.shape == (8, 8, 70) and out[0].code.shape == (8, 10, 70)
    assert out[0].code.dtype == torch.float32 and out.has_code
    again = STEGO(steps=50, batch_size=4, crop_size=8, lr=5e-3).fit(fs, ctx).transform(fs, ctx)
    torch.testing.assert_close(out[3].code, again[3].code, rtol=0, atol=0)


def test_stego_presets_load_and_bad_params_name_the_parameter():
    for name in ("stego", "stego_omh"):
        spec = registry.get("feature_learner", name)
        assert {"cocostuff27_vits8", "cocostuff27_vitb8", "cityscapes27_vitb8", "potsdam3_vits8"} <= set(
            spec.presets
        )
        for preset in spec.presets:
            params = registry.resolve_params(spec, {"num_classes": 27}, preset)
            learner = registry.instantiate(spec, params)
            assert learner.crop_mode == "five" and learner.omh is (name == "stego_omh")
        with pytest.raises(ConfigError, match="unknown preset"):
            registry.resolve_params(spec, None, "nope")
    assert (
        registry.resolve_params(registry.get("feature_learner", "stego"), None, "cocostuff27_vitb8")["dim"]
        == 90
    )
    with pytest.raises(ConfigError, match="feature_samples"):
        STEGO(feature_samples=0)
    with pytest.raises(ConfigError, match="crop_mode"):
        STEGO(crop_mode="six")
