"""Calibrated learner settings, code health (collapse guard), learning curves and what a cell records."""

from __future__ import annotations

import json
import logging
import math

import pandas as pd
import pytest
import torch
from _learner_toys import toy_ctx, toy_features

from tests.conftest import tiny_grid
from ussbench import registry
from ussbench.config import load_grid
from ussbench.errors import ConfigError
from ussbench.feature_learners import calibration, health
from ussbench.feature_learners._training import build_bank, checkpoint_steps
from ussbench.feature_learners.hp import HP
from ussbench.feature_learners.omh import OMHHeads
from ussbench.feature_learners.records import checkpoint_scores, learner_row
from ussbench.feature_learners.smooseg import SmooSeg
from ussbench.feature_learners.stego import STEGO, stego_pair_correlations
from ussbench.runner import run_grid

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on 2 shared cores: one torch thread

TOY = dict(batch_size=4, crop_size=8, lr=5e-3)


# -- health -------------------------------------------------------------------------------------------------
def test_effective_rank_and_mean_cosine_known_values():
    eye = torch.eye(6)
    assert health.effective_rank(eye) == pytest.approx(6.0, rel=1e-5)  # equal singular values
    same = torch.ones(50, 6) + 1e-4 * torch.randn(50, 6)
    assert health.effective_rank(same) < 1.01 and health.mean_cosine(same) > 0.999
    two = torch.cat([torch.eye(6)[:1].repeat(10, 1), torch.eye(6)[1:2].repeat(10, 1)])
    assert health.effective_rank(two) == pytest.approx(2.0, rel=1e-5)
    assert health.mean_cosine(two) == pytest.approx(2**-0.5, rel=1e-5)


def test_assignment_entropy_known_values():
    protos = torch.eye(4)
    uniform = torch.eye(4).repeat(5, 1)
    assert health.assignment_entropy(uniform, protos) == pytest.approx(1.0)
    one = torch.eye(4)[:1].repeat(20, 1)
    assert health.assignment_entropy(one, protos) == pytest.approx(0.0, abs=1e-6)


def test_collapse_rule():
    assert health.is_collapsed(2.0) and health.is_collapsed(math.nan)
    assert not health.is_collapsed(31.0, reference=43.0)  # a calibrated STEGO run on MSRC
    assert health.is_collapsed(8.0, reference=43.0)  # STEGO with DINO v1 shifts on MSRC
    assert health.reference_rank(43.0, 196.0, 70) == 43.0
    assert (
        health.reference_rank(None, 196.0, 70) == 70.0 and health.reference_rank(math.nan, 20.0, 70) == 20.0
    )


def test_probe_indices_are_valid_seeded_and_cover_small_sets():
    grids = [(3, 4), (2, 5), (4, 4)]
    idx = health.probe_indices(grids, n=10, seed=0)
    assert idx.shape == (10, 3) and torch.equal(idx, health.probe_indices(grids, n=10, seed=0))
    assert all(0 <= y < grids[i][0] and 0 <= x < grids[i][1] for i, y, x in idx.tolist())
    every = health.probe_indices(grids, n=1000)
    assert len(every) == 12 + 10 + 16 and len({tuple(r) for r in every.tolist()}) == 38


# -- calibration ----------------------------------------------------------------------------------------------
def test_quantile_shift_pulls_the_requested_fraction():
    values = torch.linspace(-1, 1, 10001)
    for pull in (0.1, 0.5, 0.9):
        shift = calibration.quantile_shift(values, pull)
        assert float((values > shift).float().mean()) == pytest.approx(pull, abs=1e-3)


def test_rescaling_rules_reproduce_the_references():
    assert calibration.ema_momentum_for(3000, 0.998, 3000) == pytest.approx(0.998, abs=1e-9)
    short = calibration.ema_momentum_for(200, 0.998, 3000)  # same half-life fraction: 11.5% of 200 steps
    assert math.log(0.5) / math.log(short) == pytest.approx(0.1154 * 200, rel=0.01)
    assert calibration.hp_pool_size_for(64, 28) == 2048
    assert calibration.hp_pool_size_for(8, 12) == 42


