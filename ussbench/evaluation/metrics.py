"""Dataset-level evaluation: a streamed confusion matrix, one cluster->class matching, IoU and accuracy.

Every valid pixel of the split lands in the confusion matrix (clusters x classes); nothing is dropped:
with more clusters than classes each cluster is mapped to a class (many-to-one), and clusters left
unmatched by a one-to-one match count as errors against the class they cover.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

Matching = Literal["auto", "hungarian", "many_to_one"]
Objective = Literal["pixels", "iou"]


class ConfusionMatrix:
    """Accumulates (predicted cluster, ground-truth class) pixel counts image by image."""

    def __init__(self, n_clusters: int, n_classes: int):
        if n_clusters < 1 or n_classes < 1:
            raise ValueError(f"need >= 1 cluster and class, got {n_clusters} clusters, {n_classes} classes")
        self.n_clusters = n_clusters
        self.n_classes = n_classes
        self.counts = np.zeros((n_clusters, n_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: pred cluster ids in [0, n_clusters), gt class ids with -1 = ignore."""
        pred = np.asarray(pred).reshape(-1)
        gt = np.asarray(gt).reshape(-1)
        if pred.shape != gt.shape:
            raise ValueError(f"prediction has {pred.size} pixels, label has {gt.size}")
        valid = gt >= 0
        p, g = pred[valid].astype(np.int64), gt[valid].astype(np.int64)
        if p.size == 0:
            return
        if p.min() < 0 or p.max() >= self.n_clusters:
            raise ValueError(
                f"predicted cluster ids must lie in [0, {self.n_clusters}); got [{p.min()}, {p.max()}]"
            )
        if g.max() >= self.n_classes:
            raise ValueError(f"label class ids must lie in [0, {self.n_classes}); got {g.max()}")
        self.counts += np.bincount(p * self.n_classes + g, minlength=self.counts.size).reshape(
            self.counts.shape
        )

    def merge(self, other: ConfusionMatrix) -> None:
        self.counts += other.counts


def match_clusters(
    counts: np.ndarray, matching: Matching = "auto", objective: Objective = "pixels"
) -> np.ndarray:
    """Cluster -> class map (length n_clusters; -1 = unmatched) from a clusters x classes count matrix.

    hungarian: one-to-one maximising matched pixels (objective 'pixels', STEGO) or summed IoU ('iou', DSM);
    many_to_one: each cluster to its majority class; auto: hungarian if n_clusters <= n_classes, else
    hungarian for the best one-to-one part and majority vote for the remaining clusters.
    """
    k, c = counts.shape
    if matching == "many_to_one":
        return counts.argmax(axis=1)
    if objective == "pixels":
        score = counts.astype(np.float64)
    elif objective == "iou":
        inter = counts.astype(np.float64)
        union = counts.sum(1, keepdims=True) + counts.sum(0, keepdims=True) - inter
        score = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
    else:
        raise ValueError(f"unknown matching objective {objective!r}; expected 'pixels' or 'iou'")
    rows, cols = linear_sum_assignment(score, maximize=True)
    mapping = np.full(k, -1, dtype=np.int64)
    mapping[rows] = cols
    if matching == "auto" and k > c:
        unmatched = mapping < 0
        mapping[unmatched] = counts[unmatched].argmax(axis=1)
    elif matching not in ("auto", "hungarian"):
        raise ValueError(f"unknown matching {matching!r}; expected auto, hungarian or many_to_one")
    return mapping


@dataclass
class Scores:
    """mIoU over classes with a defined IoU, pixel accuracy, per-class IoU (NaN where undefined)."""

    miou: float
    pixel_accuracy: float
    per_class_iou: np.ndarray
    mapping: np.ndarray
    n_pixels: int

    def as_dict(self, class_names: list[str] | None = None) -> dict:
        names = class_names or [str(i) for i in range(len(self.per_class_iou))]
        return {
            "miou": self.miou,
            "pixel_accuracy": self.pixel_accuracy,
            "per_class_iou": {
                n: (None if np.isnan(v) else float(v)) for n, v in zip(names, self.per_class_iou)
            },
            "mapping": self.mapping.tolist(),
            "n_pixels": self.n_pixels,
        }


def score(counts: np.ndarray, mapping: np.ndarray) -> Scores:
    """Scores from a clusters x classes count matrix and a cluster->class map.

    A cluster mapped to -1 (unmatched) counts its pixels as false negatives of their true class, so no
    pixel is dropped; IoU of a class is NaN only when it neither occurs nor is predicted.
    """
    k, c = counts.shape
    hist = np.zeros((c, c), dtype=np.int64)  # predicted class x true class
    unmatched_fn = np.zeros(c, dtype=np.int64)
    for cluster in range(k):
        if mapping[cluster] >= 0:
            hist[mapping[cluster]] += counts[cluster]
        else:
            unmatched_fn += counts[cluster]
    tp = np.diag(hist).astype(np.float64)
    fp = hist.sum(1) - tp
    fn = hist.sum(0) - tp + unmatched_fn
    denom = tp + fp + fn
    iou = np.divide(tp, denom, out=np.full(c, np.nan), where=denom > 0)
    total = counts.sum()
    return Scores(
        miou=float(np.nanmean(iou)) if np.any(denom > 0) else float("nan"),
        pixel_accuracy=float(tp.sum() / total) if total else float("nan"),
        per_class_iou=iou,
        mapping=mapping,
        n_pixels=int(total),
    )


def evaluate_counts(
    counts: np.ndarray, matching: Matching = "auto", objective: Objective = "pixels"
) -> Scores:
    """Match clusters to classes once over the whole split, then score."""
    return score(counts, match_clusters(counts, matching, objective))
