"""The evaluation path of a cell: predictions to pixels, optional post-processing or protocol CRF, scores.

Two ways to the pixels: per-segment labels upsampled nearest (every protocol), or, under the STEGO
protocol where every patch is a segment, codes upsampled bilinearly and labelled per pixel (optionally
flip-averaged). Every image streams into one confusion matrix (two with the protocol's CRF: after and
before it); one cluster-to-class match over the whole split gives the scores.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import registry
from ..base import Dataset, FeatureSet, Segmentation
from ..contracts import check_prediction
from ..evaluation.metrics import ConfusionMatrix, evaluate_counts
from ..evaluation.per_image import cell_arrays
from ..evaluation.protocols import ProtocolSpec, flip_average, get_protocol, stego_pixel_logits, upsample_code

Prediction = tuple[int, np.ndarray, "torch.Tensor | None"]  # image index, (H, W) labels, (K, H, W) scores


def resolve_protocol(protocol: dict[str, Any]) -> ProtocolSpec:
    """The grid's protocol as a :class:`ProtocolSpec`: the named one with the grid's res/flip_tta/crf set."""
    overrides = {k: protocol[k] for k in ("res", "flip_tta", "crf") if protocol.get(k) is not None}
    return get_protocol(protocol.get("name", "default"), **overrides)


def protocol_view(dataset: Dataset, protocol: dict[str, Any], flip: bool = False) -> Dataset:
    """The dataset as the named protocol evaluates it (STEGO: short side resized to res, centre crop)."""
    if protocol.get("name", "default") == "default" and not flip:
        return dataset
    return resolve_protocol(protocol).view(dataset, flip=flip)


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


def foreground_mask(seg: Segmentation) -> torch.Tensor:
    """Which segments the dataset clusterer labels (all but the background segment, if any)."""
    mask = torch.ones(seg.n_segments, dtype=torch.bool)
    if seg.background is not None:
        mask[seg.background] = False
    return mask


def panel_indices(n: int, count: int) -> set[int]:
    """Evenly spaced image indices for qualitative panels (deterministic)."""
    if count <= 0 or n == 0:
        return set()
    return {int(i) for i in np.linspace(0, n - 1, num=min(count, n)).round()}


def nearest_pixel_predictions(segments: list[Segmentation], fg_masks: list[torch.Tensor], assigned: torch.Tensor,
                              k_dc: int, sizes: list[tuple[int, int]]) -> Iterator[Prediction]:  # fmt: skip
    """Per image (index, (H, W) int64 labels, None): segment labels on the patch grid, upsampled nearest."""
    offset = 0
    for i, (seg, fg) in enumerate(zip(segments, fg_masks)):
        seg_labels = torch.full((seg.n_segments,), k_dc, dtype=torch.long)  # background -> k_dc
        n_fg = int(fg.sum())
        seg_labels[fg] = assigned[offset : offset + n_fg]
        offset += n_fg
        yield i, upsample_nearest(seg_labels[seg.segment_map.long()].numpy(), sizes[i]), None


def bilinear_pixel_predictions(features: FeatureSet, flipped: FeatureSet | None, feature: str, normalise: bool,
                               clusterer: Any, sizes: list[tuple[int, int]], n_pred: int,
                               device: torch.device) -> Iterator[Prediction]:  # fmt: skip
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
    from ..evaluation.nfcovering import (
        BACKGROUND_CLASSES,
        foreground_classes,
        nf_covering,
        nf_covering_levels,
    )

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


@dataclass
class EvaluationSetup:
    """What the evaluation of one cell needs besides the predictions: protocol, data and post-processing."""

    spec: ProtocolSpec
    protocol: dict[str, Any]
    dataset: Dataset
    labels: list[np.ndarray]
    n_pred: int
    postprocess: Any | None  # a PostProcess plugin, or None
    progress: bool = True
    crf_workers: int | None = None
    counts: Callable[[ConfusionMatrix, set[int]], dict[str, np.ndarray]] | None = None  # exact nearest counts


def evaluate_predictions(setup: EvaluationSetup, pixels: Iterable[Prediction]) -> dict[str, Any]:
    """Stream every image's prediction into the confusion matrix (and the protocol CRF) and score the cell.

    Returns row fields (``miou``, ``pixel_accuracy``, with the CRF also ``*_no_crf``, ``protocol_crf``,
    ``time_crf_s``, ``n_pixels``) and the record's extras (confusion, mapping, per-class IoU, panels).
    """
    spec, labels = setup.spec, setup.labels
    n_images = len(labels)
    conf = ConfusionMatrix(setup.n_pred, setup.dataset.num_classes)
    conf_no_crf = ConfusionMatrix(setup.n_pred, setup.dataset.num_classes) if spec.crf else None
    panel_ids = panel_indices(n_images, int(setup.protocol.get("panels", 4)))
    panels: dict[str, np.ndarray] = {}

    def finish(i: int, pred: np.ndarray, before_crf: np.ndarray | None = None) -> None:
        conf.update(pred, labels[i], i)  # i: the image's index, for the per-image counts (statistics)
        if conf_no_crf is not None and before_crf is not None:
            conf_no_crf.update(before_crf, labels[i], i)
        if i in panel_ids:
            panels[str(i)] = pred.astype(np.int16)

    row: dict[str, Any] = {"protocol_crf": "none"}
    progress = tqdm(pixels, total=n_images, desc="evaluate", disable=not setup.progress, leave=False)
    if spec.crf:
        row["protocol_crf"], row["time_crf_s"] = protocol_crf(setup, progress, finish)
    else:
        post = setup.postprocess
        if post is None and setup.counts is not None:  # from per-patch label histograms, no pixel pass (perf)
            panels.update(setup.counts(conf, panel_ids))
            progress.close()
        else:
            for i, pred, _ in progress:
                if post is not None:
                    refined = post.apply(setup.dataset.load_image(i), pred, setup.n_pred)
                    pred = check_prediction(refined, pred.shape, f"postprocess {post.plugin_name!r}", i)
                finish(i, pred)
    matching, objective = setup.protocol["matching"], setup.protocol["objective"]
    scores = evaluate_counts(conf.counts, matching, objective)
    if conf_no_crf is not None:  # its own Hungarian, as the reference reports the two numbers
        before = evaluate_counts(conf_no_crf.counts, matching, objective)
        row.update(miou_no_crf=before.miou * 100.0, pixel_accuracy_no_crf=before.pixel_accuracy * 100.0)
    row.update(
        miou=scores.miou * 100.0, pixel_accuracy=scores.pixel_accuracy * 100.0, n_pixels=scores.n_pixels
    )
    extras = {
        "per_class_iou": scores.as_dict(setup.dataset.class_names)["per_class_iou"],
        "mapping": scores.mapping.tolist(),
        "confusion": conf.counts.tolist(),
        **({"confusion_no_crf": conf_no_crf.counts.tolist()} if conf_no_crf is not None else {}),
        "per_image": cell_arrays(conf, conf_no_crf, setup.dataset.ids()),  # arrays for the cell's .npz
        "panels": panels,
    }
    return {"row": row, "extras": extras, "panel_ids": sorted(panel_ids)}


def protocol_crf(
    setup: EvaluationSetup, pixels: Iterable[Prediction], finish: Callable[..., None]
) -> tuple[str, float]:
    """Refine every prediction with the protocol's dense CRF (its ``crf_preset``), a few images at a time.

    The unary is the per-pixel scores where the path has them (soft), else the hard labels. One
    :class:`CRFPool` serves the cell when ``crf_workers`` > 1. Returns (unary kind, CRF seconds).
    """
    from ..postprocess.crf import CRFPool, crf_batch, default_workers

    spec, dataset, n_pred = setup.spec, setup.dataset, setup.n_pred
    crf_spec = registry.get("postprocess", "crf")
    plugin = registry.instantiate(crf_spec, registry.resolve_params(crf_spec, {}, spec.crf_preset,
                                                                    where=f"protocol {spec.name}"))  # fmt: skip
    workers = setup.crf_workers
    if workers is None:
        available = default_workers()
        workers = available if available > 2 else 1
    pool = CRFPool(workers) if workers > 1 else None
    chunk = 2 * workers if pool is not None else 1
    kinds: set[str] = set()
    seconds = 0.0
    buffer: list[Prediction] = []

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
