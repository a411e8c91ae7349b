"""Fault injection: SIGKILL a real ``ussbench run`` at random points and resume; two runs at once.

Each run is a separate process on one output folder and cache. Counting plugins (a backbone, an image and a
dataset clusterer that log every computation to an append-only file) show what was computed how often.
The final results must equal an uninterrupted run's, bit for bit, with nothing lost or corrupt.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tiny_grid, write_toy_folder

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]

COUNTING_PLUGINS = '''
"""Built-in plugins that append one line per computation to EVENTS (O_APPEND: safe across processes)."""
import os

from ussbench import register
from ussbench.backbones.dino import RandomViT
from ussbench.dataset_clusterers.kmeans import KMeansClusterer
from ussbench.image_clusterers.basic import PerImageKMeans

EVENTS = {events!r}


def event(*words):
    fd = os.open(EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (" ".join(str(w) for w in (os.getpid(), *words)) + "\\n").encode())
    finally:
        os.close(fd)


@register("backbone", "counting_vit")
class CountingViT(RandomViT):
    def extract(self, dataset, device, progress=True):
        event("features", len(dataset))
        return super().extract(dataset, device, progress)


@register("image_clusterer", "counting_km")
class CountingKM(PerImageKMeans):
    def predict(self, features, ctx):
        event("segments", self.n_segments, self.seed)
        return super().predict(features, ctx)


@register("dataset_clusterer", "counting_kmeans")
class CountingKMeans(KMeansClusterer):
    def fit(self, X):
        event("cell", self.engine, self.seed, X.shape[0])  # one assignment per cell in this grid
        return super().fit(X)
'''


def fault_grid(tmp_path: Path, toy_root: Path, name: str) -> Path:
    """12 cells (2 segmentations x 2 dataset clusterers x 3 seeds) logging their work to ``name``.events."""
    events = tmp_path / f"{name}.events"
    module = tmp_path / f"{name}_plugins.py"
    module.write_text(COUNTING_PLUGINS.format(events=str(events)))
    folder = tmp_path / name
    folder.mkdir()
    return tiny_grid(
        folder, toy_root, seeds=[0, 1, 2], plugins=[str(module)],
        backbones=[{"name": "counting_vit", "params": {"depth": 2, "resolution": 32, "arch": "vit_small_patch16_224"}}],
        image_clusterers=[{"name": "counting_km", "params": {"n_segments": 3}, "label": "km3"},
                          {"name": "counting_km", "params": {"n_segments": 5}, "label": "km5"}],
        dataset_clusterers=[{"name": "counting_kmeans", "label": "km-torch"},
                            {"name": "counting_kmeans", "params": {"engine": "sklearn"}, "label": "km-sk"}],
    )  # fmt: skip


def start(grid: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "ussbench", "run", "--grid", str(grid), "--no-progress"],
                            cwd=str(grid.parent), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def results(out: Path) -> dict[str, tuple]:
    """cell id -> (mIoU, pixel accuracy, confusion) of every finished cell record."""
    records = {}
    for path in sorted((out / "cells").glob("*.json")):
        rec = json.loads(path.read_text())
        records[rec["row"]["cell_id"]] = (rec["row"]["miou"], rec["row"]["pixel_accuracy"], rec["confusion"])
    return records


def events(grid: Path) -> Counter:
    path = grid.parent.parent / f"{grid.parent.name}.events"
    return (
        Counter(" ".join(line.split()[1:]) for line in path.read_text().splitlines())
        if path.exists()
        else Counter()
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_toy_folder(tmp_path_factory.mktemp("data") / "toy")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data) -> dict:
    """The uninterrupted run's results (computed once for both tests)."""
    grid = fault_grid(tmp_path_factory.mktemp("ref"), data, "reference")
    finish(start(grid))
    ref = results(grid.parent / "out")
    assert len(ref) == 12
    assert (
        all(n == 1 for n in events(grid).values()) and sum(k.startswith("cell") for k in events(grid)) == 12
    )
    return ref


def wait_for_events(grid: Path, target: int, proc: subprocess.Popen) -> None:
    """Sleep until the run has logged ``target`` computations in all (or has exited)."""
    while proc.poll() is None and sum(events(grid).values()) < target:
        time.sleep(0.02)


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_results(tmp_path, data, reference):
    """Kills land after a random number of logged computations plus a random delay: mid-stage, mid-write."""
    grid = fault_grid(tmp_path, data, "killed")
    out = grid.parent / "out"
    rng = np.random.default_rng(11)
    kills, finished_before = 0, []
    for _ in range(5):
        finished_before.append(len(results(out)) if (out / "cells").is_dir() else 0)
        proc = start(grid)
        wait_for_events(grid, sum(events(grid).values()) + int(rng.integers(1, 6)), proc)
        time.sleep(float(rng.uniform(0.0, 0.2)))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate()
    assert kills >= 3, "the schedule should interrupt most runs"
    finish(start(grid))
    final = results(out)
    assert final == reference, "resumed results differ from the uninterrupted run"
    counts = events(grid)
    cells_recomputed = sum(n - 1 for k, n in counts.items() if k.startswith("cell"))
    assert sum(k.startswith("cell") for k in counts) == 12
    assert cells_recomputed <= kills, "only a cell in flight at a kill is computed again"
    assert counts["features 6"] <= 1 + kills  # a finished feature entry is never recomputed
    leftovers = list(tmp_path.rglob("*.tmp"))
    corrupt = [p for p in tmp_path.rglob("corrupt") if any(p.iterdir())]
    assert leftovers == [] and corrupt == [], "a kill left a temporary or corrupt file behind"
    print(f"\nfault injection: {kills} SIGKILLs survived, {cells_recomputed} cell(s) recomputed, "
          f"{sum(counts.values()) - len(counts)} stage computations repeated in all, 0 bytes lost "
          f"(finished cells before each run: {finished_before})")  # fmt: skip


def test_two_concurrent_runs_share_the_work(tmp_path, data, reference):
    grid = fault_grid(tmp_path, data, "concurrent")
    first, second = start(grid), start(grid)
    outs = [finish(first), finish(second)]
    assert results(grid.parent / "out") == reference
    counts = events(grid)
    assert all(n == 1 for n in counts.values()), f"computed twice: {[k for k, n in counts.items() if n > 1]}"
    assert sum(k.startswith("cell") for k in counts) == 12
    runs = [int(o.split(" cells (")[1].split(" run")[0]) for o in outs]
    assert sum(runs) == 12, outs  # every cell computed by exactly one of the two runs
    print(f"\nconcurrent runs: cells computed {runs[0]} + {runs[1]}, every stage once")
    for name in ("leaderboard.md", "results.csv"):  # both runs wrote complete reports
        assert (grid.parent / "out" / name).is_file()
