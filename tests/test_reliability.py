"""Results that cannot silently go wrong: no code from data files, keys bound to the data, failures isolated."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from tests.conftest import tiny_grid, write_toy_folder
from ussbench import registry
from ussbench.atomic import atomic_write_json, atomic_write_text, clean_orphans
from ussbench.base import ImageClusterer, Segmentation
from ussbench.cache import Cache, CorruptEntry, read_entry
from ussbench.cli import main
from ussbench.config import load_grid
from ussbench.graph.records import load_artifacts
from ussbench.runner import run_grid

KM3 = {"name": "kmeans_per_image", "params": {"n_segments": 3}, "label": "km3"}


def rows(out) -> dict[str, dict]:
    """cell id -> result row of every finished cell record (no report needed)."""
    return {p.stem: json.loads(p.read_text())["row"] for p in (out / "cells").glob("*.json")}


def run(grid):
    return run_grid(grid, progress=False, report=False)


class Payload:
    """Unpickling this runs code: it writes ``marker`` (what a booby-trapped file would do, harmlessly)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def plant(path, marker) -> None:
    """Overwrite ``path`` with a torch file whose unpickling would run the payload."""
    torch.save({"format": "ussbench-cache/2", "value": Payload(marker)}, path)


def test_the_payload_is_live_when_unpickled_unsafely(tmp_path):
    """Guard for the tests below: an unsafe load of a planted file really runs the payload."""
    path, marker = tmp_path / "x.pt", tmp_path / "marker"
    plant(path, marker)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "pwned"


def test_planted_pickle_in_the_cache_never_runs_and_is_recomputed(tmp_path, toy_root, caplog):
    grid = load_grid(
        tiny_grid(tmp_path, toy_root, seeds=[0], image_clusterers=[KM3], dataset_clusterers=["kmeans"])
    )
    first = run(grid)
    before = {k: r["miou"] for k, r in rows(first.output).items()}
    marker = tmp_path / "marker"
    for stage in ("features", "segments"):
        (entry,) = (grid.cache_dir / stage).glob("*.pt")
        plant(entry, marker)
    for record in (first.output / "cells").glob("*.json"):
        record.unlink()
    with caplog.at_level(logging.WARNING):
        again = run(grid)
    assert not marker.exists(), "a cache entry executed code"
    assert again.n_run == 1
    assert {k: r["miou"] for k, r in rows(first.output).items()} == before
    warnings = [r.getMessage() for r in caplog.records if "is corrupt" in r.getMessage()]
    assert len(warnings) == 2 and all("\n" not in w and "Unsupported global" in w for w in warnings)
    assert len(list((grid.cache_dir / "corrupt").rglob("*.pt*"))) == 2


def test_planted_pickle_in_a_report_folder_never_runs(tmp_path, toy_root, caplog):
    """``ussbench report`` on a folder someone sent: the cells' artifacts files are read without pickle."""
    stego = {"name": "stego", "params": {"steps": 2, "batch_size": 2, "dim": 8, "crop_size": 2, "feature_samples": 2,
                                         "neg_samples": 1, "num_neighbors": 2}}  # fmt: skip
    grid = load_grid(tiny_grid(tmp_path, toy_root, seeds=[0], image_clusterers=["none"], dataset_clusterers=["kmeans"],
                               feature_learners=[stego]))  # fmt: skip
    summary = run_grid(grid, progress=False)
    (artifacts,) = (summary.output / "cells").glob("*.artifacts.pt")
    assert "feature_learner" in load_artifacts(artifacts)  # a genuine file loads
    marker = tmp_path / "marker"
    plant(artifacts, marker)
    with caplog.at_level(logging.WARNING):
        assert main(["report", str(summary.output)]) == 0
        assert load_artifacts(artifacts) is None
    assert not marker.exists(), "the report builder executed code"
    assert any("artifacts" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)


def test_other_data_under_the_same_names_is_never_reused(tmp_path):
    """Same file names, other pixels, same output and cache: features recomputed, no cell resumed."""
    a = write_toy_folder(tmp_path / "a" / "toy", seed=0)
    b = write_toy_folder(tmp_path / "b" / "toy", seed=1)
    assert sorted(p.name for p in (a / "images").iterdir()) == sorted(
        p.name for p in (b / "images").iterdir()
    )
    settings = {"seeds": [0], "image_clusterers": [KM3], "dataset_clusterers": ["kmeans"]}
    run(load_grid(tiny_grid(tmp_path, a, **settings)))
    on_b = run(load_grid(tiny_grid(tmp_path, b, **settings)))
    assert (on_b.n_run, on_b.n_resumed) == (1, 0)
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 2
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    alone = rows(run(load_grid(tiny_grid(fresh, b, **settings))).output)
    mixed = rows(on_b.output)
    assert len(alone) == 1 and len(mixed) == 2
    (cid,) = alone
    assert mixed[cid]["miou"] == alone[cid]["miou"]


