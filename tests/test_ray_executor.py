"""The Ray executor on a local Ray instance: the same records as the in-process executor, seed for seed;
resume; failed stages and dead workers end as recorded cells; no Ray process is left behind."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, tiny_grid
from ussbench.cli import main
from ussbench.config import load_grid
from ussbench.graph.records import CellStore
from ussbench.runner import run_grid

ray = pytest.importorskip("ray", reason='the Ray executor needs pip install "ussbench[ray]"')

from ussbench.graph.ray_executor import RayExecutor  # noqa: E402

PLUGINS = str(REPO / "tests" / "_ray_plugins.py")
# what legitimately differs between two runs of the same cell: timings, memory peaks, threads of the process
VOLATILE = ("time_", "peak_", "threads_", "environment")


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process."""
    out = {}
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            out[int(proc.name)] = (ppid, cmd)
    return out


def ray_processes(temp_dir: str) -> set[int]:
    """The live processes of the Ray instance whose temporary folder is ``temp_dir``: those naming it and their
    children (workers rename themselves ``ray::...``)."""
    procs = _processes()
    found = {pid for pid, (_, cmd) in procs.items() if temp_dir in cmd}
    return found | {pid for pid, (ppid, _) in procs.items() if ppid in found}


def processes_with_env(assignment: str) -> set[int]:
    """Live processes whose environment holds ``NAME=value`` (every process a Ray instance starts inherits it)."""
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if assignment.encode() in (proc / "environ").read_bytes().split(b"\0"):
                    found.add(int(proc.name))
            except OSError:
                continue
    return found


