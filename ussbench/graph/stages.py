"""The stages of a cell as node computes: features, labels, learned codes, segments, assignment, evaluation.

Each stage is a small picklable dataclass holding the stage choices it needs; its ``compute`` builds the
plugins it uses from them, so it runs in any process given its inputs' values (see
:mod:`ussbench.graph.nodes`). :class:`CellStage` is a cell's sink: it assembles the record's row and extras
from its inputs and how they were obtained (seconds, reused).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..base import FeatureSet, Segmentation, StageContext
from ..config import StageEntry
from ..contracts import check_codes, check_labels, check_segmentations
from ..errors import ConfigError
from ..evaluation.cell_covering import segment_covering_cells
from ..evaluation.upsample import nearest_counter
from ..feature_learners import records as learner_records
from ..image_clusterers._common import pick_feature, recorded_choices
from ..limits import fit_clusters_to_vectors
from ..reports.profile import perf_row_facts
from .cells import Cell, build_params_for_record, build_plugin
from .evaluation import (
    EvaluationSetup,
    bilinear_pixel_predictions,
    evaluate_predictions,
    foreground_mask,
    nearest_pixel_predictions,
    segment_covering,
)
from .machine import row_machine_facts
from .nodes import Inputs, Resources, Stage, takes_seed
from .runtime import Runtime


@dataclass
class FeaturesStage(Stage):
    """Backbone features of a dataset as the protocol views it (``flip``: its mirror image, for flip TTA)."""

    dataset: StageEntry
    backbone: StageEntry
    flip: bool = False
    resources: Resources = field(default_factory=Resources)
    kind: ClassVar[str] = "features"
    cache_stage: ClassVar[str | None] = "features"

    def compute(self, inputs: Inputs, rt: Runtime) -> FeatureSet:
        return rt.backbone(self.backbone).extract(rt.dataset(self.dataset, self.flip), rt.device, rt.progress)

    def describe(self) -> str:
        return f"features{' (flipped)' if self.flip else ''} of {self.dataset.label} x {self.backbone.label}"


@dataclass
class LabelsStage(Stage):
    """Every label map of the dataset as the protocol views it (int16, -1 = ignore); kept in memory only."""

    dataset: StageEntry
    resources: Resources = field(default_factory=Resources)
    kind: ClassVar[str] = "labels"

    def compute(self, inputs: Inputs, rt: Runtime) -> list:
        dataset = rt.dataset(self.dataset)
        return [dataset.load_label(i).astype("int16") for i in range(len(dataset))]

    def describe(self) -> str:
        return f"labels of {self.dataset.label}"


@dataclass
class LearnedStage(Stage):
    """A feature learner fitted on the features; its codes (and, for flip TTA, the mirror images' codes)."""

    dataset: StageEntry
    backbone: StageEntry
    learner: StageEntry
    seed: int = 0
    flip: bool = False
    resources: Resources = field(default_factory=Resources)
    kind: ClassVar[str] = "learned"
    cache_stage: ClassVar[str | None] = "learned"

    def compute(self, inputs: Inputs, rt: Runtime) -> dict[str, Any]:
        dataset, backbone = rt.dataset(self.dataset), rt.backbone(self.backbone)
        n = dataset.num_classes
        learner = build_plugin(self.learner, {"seed": self.seed, "device": str(rt.device), "num_classes": n})
        ctx = StageContext(rt.device, self.seed, dataset, backbone, n, rt.progress)
        features: FeatureSet = inputs["features"]
        grids, who = [im.grid for im in features], f"feature learner {self.learner.name!r}"
        start = time.perf_counter()
        learner.fit(features, ctx)
        fit_seconds = time.perf_counter() - start
        stored = {
            "codes": check_codes(learner.transform(features, ctx), grids, who),
            "artifacts": learner.artifacts(),
            # the training time travels with the cached codes: a later run that loads them still reports it
            "fit_seconds": fit_seconds,
        }
        learner_records.add_to_learned(
            stored, self.learner, learner, features, inputs["labels"], ctx, rt.protocol
        )
        if self.flip:
            fctx = StageContext(
                rt.device, self.seed, rt.dataset(self.dataset, flip=True), backbone, n, rt.progress
            )
            flipped = inputs["flipped"]
            stored["flipped_codes"] = check_codes(
                learner.transform(flipped, fctx), [im.grid for im in flipped], who
            )
        return stored

    def rng_seed(self) -> int:
        return self.seed if takes_seed(self.learner) else 0

    def describe(self) -> str:
        return f"learner {self.learner.label} (seed {self.seed})"


def coded(
    features: FeatureSet, learned: dict[str, Any] | None, learner: str, flipped: bool = False
) -> FeatureSet:
    """The features with the learner's codes attached (unchanged without a learner)."""
    if learned is None:
        return features
    return features.with_code(learned["flipped_codes" if flipped else "codes"], learner=learner)


@dataclass
class SegmentsStage(Stage):
    """An image-level clusterer fitted on the (coded) features: one Segmentation per image, and artifacts."""

    dataset: StageEntry
    backbone: StageEntry
    clusterer: StageEntry
    learner: str | None = None  # the learner's label when the features carry its codes
    seed: int = 0
    resources: Resources = field(default_factory=Resources)
    kind: ClassVar[str] = "segments"
    cache_stage: ClassVar[str | None] = "segments"

    def compute(self, inputs: Inputs, rt: Runtime) -> dict[str, Any]:
        dataset, backbone = rt.dataset(self.dataset), rt.backbone(self.backbone)
        features = coded(inputs["features"], inputs.get("learned"), self.learner or "")
        ic = build_plugin(self.clusterer, {"seed": self.seed, "device": str(rt.device)})
        ctx = StageContext(rt.device, self.seed, dataset, backbone, dataset.num_classes, rt.progress)
        ic.fit(features, ctx)
        segments = ic.predict(features, ctx)
        check_segmentations(
            segments, [im.grid for im in features], f"image clusterer {self.clusterer.name!r}"
        )
        return {"segments": segments, "artifacts": ic.artifacts()}

    def rng_seed(self) -> int:  # a clusterer without a seed is one node for every seed: seed its RNGs alike
        return self.seed if takes_seed(self.clusterer) else 0

    def describe(self) -> str:
        return f"image clusterer {self.clusterer.label}" + (
            f" (seed {self.seed})" if takes_seed(self.clusterer) else ""
        )


@dataclass
class AssignmentStage(Stage):
    """A dataset-level clusterer fitted on the segment vectors: one label per (foreground) segment."""

    clusterer: StageEntry
    k_total: int  # clusters in all: the protocol's n_clusters, else the dataset's classes
    seed: int = 0
    resources: Resources = field(default_factory=Resources)
    cell: Cell | None = None  # the first cell using this node: names it in cluster-count errors and notes
    kind: ClassVar[str] = "assignment"

    def compute(self, inputs: Inputs, rt: Runtime) -> dict[str, Any]:
        segments: list[Segmentation] = inputs["segments"]["segments"]
        has_bg = any(s.background is not None for s in segments)
        k_dc = int(self.clusterer.params.get("n_clusters", self.k_total - int(has_bg)))
        X = torch.cat([s.vectors[foreground_mask(s)].float() for s in segments])
        entry, note = self.clusterer, None
        if self.cell is not None:  # more clusters than vectors: refused, or clipped with a note on --limit
            entry, k_dc, note = fit_clusters_to_vectors(self.cell, entry, k_dc, int(X.shape[0]))
        dc = build_plugin(entry, {"seed": self.seed, "device": str(rt.device), "n_clusters": k_dc})
        k_dc = int(getattr(dc, "n_clusters", k_dc))
        dc.fit(X)  # its return value is not used: fit need not return self
        assigned = check_labels(
            dc.predict(X), int(X.shape[0]), k_dc, f"dataset clusterer {self.clusterer.name!r}"
        )
        return {"clusterer": dc, "assigned": assigned, "k_dc": k_dc, "n_pred": k_dc + int(has_bg),
                "n_segments": int(X.shape[0]), "artifacts": dc.artifacts(),
                "params": build_params_for_record(entry, dc), "note": note}  # fmt: skip

    def describe(self) -> str:
        return f"dataset clusterer {self.clusterer.label} (seed {self.seed})"


@dataclass
class CoveringStage(Stage):
    """NFCovering of a segmentation (and its hierarchy levels), shared by the dataset clusterers that use it."""

    dataset: StageEntry
    resources: Resources = field(default_factory=Resources)
    kind: ClassVar[str] = "covering"

    def compute(self, inputs: Inputs, rt: Runtime) -> dict[str, float]:
        segments = inputs["segments"]["segments"]
        if "histograms" in inputs.values:  # the same numbers from per-patch label histograms (perf)
            return segment_covering_cells(segments, rt.dataset(self.dataset), self.dataset.name,
                                          inputs["histograms"])  # fmt: skip
        return segment_covering(segments, inputs["labels"], rt.dataset(self.dataset), self.dataset.name)

    def describe(self) -> str:
        return f"NFCovering of {self.dataset.label}"


@dataclass
class EvaluationStage(Stage):
    """Predictions to pixels (nearest labels or bilinear codes), post-processing / protocol CRF, scores."""

    cell: Cell
    bilinear: bool = False
    resources: Resources = field(default_factory=Resources)
    kind: ClassVar[str] = "evaluation"

    def __post_init__(self) -> None:
        self.seed = self.cell.seed

    def compute(self, inputs: Inputs, rt: Runtime) -> dict[str, Any]:
        cell, spec = self.cell, rt.spec
        dataset = rt.dataset(cell.entry("dataset"))
        learner = cell.entry("feature_learner").label
        segments: list[Segmentation] = inputs["segments"]["segments"]
        assignment = inputs["assignment"]
        post_entry = cell.entry("postprocess")
        dev = str(rt.device)
        post = (
            None
            if post_entry.name == "none"
            else build_plugin(post_entry, {"seed": cell.seed, "device": dev})
        )
        if post is not None and spec.crf:  # load_grid refuses this; guard direct callers too
            raise ConfigError(f"postprocess {post_entry.name!r} together with protocol {spec.name!r}'s CRF")
        labels = inputs["labels"]
        sizes = [lab.shape for lab in labels]
        n_pred = assignment["n_pred"]
        if self.bilinear:
            features = coded(inputs["features"], inputs.get("learned"), learner)
            flipped = inputs.get("flipped")
            if flipped is not None:
                flipped = coded(flipped, inputs.get("learned"), learner, flipped=True)
            ic = build_plugin(cell.entry("image_clusterer"), {"seed": cell.seed, "device": dev})
            feature = pick_feature(features, getattr(ic, "feature", "auto"), "tokens")
            pixels = bilinear_pixel_predictions(features, flipped, feature, bool(getattr(ic, "normalise", True)),
                                                assignment["clusterer"], sizes, n_pred, rt.device)  # fmt: skip
        else:
            fg_masks = [foreground_mask(s) for s in segments]
            pixels = nearest_pixel_predictions(
                segments, fg_masks, assignment["assigned"], assignment["k_dc"], sizes
            )
        setup = EvaluationSetup(spec, rt.protocol, dataset, labels, n_pred, post, rt.progress,
                                rt.settings.crf_workers)  # fmt: skip
        if not self.bilinear and "histograms" in inputs.values:  # exact counts without upsampling (perf)
            setup.counts = nearest_counter(segments, fg_masks, assignment["assigned"], assignment["k_dc"],
                                           inputs["histograms"])  # fmt: skip
        result = evaluate_predictions(setup, pixels)
        result["row"] = {"upsample": "bilinear_code" if self.bilinear else "nearest_labels",
                         "flip_tta": bool(self.bilinear and spec.flip_tta), **result["row"]}  # fmt: skip
        result["level_panels"] = {
            f"{name}_{i}": level.numpy().astype("int16")
            for i in result.pop("panel_ids")
            for name, level in segments[i].levels.items()
        }
        return result

    def describe(self) -> str:
        return f"evaluation of {self.cell.describe()}"


@dataclass
class CellStage(Stage):
    """A cell's sink: its result row and record extras, assembled from its stages' values and timings."""

    cell: Cell
    resources: Resources = field(default_factory=lambda: Resources(cpus=0.1))
    kind: ClassVar[str] = "cell"

    def __post_init__(self) -> None:
        self.seed = self.cell.seed

    def compute(self, inputs: Inputs, rt: Runtime) -> tuple[dict[str, Any], dict[str, Any]]:
        cell = self.cell
        raw = rt.raw_dataset(cell.entry("dataset"))
        dataset = rt.dataset(cell.entry("dataset"))
        backbone = rt.backbone(cell.entry("backbone"))
        seconds, reused = inputs.seconds, inputs.reused
        row: dict[str, Any] = {"seed": cell.seed, "device": str(rt.device), **cell.labels()}
        row["time_features_s"], row["features_reused"] = seconds["features"], reused["features"]
        if "flipped" in inputs.values:
            row["time_features_flipped_s"] = seconds["flipped"]
        row["time_feature_learner_s"] = seconds.get("learned", 0.0)
        if "learned" in inputs.values:  # this run's seconds are a cache load when the codes were reused
            row["learner_reused"] = bool(reused.get("learned", False))
            row["time_feature_learner_fit_s"] = float(inputs["learned"].get("fit_seconds", math.nan))
        row["time_image_clusterer_s"] = seconds["segments"]
        row["time_dataset_clusterer_s"] = seconds["assignment"]
        evaluation, assignment, segments = inputs["evaluation"], inputs["assignment"], inputs["segments"]
        row.update(evaluation["row"])
        row["time_eval_s"] = seconds["evaluation"]
        row.update(inputs["covering"])
        row["time_nfcov_s"] = seconds["covering"]
        row.update(inputs.get("probe") or {})  # linear probe of the representation (evaluation/probe.py)
        row.update(n_clusters=assignment["n_pred"], n_segments=assignment["n_segments"],
                   n_images=len(segments["segments"]))  # fmt: skip
        row.update(row_machine_facts())
        if assignment.get("note"):
            row["note"] = assignment["note"]
        # token counts, dimensions, precision and pool sizes for the stage profile (ussbench.reports.profile)
        row.update(perf_row_facts(inputs["features"], segments["segments"], str(rt.device)))
        artifacts = {}
        if "learned" in inputs.values:
            artifacts["feature_learner"] = inputs["learned"]["artifacts"]
            row.update(learner_records.learner_row(coded(inputs["features"], inputs["learned"], ""), artifacts["feature_learner"]))  # fmt: skip
        artifacts["image_clusterer"] = segments["artifacts"]
        # hook (issue 14): choices the image clusterer resolved at run time, e.g. DSM's background rule
        row.update(recorded_choices(segments["artifacts"]))
        artifacts["dataset_clusterer"] = assignment["artifacts"]
        ic = build_plugin(cell.entry("image_clusterer"), {"seed": cell.seed, "device": str(rt.device)})
        extras = {
            **{k: v for k, v in evaluation["extras"].items()},
            "class_names": dataset.class_names,
            "level_panels": evaluation["level_panels"],
            "artifacts": artifacts,
            "params": {"dataset": build_params_for_record(cell.entry("dataset"), raw),
                       "backbone": build_params_for_record(cell.entry("backbone"), backbone),
                       "image_clusterer": build_params_for_record(cell.entry("image_clusterer"), ic),
                       "dataset_clusterer": assignment["params"],
                       **learner_records.record_params(inputs.values.get("learned"))},
            "backbone_report_name": backbone.report_name or backbone.plugin_name,
            "dataset_description": dataset.description,
        }  # fmt: skip
        return row, extras

    def describe(self) -> str:
        return self.cell.describe()