def test_a_copy_of_the_same_data_elsewhere_resumes(tmp_path):
    """Keys name the content, not the location or the files' dates: a plain copy resumes every cell."""
    a = write_toy_folder(tmp_path / "a" / "toy")
    copy = tmp_path / "elsewhere" / "toy"
    shutil.copytree(a, copy, copy_function=shutil.copyfile)  # new mtimes
    settings = {"seeds": [0], "image_clusterers": [KM3], "dataset_clusterers": ["kmeans"]}
    run(load_grid(tiny_grid(tmp_path, a, **settings)))
    again = run(load_grid(tiny_grid(tmp_path, copy, **settings)))
    assert (again.n_run, again.n_resumed) == (0, 1)


def test_a_rewritten_file_with_its_old_size_and_mtime_is_rehashed(tmp_path):
    """The remembered digest is keyed by size, mtime and ctime: restoring the mtime does not hide an edit."""
    from ussbench.fingerprint import DigestStore

    store = DigestStore(tmp_path / "fingerprints")
    path = tmp_path / "img.png"
    path.write_bytes(b"A" * 100)
    before = store.digests([path])
    st = path.stat()
    path.write_bytes(b"B" * 100)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
    assert store.digests([path]) != before
    assert DigestStore(tmp_path / "fingerprints").digests([path]) == store.digests([path])  # remembered


def test_an_entry_holding_another_key_is_not_used(tmp_path, toy_root, caplog):
    grid = load_grid(
        tiny_grid(tmp_path, toy_root, seeds=[0, 1], image_clusterers=[KM3], dataset_clusterers=["kmeans"])
    )
    run_grid(grid, progress=False)
    first, second = sorted((grid.cache_dir / "segments").glob("*.pt"))
    shutil.copyfile(first, second)  # a readable entry, but another key's segments
    with pytest.raises(CorruptEntry, match="holds key"):
        read_entry(second, "segments", second.stem)
    with caplog.at_level(logging.WARNING):
        assert Cache(grid.cache_dir).load("segments", second.stem) is None
    assert any("holds key" in r.getMessage() for r in caplog.records)
    assert not second.exists()


def test_a_disk_hit_counts_as_reused(tmp_path, toy_root):
    grid = load_grid(tiny_grid(tmp_path, toy_root, seeds=[0], dataset_clusterers=["kmeans"]))
    first = run(grid)
    cold = {r["image_clusterer"]: r for r in rows(first.output).values()}
    assert {k: r["features_reused"] for k, r in cold.items()} == {
        "none": False,
        "km3": True,
    }  # computed first
    shutil.rmtree(first.output)
    run(grid)
    warm = {r["image_clusterer"]: r for r in rows(first.output).values()}
    assert {k: r["features_reused"] for k, r in warm.items()} == {"none": True, "km3": True}  # the disk cache
    assert {k: r["miou"] for k, r in warm.items()} == {k: r["miou"] for k, r in cold.items()}


def test_learned_codes_loaded_from_the_cache_keep_their_training_time(tmp_path, toy_root):
    """A warm run reads the learner's training seconds from its cached codes (not the load) and says it loaded."""
    small = {"steps": 4, "batch_size": 2, "dim": 8, "crop_size": 2, "feature_samples": 2, "neg_samples": 1,
             "num_neighbors": 2, "curve_every": 2, "checkpoints": 0}  # fmt: skip
    grid = load_grid(tiny_grid(tmp_path, toy_root, seeds=[0], image_clusterers=["none"], dataset_clusterers=["kmeans"],
                               feature_learners=[{"name": "stego", "label": "STEGO", "params": small}]))  # fmt: skip
    first = run(grid)
    (cold,) = rows(first.output).values()
    assert cold["learner_reused"] is False and cold["time_feature_learner_fit_s"] > 0
    shutil.rmtree(first.output)
    run_grid(grid, progress=False)  # with the report
    (warm,) = rows(first.output).values()
    assert warm["learner_reused"] is True
    assert warm["time_feature_learner_fit_s"] == cold["time_feature_learner_fit_s"]  # stored with the codes
    board = (first.output / "leaderboard.md").read_text()
    assert "learner training s" in board and "loaded them from the cache" in board


def test_a_grid_without_learners_has_no_learner_time_column_and_says_what_times_hold(tmp_path, toy_root):
    grid = load_grid(
        tiny_grid(tmp_path, toy_root, seeds=[0], image_clusterers=["none"], dataset_clusterers=["kmeans"])
    )
    out = run_grid(grid, progress=False).output
    header = (out / "leaderboard.md").read_text().split("## Leaderboard")[1].strip().splitlines()[0]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert "features s" in columns and "learner s" not in columns and "learner training s" not in columns
    assert "its load when an earlier run had cached it" in (out / "leaderboard.md").read_text()


