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
    """Accumulates (predicted cluster, ground-truth class) pixel counts image by image.

    Besides the split's total ``counts`` it keeps each image's counts sparsely (see
    :meth:`per_image_counts`), so image-level statistics (bootstrap intervals, paired comparisons) can be
    computed later from a finished cell without rerunning it.
    """

    def __init__(self, n_clusters: int, n_classes: int):
        if n_clusters < 1 or n_classes < 1:
            raise ValueError(f"need >= 1 cluster and class, got {n_clusters} clusters, {n_classes} classes")
        self.n_clusters = n_clusters
        self.n_classes = n_classes
        self.counts = np.zeros((n_clusters, n_classes), dtype=np.int64)
        self.n_images = 0
        self._blocks: list[np.ndarray] = []  # one (nnz, 4) block per update: image, cluster, class, count

    def update(self, pred: np.ndarray, gt: np.ndarray, image: int | None = None) -> None:
        """Add one image: pred cluster ids in [0, n_clusters), gt class ids with -1 = ignore.

        ``image``: the image's index in the split (default: the next one); an image without a valid pixel
        still counts as an image of the split.
        """
        pred, gt = np.asarray(pred), np.asarray(gt)
        if pred.shape != gt.shape:  # the same pixels in the same layout: a transposed map is no match
            raise ValueError(f"prediction has shape {pred.shape}, label has {gt.shape}")
        if not (np.issubdtype(pred.dtype, np.integer) and np.issubdtype(gt.dtype, np.integer)):
            raise ValueError(f"predictions and labels must be integer ids, got {pred.dtype} and {gt.dtype}")
        pred, gt = pred.reshape(-1), gt.reshape(-1)
        index = self.n_images if image is None else int(image)
        if index < 0:
            raise ValueError(f"image index must be >= 0, got {index}")
        valid = gt >= 0
        p, g = pred[valid].astype(np.int64), gt[valid].astype(np.int64)
        if p.size:
            if p.min() < 0 or p.max() >= self.n_clusters:
                raise ValueError(
                    f"predicted cluster ids must lie in [0, {self.n_clusters}); got [{p.min()}, {p.max()}]"
                )
            if g.max() >= self.n_classes:
                raise ValueError(f"label class ids must lie in [0, {self.n_classes}); got {g.max()}")
            image_counts = np.bincount(p * self.n_classes + g, minlength=self.counts.size)
            self.counts += image_counts.reshape(self.counts.shape)
            nz = np.flatnonzero(image_counts)
            self._blocks.append(
                np.stack(
                    [np.full(nz.size, index), nz // self.n_classes, nz % self.n_classes, image_counts[nz]], 1
                )
            )
        self.n_images = max(self.n_images, index + 1)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix over the same images (its per-image counts are added image by image)."""
        self.counts += other.counts
        self._blocks.extend(other._blocks)
        self.n_images = max(self.n_images, other.n_images)

    def per_image_counts(self) -> np.ndarray:
        """Each image's non-zero counts as an int64 array (nnz, 4): image, cluster, class, pixel count.

        Sorted by image, then cluster, then class; an (image, cluster, class) triple appears once.
        """
        if not self._blocks:
            return np.zeros((0, 4), dtype=np.int64)
        rows = np.concatenate(self._blocks).astype(np.int64)
        key = (rows[:, 0] * self.n_clusters + rows[:, 1]) * self.n_classes + rows[:, 2]
        unique, inverse = np.unique(key, return_inverse=True)
        summed = np.bincount(inverse, weights=rows[:, 3]).astype(np.int64)
        return np.stack([unique // (self.n_clusters * self.n_classes), (unique // self.n_classes) % self.n_clusters,
                         unique % self.n_classes, summed], 1)  # fmt: skip

    @classmethod
    def from_per_image(
        cls, per_image: np.ndarray, n_clusters: int, n_classes: int, n_images: int | None = None
    ) -> ConfusionMatrix:
        """Rebuild a matrix from :meth:`per_image_counts` (e.g. read back from a cell's ``.npz``)."""
        rows = np.asarray(per_image, dtype=np.int64).reshape(-1, 4)
        if rows.size and (
            rows[:, :3].min() < 0 or rows[:, 1].max() >= n_clusters or rows[:, 2].max() >= n_classes
        ):
            raise ValueError(f"per-image counts outside {n_clusters} clusters x {n_classes} classes")
        cm = cls(n_clusters, n_classes)
        if rows.size:
            np.add.at(cm.counts, (rows[:, 1], rows[:, 2]), rows[:, 3])
            cm._blocks.append(rows)
            cm.n_images = int(rows[:, 0].max()) + 1
        if n_images is not None:
            cm.n_images = max(cm.n_images, int(n_images))
        return cm


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


def match_many(
    counts: np.ndarray, matching: Matching = "auto", objective: Objective = "pixels"
) -> np.ndarray:
    """:func:`match_clusters` for a stack of count matrices (B, K, C) -> (B, K) maps (one Hungarian each)."""
    counts = np.asarray(counts)
    out = np.empty(counts.shape[:2], dtype=np.int64)
    for i, c in enumerate(counts):
        out[i] = match_clusters(c, matching, objective)
    return out


def score_many(counts: np.ndarray, mappings: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised :func:`score` for (B, K, C) count matrices and (B, K) maps.

    Returns (mIoU (B,), pixel accuracy (B,), per-class IoU (B, C)) as fractions, with :func:`score`'s
    conventions: an unmatched cluster's pixels are misses of their class; a class that neither occurs nor
    is predicted has NaN IoU and is left out of the mean.
    """
    counts = np.asarray(counts, dtype=np.float64)
    b, k, c = counts.shape
    onehot = np.zeros((b, k, c))
    bi, ki = np.nonzero(mappings >= 0)
    onehot[bi, ki, mappings[bi, ki]] = 1.0
    tp = (onehot * counts).sum(1)
    predicted = np.einsum("bkc,bk->bc", onehot, counts.sum(2))  # pixels assigned to each class
    actual = counts.sum(1)
    denom = predicted + actual - tp
    defined = denom > 0
    iou = np.divide(tp, denom, out=np.full((b, c), np.nan), where=defined)
    n_defined = defined.sum(1)
    miou = np.divide(np.nansum(iou, 1), n_defined, out=np.full(b, np.nan), where=n_defined > 0)
    total = actual.sum(1)
    acc = np.divide(tp.sum(1), total, out=np.full(b, np.nan), where=total > 0)
    return miou, acc, iou