def wait_gone(pids: set[int], seconds: float = 20) -> set[int]:
    """The pids still alive after waiting up to ``seconds`` for them to exit."""
    deadline = time.time() + seconds
    alive = {p for p in pids if Path(f"/proc/{p}").exists()}
    while alive and time.time() < deadline:
        time.sleep(0.5)
        alive = {p for p in alive if Path(f"/proc/{p}").exists()}
    return alive


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (2 CPUs, a small object store); shut down and checked gone."""
    temp_dir = tempfile.mkdtemp(prefix="ur", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    ray.init(num_cpus=2, object_store_memory=300 * 2**20, include_dashboard=False, _temp_dir=temp_dir,
             configure_logging=False, log_to_driver=False)  # fmt: skip
    yield
    started = ray_processes(temp_dir)
    assert started, "the check sees the instance's processes"
    ray.shutdown()
    left = wait_gone(started)
    shutil.rmtree(temp_dir, ignore_errors=True)
    assert not left, f"Ray processes left behind: {left}"


def folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def records(output: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (output / "cells").glob("*.json")}


def stable(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith(VOLATILE)}


def assert_same_cells(a: Path, b: Path) -> None:
    """Both output folders hold the same cells with the same rows, panels and extras, seed for seed (the
    grids differ only in their output and cache folders)."""
    ra, rb = records(a), records(b)
    text = json.dumps(ra).replace(str(a.parent / "cache"), str(b.parent / "cache"))
    ra = json.loads(text.replace(str(a), str(b)))
    assert ra and set(ra) == set(rb)
    for cid in ra:
        x, y = ra[cid], rb[cid]
        assert stable(x["row"]) == stable(y["row"]), cid
        assert {k: v for k, v in x.items() if k != "row"} == {k: v for k, v in y.items() if k != "row"}, cid
        with np.load(a / "cells" / f"{cid}.npz") as pa, np.load(b / "cells" / f"{cid}.npz") as pb:
            assert set(pa.files) == set(pb.files)
            for name in pa.files:
                assert np.array_equal(pa[name], pb[name]), (cid, name)


@pytest.mark.slow
def test_ray_writes_the_local_executors_records_and_resumes(tmp_path, toy_root, local_ray):
    local = load_grid(tiny_grid(folder(tmp_path / "local"), toy_root))
    remote = load_grid(
        tiny_grid(folder(tmp_path / "ray"), toy_root)
    )  # its own cache: Ray workers compute every stage
    expected = run_grid(local, progress=False, report=False)
    got = run_grid(remote, progress=False, report=False, executor=RayExecutor())
    assert got.n_run == 8 and got.n_failed == 0
    assert got.execution.computed == expected.execution.computed, "each shared stage computed once"
    assert got.execution.computed["features"] == 1 and got.execution.computed["segments"] == 3
    assert_same_cells(local.output, remote.output)
    assert json.loads((remote.output / "run.json").read_text())["executor"] == "ray"

    again = run_grid(remote, progress=False, report=False, executor=RayExecutor())  # resume: nothing to do
    assert again.n_resumed == 8 and again.n_run == 0 and sum(again.execution.computed.values()) == 0

    for path in list((remote.output / "cells").glob("*.json"))[:3]:  # a half-finished folder, warm cache
        path.unlink()
    warm = run_grid(remote, progress=False, report=False, executor=RayExecutor())
    assert warm.n_run == 3 and warm.n_resumed == 5
    assert "features" not in warm.execution.computed and warm.execution.loaded["features"] == 1
    assert_same_cells(local.output, remote.output)


def misbehaving_grid(tmp_path: Path, toy_root: Path, mode: str, markers: Path | None = None) -> Path:
    segments = {"name": "ray_test_segments", "label": "flaky",
                "params": {"mode": mode, "bad_seed": 1, "marker_dir": str(markers or tmp_path / "attempts")}}  # fmt: skip
    return tiny_grid(tmp_path, toy_root, plugins=[PLUGINS], image_clusterers=[segments],
                     dataset_clusterers=["kmeans", {"name": "kmeans", "params": {"engine": "sklearn"}, "label": "sk"}])  # fmt: skip


def failed_records(output: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (output / "cells" / "failed").glob("*.json")]


@pytest.mark.slow
def test_a_failing_stage_is_recorded_like_the_local_executors_and_the_rest_finishes(
    tmp_path, toy_root, local_ray
):
    markers = tmp_path / "attempts"  # one folder: the same parameters, so the same cell ids
    local = load_grid(misbehaving_grid(folder(tmp_path / "local"), toy_root, "fail", markers))
    remote = load_grid(misbehaving_grid(folder(tmp_path / "ray"), toy_root, "fail", markers))
    expected = run_grid(local, progress=False, report=False)
    got = run_grid(remote, progress=False, report=False, executor=RayExecutor(max_retries=2))
    assert got.n_run == 2 and got.n_failed == 2
    assert sorted(got.failures) == sorted(expected.failures)
    assert all("RuntimeError: boom on seed 1" in f for f in got.failures)
    in_workers = [p for p in (tmp_path / "attempts").glob("attempt-1-*") if f"-{os.getpid()}-" not in p.name]
    assert len(in_workers) == 1, "a stage error is deterministic: not retried"
    assert {json.dumps(r["row"], sort_keys=True) for r in failed_records(remote.output)} == {
        json.dumps(r["row"], sort_keys=True) for r in failed_records(local.output)
    }
    assert "Traceback" in CellStore(remote.output).error_log.read_text()
    assert_same_cells(local.output, remote.output)


@pytest.mark.slow
def test_a_transient_error_is_retried_and_the_cell_finishes(tmp_path, toy_root, local_ray):
    path = misbehaving_grid(tmp_path, toy_root, "eio_once")
    grid = load_grid(path)
    got = run_grid(grid, progress=False, report=False, executor=RayExecutor(max_retries=1))
    assert got.n_failed == 0 and got.n_run == 4
    assert len(list((tmp_path / "attempts").glob("attempt-1-*"))) == 2, "the I/O error was retried once"
    assert not failed_records(grid.output)


@pytest.mark.slow
def test_a_worker_that_always_dies_is_retried_a_bounded_number_of_times_then_recorded(tmp_path, toy_root,
                                                                                       local_ray):  # fmt: skip
    grid = load_grid(misbehaving_grid(tmp_path, toy_root, "crash"))
    got = run_grid(grid, progress=False, report=False, executor=RayExecutor(max_retries=1))
    assert got.n_run == 2 and got.n_failed == 2, "the cells of seed 0 finish"
    assert len(list((tmp_path / "attempts").glob("attempt-1-*"))) == 2, "1 try + 1 retry"
    for record in failed_records(grid.output):
        error = record["row"]["error"]
        assert "\n" not in error and "image clusterer flaky (seed 1)" in error
        assert "TaskLost" in error and "2 attempt(s)" in error
    assert len(records(grid.output)) == 2


@pytest.mark.slow
def test_killing_a_worker_mid_grid_still_records_every_cell(tmp_path, toy_root, local_ray):
    grid = load_grid(misbehaving_grid(tmp_path, toy_root, "hang_once"))
    pid_file = tmp_path / "attempts" / "running.pid"
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 90
        while not pid_file.is_file() and time.time() < deadline:
            time.sleep(0.1)
        if pid_file.is_file():
            pid = int(pid_file.read_text())
            os.kill(pid, 9)
            killed.append(pid)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    got = run_grid(grid, progress=False, report=False, executor=RayExecutor(max_retries=2))
    thread.join(timeout=5)
    assert killed, "the worker was killed mid-task"
    assert got.n_failed == 0 and got.n_run == 4, (
        "the killed task was retried elsewhere and every cell finished"
    )
    assert len(records(grid.output)) == 4 and not failed_records(grid.output)


def _unpickle_after_importing(plugins: str, blob: bytes) -> str:
    from ussbench import registry

    registry.import_plugin_module(plugins)
    return type(pickle.loads(blob)).__name__


@pytest.mark.slow
def test_a_plugin_object_unpickles_in_another_process_that_imported_the_grids_plugins():
    """Plugin modules get the same module name in every process, so a worker reads a fitted plugin object
    that another worker computed (Python's str hash differs per process and once named the module)."""
    from ussbench import registry

    module = registry.import_plugin_module(PLUGINS)
    blob = pickle.dumps(module.MisbehavingSegments(mode="fail"))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.apply(_unpickle_after_importing, (PLUGINS, blob)) == "MisbehavingSegments"


def test_cli_without_ray_is_one_line_saying_how_to_install_it(tmp_path, toy_root, monkeypatch, capsys):
    path = tiny_grid(tmp_path, toy_root)
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    assert main(["run", "--grid", str(path), "--executor", "ray", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install "ussbench[ray]"' in err
    assert not (tmp_path / "out").exists(), "nothing written"
    assert main(["run", "--grid", str(path), "--address", "auto", "--no-progress"]) == 2
    assert "--address is for --executor ray" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_runs_a_grid_on_its_own_local_ray_instance_and_stops_it(tmp_path, toy_root):
    """``python -m ussbench run --executor ray`` starts a local instance, writes the report and leaves no process."""
    path = tiny_grid(tmp_path, toy_root, seeds=[0], dataset_clusterers=["kmeans"])
    temp_dir = tempfile.mkdtemp(prefix="ur", dir="/tmp")
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "RAY_TMPDIR": temp_dir,
        "USSBENCH_RAY_OBJECT_STORE_MB": "300",
    }
    try:
        proc = subprocess.run([sys.executable, "-m", "ussbench", "run", "--grid", str(path), "--executor", "ray",
                               "--no-progress"], env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "2 cells (2 run, 0 resumed)" in proc.stdout
        assert (tmp_path / "out" / "leaderboard.md").is_file()
        left = wait_gone(processes_with_env(f"RAY_TMPDIR={temp_dir}") | ray_processes(temp_dir), 10)
        assert not left, f"Ray processes left behind: {left}"
    finally:
        shutil.rmtree(temp_dir, ignore_errors=True)