class FailsOnSeed(ImageClusterer):
    """One segment per patch, except that the seeds in ``broken`` raise (a plugin bug that must not stop the grid)."""

    calls: list[int] = []
    broken: set[int] = {1}

    def __init__(self, seed: int = 0):
        self.seed = seed

    def predict(self, features, ctx):
        FailsOnSeed.calls.append(self.seed)
        if self.seed in FailsOnSeed.broken:
            raise RuntimeError(f"boom on seed {self.seed}\nsecond line of the message")
        out = []
        for im in features:
            h, w = im.grid
            out.append(Segmentation(torch.arange(h * w).reshape(h, w), im.tokens.reshape(h * w, -1).float()))
        return out


@pytest.fixture
def fails_on_seed():
    registry.register("image_clusterer", "fails_on_seed_test")(FailsOnSeed)
    FailsOnSeed.calls, FailsOnSeed.broken = [], {1}
    yield FailsOnSeed
    registry.unregister("image_clusterer", "fails_on_seed_test")


def test_a_failing_cell_is_recorded_and_the_grid_goes_on(tmp_path, toy_root, fails_on_seed, capsys, caplog):
    path = tiny_grid(tmp_path, toy_root, seeds=[0, 1], image_clusterers=["fails_on_seed_test"],
                     dataset_clusterers=["kmeans", {"name": "kmeans", "params": {"engine": "sklearn"}, "label": "sk"}])  # fmt: skip
    with caplog.at_level(logging.INFO):
        code = main(["-v", "run", "--grid", str(path), "--no-progress"])
    assert code == 1
    assert "2 cell(s) failed" in capsys.readouterr().err
    assert sorted(fails_on_seed.calls) == [0, 1], (
        "the failing segments node is shared: tried once, not per cell"
    )
    out = tmp_path / "out"
    assert (
        len(list((out / "cells").glob("*.json"))) == 2
        and len(list((out / "cells" / "failed").glob("*.json"))) == 2
    )
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(lines) == 2
    for line in lines:  # one line naming the cell's stages and seed, the stage that raised and the error
        assert "\n" not in line and "fails_on_seed_test" in line and "seed 1" in line
        assert "RuntimeError: boom on seed 1" in line and "errors.log" in line
    assert any("Traceback" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)  # with -v
    log_text = (out / "errors.log").read_text()
    assert log_text.count("Traceback (most recent call last)") == 2 and "predict" in log_text
    failed = json.loads(next((out / "cells" / "failed").glob("*.json")).read_text())
    assert failed["row"]["status"] == "failed" and failed["row"]["seed"] == 1
    board = (out / "leaderboard.md").read_text()
    assert "## Failed cells" in board and "boom on seed 1" in board
    assert len(pd.read_csv(out / "results.csv")) == 2  # the finished cells are reported

    fails_on_seed.calls, fails_on_seed.broken = [], set()  # the bug is fixed: a new run retries the failures
    assert main(["run", "--grid", str(path), "--no-progress"]) == 0
    assert fails_on_seed.calls == [1], "only the failed cells are retried"
    assert not list((out / "cells" / "failed").glob("*.json"))
    assert "Failed cells" not in (out / "leaderboard.md").read_text()
    assert len(pd.read_csv(out / "results.csv")) == 4


