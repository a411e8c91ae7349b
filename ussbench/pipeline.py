"""One grid cell, stage by stage: features -> [learner] -> image clusterer -> dataset clusterer -> evaluation.

Shared stages are looked up in an in-process memo first, then in the on-disk cache, and computed only if
both miss, so cells that share a prefix share its work.
"""

from __future__ import annotations

import resource
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import __version__, registry
from .base import Backbone, Dataset, FeatureSet, Segmentation, StageContext
from .cache import Cache, stable_hash
from .config import StageEntry
from .evaluation.metrics import ConfusionMatrix, evaluate_counts

STAGE_ORDER = (
    "dataset",
    "backbone",
    "feature_learner",
    "image_clusterer",
    "dataset_clusterer",
    "postprocess",
)


@dataclass(frozen=True)
class Cell:
    """One choice per stage plus a seed."""

    entries: tuple[StageEntry, ...]  # in STAGE_ORDER
    seed: int

    def entry(self, kind: str) -> StageEntry:
        return self.entries[STAGE_ORDER.index(kind)]

    def labels(self) -> dict[str, str]:
        return {e.kind: e.label for e in self.entries}

    def identity(self, protocol: dict[str, Any]) -> dict[str, Any]:
        return {"stages": [e.identity() for e in self.entries], "seed": self.seed, "protocol": protocol}

    def cell_id(self, protocol: dict[str, Any]) -> str:
        return stable_hash(self.identity(protocol), 16)


def build_plugin(entry: StageEntry, injections: dict[str, Any]) -> Any:
    """Instantiate a stage's plugin, filling runner-provided params the grid left unset."""
    spec = registry.get(entry.kind, entry.name)
    params = dict(entry.params)
    for key, value in injections.items():
        if key in spec.params and key not in params:
            params[key] = value
    return registry.instantiate(spec, params)


def plugin_identity(plugin: Any) -> dict[str, Any]:
    """Cache identity of a plugin: name, effective params (device excluded) and code version."""
    params = {k: v for k, v in plugin.get_params().items() if k != "device"}
    return {"plugin": plugin.plugin_name, "params": params, "version": getattr(plugin, "version", "1")}


class LRU(OrderedDict):
    """A tiny in-process memo keeping the most recent ``size`` stage outputs."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key: str, compute: Callable[[], Any]) -> tuple[Any, bool]:
        if key in self:
            self.move_to_end(key)
            return self[key], True
        value = compute()
        self[key] = value
        while len(self) > self.size:
            self.popitem(last=False)
        return value, False


def upsample_nearest(grid_labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of a (h, w) label grid to (H, W): pixel centre -> the patch that contains it."""
    h, w = grid_labels.shape
    H, W = size
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    return grid_labels[rows[:, None], cols[None, :]]


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@dataclass
class StageMemo:
    """In-process memos shared by the cells of one grid run."""

    features: LRU = field(default_factory=lambda: LRU(1))
    learned: LRU = field(default_factory=lambda: LRU(1))
    segments: LRU = field(default_factory=lambda: LRU(3))
    labels: LRU = field(default_factory=lambda: LRU(1))
    timings: dict[str, float] = field(default_factory=dict)  # first computation time of each stage key


