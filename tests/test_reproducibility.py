"""Same grid, seed, machine and thread count -> identical numbers, whatever ran before or was cached."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from tests.conftest import tiny_grid
from ussbench import registry
from ussbench.base import DatasetClusterer, ImageClusterer, Segmentation
from ussbench.config import load_grid
from ussbench.runner import run_grid

KM3 = {"name": "kmeans_per_image", "params": {"n_segments": 3}, "label": "km3"}


def folder(path):
    path.mkdir(parents=True, exist_ok=True)
    return path


def records(out) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}


def test_same_grid_twice_gives_identical_numbers(tmp_path, toy_root):
    settings = {"image_clusterers": ["none", KM3]}
    a = run_grid(
        load_grid(tiny_grid(folder(tmp_path / "a"), toy_root, **settings)), progress=False, report=False
    )
    b = run_grid(
        load_grid(tiny_grid(folder(tmp_path / "b"), toy_root, **settings)), progress=False, report=False
    )
    ra, rb = records(a.output), records(b.output)
    assert set(ra) == set(rb) and len(ra) == 8  # same data, same grid: same cell ids
    for cid in ra:
        assert ra[cid]["confusion"] == rb[cid]["confusion"]
        assert ra[cid]["row"]["miou"] == rb[cid]["row"]["miou"]


class RandomSegments(ImageClusterer):
    """Draws from the global torch RNG (no generator): what a careless plugin does."""

    def __init__(self, seed: int = 0):
        self.seed = seed

    def predict(self, features, ctx):
        out = []
        for im in features:
            h, w = im.grid
            ids = torch.randint(0, 3, (h, w))
            ids[0, :3] = torch.arange(3)  # every id present
            vec = torch.stack([im.tokens.float()[ids == k].mean(0) for k in range(3)])
            out.append(Segmentation(ids, vec))
        return out


class RandomCentres(DatasetClusterer):
    """k-means-free labelling by the nearest of n_clusters points drawn with the global RNG."""

    def __init__(self, n_clusters: int = 3, seed: int = 0):
        self.n_clusters, self.seed = n_clusters, seed

    def fit(self, X):
        self.centres_ = X[torch.randperm(len(X))[: self.n_clusters]]
        return self

    def predict(self, X):
        return torch.cdist(X, self.centres_).argmin(1)


@pytest.fixture
def global_rng_plugins():
    registry.register("image_clusterer", "random_segments_test")(RandomSegments)
    registry.register("dataset_clusterer", "random_centres_test")(RandomCentres)
    yield
    registry.unregister("image_clusterer", "random_segments_test")
    registry.unregister("dataset_clusterer", "random_centres_test")


def test_a_cell_does_not_depend_on_what_ran_before_it(tmp_path, toy_root, global_rng_plugins):
    """Each stage seeds the global RNGs itself: a cell computed alone, inside a grid, or from a warm cache agrees."""
    dcs = [
        {"name": "random_centres_test", "label": "rc-a"},
        {"name": "random_centres_test", "label": "rc-b", "params": {"n_clusters": 2}},
    ]
    full = run_grid(load_grid(tiny_grid(folder(tmp_path / "full"), toy_root, seeds=[0, 1], image_clusterers=["random_segments_test"],
                                        dataset_clusterers=dcs)), progress=False, report=False)  # fmt: skip
    alone = run_grid(load_grid(tiny_grid(folder(tmp_path / "alone"), toy_root, seeds=[1], image_clusterers=["random_segments_test"],
                                         dataset_clusterers=dcs[1:])), progress=False, report=False)  # fmt: skip
    (cid,) = records(alone.output)
    in_grid, by_itself = records(full.output)[cid], records(alone.output)[cid]
    assert in_grid["confusion"] == by_itself["confusion"]
    for record in (alone.output / "cells").glob("*.json"):  # again from the warm cache (segments loaded)
        record.unlink()
    warm = run_grid(load_grid(tiny_grid(folder(tmp_path / "alone"), toy_root, seeds=[1], image_clusterers=["random_segments_test"],
                                        dataset_clusterers=dcs[1:])), progress=False, report=False)  # fmt: skip
    assert warm.execution.loaded["segments"] == 1
    assert records(warm.output)[cid]["confusion"] == by_itself["confusion"]


def test_rows_record_the_cpu_and_thread_counts(tmp_path, toy_root):
    summary = run_grid(load_grid(tiny_grid(tmp_path, toy_root, seeds=[0], image_clusterers=["none"],
                                           dataset_clusterers=["kmeans"])), progress=False)  # fmt: skip
    row = pd.read_csv(summary.output / "results.csv").iloc[0]
    assert isinstance(row.cpu_model, str) and row.cpu_model
    assert row.threads_torch == torch.get_num_threads() and row.threads_torch >= 1
    assert row.threads_omp >= 1
    assert "cpu_isa" in row.index and "threads_blas" in row.index