def test_stego_pair_correlations_are_what_the_loss_sees():
    fs = toy_features()
    bank = build_bank(fs, 8, "random", torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    img, top, left = bank.windows(torch.arange(4), g)
    feats = bank.gather("tokens", img, top, left).permute(0, 3, 1, 2)
    out = stego_pair_correlations(feats, feats.roll(1, 0), 5, True, g)
    assert set(out) == {"self", "knn", "rand"} and out["self"].shape == (4, 5, 5, 5, 5)
    # self pairs of the same point: correlation 1 before centring, so the self median exceeds the random one
    assert float(out["self"].median()) > float(out["rand"].median())


def test_stego_auto_shifts_are_quantiles_and_given_numbers_reproduce_training():
    fs, ctx = toy_features(), toy_ctx()
    # fixed pulls here (the measured ones: tests/test_learner_pulls.py)
    auto = STEGO(steps=20, pull_self=0.8, pull_knn=0.8, **TOY).fit(fs, ctx)
    shifts = {k: auto.resolved_[k] for k in ("shift_self", "shift_knn", "shift_rand")}
    rand, self_ = auto.resolved_["correlation_rand"], auto.resolved_["correlation_self"]
    assert shifts["shift_rand"] > rand["q90"]  # pull_rand 0.03: the 97% quantile of random-pair correlations
    assert self_["q10"] < shifts["shift_self"] < self_["median"]  # pull_self 0.8: the 20% quantile
    given = STEGO(steps=20, **TOY, **shifts).fit(fs, ctx)
    assert given.resolved_ == shifts  # no calibration (no measured share either) when every shift is given
    a, b = auto.transform(fs, ctx), given.transform(fs, ctx)
    torch.testing.assert_close(
        a[2].code, b[2].code, rtol=0, atol=0
    )  # calibration leaves training draws alone
    with pytest.raises(ConfigError, match="pull_rand"):
        STEGO(pull_rand=1.0)
    with pytest.raises(ConfigError, match="shift_knn"):
        STEGO(shift_knn="median")


def test_presets_use_the_papers_numbers_exactly():
    fs, ctx = toy_features(), toy_ctx()
    spec = registry.get("feature_learner", "stego")
    params = registry.resolve_params(spec, {"steps": 2, "batch_size": 4, "crop_size": 8}, "cocostuff27_vits8")
    learner = registry.instantiate(spec, params).fit(fs, ctx)
    assert (
        learner.resolved_["shift_self"],
        learner.resolved_["shift_knn"],
        learner.resolved_["shift_rand"],
    ) == (0.08, 0.02, 0.66)
    smooseg = registry.get("feature_learner", "smooseg")
    params = registry.resolve_params(
        smooseg, {"steps": 2, "batch_size": 4, "crop_size": 8}, "cocostuff27_vits8"
    )
    fitted = registry.instantiate(smooseg, params).fit(fs, ctx)
    assert fitted.resolved_ == {"shift_intra": -0.02, "shift_inter": 0.48, "ema_momentum": 0.998}


def test_smooseg_auto_settings_and_hp_auto_pool():
    fs, ctx = toy_features(), toy_ctx()
    learner = SmooSeg(steps=30, **TOY).fit(fs, ctx)
    r = learner.resolved_
    assert r["ema_momentum"] == pytest.approx(calibration.ema_momentum_for(30, 0.998, 3000))
    assert r["shift_inter"] > r["correlation_inter"]["median"]  # pull_inter 0.1 of inter-image pairs
    assert (
        "prototypes" in learner.artifacts()
        and learner.artifacts()["health"]["final"]["assignment_entropy"] >= 0
    )
    hp = HP(steps=3, batch_size=4, crop_size=8, dim=16).fit(fs, ctx)
    assert hp.resolved_ == {"pool_size": calibration.hp_pool_size_for(4, 8)}
    assert (
        HP(steps=3, batch_size=4, crop_size=8, dim=16, pool_size=5).fit(fs, ctx).resolved_["pool_size"] == 5
    )


# -- collapse guard and curves ----------------------------------------------------------------------------------
def test_pulling_every_pair_collapses_the_codes_and_is_flagged(caplog):
    """Shifts below every correlation pull all pairs together: the guard must see it; calibrated shifts not."""
    fs, ctx = toy_features(n=12), toy_ctx()
    kw = dict(steps=120, batch_size=6, crop_size=8, lr=2e-2, dim=16)
    with caplog.at_level(logging.WARNING):
        pulled = STEGO(shift_self=-1.0, shift_knn=-1.0, shift_rand=-1.0, **kw).fit(fs, ctx)
    healthy = STEGO(**kw).fit(fs, ctx)
    art = pulled.artifacts()["health"]
    assert art["collapsed"] and "collapsed" in caplog.text
    assert pulled.curve_.last("effective_rank") < 0.5 * pulled.curve_.points["effective_rank"][0]
    assert pulled.curve_.last("mean_cosine") > healthy.curve_.last("mean_cosine") + 0.2
    assert not healthy.artifacts()["health"]["collapsed"]
    row = learner_row(pulled.transform(fs, ctx), pulled.artifacts())
    assert (
        row["code_collapsed"]
        and row["code_effective_rank"] < health.COLLAPSE_FRACTION * art["initial_effective_rank"]
    )


def test_curve_points_and_snapshots():
    fs, ctx = toy_features(), toy_ctx()
    learner = STEGO(steps=30, curve_every=8, checkpoints=3, **TOY).fit(fs, ctx)
    curve = learner.artifacts()["curve"]
    assert curve["step"] == [0, 8, 16, 24, 30]
    assert {"loss", "base", "self", "effective_rank", "mean_cosine"} <= set(curve)
    assert all(len(v) == 5 for v in curve.values())
    assert [s for s, _ in learner.snapshots_] == checkpoint_steps(30, 3) == [0, 10, 20, 30]
    last = learner.transform_at(3, fs, ctx)
    torch.testing.assert_close(last[1].code, learner.transform(fs, ctx)[1].code, rtol=0, atol=0)
    short = STEGO(steps=2, checkpoints=1, **TOY).fit(fs, ctx)  # same seed: same untrained head
    torch.testing.assert_close(
        short.transform_at(0, fs, ctx)[0].code, learner.transform_at(0, fs, ctx)[0].code
    )
    assert not torch.equal(learner.transform_at(0, fs, ctx)[0].code, last[0].code)


def test_checkpoint_scores_on_separable_toy_data():
    fs, ctx = toy_features(noise=0.3), toy_ctx()
    labels = [torch.zeros(im.grid, dtype=torch.long).numpy() for im in fs]
    learner = STEGO(steps=12, checkpoints=2, **TOY).fit(fs, ctx)
    scores = checkpoint_scores(learner, fs, labels, ctx)
    assert scores["step"] == [0.0, 6.0, 12.0]
    assert all(0.0 <= m <= 100.0 for m in scores["miou"] + scores["pixel_accuracy"])


# -- OMH balance -----------------------------------------------------------------------------------------------
def test_omh_mean_balance_is_the_per_level_per_cluster_mean():
    torch.manual_seed(4)
    code = torch.randn(2, 8, 4, 4)
    paper = OMHHeads(3, 8, levels=3, expansion=2.0, balance="paper")
    mean = OMHHeads(3, 8, levels=3, expansion=2.0, balance="mean")
    mean.load_state_dict(paper.state_dict())
    with torch.no_grad():
        c_paper, m_paper = paper.losses(code)
        c_mean, m_mean = mean.losses(code)
    assert float(c_mean) == pytest.approx(float(c_paper) / 3, rel=1e-5)
    from ussbench.feature_learners.omh import matching_loss, soft_assign

    x = code.permute(0, 2, 3, 1).reshape(-1, 8)
    with torch.no_grad():
        m = [soft_assign(x, h.weight) for h in paper.heads]
        terms = [float(matching_loss(a, m[i], m[i + 1])) for i, (a, _) in enumerate(paper.plans())]
    assert float(m_paper) == pytest.approx(sum(terms), rel=1e-5)
    assert float(m_mean) == pytest.approx((terms[0] / 3 + terms[1] / 6) / 2, rel=1e-5)
    with pytest.raises(ConfigError, match="omh_balance"):
        STEGO(omh_balance="median")


# -- what a grid cell records --------------------------------------------------------------------------------------
def test_grid_records_learner_params_health_and_draws_curves(tmp_path, toy_root):
    small = {"steps": 6, "batch_size": 2, "dim": 8, "crop_size": 2, "feature_samples": 2, "neg_samples": 1,
             "num_neighbors": 2, "curve_every": 2, "checkpoints": 2}  # fmt: skip
    learners = ["none", {"name": "stego", "label": "STEGO", "params": small}]
    grid = load_grid(tiny_grid(tmp_path, toy_root, feature_learners=learners, seeds=[0],
                               image_clusterers=["none"], dataset_clusterers=["kmeans"]))  # fmt: skip
    out = run_grid(grid, progress=False).output
    results = pd.read_parquet(out / "results.parquet")
    row = results[results.feature_learner == "STEGO"].iloc[0]
    record = json.loads(row.params)["feature_learner"]
    assert (
        record["name"] == "stego"
        and record["params"]["steps"] == 6
        and record["params"]["shift_self"] == "auto"
    )
    assert set(record["calibrated"]) >= {"shift_self", "shift_knn", "shift_rand"}
    assert isinstance(record["calibrated"]["shift_rand"], float)
    assert row.code_effective_rank >= 1 and row.learner_steps == 6 and "code_collapsed" in results
    assert pd.isna(results[results.feature_learner == "none"].code_effective_rank).all()
    md = (out / "leaderboard.md").read_text()
    assert "code eff. rank" in md and "## Learning curves and code health" in md
    assert (out / "learning_curves_stego.png").stat().st_size > 1000


def test_report_section_names_collapsed_rows(tmp_path):
    """A row with a collapsed seed is listed as collapsed in the learning-curve section; a healthy one is not."""
    from ussbench.reports.learning_curves import section

    def cell(label: str, seed: int, collapsed: bool, rank: float) -> dict:
        row = {"dataset": "msrc", "backbone": "dinov2", "feature_learner": label, "image_clusterer": "patches",
               "dataset_clusterer": "k-means", "postprocess": "none", "seed": seed, "miou": 10.0,
               "cell_id": f"{label}{seed}", "code_effective_rank": rank, "input_effective_rank": 190.0,
               "code_collapsed": collapsed, "learner_steps": 300}  # fmt: skip
        stages = [{"kind": "feature_learner", "name": "stego"}]
        return {"row": row, "identity": {"stages": stages}, "params": {}}

    cells = [cell("STEGO paper", s, s < 2, 2.5 if s < 2 else 20.0) for s in range(3)]
    cells += [cell("STEGO", s, False, 40.0) for s in range(3)]
    md = section(tmp_path, cells)
    assert "## Learning curves and code health" in md
    collapsed_line = next(line for line in md.splitlines() if line.startswith("**Collapsed rows**"))
    assert "STEGO paper on msrc (2/3 seeds)" in collapsed_line and "STEGO on" not in collapsed_line


def known_learner_cells() -> list[dict]:
    """Raw tokens, STEGO and STEGO+OMH on 'msrc' at three seeds with known mIoU."""

    def cell(label: str, plugin: str, seed: int, miou: float) -> dict:
        return {"row": {"dataset": "msrc", "feature_learner": label, "seed": seed, "miou": miou},
                "identity": {"stages": [{"kind": "feature_learner", "name": plugin}]}}  # fmt: skip

    cells = [cell("none", "none", s, m) for s, m in enumerate([10.0, 11.0, 12.0])]
    cells += [cell("STEGO", "stego", s, m) for s, m in enumerate([20.0, 21.0, 22.0])]
    return cells + [cell("STEGO+OMH", "stego_omh", s, m) for s, m in enumerate([19.0, 22.0, 25.0])]


def test_comparison_with_raw_tokens_and_omh_on_known_scores():
    from ussbench.reports.learning_curves import comparison_table

    cells = known_learner_cells()
    table = comparison_table(cells).set_index(["row", "against"])
    stego = table.loc[("STEGO", "raw tokens")]
    assert stego["diff"] == "+10.00" and stego["spread"] == "1.41" and stego["beyond 2 spreads"] == "yes"
    omh = table.loc[("STEGO+OMH", "STEGO")]  # +1 against a spread of sqrt(1 + 9)
    assert omh["diff"] == "+1.00" and omh["spread"] == "3.16" and omh["beyond 2 spreads"] == "no"
    assert ("none", "raw tokens") not in table.index and len(table) == 3


def test_comparison_is_decided_by_the_reports_paired_interval_where_there_is_one():
    """The seed-only spread screen says 'no' for STEGO+OMH vs STEGO; the paired image bootstrap decides it."""
    from ussbench.evaluation.statistics import PairedDelta
    from ussbench.reports.learning_curves import comparison_table

    cells = known_learner_cells()
    asked = []

    def paired(dataset: str, a: str, b: str):
        asked.append((dataset, a, b))
        if b == "none":  # the raw-token row has no per-image counts in this made-up report
            return None
        return PairedDelta(delta=1.0, low=0.2, high=1.9, p_value=0.01)

    table = comparison_table(cells, paired).set_index(["row", "against"])
    assert set(asked) == {
        ("msrc", "STEGO", "none"),
        ("msrc", "STEGO+OMH", "none"),
        ("msrc", "STEGO+OMH", "STEGO"),
    }
    omh = table.loc[("STEGO+OMH", "STEGO")]
    assert omh["beyond 2 spreads"] == "no" and omh["decided"] == "yes"
    assert omh["paired Δ 95% CI"] == "+1.00 [+0.20, +1.90]"
    assert table.loc[("STEGO", "raw tokens")]["decided"] == "no per-image counts"
