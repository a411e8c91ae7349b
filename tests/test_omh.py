"""OMH: level sizes, Sinkhorn plan marginals, matching loss (0 when levels agree), variants and training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _learner_toys import toy_ctx, toy_features

from tests.conftest import tiny_grid
from ussbench import registry
from ussbench.config import load_grid
from ussbench.errors import ConfigError
from ussbench.feature_learners.omh import (
    OMHHeads,
    cluster_loss,
    hierarchy_plan,
    level_sizes,
    matching_loss,
    plot_hierarchy,
    soft_assign,
    transported,
)
from ussbench.feature_learners.stego import STEGO
from ussbench.runner import run_grid

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on 2 shared cores: one torch thread


def test_level_sizes():
    assert level_sizes(27, 3, 2.0) == [27, 54, 108]  # the paper's example
    assert level_sizes(21, 3, 1.5) == [21, 32, 47]  # 31.5 and 47.25 rounded half up
    assert level_sizes(11, 1, 3.0) == [11]


def test_soft_assign_clips_negative_similarity():
    x = torch.tensor([[1.0, 0.0], [-1.0, 1.0]])
    centres = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    m = soft_assign(x, centres)
    torch.testing.assert_close(m, torch.tensor([[1.0, 0.0], [0.0, 2**-0.5]]))


def test_cluster_loss_hand_value():
    m = torch.tensor([[0.2, 0.7], [0.5, 0.1]])
    assert float(cluster_loss(m)) == pytest.approx(-(0.7 + 0.5) / 2)


def test_sinkhorn_plan_marginals():
    torch.manual_seed(0)
    coarse, fine = torch.randn(4, 6), torch.randn(8, 6)
    a, z = hierarchy_plan(coarse, fine, epsilon=0.05, n_iter=2000)
    assert a.shape == (4, 8) and z.shape == (4, 8) and (z >= 0).all() and (z <= 1 + 1e-6).all()
    torch.testing.assert_close(a.sum(0), torch.ones(8), atol=1e-5, rtol=0)  # each finer cluster sends 1
    torch.testing.assert_close(a.sum(1), torch.full((4,), 2.0), atol=1e-3, rtol=0)  # rho = 8 / 4
    assert (a >= 0).all() and float(a.max()) <= 1 + 1e-5


def test_plan_is_sparser_at_lower_temperature():
    torch.manual_seed(1)
    coarse, fine = torch.randn(5, 8), torch.randn(10, 8)
    entropy = []
    for eps in (0.02, 0.1):
        a, _ = hierarchy_plan(coarse, fine, eps, n_iter=500)
        p = a / a.sum()
        entropy.append(float(-(p * p.clamp_min(1e-30).log()).sum()))
    assert entropy[0] < entropy[1]


def test_matching_loss_is_zero_when_levels_agree():
    # parent k owns children 2k and 2k+1; each pixel's parent activation is the max of its children's
    a = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    m_fine = torch.tensor([[0.9, 0.2, 0.0, 0.1], [0.0, 0.0, 0.3, 0.8], [0.4, 0.5, 0.6, 0.0]])
    m_coarse = torch.tensor([[0.9, 0.1], [0.0, 0.8], [0.5, 0.6]])
    assert float(matching_loss(a, m_coarse, m_fine)) == 0.0
    # one disagreement of 0.3 on one of three pixels -> mean 0.1
    m_coarse[0, 0] = 0.6
    assert float(matching_loss(a, m_coarse, m_fine)) == pytest.approx(0.1)


def test_matching_loss_zero_for_identical_levels_through_ot():
    centres = torch.eye(4, 6) * 3  # orthogonal centres: cost 0 on the diagonal, 1 elsewhere
    a, _ = hierarchy_plan(centres, centres.clone(), epsilon=0.02)
    torch.testing.assert_close(a, torch.eye(4), atol=1e-6, rtol=0)
    x = torch.randn(20, 6)
    m = soft_assign(x, centres)
    assert float(matching_loss(a, m, m)) < 1e-6
    heads = OMHHeads(4, 6, levels=2, expansion=1.0)
    with torch.no_grad():
        heads.heads[0].weight.copy_(centres)
        heads.heads[1].weight.copy_(centres)
    with torch.no_grad():
        cluster, match = heads.losses(x)
    assert float(match) < 1e-6
    assert float(cluster) == pytest.approx(2 * float(cluster_loss(m)), rel=1e-6)


def test_transported_matches_brute_force_max_and_gradient():
    torch.manual_seed(2)
    a = torch.rand(3, 5, requires_grad=True)
    m_fine = torch.rand(7, 5, requires_grad=True)
    got = transported(a, m_fine)
    want = (a[None] * m_fine[:, None, :]).amax(-1)
    torch.testing.assert_close(got, want)
    w = torch.randn(7, 3)
    g1 = torch.autograd.grad((got * w).sum(), (a, m_fine))
    g2 = torch.autograd.grad((want * w).sum(), (a, m_fine))
    for x, y in zip(g1, g2):
        torch.testing.assert_close(x, y)


def test_omh_heads_gradients_reach_features_and_centres():
    torch.manual_seed(3)
    heads = OMHHeads(3, 8, levels=3, expansion=2.0)
    assert heads.sizes == [3, 6, 12]
    code = torch.randn(2, 8, 4, 4, requires_grad=True)  # no stop-gradient: sparsity reaches the code
    cluster, match = heads.losses(code)
    (0.01 * cluster + 0.3 * match).backward()
    assert code.grad is not None and code.grad.abs().sum() > 0
    assert all(h.weight.grad is not None and h.weight.grad.abs().sum() > 0 for h in heads.heads)
    _, no_match = heads.losses(code, with_match=False)
    assert float(no_match) == 0.0
    info = heads.hierarchy()
    assert info["sizes"] == [3, 6, 12] and [p.shape for p in info["plans"]] == [(3, 6), (6, 12)]


def test_omh_variants_and_ablation_params():
    for base in ("stego", "hp", "smooseg"):
        plain, with_omh = (
            registry.get("feature_learner", base),
            registry.get("feature_learner", base + "_omh"),
        )
        assert plain.defaults()["omh"] is False and with_omh.defaults()["omh"] is True
        assert {k: v for k, v in plain.defaults().items() if k != "omh"} == {
            k: v for k, v in with_omh.defaults().items() if k != "omh"
        }
        assert with_omh.presets == plain.presets
        params = registry.resolve_params(
            with_omh, {"omh_levels": 4, "omh_expansion": 1.5, "omh_epsilon": 0.1, "omh_match": False}
        )
        learner = registry.instantiate(with_omh, params)
        assert learner.omh and learner.omh_levels == 4 and learner.get_params()["omh_match"] is False
    assert registry.get("feature_learner", "smooseg_omh").defaults()["omh_lr"] == 5e-4
    with pytest.raises(ConfigError, match="omh_levels"):
        STEGO(omh_levels=0)
    with pytest.raises(ConfigError, match="omh_expansion"):
        STEGO(omh_expansion=0.5)
    with pytest.raises(ConfigError, match="omh_epsilon"):
        STEGO(omh_epsilon=0.0)


def test_stego_omh_training_lowers_omh_losses_and_keeps_plans():
    fs, ctx = toy_features(), toy_ctx()
    spec = registry.get("feature_learner", "stego_omh")
    learner = spec.cls(steps=50, batch_size=4, crop_size=8, dim=16).fit(fs, ctx)
    art = learner.artifacts()
    log = art["loss"]
    assert {"omh_cluster", "omh_match", "base"} <= set(log)
    total = [b + 0.01 * c + 0.3 * m for b, c, m in zip(log["base"], log["omh_cluster"], log["omh_match"])]
    assert log["loss"] == pytest.approx(total, rel=1e-5, abs=1e-6)
    assert sum(log["omh_match"][-10:]) < sum(log["omh_match"][:10])
    assert art["omh"]["sizes"] == [3, 6, 12]
    a = art["omh"]["plans"][0]
    assert a.shape == (3, 6) and a.sum(0).tolist() == pytest.approx([1.0] * 6, abs=1e-4)
    assert learner.transform(fs, ctx)[0].code.shape == (8, 10, 16)  # the hierarchy heads are not in the code
    ablated = spec.cls(steps=5, batch_size=4, crop_size=8, dim=16, omh_match=False).fit(fs, ctx)
    assert set(ablated.artifacts()["loss"]["omh_match"]) == {0.0}
    one_level = spec.cls(steps=5, batch_size=4, crop_size=8, dim=16, omh_levels=1).fit(fs, ctx)
    assert one_level.artifacts()["omh"]["plans"] == []
    codes = [F.normalize(c.code, dim=-1) for c in learner.transform(fs, ctx)]
    assert all(torch.isfinite(c).all() for c in codes)


def test_plot_hierarchy_writes_figure(tmp_path):
    info = OMHHeads(3, 4, levels=2).hierarchy()
    path = plot_hierarchy(info, str(tmp_path / "fig3.png"))
    assert (tmp_path / "fig3.png").stat().st_size > 1000 and path.endswith("fig3.png")
    with pytest.raises(ValueError, match="single level"):
        plot_hierarchy(OMHHeads(3, 4, levels=1).hierarchy(), str(tmp_path / "x.png"))


def test_report_draws_figure3_from_the_best_omh_cell(tmp_path, toy_root):
    """A grid with an OMH learner gets omh_hierarchy.png from the saved plans; one without gets none."""
    small = {"steps": 2, "batch_size": 2, "dim": 8, "crop_size": 2, "feature_samples": 2, "neg_samples": 1,
             "num_neighbors": 2}  # fmt: skip
    learners = [{"name": "stego_omh", "label": "omh3", "params": small},
                {"name": "stego_omh", "label": "omh1", "params": {**small, "omh_levels": 1}}]  # fmt: skip
    common = {"seeds": [0], "image_clusterers": ["none"], "dataset_clusterers": ["kmeans"]}
    with_plans = run_grid(load_grid(tiny_grid(tmp_path, toy_root, feature_learners=learners, **common)),
                          progress=False)  # fmt: skip
    assert (with_plans.output / "omh_hierarchy.png").stat().st_size > 1000
    assert "omh_hierarchy.png" in (with_plans.output / "leaderboard.md").read_text()
    single = run_grid(load_grid(tiny_grid(tmp_path, toy_root, feature_learners=learners[1:], output=str(tmp_path / "b"), **common)),
                      progress=False)  # fmt: skip
    assert not (single.output / "omh_hierarchy.png").exists()
