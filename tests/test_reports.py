"""Reports with statistics: intervals, Δ vs baseline, rank ranges, the committed per-image store, rebuilding a
committed folder without its cells, old cells without counts, provenance flags, ``compare``, the index page."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from tests._report_fakes import ENV, leaderboard_rows, read_json, write_fake_cells
from ussbench.cli import main
from ussbench.evaluation.per_image import STORE_NAME, read_store
from ussbench.reports.build import build_report

ROWS = {"raw tokens": 0.35, "good": 0.8, "good twin": 0.8, "bad": 0.2}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One report shared by the tests that only read it (copy it before changing it)."""
    out = tmp_path_factory.mktemp("shared") / "reports" / "toy"
    write_fake_cells(out, ROWS)
    build_report(out, "toy", n_resamples=300)
    return out


def _cells(md: str, label: str) -> list[str]:
    line = next(line for line in leaderboard_rows(md) if f"| {label} |" in line)
    return [c.strip() for c in line.strip("|").split("|")]


def _column(md: str, name: str) -> int:
    return [c.strip() for c in leaderboard_rows(md)[0].strip("|").split("|")].index(name)


def test_report_shows_intervals_baseline_delta_and_rank_ranges(report):
    md = (report / "leaderboard.md").read_text()
    assert (
        "Statistics: bootstrap over images (300 replicates" in md
        and "recomputes the cluster-to-class match" in md
    )
    ci, delta, p, rank = (_column(md, n) for n in ("mIoU 95% CI", "Δ mIoU vs baseline", "p", "rank"))
    good, twin, bad, raw = (_cells(md, k) for k in ("good", "good twin", "bad", "raw tokens"))
    assert raw[delta] == "baseline"
    assert good[delta].startswith("+") and float(good[delta].split()[0]) > 10
    lo = float(good[delta].split("[")[1].split(",")[0])
    assert lo > 0 and good[p].startswith("≤")  # better on every image: the smallest p the bootstrap resolves
    assert bad[delta].startswith("-")
    lo_ci, hi_ci = (float(x) for x in good[ci].strip("[]").split(","))
    mean = float(good[_column(md, "mIoU (%)")].split("±")[0])
    assert lo_ci < mean < hi_ci
    # the twins cannot be told apart; both are above the rest
    assert good[rank] == "1–2" and twin[rank] == "1–2" and raw[rank] == "3" and bad[rank] == "4"
    assert "## Which differences are decided" in md and "not decided" in md
    assert "p ≤ " in md and "p = ≤" not in md  # the decided section's p-values read as text
    assert (report / "significance.png").is_file()
    table = pd.read_csv(report / "leaderboard.csv")
    good_row = table[table.image_clusterer == "good"].iloc[0]
    assert good_row.miou_lo < good_row.miou_mean < good_row.miou_hi and good_row.delta_lo > 0
    assert table.is_baseline.sum() == 1 and table.rank_lo.min() == 1


def test_committed_folder_rebuilds_the_same_statistics_without_cells(report, tmp_path):
    report = shutil.copytree(report, tmp_path / "toy")
    before = (report / "leaderboard.md").read_text()
    store = read_store(report / STORE_NAME)
    assert len(store) == len(ROWS) * 3
    shutil.rmtree(report / "cells")  # what a fresh clone sees: cells/ is not committed
    (report / "panels.png").write_bytes(b"drawn from the cells before they were removed")
    build_report(report, "toy", n_resamples=300)
    after = (report / "leaderboard.md").read_text()
    assert "Qualitative panels" in after and "panels.png" in after  # the committed figure stays in the report
    assert (report / "panels.png").read_bytes().startswith(b"drawn from the cells")
    strip = [_column(before, c) for c in ("mIoU 95% CI", "Δ mIoU vs baseline", "p", "rank", "acc. 95% CI")]
    for line_a, line_b in zip(leaderboard_rows(before)[1:], leaderboard_rows(after)[1:]):
        a, b = line_a.strip("|").split("|"), line_b.strip("|").split("|")
        assert [a[i] for i in strip] == [b[i] for i in strip]
    assert main(["report", str(report)]) == 0  # the command the lead runs on a committed folder
    md = (report / "leaderboard.md").read_text()
    assert "Statistics: bootstrap over images (1000 replicates" in md and "Intervals: unavailable" not in md


