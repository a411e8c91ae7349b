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
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import __version__, registry
from .base import Backbone, Dataset, FeatureSet, Segmentation, StageContext
from .cache import Cache, stable_hash
from .config import StageEntry
from .errors import ConfigError
from .evaluation.metrics import ConfusionMatrix, evaluate_counts
from .evaluation.protocols import ProtocolSpec, flip_average, get_protocol, stego_pixel_logits, upsample_code
from .image_clusterers._common import pick_feature, recorded_choices
from .limits import fit_clusters_to_vectors

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
        """What a finished cell's result depends on: stage choices, each plugin's code version, seed, protocol.

        The plugin versions make a grid re-run a cell whose plugin changed behaviour (its ``version`` bumped)
        instead of resuming a result the current code would not produce.
        """
        stages = [{**e.identity(), "version": plugin_version(e)} for e in self.entries]
        return {"stages": stages, "seed": self.seed, "protocol": protocol}

    def cell_id(self, protocol: dict[str, Any]) -> str:
        return stable_hash(self.identity(protocol), 16)


def plugin_version(entry: StageEntry) -> str | None:
    """The registered plugin class's ``version`` (None for a skipped stage)."""
    if entry.skipped:
        return None
    return str(getattr(registry.get(entry.kind, entry.name).cls, "version", "1"))


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
    flipped: LRU = field(default_factory=lambda: LRU(1))  # features of the mirrored view (flip TTA)
    learned: LRU = field(default_factory=lambda: LRU(1))
    segments: LRU = field(default_factory=lambda: LRU(3))
    labels: LRU = field(default_factory=lambda: LRU(1))
    # NFCovering per segments key (the dataset clusterers of one segmentation share it)
    covering: LRU = field(default_factory=lambda: LRU(16))
    timings: dict[str, float] = field(default_factory=dict)  # first computation time of each stage key


