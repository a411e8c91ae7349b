"""Rows that ran different seeds (a failed cell): Δ, p and ranks pair them by seed value on the seeds both ran,
and say so; rows with no seed in common get no Δ. Rows with the same seeds keep exactly the old numbers."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from tests._report_fakes import read_json, write_fake_cells
from ussbench.cli import main
from ussbench.evaluation.statistics import bootstrap_rows, paired_delta, rank_ranges, seed_draws
from ussbench.reports.build import build_report
from ussbench.reports.comparisons import board_statistics, pairwise_matrix
from ussbench.reports.records import collect_per_image_counts, load_report_cells
from ussbench.reports.tables import leaderboard_frame, results_frame

B = 200  # bootstrap replicates


def _statistics(out):
    """The report's board statistics, and each row's (seed, counts) as bootstrap_rows takes them."""
    cells, _ = load_report_cells(out)
    board = leaderboard_frame(results_frame(cells))
    counts, _ = collect_per_image_counts(out, cells)
    stats = board_statistics(board, cells, counts, n_resamples=B)
    rows = {}
    for c in cells:
        rows.setdefault(c["row"]["image_clusterer"], []).append(
            (int(c["row"]["seed"]), counts[c["row"]["cell_id"]].counts)
        )
    return board, stats, rows


def _index(board: pd.DataFrame, label: str) -> int:
    return int(board.index[board.image_clusterer == label][0])


def test_rows_with_the_same_seeds_keep_the_old_numbers(tmp_path):
    """The common case, against the formulas used before seeds were paired by value: Δ on the full nested
    replicates (seed positions), ranks from all rows' replicates at once; equal to the last bit."""
    out = tmp_path / "same"
    write_fake_cells(out, {"raw tokens": 0.35, "good": 0.8, "twin": 0.8, "bad": 0.2}, n_images=12)
    board, stats, rows = _statistics(out)
    boots = bootstrap_rows(rows, B)
    base = boots["raw tokens"]
    order = list(board.image_clusterer)
    ranks = rank_ranges(
        np.array([boots[k].miou for k in order]), np.stack([boots[k].nested_miou for k in order])
    )
    for i, label in enumerate(order):
        row = boots[label]
        old = paired_delta(row.miou, base.miou, row.nested_miou, base.nested_miou)
        got = stats.table.loc[i]
        assert (got.delta, got.delta_lo, got.delta_hi, got.delta_p) == (
            old.delta,
            old.low,
            old.high,
            old.p_value,
        )
        assert (got.rank_lo, got.rank_hi) == ranks[i]
    _, delta, pvals, _ = pairwise_matrix(stats, stats.groups[0])
    for a, la in enumerate(order):
        for b, lb in enumerate(order):
            if a != b:
                old = paired_delta(
                    boots[la].miou, boots[lb].miou, boots[la].nested_miou, boots[lb].nested_miou
                )
                assert (delta[a, b], pvals[a, b]) == (old.delta, old.p_value)
    assert not any("seed" in note for note in stats.notes)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """'good' lost its seed-1 cell; 'lone' ran only seed 5, which no other row ran."""
    out = tmp_path_factory.mktemp("mixed") / "reports" / "toy"
    write_fake_cells(out, {"raw tokens": 0.35, "bad": 0.2}, seeds=(0, 1, 2), n_images=12)
    write_fake_cells(out, {"pad": 0.1, "good": 0.8}, seeds=(0, 2), n_images=12)
    (out / "cells" / "toyset-pad-0.json").unlink()
    (out / "cells" / "toyset-pad-2.json").unlink()
    write_fake_cells(out, {"pad2": 0.1, "pad3": 0.1, "lone": 0.6}, seeds=(5,), n_images=12)
    for name in ("pad2", "pad3"):
        (out / "cells" / f"toyset-{name}-5.json").unlink()
    build_report(out, "toy", n_resamples=B)
    return out


def _miou(out, label: str, seed: int) -> float:
    return read_json(out / "cells" / f"toyset-{label.replace(' ', '_')}-{seed}.json")["row"]["miou"]


def test_delta_pairs_rows_by_seed_value_on_the_seeds_both_ran(mixed):
    board, stats, rows = _statistics(mixed)
    good, base = _index(board, "good"), _index(board, "raw tokens")
    got = stats.table.loc[good]
    expected = np.mean([_miou(mixed, "good", s) - _miou(mixed, "raw tokens", s) for s in (0, 2)])
    assert got.delta == pytest.approx(expected, abs=1e-9)  # not good's mean minus the baseline's 3-seed mean
    boots = bootstrap_rows(rows, B)
    draws = seed_draws(2, B)  # the draws every two-seed row uses
    cols = np.arange(B)[:, None]
    nested = {
        k: boots[k].miou_reps[idx].T[cols, draws].mean(1)
        for k, idx in (("good", [0, 1]), ("raw tokens", [0, 2]))
    }
    d = paired_delta(
        boots["good"].miou,
        boots["raw tokens"].miou_point[[0, 2]].mean(),
        nested["good"],
        nested["raw tokens"],
    )
    assert (got.delta_lo, got.delta_hi, got.delta_p) == pytest.approx((d.low, d.high, d.p_value), abs=1e-9)
    assert stats.table.loc[base, "delta"] == 0.0


def test_rows_without_a_common_seed_get_no_delta_and_the_report_says_why(mixed):
    board, stats, _ = _statistics(mixed)
    assert pd.isna(stats.table.loc[_index(board, "lone"), "delta"])
    md = (mixed / "leaderboard.md").read_text()
    assert "seed positions" not in md and "paired by seed" in md
    notes = [line for line in md.splitlines() if "seeds 0, 2" in line or "no seed in common" in line]
    assert any("good" in n and "seeds 0, 1, 2" in n and "the seeds both ran (0, 2)" in n for n in notes), (
        notes
    )
    assert any("lone" in n and "no seed in common" in n for n in notes), notes
    table = pd.read_csv(mixed / "leaderboard.csv").set_index("image_clusterer")
    assert np.isnan(table.loc["lone", "delta"]) and np.isfinite(table.loc["good", "delta"])
    assert "no seed in common" in md.split("## Which differences are decided", 1)[1]


def test_compare_pairs_by_seed_value_and_refuses_rows_without_a_common_seed(mixed, capsys):
    assert main(["compare", str(mixed), "good", "raw tokens", "--resamples", str(B)]) == 0
    out = capsys.readouterr().out
    expected = np.mean([_miou(mixed, "good", s) - _miou(mixed, "raw tokens", s) for s in (0, 2)])
    assert f"Δ mIoU (A − B) = {expected:+.2f}" in out and "on the seeds both rows ran: 0, 2" in out
    assert main(["compare", str(mixed), "lone", "raw tokens"]) == 2
    err = capsys.readouterr().err
    assert "no seed in common" in err and "5" in err