class CellRunner:
    """Runs cells against one cache, device and protocol, reusing shared stages."""

    def __init__(self, cache: Cache, device: torch.device, protocol: dict[str, Any], data_root: str | None,
                 progress: bool = True):  # fmt: skip
        self.cache = cache
        self.device = device
        self.protocol = protocol
        self.data_root = data_root
        self.progress = progress
        self.memo = StageMemo()

    # -- stage helpers ----------------------------------------------------------------------------------
    def _timed(self, key: str, compute: Callable[[], Any]) -> tuple[Any, float, bool]:
        start = time.perf_counter()
        value, reused = compute()
        elapsed = time.perf_counter() - start
        if not reused:
            self.memo.timings.setdefault(key, elapsed)
        return value, self.memo.timings.get(key, elapsed), reused

    def _cached(self, stage: str, key: str, compute: Callable[[], Any]) -> tuple[Any, bool]:
        hit = self.cache.load(stage, key)
        if hit is not None:
            return hit, True
        value = compute()
        self.cache.save(stage, key, value)
        return value, False

    def features(self, dataset: Dataset, backbone: Backbone) -> tuple[FeatureSet, str, float, bool]:
        key = stable_hash({"dataset": dataset.cache_identity(), "backbone": backbone.cache_identity(),
                           "ussbench": __version__})  # fmt: skip

        def compute():
            return self.memo.features.get_or(
                key,
                lambda: self._cached(
                    "features", key, lambda: backbone.extract(dataset, self.device, self.progress)
                )[0],
            )

        feats, seconds, reused = self._timed("features:" + key, compute)
        return feats, key, seconds, reused

    def labels(self, dataset: Dataset, key: str) -> list[np.ndarray]:
        def load():
            return [dataset.load_label(i).astype(np.int16) for i in range(len(dataset))]

        return self.memo.labels.get_or(key, load)[0]

    # -- one cell -------------------------------------------------------------------------------------------
    def run(self, cell: Cell) -> tuple[dict[str, Any], dict[str, Any]]:
        """Run one cell; returns (result row, extras with panel predictions and artifacts)."""
        seed = cell.seed
        torch.manual_seed(seed)
        np.random.seed(seed % (2**32))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t_cell = time.perf_counter()
        dev = str(self.device)
        dataset: Dataset = protocol_view(
            build_plugin(cell.entry("dataset"), {"data_root": self.data_root}), self.protocol
        )
        backbone: Backbone = build_plugin(
            cell.entry("backbone"), {"cache_dir": str(self.cache.root or "")} if self.cache.root else {}
        )
        num_classes = dataset.num_classes
        row: dict[str, Any] = {"seed": seed, "device": dev, **{f"{k}": v for k, v in cell.labels().items()}}

        features, feat_key, row["time_features_s"], row["features_reused"] = self.features(dataset, backbone)
        ctx = StageContext(self.device, seed, dataset, backbone, num_classes, self.progress)
        artifacts: dict[str, Any] = {}

        # feature learner
        upstream = feat_key
        learner_entry = cell.entry("feature_learner")
        row["time_feature_learner_s"] = 0.0
        if not learner_entry.skipped:
            learner = build_plugin(learner_entry, {"seed": seed, "device": dev, "num_classes": num_classes})
            lkey = stable_hash({"up": feat_key, "learner": plugin_identity(learner)})

            def fit_learner():
                learner.fit(features, ctx)
                out = learner.transform(features, ctx)
                return {"codes": [im.code for im in out], "artifacts": learner.artifacts()}

            def learned():
                return self.memo.learned.get_or(lkey, lambda: self._cached("learned", lkey, fit_learner)[0])

            stored, row["time_feature_learner_s"], _ = self._timed("learned:" + lkey, learned)
            features = features.with_code(stored["codes"], learner=learner_entry.label)
            artifacts["feature_learner"] = stored["artifacts"]
            upstream = lkey

        # image-level clusterer
        ic = build_plugin(cell.entry("image_clusterer"), {"seed": seed, "device": dev})
        skey = stable_hash({"up": upstream, "ic": plugin_identity(ic)})

        def fit_ic():
            ic.fit(features, ctx)
            return {"segments": ic.predict(features, ctx), "artifacts": ic.artifacts()}

        def segmented():
            return self.memo.segments.get_or(skey, lambda: self._cached("segments", skey, fit_ic)[0])

        stored, row["time_image_clusterer_s"], _ = self._timed("segments:" + skey, segmented)
        segments: list[Segmentation] = stored["segments"]
        artifacts["image_clusterer"] = stored["artifacts"]

        # dataset-level clusterer
        has_bg = any(s.background is not None for s in segments)
        dc_entry = cell.entry("dataset_clusterer")
        k_total = self.protocol.get("n_clusters") or num_classes
        k_dc = int(dc_entry.params.get("n_clusters", k_total - int(has_bg)))
        dc = build_plugin(dc_entry, {"seed": seed, "device": dev, "n_clusters": k_dc})
        k_dc = int(getattr(dc, "n_clusters", k_dc))
        fg_masks = [_foreground(s) for s in segments]
        X = torch.cat([s.vectors[m].float() for s, m in zip(segments, fg_masks)])
        t0 = time.perf_counter()
        assigned = dc.fit(X).predict(X).long().cpu()
        row["time_dataset_clusterer_s"] = time.perf_counter() - t0
        if assigned.shape[0] != X.shape[0] or int(assigned.min()) < 0 or int(assigned.max()) >= k_dc:
            raise ValueError(
                f"dataset clusterer {dc_entry.name!r} returned labels outside [0, {k_dc}) or of wrong length"
            )
        artifacts["dataset_clusterer"] = dc.artifacts()
        n_pred = k_dc + int(has_bg)

        # evaluation: stream every image into one confusion matrix
        t0 = time.perf_counter()
        post_entry = cell.entry("postprocess")
        post = None if post_entry.name == "none" else build_plugin(post_entry, {"seed": seed, "device": dev})
        labels = self.labels(dataset, feat_key)
        conf = ConfusionMatrix(n_pred, num_classes)
        panel_ids = panel_indices(len(segments), int(self.protocol.get("panels", 4)))
        panels: dict[str, np.ndarray] = {}
        offset = 0
        for i, (seg, fg) in enumerate(
            tqdm(list(zip(segments, fg_masks)), desc="evaluate", disable=not self.progress, leave=False)
        ):
            seg_labels = torch.full((seg.n_segments,), k_dc, dtype=torch.long)  # background -> k_dc
            n_fg = int(fg.sum())
            seg_labels[fg] = assigned[offset : offset + n_fg]
            offset += n_fg
            grid = seg_labels[seg.segment_map.long()].numpy()
            gt = labels[i]
            pred = upsample_nearest(grid, gt.shape)
            if post is not None:
                pred = post.apply(dataset.load_image(i), pred, n_pred)
            conf.update(pred, gt)
            if i in panel_ids:
                panels[str(i)] = pred.astype(np.int16)
        row["time_eval_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        row.update(segment_covering(segments, labels, dataset, cell.entry("dataset").name))
        row["time_nfcov_s"] = time.perf_counter() - t0
        level_panels = {
            f"{name}_{i}": level.numpy().astype(np.int16)
            for i in sorted(panel_ids)
            for name, level in segments[i].levels.items()
        }
        scores = evaluate_counts(conf.counts, self.protocol["matching"], self.protocol["objective"])
        row.update(
            miou=scores.miou * 100.0,
            pixel_accuracy=scores.pixel_accuracy * 100.0,
            n_clusters=n_pred,
            n_segments=int(X.shape[0]),
            n_images=len(segments),
            n_pixels=scores.n_pixels,
            time_total_s=time.perf_counter() - t_cell,
            peak_gpu_mb=(torch.cuda.max_memory_allocated(self.device) / 2**20)
            if self.device.type == "cuda"
            else 0.0,
            peak_rss_mb=peak_rss_mb(),
        )
        extras = {
            "per_class_iou": scores.as_dict(dataset.class_names)["per_class_iou"],
            "mapping": scores.mapping.tolist(),
            "class_names": dataset.class_names,
            "confusion": conf.counts.tolist(),
            "panels": panels,
            "level_panels": level_panels,
            "artifacts": artifacts,
            "params": {kind: build_params_for_record(cell.entry(kind), obj) for kind, obj in
                       (("dataset", getattr(dataset, "dataset", dataset)), ("backbone", backbone), ("image_clusterer", ic), ("dataset_clusterer", dc))},
            "backbone_report_name": backbone.report_name or backbone.plugin_name,
            "dataset_description": dataset.description,
        }  # fmt: skip
        return row, extras


def protocol_view(dataset: Dataset, protocol: dict[str, Any]) -> Dataset:
    """The dataset as the named protocol evaluates it (STEGO: short side resized to res, centre crop)."""
    name = protocol.get("name", "default")
    if name == "default":
        return dataset
    from .evaluation.protocols import get_protocol

    spec = get_protocol(name, **({"res": protocol["res"]} if protocol.get("res") else {}))
    return spec.view(dataset)


def segment_covering(
    segments: list[Segmentation], labels: list[np.ndarray], dataset: Dataset, dataset_name: str
) -> dict[str, float]:
    """NFCovering (HSG eq. 10) of the image-level segments and of every hierarchy level they carry.

    Returns ``nfcov`` for the segments and ``nfcov_<level>`` per level, or nothing when the dataset has no
    foreground rule (see :mod:`ussbench.evaluation.nfcovering`).
    """
    from .evaluation.nfcovering import BACKGROUND_CLASSES, foreground_classes, nf_covering, nf_covering_levels

    try:
        foreground = foreground_classes(
            dataset.class_names, dataset_name if dataset_name in BACKGROUND_CLASSES else None
        )
    except ValueError:
        return {}
    out = {"nfcov": nf_covering([s.segment_map for s in segments], labels, foreground).score * 100.0}
    if any(s.levels for s in segments):
        for name, result in nf_covering_levels(segments, labels, foreground).items():
            out[f"nfcov_{name}"] = result.score * 100.0
    return out


def _foreground(seg: Segmentation) -> torch.Tensor:
    mask = torch.ones(seg.n_segments, dtype=torch.bool)
    if seg.background is not None:
        mask[seg.background] = False
    return mask


def panel_indices(n: int, count: int) -> set[int]:
    """Evenly spaced image indices for qualitative panels (deterministic)."""
    if count <= 0 or n == 0:
        return set()
    return {int(i) for i in np.linspace(0, n - 1, num=min(count, n)).round()}


def build_params_for_record(entry: StageEntry, plugin: Any) -> dict[str, Any]:
    """Effective parameters of a stage as recorded in results (preset name included)."""
    return {"name": entry.name, "preset": entry.preset, "params": plugin.get_params()}