def test_cells_without_per_image_counts_still_report_with_intervals_unavailable(tmp_path):
    out = tmp_path / "old"
    write_fake_cells(out, {"raw tokens": 0.4, "good": 0.8}, per_image=False)
    build_report(out, "old", n_resamples=100)
    md = (out / "leaderboard.md").read_text()
    assert "Intervals: unavailable" in md and "mIoU 95% CI" not in md
    assert not (out / STORE_NAME).exists()
    assert main(["compare", str(out), "1", "2"]) == 2


def test_per_image_store_stays_small_and_exact(report):
    store = read_store(report / STORE_NAME)
    cid = next(iter(store))
    fresh = np.load(report / "cells" / f"{cid}.npz")
    assert np.array_equal(store[cid].counts.per_image, fresh["counts_per_image"])
    assert (report / STORE_NAME).stat().st_size < 60_000  # 12 cells x 40 images x <= 16 entries


def test_baseline_named_by_the_grid(tmp_path):
    out = tmp_path / "named"
    write_fake_cells(out, {"raw tokens": 0.4, "good": 0.8, "bad": 0.2})
    (out / "run.json").write_text('{"grid": {"baseline": {"image_clusterer": "bad"}}}')
    build_report(out, "named", n_resamples=100)
    md = (out / "leaderboard.md").read_text()
    assert _cells(md, "bad")[_column(md, "Δ mIoU vs baseline")] == "baseline"
    assert "image_clusterer `bad`" in md


def test_no_baseline_row_is_said_not_hidden(tmp_path):
    out = tmp_path / "nobase"
    write_fake_cells(out, {"good": 0.8, "bad": 0.2})
    build_report(out, "nobase", n_resamples=100)
    md = (out / "leaderboard.md").read_text()
    assert "no baseline row" in md and "Δ mIoU vs baseline" not in md and "mIoU 95% CI" in md


def test_rows_from_another_machine_or_code_version_are_flagged(tmp_path):
    out = tmp_path / "mixed"
    write_fake_cells(out, {"raw tokens": 0.4, "good": 0.8, "bad": 0.2})
    other = {**ENV, "git_commit": "b" * 40, "machine": {**ENV["machine"], "cpu_model": "Other CPU"}}
    write_fake_cells(out, {"odd": 0.5}, env=other)
    build_report(out, "mixed", n_resamples=100)
    md = (out / "leaderboard.md").read_text()
    assert "Cells come from 2 code versions" in md and "Cells come from 2 machines" in md
    assert _cells(md, "odd")[0].endswith("†") and not _cells(md, "good")[0].endswith("†")
    assert "Code: " not in md.split("Cells come from")[0].splitlines()[-1]


def test_images_line_states_the_images_really_scored(report):
    md = (report / "leaderboard.md").read_text()
    assert "**40 images scored**" in md