class CellRunner:
    """Runs cells against one cache, device and protocol, reusing shared stages."""

    def __init__(self, cache: Cache, device: torch.device, protocol: dict[str, Any], data_root: str | None,
                 progress: bool = True, crf_workers: int | None = None):  # fmt: skip
        self.cache = cache
        self.device = device
        self.protocol = protocol
        self.spec: ProtocolSpec = resolve_protocol(protocol)
        self.data_root = data_root
        self.progress = progress
        self.crf_workers = crf_workers  # protocol CRF pool size; None: serial on <= 2 CPUs, else up to 8
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

    def features(self, dataset: Dataset, backbone: Backbone, memo: LRU | None = None
                 ) -> tuple[FeatureSet, str, float, bool]:  # fmt: skip
        key = stable_hash({"dataset": dataset.cache_identity(), "backbone": backbone.cache_identity(),
                           "ussbench": __version__})  # fmt: skip
        memo = self.memo.features if memo is None else memo

        def compute():
            return memo.get_or(
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
        spec = self.spec
        raw_dataset: Dataset = build_plugin(cell.entry("dataset"), {"data_root": self.data_root})
        dataset: Dataset = spec.view(raw_dataset)
        backbone: Backbone = build_plugin(
            cell.entry("backbone"), {"cache_dir": str(self.cache.root or "")} if self.cache.root else {}
        )
        num_classes = dataset.num_classes
        row: dict[str, Any] = {"seed": seed, "device": dev, **{f"{k}": v for k, v in cell.labels().items()}}

        features, feat_key, row["time_features_s"], row["features_reused"] = self.features(dataset, backbone)
        ctx = StageContext(self.device, seed, dataset, backbone, num_classes, self.progress)
        artifacts: dict[str, Any] = {}
        learner_entry = cell.entry("feature_learner")

        # protocol path: codes upsampled bilinearly to the pixels (stego) where every patch is a segment
        bilinear = spec.upsample == "bilinear_code" and cell.entry("image_clusterer").name == "none"
        # flipped features serve flip TTA, and the learner's flipped codes (stored with the learned entry,
        # which image clusterers of every kind share, so they are computed whenever a learner runs)
        need_flip = spec.flip_tta and (bilinear or not learner_entry.skipped)
        flipped: FeatureSet | None = None
        if need_flip:
            flip_dataset = spec.view(raw_dataset, flip=True)
            flipped, flip_key, row["time_features_flipped_s"], _ = self.features(
                flip_dataset, backbone, self.memo.flipped
            )

        # feature learner
        upstream = feat_key
        row["time_feature_learner_s"] = 0.0
        if not learner_entry.skipped:
            learner = build_plugin(learner_entry, {"seed": seed, "device": dev, "num_classes": num_classes})
            lkey = stable_hash({"up": feat_key, "learner": plugin_identity(learner),
                                **({"flip_tta_up": flip_key} if need_flip else {})})  # fmt: skip

            def fit_learner():
                learner.fit(features, ctx)
                out = learner.transform(features, ctx)
                stored = {"codes": [im.code for im in out], "artifacts": learner.artifacts()}
                if need_flip:
                    fctx = StageContext(self.device, seed, flip_dataset, backbone, num_classes, self.progress)
                    stored["flipped_codes"] = [im.code for im in learner.transform(flipped, fctx)]
                return stored

            def learned():
                return self.memo.learned.get_or(lkey, lambda: self._cached("learned", lkey, fit_learner)[0])

            stored, row["time_feature_learner_s"], _ = self._timed("learned:" + lkey, learned)
            features = features.with_code(stored["codes"], learner=learner_entry.label)
            if need_flip:
                flipped = flipped.with_code(stored["flipped_codes"], learner=learner_entry.label)
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
        # hook (issue 14): choices the image clusterer resolved at run time, e.g. DSM's background rule
        row.update(recorded_choices(stored["artifacts"]))

        # dataset-level clusterer
        has_bg = any(s.background is not None for s in segments)
        dc_entry = cell.entry("dataset_clusterer")
        k_total = self.protocol.get("n_clusters") or num_classes
        k_dc = int(dc_entry.params.get("n_clusters", k_total - int(has_bg)))
        fg_masks = [_foreground(s) for s in segments]
        X = torch.cat([s.vectors[m].float() for s, m in zip(segments, fg_masks)])
        # more clusters than vectors: refused, or clipped on a --limit run with a note (ussbench.limits)
        dc_entry, k_dc, clusters_note = fit_clusters_to_vectors(cell, dc_entry, k_dc, int(X.shape[0]))
        if clusters_note:
            row["note"] = clusters_note
        dc = build_plugin(dc_entry, {"seed": seed, "device": dev, "n_clusters": k_dc})
        k_dc = int(getattr(dc, "n_clusters", k_dc))
        t0 = time.perf_counter()
        assigned = dc.fit(X).predict(X).long().cpu()
        row["time_dataset_clusterer_s"] = time.perf_counter() - t0
        if assigned.shape[0] != X.shape[0] or int(assigned.min()) < 0 or int(assigned.max()) >= k_dc:
            raise ValueError(
                f"dataset clusterer {dc_entry.name!r} returned labels outside [0, {k_dc}) or of wrong length"
            )
        artifacts["dataset_clusterer"] = dc.artifacts()
        n_pred = k_dc + int(has_bg)

        # evaluation: stream every image into one confusion matrix (two with the protocol's CRF: after, before)
        t0 = time.perf_counter()
        post_entry = cell.entry("postprocess")
        post = None if post_entry.name == "none" else build_plugin(post_entry, {"seed": seed, "device": dev})
        if post is not None and spec.crf:  # load_grid refuses this; guard direct callers too
            raise ConfigError(f"postprocess {post_entry.name!r} together with protocol {spec.name!r}'s CRF")
        labels = self.labels(dataset, feat_key)
        if bilinear:
            ic_feature = pick_feature(features, getattr(ic, "feature", "auto"), "tokens")
            pixels = bilinear_pixel_predictions(
                features, flipped if spec.flip_tta else None, ic_feature, bool(getattr(ic, "normalise", True)),
                dc, [lab.shape for lab in labels], n_pred, self.device,
            )  # fmt: skip
        else:
            pixels = nearest_pixel_predictions(
                segments, fg_masks, assigned, k_dc, [lab.shape for lab in labels]
            )
        row.update(upsample="bilinear_code" if bilinear else "nearest_labels", flip_tta=bool(bilinear and spec.flip_tta),
                   protocol_crf="none")  # fmt: skip
        conf = ConfusionMatrix(n_pred, num_classes)
        conf_no_crf = ConfusionMatrix(n_pred, num_classes) if spec.crf else None
        panel_ids = panel_indices(len(segments), int(self.protocol.get("panels", 4)))
        panels: dict[str, np.ndarray] = {}

        def finish(i: int, pred: np.ndarray, before_crf: np.ndarray | None = None) -> None:
            conf.update(pred, labels[i])
            if conf_no_crf is not None and before_crf is not None:
                conf_no_crf.update(before_crf, labels[i])
            if i in panel_ids:
                panels[str(i)] = pred.astype(np.int16)

        progress = tqdm(pixels, total=len(segments), desc="evaluate", disable=not self.progress, leave=False)
        if spec.crf:
            row["protocol_crf"], row["time_crf_s"] = self._protocol_crf(dataset, progress, n_pred, finish)
        else:
            for i, pred, _ in progress:
                if post is not None:
                    pred = post.apply(dataset.load_image(i), pred, n_pred)
                finish(i, pred)
        row["time_eval_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        covering, _ = self.memo.covering.get_or(
            skey, lambda: segment_covering(segments, labels, dataset, cell.entry("dataset").name)
        )
        row.update(covering)
        row["time_nfcov_s"] = time.perf_counter() - t0
        level_panels = {
            f"{name}_{i}": level.numpy().astype(np.int16)
            for i in sorted(panel_ids)
            for name, level in segments[i].levels.items()
        }
        scores = evaluate_counts(conf.counts, self.protocol["matching"], self.protocol["objective"])
        if conf_no_crf is not None:  # its own Hungarian, as the reference reports the two numbers
            before = evaluate_counts(
                conf_no_crf.counts, self.protocol["matching"], self.protocol["objective"]
            )
            row.update(miou_no_crf=before.miou * 100.0, pixel_accuracy_no_crf=before.pixel_accuracy * 100.0)
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
            **({"confusion_no_crf": conf_no_crf.counts.tolist()} if conf_no_crf is not None else {}),
            "panels": panels,
            "level_panels": level_panels,
            "artifacts": artifacts,
            "params": {kind: build_params_for_record(cell.entry(kind), obj) for kind, obj in
                       (("dataset", getattr(dataset, "dataset", dataset)), ("backbone", backbone), ("image_clusterer", ic), ("dataset_clusterer", dc))},
            "backbone_report_name": backbone.report_name or backbone.plugin_name,
            "dataset_description": dataset.description,
        }  # fmt: skip
        return row, extras

    def _protocol_crf(
        self, dataset: Dataset, pixels, n_pred: int, finish: Callable[..., None]
    ) -> tuple[str, float]:
        """Refine every prediction with the protocol's dense CRF (its ``crf_preset``), a few images at a time.

        The unary is the per-pixel scores where the path has them (soft), else the hard labels. One
        :class:`CRFPool` serves the cell when ``crf_workers`` > 1. Returns (unary kind, CRF seconds).
        """
        from .postprocess.crf import CRFPool, crf_batch, default_workers

        crf_spec = registry.get("postprocess", "crf")
        plugin = registry.instantiate(crf_spec, registry.resolve_params(crf_spec, {}, self.spec.crf_preset,
                                                                        where=f"protocol {self.spec.name}"))  # fmt: skip
        workers = self.crf_workers
        if workers is None:
            available = default_workers()
            workers = available if available > 2 else 1
        pool = CRFPool(workers) if workers > 1 else None
        chunk = 2 * workers if pool is not None else 1
        kinds: set[str] = set()
        seconds = 0.0
        buffer: list[tuple[int, np.ndarray, torch.Tensor | None]] = []

        def flush() -> None:
            nonlocal seconds
            soft = plugin.use_probs and all(s is not None for _, _, s in buffer)
            kinds.add("soft" if soft else "labels")
            t = time.perf_counter()
            refined = crf_batch(
                [dataset.load_image(i) for i, _, _ in buffer], [p for _, p, _ in buffer], n_pred,
                probs_list=[s for _, _, s in buffer] if soft else None, workers=1, timeout=plugin.timeout,
                params=plugin.params, scores="logits", pool=pool,
            )  # fmt: skip
            seconds += time.perf_counter() - t
            for (i, before, _), pred in zip(buffer, refined):
                finish(i, pred, before)
            buffer.clear()

        try:
            for item in pixels:
                buffer.append(item)
                if len(buffer) >= chunk:
                    flush()
            if buffer:
                flush()
        finally:
            if pool is not None:
                pool.close()
        return ("+".join(sorted(kinds)) or "none"), seconds


