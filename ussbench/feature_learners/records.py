"""What a grid cell records about its feature learner: parameters, calibrated values, code health, curve scores.

Called from the stage graph (one line each): :func:`add_to_learned` when the learner's node is computed
(its parameters and calibrated values, :func:`learner_record`, and the scores of its kept snapshots for the
report's learning curves, :func:`checkpoint_scores`), :func:`record_params` for ``results.parquet``'s
parameters and :func:`learner_row` for the row's health fields (the leaderboard's code effective rank and
collapse flag). Everything stored is plain tensors, numbers, strings, lists and dicts, so the learned node's
cache entry and the cell's artifacts file go through the pickle-free serialization
(:mod:`ussbench.serialization`). The scores use labels and are evaluation only: nothing the learner returns
depends on them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..base import FeatureSet, StageContext
from . import health

CHECKPOINT_FIT_PATCHES = 50_000  # k-means of a checkpoint is fitted on at most this many sampled patches


def learner_record(entry: Any, learner: Any, artifacts: dict[str, Any]) -> dict[str, Any]:
    """Every constructor parameter of the learner (preset name included) and the values it calibrated."""
    return {
        "name": entry.name,
        "preset": entry.preset,
        "params": learner.get_params(),
        "calibrated": artifacts.get("calibrated", {}),
    }


def add_to_learned(
    stored: dict[str, Any],
    entry: Any,
    learner: Any,
    features: FeatureSet,
    labels: list[np.ndarray],
    ctx: StageContext,
    protocol: dict[str, Any],
) -> None:
    """Add the learner's record (``stored["params"]``) and checkpoint scores (artifacts) to its node's value."""
    stored["artifacts"]["checkpoints"] = checkpoint_scores(
        learner, features, labels, ctx, protocol.get("matching", "auto"), protocol.get("objective", "pixels")
    )
    stored["params"] = learner_record(entry, learner, stored["artifacts"])


def record_params(learned: dict[str, Any] | None) -> dict[str, Any]:
    """``{"feature_learner": record}`` for a cell's parameters (empty without a learner or a record)."""
    return {"feature_learner": learned["params"]} if learned and "params" in learned else {}


def learner_row(features: FeatureSet, artifacts: dict[str, Any]) -> dict[str, Any]:
    """Row fields of a learned code: effective rank, mean cosine, assignment entropy, collapse flag, steps.

    Rank and cosine are measured on the final codes of the fixed health probe (the same patches as the
    learning curve), the input rank on the tokens of those patches; the assignment entropy is the learner's
    own (prototype learners only); the collapse rule is :func:`.health.is_collapsed` against the untrained
    head's rank (learners with a curve) or min(input rank, code dimension).
    """
    index = health.probe_indices([im.grid for im in features])
    codes = health.gather_probe([im.code for im in features], index)
    tokens = health.gather_probe([im.tokens for im in features], index)
    rank, input_rank = health.effective_rank(codes), health.effective_rank(tokens)
    learned = artifacts.get("health") or {}
    final = learned.get("final") or {}
    reference = health.reference_rank(learned.get("initial_effective_rank"), input_rank, int(codes.shape[1]))
    return {
        "code_effective_rank": rank,
        "code_mean_cosine": health.mean_cosine(codes),
        "code_assignment_entropy": float(final.get("assignment_entropy", math.nan)),
        "input_effective_rank": input_rank,
        "code_collapsed": health.is_collapsed(rank, reference),
        "learner_steps": int(learned.get("steps", -1)),
    }


def checkpoint_scores(
    learner: Any,
    features: FeatureSet,
    labels: list[np.ndarray],
    ctx: StageContext,
    matching: str = "auto",
    objective: str = "pixels",
) -> dict[str, list[float]]:
    """mIoU and pixel accuracy (%) of every kept snapshot of a head learner (empty without snapshots).

    A cheap, fixed evaluation so the curve's points compare with each other: per-patch codes L2-normalised,
    k-means (faiss, one seeded init) fitted on at most CHECKPOINT_FIT_PATCHES sampled patches, every patch
    labelled, labels upsampled nearest to the label maps, one Hungarian match over all pixels. Its last point
    is near, not equal to, the cell's own score (which clusters every patch with the grid's clusterer).
    """
    from .. import registry
    from ..evaluation.metrics import ConfusionMatrix, evaluate_counts
    from ..graph.evaluation import upsample_nearest

    snapshots = getattr(learner, "snapshots_", None) or []
    out: dict[str, list[float]] = {"step": [], "miou": [], "pixel_accuracy": []}
    k = int(ctx.num_classes)
    for i, (step, _) in enumerate(snapshots):
        maps = [im.code for im in learner.transform_at(i, features, ctx)]
        x = F.normalize(torch.cat([m.reshape(-1, m.shape[-1]).float() for m in maps]), dim=1)
        g = torch.Generator().manual_seed(int(ctx.seed))
        fit_rows = x[torch.randperm(len(x), generator=g)[:CHECKPOINT_FIT_PATCHES]]
        kmeans = registry.instantiate(
            registry.get("dataset_clusterer", "kmeans"),
            {"n_clusters": k, "seed": int(ctx.seed), "n_init": 1, "device": str(ctx.device)},
        )
        assigned = kmeans.fit(fit_rows).predict(x).long().cpu().numpy()
        conf = ConfusionMatrix(k, k)
        offset = 0
        for m, y in zip(maps, labels):
            h, w = m.shape[:2]
            conf.update(upsample_nearest(assigned[offset : offset + h * w].reshape(h, w), y.shape), y)
            offset += h * w
        scores = evaluate_counts(conf.counts, matching, objective)
        out["step"].append(float(step))
        out["miou"].append(scores.miou * 100.0)
        out["pixel_accuracy"].append(scores.pixel_accuracy * 100.0)
    return out if out["step"] else {}