def test_compare_two_rows_of_one_report(report, capsys):
    assert main(["compare", str(report), "good twin", "raw tokens", "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "Δ mIoU (A − B) = +" in out and ": decided" in out and "40 images" in out
    assert main(["compare", str(report), "good", "twin + k-means", "--resamples", "200"]) == 0
    assert "not decided" in capsys.readouterr().out


def test_compare_refuses_ambiguous_rows_and_other_data(report, tmp_path, capsys):
    assert main(["compare", str(report), "good", "9"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("ussbench: error:") and "does not exist" in err and len(err.strip().splitlines()) == 1
    )
    assert main(["compare", str(report), "o", "bad"]) == 2  # 'o' matches several rows
    assert "matches" in capsys.readouterr().err
    assert main(["compare", str(report), "zzz", "1"]) == 2  # no row: the rows are listed to choose from
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "'zzz' matches no row; the rows are 1: " in line and "2: " in line, line
    with pytest.raises(SystemExit) as exit_:
        main(["compare", str(report), "1", "2", "--resamples", "0"])
    assert exit_.value.code == 2 and "positive number of bootstrap replicates" in capsys.readouterr().err
    same = tmp_path / "same_data"
    write_fake_cells(same, {"raw tokens": 0.3, "other": 0.6})
    assert main(["compare", str(report), str(same), "--row-b", "other", "--resamples", "100"]) == 0
    other = tmp_path / "other_data"
    write_fake_cells(other, {"raw tokens": 0.3}, image_seed=5)  # same ids, other labels
    assert main(["compare", str(report), str(other)]) == 2
    err = capsys.readouterr().err
    assert "different labelled pixels" in err and len(err.strip().splitlines()) == 1
    renamed = tmp_path / "renamed"
    write_fake_cells(renamed, {"raw tokens": 0.3}, image_prefix="photo")
    assert main(["compare", str(report), str(renamed)]) == 2
    assert "different images" in capsys.readouterr().err


def test_compare_reads_a_plus_inside_a_name_as_part_of_the_name(tmp_path, capsys):
    """'STEGO+OMH' names one row although 'STEGO+OMH levels=1' contains it (found by a new-user check: the
    '+' split the name and every longer label stayed ambiguous)."""
    out = tmp_path / "plus"
    write_fake_cells(out, {"raw tokens": 0.3, "STEGO+OMH": 0.6, "STEGO+OMH levels=1": 0.5, "STEGO": 0.55})
    build_report(out, "plus", n_resamples=50)
    assert main(["compare", str(out), "STEGO+OMH", "STEGO+OMH levels=1", "--resamples", "50"]) == 0
    text = capsys.readouterr().out
    assert "STEGO+OMH | k-means" in text and "STEGO+OMH levels=1 | k-means" in text
    assert main(["compare", str(out), "STEGO+OMH | k-means", "STEGO + k-means", "--resamples", "50"]) == 0
    assert "STEGO | k-means" in capsys.readouterr().out


def test_compare_verdict_says_the_interval_decides_when_p_and_interval_disagree():
    from ussbench.reports.compare import verdict

    assert verdict(True, 0.001) == "decided"
    assert verdict(False, 0.4) == "not decided (the interval contains 0)"
    assert "the interval decides" in verdict(False, 0.032)  # a new user read p = 0.032 beside 'not decided'


def test_index_lists_every_report(report):
    second = report.parent / "second"
    write_fake_cells(second, {"raw tokens": 0.3, "good": 0.7}, seeds=(0,))
    build_report(second, "second", n_resamples=50)
    index = (report.parent / "index.html").read_text()
    assert "toy/leaderboard.html" in index and "second/leaderboard.html" in index
    assert "good" in index
    assert "href='../index.html'" in (second / "leaderboard.html").read_text()


def test_paper_number_beside_a_row_on_the_same_dataset(tmp_path, monkeypatch):
    from ussbench.reports import paper

    def fake_published(kind, name, root=None):
        if (kind, name) == ("image_clusterer", "good"):
            return [{"dataset": "toyset", "metric": "mIoU", "value": 40.0, "source": "Toy paper", "backbone": "B"},
                    {"dataset": "voc2012", "metric": "miou", "value": 99.0, "source": "elsewhere"}]  # fmt: skip
        return []

    monkeypatch.setattr(paper, "published_numbers", fake_published)
    out = tmp_path / "paper"
    write_fake_cells(out, {"raw tokens": 0.4, "good": 0.8})
    build_report(out, "paper", n_resamples=50)
    md = (out / "leaderboard.md").read_text()
    col = _column(md, "paper mIoU (ratio)")
    good = _cells(md, "good")
    mean = float(good[_column(md, "mIoU (%)")].split("±")[0])
    assert good[col] == f"40.0 ({mean / 40.0:.2f}x)"
    assert _cells(md, "raw tokens")[col] == ""


def test_run_history_is_appended(tmp_path, toy_root):
    from tests.conftest import tiny_grid
    from ussbench.config import limit_images, load_grid
    from ussbench.runner import run_grid

    grid = load_grid(
        tiny_grid(tmp_path, toy_root, seeds=[0], image_clusterers=["none"], dataset_clusterers=["kmeans"])
    )
    run_grid(limit_images(grid, 4), progress=False)
    grid = load_grid(
        tiny_grid(tmp_path, toy_root, seeds=[0, 1], image_clusterers=["none"], dataset_clusterers=["kmeans"])
    )
    run_grid(grid, progress=False)
    run = read_json(grid.output / "run.json")
    assert len(run["history"]) == 2
    first, second = run["history"]
    assert first["dataset_limit"] == "4" and second["dataset_limit"] is None
    assert first["n_run"] == 1 and second["n_run"] == 2 and second["ended"]
    assert second["environment"]["machine"]["cpu_model"] and "threads" in second["environment"]["machine"]
    assert run["started"] == second["started"]  # top level: the latest run
    results = pd.read_csv(grid.output / "results.csv")
    assert len(results) == 2  # the limited cell is another cell and stays out of this grid's report
    md = (grid.output / "leaderboard.md").read_text()
    assert "**6 images scored**" in md and "2 run(s) into this folder" in md


def test_report_covers_the_latest_run_of_each_grid_file(tmp_path, toy_root):
    """`ussbench report` after a rerun with fewer seeds leaves the dropped seed out; a sub-grid file run into the
    same folder adds its cells; --all-cells reports every cell. Before, `report` read every cell in the folder
    (the dropped seed came back into the mean)."""
    from tests.conftest import tiny_grid
    from ussbench.config import load_grid
    from ussbench.runner import run_grid

    one = {"image_clusterers": ["none"], "dataset_clusterers": ["kmeans"], "name": "main-grid"}
    run_grid(load_grid(tiny_grid(tmp_path, toy_root, seeds=[0, 1], **one)), progress=False)
    grid = load_grid(tiny_grid(tmp_path, toy_root, seeds=[0], **one))
    run_grid(grid, progress=False)
    out = grid.output
    assert len(pd.read_csv(out / "results.csv")) == 1  # the run's own report: its planned cells
    assert main(["report", str(out)]) == 0
    assert pd.read_csv(out / "results.csv").seed.tolist() == [0]
    md = (out / "leaderboard.md").read_text()
    assert md.startswith("# Leaderboard: main-grid") and "Cells: those of the latest run of grid.yaml" in md
    from ussbench.reports.compare import _load

    assert {c["row"]["seed"] for c in _load(out)[1]} == {0}  # `compare` picks rows from the same cells
    # a sub-grid (another file, same output folder) adds its rows
    sub = tiny_grid(tmp_path, toy_root, seeds=[0], **{**one, "dataset_clusterers": ["km-sklearn-only"]})
    sub = sub.rename(tmp_path / "sub.yaml")
    text = sub.read_text().replace(
        "- km-sklearn-only", "- {name: kmeans, label: km-sk, params: {engine: sklearn}}"
    )
    sub.write_text(text)
    run_grid(load_grid(sub), progress=False)
    for _ in ("the sub-grid run's own report", "ussbench report"):
        results = pd.read_csv(out / "results.csv")
        assert sorted(results.dataset_clusterer) == ["km-sk", "kmeans"] and set(results.seed) == {0}
        assert "latest run of each of grid.yaml, sub.yaml" in (out / "leaderboard.md").read_text()
        assert main(["report", str(out)]) == 0
    assert main(["report", str(out), "--all-cells"]) == 0
    assert len(pd.read_csv(out / "results.csv")) == 3  # seed 1 of the first run too
    assert "Cells: every finished cell in the folder (`--all-cells`)" in (out / "leaderboard.md").read_text()


def test_grid_baseline_key_is_validated(tmp_path, toy_root):
    from tests.conftest import tiny_grid
    from ussbench.config import load_grid
    from ussbench.errors import ConfigError

    ok = load_grid(
        tiny_grid(tmp_path, toy_root, baseline={"image_clusterer": "km3", "dataset_clusterer": "kmeans"})
    )
    assert ok.raw["baseline"] == {"image_clusterer": "km3", "dataset_clusterer": "kmeans"}
    for bad, message in (({"image_clusterer": "dsm"}, "names no entry of image_clusterers"),
                         ({"image_clustrer": "none"}, "unknown stage"), ("none", "expected a mapping")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_grid(tiny_grid(tmp_path, toy_root, baseline=bad))


def test_command_line_options_are_recorded():
    from ussbench.provenance import command_info

    info = command_info(["/x/ussbench/__main__.py", "run", "--grid", "g.yaml", "--limit", "8", "--set", "seeds=[0]",
                         "--set=image_clusterers.acg.epochs=5"])  # fmt: skip
    assert info["command"].startswith("python -m ussbench run --grid g.yaml")
    assert info["limit"] == "8" and info["set"] == ["seeds=[0]", "image_clusterers.acg.epochs=5"]


def test_per_image_store_round_trips_crf_counts(tmp_path):
    from tests._report_fakes import fake_cell
    from ussbench.evaluation.per_image import StoredCell, write_store
    from ussbench.evaluation.statistics import CellCounts

    after, before = fake_cell(0.7, 30, 0), fake_cell(0.5, 30, 1)
    cell = StoredCell(CellCounts(after.per_image_counts(), 30, 4, 4), CellCounts(before.per_image_counts(), 30, 4, 4),
                      [f"im{i}" for i in range(30)])  # fmt: skip
    write_store(tmp_path / "s.npz", {"abc": cell})
    back = read_store(tmp_path / "s.npz")["abc"]
    assert np.array_equal(back.counts.per_image, after.per_image_counts())
    assert np.array_equal(back.counts_no_crf.per_image, before.per_image_counts())
    assert back.image_ids == cell.image_ids and back.fingerprint == cell.fingerprint


def test_protocol_crf_rows_get_an_interval_without_crf_too(tmp_path):
    out = tmp_path / "crf"
    write_fake_cells(out, {"raw tokens": 0.4, "good": 0.8}, crf=True)
    build_report(out, "crf", n_resamples=100)
    md = (out / "leaderboard.md").read_text()
    no_crf = _cells(md, "good")[_column(md, "no CRF 95% CI")]
    lo, hi = (float(x) for x in no_crf.strip("[]").split(","))
    mean = float(_cells(md, "good")[_column(md, "mIoU no CRF (%)")].split("±")[0])
    assert lo < mean < hi


def test_two_datasets_are_ranked_and_compared_separately(tmp_path):
    out = tmp_path / "two"
    write_fake_cells(out, {"raw tokens": 0.4, "good": 0.8}, dataset="alpha", image_prefix="a")
    write_fake_cells(out, {"raw tokens": 0.6, "good": 0.3}, dataset="beta", image_prefix="b", n_images=30)
    build_report(out, "two", n_resamples=100)
    md = (out / "leaderboard.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in leaderboard_rows(md)[1:]]
    head = [c.strip() for c in leaderboard_rows(md)[0].strip("|").split("|")]
    ds, ic, rank, delta = (
        head.index(c) for c in ("dataset", "image_clusterer", "rank", "Δ mIoU vs baseline")
    )
    by = {(r[ds], r[ic]): r for r in rows}
    assert by[("alpha", "good")][rank] == "1" and by[("beta", "raw tokens")][rank] == "1"
    assert (
        by[("alpha", "raw tokens")][delta] == "baseline" and by[("beta", "raw tokens")][delta] == "baseline"
    )
    assert by[("beta", "good")][delta].startswith("-")
    assert "**alpha** (40 images" in md and "**beta** (30 images" in md


def test_one_image_gets_no_interval_and_few_images_are_said_to_be_rough(tmp_path):
    one, few = tmp_path / "one", tmp_path / "few"
    write_fake_cells(one, {"raw tokens": 0.4, "good": 0.8}, n_images=1)
    write_fake_cells(few, {"raw tokens": 0.4, "good": 0.8}, n_images=8)
    build_report(one, "one", n_resamples=50)
    build_report(few, "few", n_resamples=50)
    assert "too few to resample" in (one / "leaderboard.md").read_text()
    assert "mIoU 95% CI" not in (one / "leaderboard.md").read_text()
    assert "intervals are rough" in (few / "leaderboard.md").read_text()


def test_default_baseline_prefers_a_label_match_over_a_plugin_name_match(tmp_path, toy_root):
    from tests.conftest import tiny_grid
    from ussbench.config import load_grid
    from ussbench.runner import run_grid

    # km-sklearn is a kmeans plugin too; the row labelled 'kmeans' is the baseline
    grid = load_grid(tiny_grid(tmp_path, toy_root, seeds=[0], image_clusterers=["none"]))
    run_grid(grid, progress=False)
    md = (grid.output / "leaderboard.md").read_text()
    assert _cells(md, "kmeans")[_column(md, "Δ mIoU vs baseline")] == "baseline"
    assert "2 rows match the baseline rule; used: none + kmeans" in md


def test_a_grid_run_stores_per_image_counts_pickle_free(tmp_path, toy_root):
    """Through the stage graph: each cell's .npz holds its per-image counts (summing to the record's confusion)
    and the image ids; the report's per_image_counts.npz holds every cell; both load with allow_pickle=False."""
    from tests.conftest import tiny_grid
    from ussbench.config import load_grid
    from ussbench.evaluation.per_image import CELL_IDS_KEY, CELL_KEY
    from ussbench.evaluation.statistics import CellCounts
    from ussbench.runner import run_grid

    grid = load_grid(tiny_grid(tmp_path, toy_root, seeds=[0], dataset_clusterers=["kmeans"]))
    run_grid(grid, progress=False)
    records = sorted((grid.output / "cells").glob("*.json"))
    assert len(records) == 2
    ids = None
    for path in records:
        record = read_json(path)
        with np.load(path.with_suffix(".npz"), allow_pickle=False) as data:
            rows, ids = data[CELL_KEY], [str(x) for x in data[CELL_IDS_KEY]]
        confusion = np.asarray(record["confusion"])
        counts = CellCounts(rows, len(ids), *confusion.shape)
        assert np.array_equal(counts.total(), confusion) and rows[:, 3].min() > 0
        assert len(ids) == record["row"]["n_images"] == len(set(ids))
    store = read_store(grid.output / STORE_NAME)
    assert set(store) == {read_json(p)["row"]["cell_id"] for p in records}
    assert all(cell.image_ids == ids for cell in store.values())
    with np.load(grid.output / STORE_NAME, allow_pickle=False) as data:
        assert all(data[name].dtype != object for name in data.files)
    md = (grid.output / "leaderboard.md").read_text()
    assert "Intervals: unavailable" not in md and "bootstrap over images" in md


def test_compare_where_picks_rows_by_stage_labels_and_matches_the_command(report, capsys):
    """The study tables' claims use compare_where: the same paired Δ and interval as ``ussbench compare``."""
    from ussbench.reports.compare import compare_where

    d = compare_where(
        report, {"image_clusterer": "good twin"}, {"image_clusterer": "raw tokens"}, n_resamples=200
    )
    assert main(["compare", str(report), "good twin", "raw tokens", "--resamples", "200"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("Δ mIoU"))
    assert f"{d.delta:+.2f} [{d.low:+.2f}, {d.high:+.2f}]" in line and d.decided
    assert compare_where(report, {"image_clusterer": "good"}, {"image_clusterer": "no such row"}) is None


def test_index_names_the_best_row_of_each_dataset(tmp_path):
    """A report over two datasets lists each dataset's best row (the omh index showed CamVid's 21.56 as best)."""
    from ussbench.reports.index import _summary

    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "leaderboard.html").write_text("<html></html>")
    rows = [("msrc", "STEGO", 17.9), ("msrc", "HP", 19.4), ("camvid", "STEGO", 21.6), ("camvid", "HP", 11.9)]
    frame = pd.DataFrame([{"dataset": d, "feature_learner": f, "image_clusterer": "patches", "miou": m,
                           "n_images": 10} for d, f, m in rows])  # fmt: skip
    frame.to_parquet(folder / "results.parquet")
    best = _summary(folder)["best"]
    assert best == "camvid: STEGO + patches (21.60 mIoU); msrc: HP + patches (19.40 mIoU)"


def test_html_sort_keys_read_bounded_p_values():
    """The page sorts the p column by its data-v key: a p at the bootstrap's floor ('≤ 1.0e-03') sorts as
    that number (smallest first), not as missing (it sorted below every other row)."""
    from ussbench.reports.comparisons import fmt_p
    from ussbench.reports.page import sort_value

    shown = [fmt_p(p, 999) for p in (1.0, 0.03, 0.0)]
    assert shown[-1].startswith("≤")
    keys = [float(sort_value(text)) for text in shown]
    assert keys == sorted(keys, reverse=True) and keys[-1] == pytest.approx(1e-3)
    assert sort_value(fmt_p(float("nan"), 999)) == ""


def test_one_seed_rows_have_no_std_in_the_csv(tmp_path):
    """A std over one seed is undefined: blank in leaderboard.csv, not 0.0 (which reads as certainty)."""
    out = tmp_path / "one"
    write_fake_cells(out, {"raw tokens": 0.3, "good": 0.7}, seeds=(0,))
    write_fake_cells(out, {"three": 0.5}, seeds=(0, 1, 2))
    build_report(out, "one", n_resamples=100)
    table = pd.read_csv(out / "leaderboard.csv").set_index("image_clusterer")
    assert table.loc["good", "seeds"] == 1 and np.isnan(table.loc["good", "miou_std"])
    assert np.isnan(table.loc["good", "acc_std"]) and table.loc["three", "miou_std"] > 0


def test_identical_scores_get_their_own_verdict():
    from ussbench.evaluation.statistics import PairedDelta, RowBootstrap
    from ussbench.reports.compare import verdict
    from ussbench.reports.comparisons import _verdict

    assert verdict(False, 1.0, identical=True) == "identical scores (no difference to decide)"
    assert verdict(False, 1.0) == "not decided (the interval contains 0)"
    boot = RowBootstrap.__new__(RowBootstrap)
    assert _verdict(PairedDelta(0.0, 0.0, 0.0, 1.0), boot, boot, 0.95).startswith("identical scores")


def test_compare_picks_a_row_by_the_label_its_no_match_error_lists(tmp_path, capsys):
    out = tmp_path / "nones"
    write_fake_cells(out, {"none": 0.3, "km": 0.6})  # an image clusterer labelled 'none' (raw tokens)
    build_report(out, "nones", n_resamples=50)
    assert main(["compare", str(out), "nothing like it", "1"]) == 2
    listed = capsys.readouterr().err.split("the rows are ")[1].split("; give")[0]
    labels = dict(item.split(": ", 1) for item in listed.split("; "))
    assert set(labels.values()) == {"none", "km"}
    row_of_none = next(n for n, lab in labels.items() if lab == "none")
    assert main(["compare", str(out), "none", "km", "--resamples", "50"]) == 0
    assert f" row {row_of_none}: " in capsys.readouterr().out.splitlines()[0]


def test_tied_rows_are_ordered_by_label_whatever_order_the_cells_come_in(tmp_path):
    """Before, rows with equal means kept the order their cells were read in (cell-id order), so the row numbers
    `compare` takes could differ between two folders holding the same results."""
    import copy

    from ussbench.reports.records import load_report_cells
    from ussbench.reports.tables import leaderboard_frame, results_frame

    write_fake_cells(tmp_path, {"alpha": 0.6, "beta": 0.3}, seeds=(0,))
    cells, _ = load_report_cells(tmp_path)
    twins = []
    for label in ("zeta", "eta"):  # same scores as alpha under other labels, read before it
        twin = copy.deepcopy(next(c for c in cells if c["row"]["image_clusterer"] == "alpha"))
        twin["row"].update(image_clusterer=label, cell_id=f"twin-{label}")
        twins.append(twin)
    for order in (twins + cells, cells + twins[::-1]):
        board = leaderboard_frame(results_frame(order))
        assert board.image_clusterer.tolist() == ["alpha", "eta", "zeta", "beta"]


def test_history_line_shows_the_set_values_once():
    """A new user saw "latest `... --set 'seeds=[0]' ...`, --set seeds=[0]": the command already holds them."""
    from ussbench.reports.header import history_line

    entry = {"command": "python -m ussbench run --grid g.yaml --set 'seeds=[0]' --limit 3", "limit": "3",
             "set": ["seeds=[0]"], "ended": "x"}  # fmt: skip
    line = history_line({"history": [entry]})
    assert line.count("seeds=[0]") == 1 and line.count("--limit 3") == 1
    assert "--set seeds=[0]" in history_line({"history": [{**entry, "command": None}]})  # no command recorded