def resolve_protocol(protocol: dict[str, Any]) -> ProtocolSpec:
    """The grid's protocol as a :class:`ProtocolSpec`: the named one with the grid's res/flip_tta/crf set."""
    overrides = {k: protocol[k] for k in ("res", "flip_tta", "crf") if protocol.get(k) is not None}
    return get_protocol(protocol.get("name", "default"), **overrides)


def protocol_view(dataset: Dataset, protocol: dict[str, Any], flip: bool = False) -> Dataset:
    """The dataset as the named protocol evaluates it (STEGO: short side resized to res, centre crop)."""
    if protocol.get("name", "default") == "default" and not flip:
        return dataset
    return resolve_protocol(protocol).view(dataset, flip=flip)


def nearest_pixel_predictions(segments: list[Segmentation], fg_masks: list[torch.Tensor], assigned: torch.Tensor,
                              k_dc: int, sizes: list[tuple[int, int]]):  # fmt: skip
    """Per image (index, (H, W) int64 labels, None): segment labels on the patch grid, upsampled nearest."""
    offset = 0
    for i, (seg, fg) in enumerate(zip(segments, fg_masks)):
        seg_labels = torch.full((seg.n_segments,), k_dc, dtype=torch.long)  # background -> k_dc
        n_fg = int(fg.sum())
        seg_labels[fg] = assigned[offset : offset + n_fg]
        offset += n_fg
        yield i, upsample_nearest(seg_labels[seg.segment_map.long()].numpy(), sizes[i]), None


