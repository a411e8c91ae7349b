"""With ``--reuse-committed`` a committed report folder (no ``cells/``) resumes its cells from results.parquet +
per_image_counts.npz, so a fresh clone recomputes only the cells the grid changed; without it, everything."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from tests.conftest import tiny_grid
from ussbench.config import load_grid
from ussbench.evaluation.per_image import STORE_NAME, read_store, write_store
from ussbench.runner import run_grid


@pytest.fixture
def committed(tmp_path, toy_root):
    """A finished grid's folder as a clone sees it: cells/ removed, committed files kept."""
    grid = load_grid(tiny_grid(tmp_path, toy_root, dataset_clusterers=["kmeans"]))
    first = run_grid(grid, progress=False)
    before = pd.read_parquet(first.output / "results.parquet")
    md_before = (first.output / "leaderboard.md").read_text()
    shutil.rmtree(first.output / "cells")
    return grid, before, md_before


def _rows(md: str) -> list[str]:
    """The leaderboard's table rows (every table line that names one of the grid's image clusterers)."""
    return [line for line in md.splitlines() if line.startswith("|") and ("km3" in line or "| none" in line)]


def test_fresh_clone_resumes_every_committed_cell(committed, monkeypatch):
    grid, before, md_before = committed
    import ussbench.graph.executor as executor

    monkeypatch.setattr(
        executor, "compute_node", lambda *a, **k: pytest.fail("a committed cell was recomputed")
    )
    again = run_grid(grid, progress=False, reuse_committed=True)
    assert (again.n_run, again.n_resumed) == (0, 4)
    after = pd.read_parquet(again.output / "results.parquet")
    cols = [c for c in before.columns if c != "grid"]
    pd.testing.assert_frame_equal(
        before[cols].sort_values("cell_id").reset_index(drop=True),
        after[cols].sort_values("cell_id").reset_index(drop=True),
    )
    md = (again.output / "leaderboard.md").read_text()
    assert "Intervals: unavailable" not in md and "mIoU 95% CI" in md
    assert len(_rows(md)) >= 2 and _rows(md) == _rows(md_before)  # same means, intervals, ranks
    assert (again.output / "panels.png").is_file() and "panels.png" in md


def test_a_changed_row_alone_is_recomputed(committed, tmp_path, toy_root):
    grid, before, _ = committed
    grown = load_grid(
        tiny_grid(
            tmp_path,
            toy_root,
            dataset_clusterers=[
                "kmeans",
                {"name": "kmeans", "params": {"engine": "sklearn"}, "label": "km-sklearn"},
            ],
        )  # fmt: skip
    )
    again = run_grid(grown, progress=False, reuse_committed=True)
    assert (again.n_run, again.n_resumed) == (4, 4)
    after = pd.read_parquet(again.output / "results.parquet")
    kept = after[after.cell_id.isin(before.cell_id)].set_index("cell_id").sort_index()
    assert kept.miou.equals(before.set_index("cell_id").sort_index().miou)
    assert set(read_store(again.output / STORE_NAME)) == set(after.cell_id)  # counts of all 8 cells travel on


def test_cells_without_committed_counts_are_recomputed(committed):
    grid, before, _ = committed
    store = read_store(grid.output / STORE_NAME)
    dropped = before.cell_id.iloc[0]
    write_store(grid.output / STORE_NAME, {k: v for k, v in store.items() if k != dropped})
    again = run_grid(grid, progress=False, reuse_committed=True)
    assert (again.n_run, again.n_resumed) == (1, 3)
    assert dropped in read_store(grid.output / STORE_NAME)


def test_without_the_flag_a_fresh_clone_recomputes_every_cell(committed):
    grid, _, _ = committed
    assert run_grid(grid, progress=False).n_run == 4


def test_the_cli_flag_reuses_committed_cells(committed, capsys):
    from ussbench.cli import main

    grid, _, _ = committed
    assert main(["run", "--grid", str(grid.path), "--no-progress", "--reuse-committed"]) == 0
    assert "(0 run, 4 resumed)" in capsys.readouterr().out


def test_a_folder_with_its_own_cells_recomputes_a_deleted_record(committed):
    grid, _, _ = committed
    run_grid(grid, progress=False, reuse_committed=True)  # restores all four
    records = sorted((grid.output / "cells").glob("*.json"))
    records[0].unlink()
    assert run_grid(grid, progress=False, reuse_committed=True).n_run == 1


def test_an_unreadable_committed_table_recomputes_with_a_warning(committed, caplog):
    grid, _, _ = committed
    (grid.output / "results.parquet").write_bytes(b"not parquet")
    with caplog.at_level("WARNING", logger="ussbench"):
        again = run_grid(grid, progress=False, reuse_committed=True)
    assert again.n_run == 4
    assert any("not restored" in r.getMessage() for r in caplog.records)


def test_a_sub_grid_restores_the_whole_committed_report(committed, tmp_path, toy_root):
    """A sub-grid (as study_*_full_abc.yaml) run on a fresh clone keeps the report's other cells: restored too,
    so ``report`` over the folder and a later full-grid run still have them."""
    from ussbench.cli import main

    grid, before, _ = committed
    sub_file = tiny_grid(tmp_path, toy_root, image_clusterers=["none"], dataset_clusterers=["kmeans"])
    sub = load_grid(sub_file.rename(tmp_path / "sub.yaml"))  # its own file, as study_*_full_abc.yaml
    assert (run_grid(sub, progress=False, reuse_committed=True).n_resumed) == 2
    assert main(["report", str(grid.output)]) == 0
    assert set(pd.read_parquet(grid.output / "results.parquet").cell_id) == set(before.cell_id)
    assert (run_grid(grid, progress=False, reuse_committed=True).n_run) == 0


def test_dry_run_counts_the_cells_the_flag_restores(committed, capsys):
    from ussbench.cli import main

    grid, _, _ = committed
    assert main(["run", "--grid", str(grid.path), "--dry-run"]) == 0
    assert "0 finished, 4 to run" in capsys.readouterr().out
    assert main(["run", "--grid", str(grid.path), "--dry-run", "--reuse-committed"]) == 0
    out = capsys.readouterr().out
    assert "0 finished, 4 restored from the committed results, 0 to run" in out
    assert not (grid.output / "cells").is_dir() or not any((grid.output / "cells").glob("*.json"))
