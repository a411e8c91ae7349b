"""The stage graph: shared stages are one node, computed once, released when done, computable anywhere."""

from __future__ import annotations

import json
import multiprocessing
import pickle

import pandas as pd
import pytest
import torch

from tests.conftest import tiny_grid
from ussbench.config import load_grid
from ussbench.graph import Inputs, Runtime, compute_node
from ussbench.graph.cells import STAGE_ORDER
from ussbench.runner import plan_grid, run_grid

KM3 = {"name": "kmeans_per_image", "params": {"n_segments": 3}, "label": "km3"}


@pytest.fixture
def grid(tmp_path, toy_root):
    """2 image clusterers ('none' takes no seed) x 2 dataset clusterers x 2 seeds = 8 cells."""
    return load_grid(tiny_grid(tmp_path, toy_root))


def test_shared_stages_are_one_node(grid):
    plan, _ = plan_grid(grid)
    kinds = plan.graph.counts_by_kind()
    assert len(plan.cells) == 8 and len(set(plan.cell_ids)) == 8
    # one extraction; segments: 'none' once for both seeds, km3 per seed; one assignment per cell
    assert kinds == {"features": 1, "labels": 1, "segments": 3, "covering": 3, "assignment": 8,
                     "evaluation": 8, "cell": 8, "probe": 1}  # fmt: skip
    order = plan.graph.topological()
    position = {node.key: i for i, node in enumerate(order)}
    assert len(order) == len(plan.graph)
    assert all(position[inp.key] < position[node.key] for node in order for inp in node.inputs.values())
    features = {n.inputs["features"].key for n in plan.graph if n.kind == "segments"}
    assert len(features) == 1


def test_every_shared_stage_is_computed_once_and_released(grid):
    summary = run_grid(grid, progress=False, report=False).execution
    assert dict(summary.computed) == {"features": 1, "labels": 1, "segments": 3, "covering": 3, "assignment": 8,
                                      "evaluation": 8, "cell": 8, "probe": 1}  # fmt: skip
    assert summary.held_at_end == 0, "every value is dropped once its last consumer is done"
    assert summary.peak_held < 16  # of 32 nodes: never the whole graph at once
    results = pd.DataFrame([json.loads(p.read_text())["row"] for p in (grid.output / "cells").glob("*.json")])
    # a shared stage is timed at its first computation: every cell sharing it shows the same seconds
    assert results.time_features_s.nunique() == 1
    for _, group in results.groupby(["image_clusterer", "seed"]):
        assert group.time_image_clusterer_s.nunique() == 1
    rerun = run_grid(grid, progress=False, report=False).execution
    assert (
        rerun.count("resumed") == 8 and sum(rerun.computed.values()) == 0 and sum(rerun.loaded.values()) == 0
    )


def test_a_warm_cache_loads_instead_of_computing(grid):
    first = run_grid(grid, progress=False, report=False)
    for record in (first.output / "cells").glob("*.json"):
        record.unlink()
    summary = run_grid(grid, progress=False, report=False).execution
    assert summary.loaded == {"features": 1, "segments": 3, "probe": 1}  # the linear probe is cached too
    assert "features" not in summary.computed and "segments" not in summary.computed
    assert summary.computed["cell"] == 8


def _compute_in_fresh_process(payload: bytes) -> bytes:
    node, settings, values = pickle.loads(payload)
    rt = Runtime.in_worker(settings)
    return pickle.dumps(compute_node(node, Inputs(values), rt))


@pytest.mark.slow
def test_a_node_computes_the_same_value_in_another_process(grid):
    """The executor contract: a node (its stage), the settings and its inputs' values suffice, in any process."""
    plan, rt = plan_grid(grid)
    seg = next(n for n in plan.graph if n.kind == "segments" and n.stage.clusterer.label == "km3")
    features = compute_node(seg.inputs["features"], Inputs({}), rt)
    here = compute_node(seg, Inputs({"features": features}), rt)
    payload = pickle.dumps((seg, rt.settings, {"features": features}))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        there = pickle.loads(pool.apply(_compute_in_fresh_process, (payload,)))
    assert len(there["segments"]) == len(here["segments"]) == 6
    for a, b in zip(here["segments"], there["segments"]):
        assert torch.equal(a.segment_map, b.segment_map) and torch.equal(a.vectors, b.vectors)
    for node in plan.graph:  # every stage of the grid travels
        pickle.dumps(node.stage)


def test_cell_identity_names_every_stage_and_the_data(grid):
    plan, _ = plan_grid(grid)
    identity = plan.identities[0]
    assert [s["kind"] for s in identity["stages"]] == list(STAGE_ORDER)
    assert set(identity["inputs"]) == {"data", "backbone"} and len(identity["inputs"]["data"]) == 32