def bilinear_pixel_predictions(features: FeatureSet, flipped: FeatureSet | None, feature: str, normalise: bool,
                               clusterer: Any, sizes: list[tuple[int, int]], n_pred: int, device: torch.device):  # fmt: skip
    """Per image (index, (H, W) int64 labels, (K, H, W) scores or None) from codes upsampled to the pixels.

    The STEGO evaluation: the dense map ``feature`` (h, w, D) of each image, averaged with the unflipped map of
    its mirror image when ``flipped`` is given, is upsampled bilinearly to the label size; a clusterer with
    ``logits`` (the cluster probe) scores every pixel (``log_softmax(alpha cos)``, argmax = the label), any
    other labels the pixel vectors (L2-normalised when the segment vectors were) with ``predict``.
    """
    scored = callable(getattr(clusterer, "logits", None))
    for i, size in enumerate(sizes):
        code = features[i].dense(feature).float()
        if flipped is not None:
            code = flip_average(code, flipped[i].dense(feature).float())
        if scored:
            scores = stego_pixel_logits(code.to(device), clusterer, tuple(size)).float().cpu()
            pred = scores.argmax(0).numpy().astype(np.int64)
        else:
            up = upsample_code(code, tuple(size))
            up = F.normalize(up, dim=-1) if normalise else up
            pred = clusterer.predict(up.reshape(-1, up.shape[-1])).long().cpu().reshape(size).numpy()
            scores = None
        if pred.size and (int(pred.min()) < 0 or int(pred.max()) >= n_pred):
            raise ValueError(f"dataset clusterer returned pixel labels outside [0, {n_pred})")
        yield i, pred, scores


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