def test_an_unreadable_cell_record_is_moved_aside_and_recomputed(tmp_path, toy_root, caplog):
    grid = load_grid(tiny_grid(tmp_path, toy_root, seeds=[0], dataset_clusterers=["kmeans"]))
    summary = run_grid(grid, progress=False)
    record = sorted((summary.output / "cells").glob("*.json"))[0]
    good = record.read_text()
    record.write_text(good[: len(good) // 2])  # truncated
    with caplog.at_level(logging.WARNING):
        assert main(["report", str(summary.output)]) == 0  # the report skips it, naming the file
    assert any(record.name in r.getMessage() and "not valid JSON" in r.getMessage() for r in caplog.records)
    again = run_grid(grid, progress=False)
    assert (again.n_run, again.n_resumed) == (1, 1)
    assert json.loads(record.read_text())["row"]["miou"] == json.loads(good)["row"]["miou"]
    assert len(list((summary.output / "cells" / "corrupt").iterdir())) == 1


def _truncate(path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data


def test_truncated_cell_arrays_are_moved_aside_and_the_cell_recomputed(tmp_path, toy_root, caplog):
    grid = load_grid(tiny_grid(tmp_path, toy_root, seeds=[0], dataset_clusterers=["kmeans"]))
    summary = run_grid(grid, progress=False)
    cells = summary.output / "cells"
    arrays = sorted(cells.glob("*.npz"))[0]
    good = rows(summary.output)[arrays.stem]
    _truncate(arrays)
    with caplog.at_level(logging.WARNING):  # the report still builds: counts from per_image_counts.npz
        assert main(["report", str(summary.output)]) == 0
    assert any(arrays.name in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    again = run_grid(grid, progress=False)
    assert (again.n_run, again.n_resumed) == (1, 1)  # recomputed, not "finished" forever
    assert rows(summary.output)[arrays.stem]["miou"] == good["miou"]
    assert np.load(arrays)["image_ids"].size > 0  # readable again
    kept = sorted(p.name.split(".")[1] for p in (cells / "corrupt").iterdir())
    assert kept == ["json", "npz"]


def test_a_truncated_per_image_store_is_rebuilt_from_the_cells(tmp_path, toy_root, caplog):
    grid = load_grid(tiny_grid(tmp_path, toy_root, seeds=[0], dataset_clusterers=["kmeans"]))
    summary = run_grid(grid, progress=False)
    store = summary.output / "per_image_counts.npz"
    whole = _truncate(store)
    with caplog.at_level(logging.WARNING):
        assert main(["report", str(summary.output)]) == 0
    assert any(
        "per_image_counts.npz" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records
    )
    assert len(store.read_bytes()) == len(whole)  # rewritten whole from the cells' own arrays


def test_a_corrupt_run_history_is_kept_aside_and_a_new_one_starts(tmp_path, toy_root, caplog):
    grid = load_grid(tiny_grid(tmp_path, toy_root, seeds=[0], dataset_clusterers=["kmeans"]))
    summary = run_grid(grid, progress=False)
    history = summary.output / "run.json"
    _truncate(history)
    with caplog.at_level(logging.WARNING):
        assert main(["report", str(summary.output)]) == 0  # reads it as empty, warns, leaves it alone
        again = run_grid(grid, progress=False)
    assert again.n_resumed == 2
    assert any("run.json" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    assert len(json.loads(history.read_text())["history"]) == 1
    assert len(list(summary.output.glob("run.json.corrupt-*"))) == 1


def test_report_on_a_folder_of_unreadable_cells_is_one_line(tmp_path, toy_root, capsys):
    grid = load_grid(tiny_grid(tmp_path, toy_root, seeds=[0], dataset_clusterers=["kmeans"]))
    summary = run_grid(grid, progress=False, report=False)
    for record in (summary.output / "cells").glob("*.json"):
        record.write_text("{")
    assert main(["report", str(summary.output)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ussbench: error: no readable finished cell in "), err


def test_orphaned_temp_files_are_cleaned_but_a_live_writers_are_kept(tmp_path, toy_root):
    grid = load_grid(
        tiny_grid(tmp_path, toy_root, seeds=[0], image_clusterers=["none"], dataset_clusterers=["kmeans"])
    )
    run_grid(grid, progress=False)
    import ussbench.atomic as atomic

    dead = 2**22 + 12345  # above the default pid_max: no such process
    orphans = [grid.output / "cells" / f".x.json.{atomic._HOST}.{dead}.abcd.tmp",
               grid.cache_dir / "features" / f".k.pt.{atomic._HOST}.{dead}.ef01.tmp"]  # fmt: skip
    live = grid.output / "cells" / f".y.json.{atomic._HOST}.{os.getpid()}.abcd.tmp"
    for path in (*orphans, live):
        path.write_bytes(b"")
    run(grid)
    assert not any(p.exists() for p in orphans) and live.exists()
    assert clean_orphans(grid.output) == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_respect_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_results_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    import ussbench.atomic as atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    atomic_write_json(tmp_path / "r.json", {"a": 1})
    assert events[:2] == ["fsync", "replace"] and events.count("fsync") >= 2  # the file, then its folder


def test_storable_values_round_trip_and_foreign_objects_become_text(tmp_path, caplog):
    from ussbench.cache import write_entry

    value = {"t": torch.arange(3), "a": np.ones((2, 2), np.float32), "s": np.float64(0.5), "l": [1, "x", None],
             "odd": tmp_path}  # fmt: skip
    with caplog.at_level(logging.WARNING):
        write_entry(tmp_path / "e.pt", value, "segments", "k")
    back = read_entry(tmp_path / "e.pt", "segments", "k")
    assert torch.equal(back["t"], value["t"]) and np.array_equal(back["a"], value["a"])
    assert back["s"] == 0.5 and back["l"] == [1, "x", None] and back["odd"] == repr(tmp_path)
    assert any("stored as text" in r.getMessage() for r in caplog.records)
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"x": 1}, f)
    with pytest.raises(CorruptEntry):
        read_entry(tmp_path / "plain.pkl")
