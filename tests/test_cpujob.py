"""scripts/cpujob: the timing wrapper the benchmarks' docstrings name (one core and 1 thread, or all cores)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "cpujob"

pytestmark = pytest.mark.skipif(
    not (shutil.which("flock") and shutil.which("taskset")), reason="cpujob needs flock and taskset"
)

PROBE = "import os; print(os.environ.get('OMP_NUM_THREADS'), sorted(os.sched_getaffinity(0)))"


def _run(tmp_path: Path, *args: str) -> str:
    env = {**os.environ, "CPUJOB_LOCK_DIR": str(tmp_path)}
    env.pop("OMP_NUM_THREADS", None)
    return subprocess.run(
        [str(SCRIPT), *args], env=env, capture_output=True, text=True, check=True, timeout=60
    ).stdout


def test_one_core_job_is_pinned_to_one_core_with_one_thread(tmp_path):
    threads, cores = _run(tmp_path, sys.executable, "-c", PROBE).split(maxsplit=1)
    assert threads == "1"
    assert len(eval(cores)) == 1
    assert eval(cores)[0] in os.sched_getaffinity(0)


def test_both_waits_for_a_running_one_core_job_and_gets_every_core(tmp_path):
    env = {**os.environ, "CPUJOB_LOCK_DIR": str(tmp_path)}
    holder = subprocess.Popen([str(SCRIPT), "bash", "-c", "touch started; sleep 2"], env=env, cwd=tmp_path)
    try:
        deadline = time.time() + 30
        while not (tmp_path / "started").exists():
            assert time.time() < deadline, "the one-core job did not start"
            time.sleep(0.05)
        t0 = time.perf_counter()
        out = _run(tmp_path, "--both", sys.executable, "-c", PROBE)
        waited = time.perf_counter() - t0
    finally:
        holder.wait(timeout=60)
    threads, cores = out.split(maxsplit=1)
    assert eval(cores) == sorted(os.sched_getaffinity(0))
    assert threads == "None"  # the default thread count: nothing set
    assert waited > 1.0  # it waited for the one-core job's lock


def test_no_command_is_a_usage_error(tmp_path):
    env = {**os.environ, "CPUJOB_LOCK_DIR": str(tmp_path)}
    res = subprocess.run([str(SCRIPT), "--both"], env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == 2 and "usage" in res.stderr
