"""Linear probe: a supervised reference for a representation (raw tokens or a learner's codes).

A linear classifier on the patch features, each patch labelled by the majority class of the pixels it
covers (patches without a labelled pixel are left out of training). Default: least squares onto one-hot
targets with a small ridge penalty on standardised inputs, solved in closed form (a ridge classifier; on
MSRC-v2 raw tokens it matched cross-entropy logistic regression: 71.7 vs 70.4-71.4 mIoU, at a fraction of
the time); ``classifier='logistic'`` trains cross-entropy by L-BFGS instead. It is trained and scored by
k-fold over the evaluated images: the datasets used here (MSRC-v2, CamVid test) have no official training
split, so each fold's images are predicted by a classifier fitted on the other folds. Predictions are
upsampled to the labels (nearest, as the unsupervised segment rows) and scored per pixel with the classes'
own labels (no cluster matching): mIoU and accuracy.

STEGO's linear probe is a 1x1 convolution (a linear map per patch) trained with cross-entropy on bilinearly
upsampled logits against every pixel; training on patch-resolution majority labels instead keeps this to
seconds on a CPU. It is one node of the stage graph per representation key (:func:`probe_node`; memoised
and cached on disk by the executor) whose entries are copied into every row that uses the representation.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from ..cache import stable_hash
from ..config import StageEntry
from ..graph.nodes import Inputs, Resources, Stage
from .metrics import ConfusionMatrix, score

PROBE_VERSION = "1"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbeSettings:
    """Probe hyperparameters (part of the cache key)."""

    folds: int = 5
    classifier: str = (
        "ridge"  # "ridge": least squares on one-hot targets (closed form); "logistic": CE + L-BFGS
    )
    ridge: float = 1e-3  # ridge strength relative to the mean feature variance (inputs standardised)
    weight_decay: float = 1e-4  # logistic: L2 on the weights (mean loss)
    max_iter: int = 60  # logistic: L-BFGS iterations per fold
    seed: int = 0  # fold assignment
    max_train_patches: int = 200_000  # logistic: subsample beyond this (seeded), to bound time and memory


def patch_labels(label: np.ndarray, grid: tuple[int, int], n_classes: int) -> np.ndarray:
    """(h*w,) majority class of the labelled pixels in each patch (-1 where a patch has none).

    A pixel belongs to the patch whose cell contains its centre, as in nearest upsampling.
    """
    H, W = label.shape
    h, w = grid
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    patch = (rows[:, None] * w + cols[None, :]).ravel()
    lab = label.ravel().astype(np.int64)
    valid = lab >= 0
    hist = np.bincount(patch[valid] * n_classes + lab[valid], minlength=h * w * n_classes).reshape(
        h * w, n_classes
    )
    out = hist.argmax(1)
    out[hist.sum(1) == 0] = -1
    return out


def _fit_logreg(
    x: torch.Tensor, y: torch.Tensor, n_classes: int, settings: ProbeSettings
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS (deterministic for a given input)."""
    d = x.shape[1]
    weight = torch.zeros(d, n_classes, dtype=x.dtype, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=settings.max_iter, history_size=10,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9)  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = (
            torch.nn.functional.cross_entropy(x @ weight + bias, y)
            + settings.weight_decay * (weight * weight).sum()
        )
        loss.backward()
        return loss

    opt.step(closure)
    return weight.detach(), bias.detach()


@dataclass
class ProbeResult:
    miou: float  # %
    acc: float  # %
    per_class_iou: np.ndarray
    folds: int
    n_train_patches: int
    seconds: float

    def row(self, feature: str) -> dict[str, Any]:
        return {"probe_miou": self.miou, "probe_acc": self.acc, "probe_folds": self.folds, "probe_feature": feature,
                "time_probe_s": self.seconds}  # fmt: skip


def _fit_ridge(
    stats: list[tuple[torch.Tensor, torch.Tensor]], ridge: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares onto one-hot targets from summed sufficient statistics (X~'X~, X~'Y; X~ = [x, 1]).

    The penalty ``ridge * n`` (n = training patches; inputs standardised, so unit feature variance) spares the
    bias. Solved in float64.
    """
    gram = sum(g for g, _ in stats)
    cross = sum(c for _, c in stats)
    d = gram.shape[0] - 1
    penalty = torch.zeros_like(gram)
    penalty[range(d), range(d)] = ridge * float(gram[-1, -1])
    solution = torch.linalg.solve(gram + penalty, cross)
    return solution[:-1].float(), solution[-1].float()


def linear_probe(features: list[torch.Tensor], labels: list[np.ndarray], n_classes: int,
                 settings: ProbeSettings | None = None) -> ProbeResult:  # fmt: skip
    """k-fold linear probe of dense features (one (h, w, D) map per image) against (H, W) labels (-1 = ignore)."""
    from ..graph.evaluation import upsample_nearest

    settings = settings or ProbeSettings()
    if settings.classifier not in ("ridge", "logistic"):
        raise ValueError(f"unknown probe classifier {settings.classifier!r}; expected ridge or logistic")
    start = time.perf_counter()
    n = len(features)
    folds = min(settings.folds, n)
    if folds < 2:
        raise ValueError(f"a k-fold linear probe needs >= 2 images, got {n}")
    rng = np.random.default_rng(settings.seed)
    fold_of = rng.permutation(np.arange(n) % folds)
    with torch.no_grad():
        flat = [f.reshape(-1, f.shape[-1]).float() for f in features]
        grids = [tuple(f.shape[:2]) for f in features]
        targets = [torch.from_numpy(patch_labels(lab, g, n_classes)) for lab, g in zip(labels, grids)]
        allx = torch.cat(flat)
        mean, std = allx.mean(0), allx.std(0).clamp_min(1e-6)  # standardised inputs: one penalty fits all
        del allx
        members = [[i for i in range(n) if fold_of[i] == k] for k in range(folds)]
        fold_data = []
        for k in range(folds):
            x = (torch.cat([flat[i] for i in members[k]]) - mean) / std
            y = torch.cat([targets[i] for i in members[k]])
            fold_data.append((x[y >= 0], y[y >= 0]))
        if settings.classifier == "ridge":  # each fold's sufficient statistics once; a fit sums the others
            sufficient = []
            for x, y in fold_data:
                xt = torch.cat([x, torch.ones(len(x), 1)], 1)
                onehot = torch.nn.functional.one_hot(y, n_classes).float()
                sufficient.append(((xt.T @ xt).double(), (xt.T @ onehot).double()))
    conf = ConfusionMatrix(n_classes, n_classes)
    n_train = 0
    for k in range(folds):
        others = [j for j in range(folds) if j != k]
        size = sum(len(fold_data[j][1]) for j in others)
        if size == 0:
            raise ValueError(f"fold {k} of the linear probe has no labelled training patch")
        n_train += size
        if settings.classifier == "ridge":
            weight, bias = _fit_ridge([sufficient[j] for j in others], settings.ridge)
        else:
            x = torch.cat([fold_data[j][0] for j in others])
            y = torch.cat([fold_data[j][1] for j in others])
            if len(y) > settings.max_train_patches:
                pick = torch.from_numpy(rng.choice(len(y), settings.max_train_patches, replace=False))
                x, y = x[pick], y[pick]
            weight, bias = _fit_logreg(x, y, n_classes, settings)
        with torch.no_grad():
            for i in members[k]:
                pred = (((flat[i] - mean) / std) @ weight + bias).argmax(1).reshape(grids[i]).numpy()
                conf.update(upsample_nearest(pred, labels[i].shape), labels[i], i)
    scores = score(conf.counts, np.arange(n_classes))
    return ProbeResult(scores.miou * 100.0, scores.pixel_accuracy * 100.0, scores.per_class_iou, folds,
                       n_train // folds, time.perf_counter() - start)  # fmt: skip


def probe_entries(features: Any, labels: list[np.ndarray], n_classes: int,
                  settings: ProbeSettings | None = None) -> dict[str, Any]:  # fmt: skip
    """The probe's row entries for a FeatureSet (its learner's ``code`` when it has one, else the backbone
    tokens); {} when k-fold is impossible (one image, too little labelled data): never a failed cell."""
    if len(features) < 2:  # k-fold needs two images; a one-image run reports no probe
        return {}
    feature = "code" if features.has_code else "tokens"
    try:
        dense = [im.dense(feature) for im in features]
        return linear_probe(dense, labels, n_classes, settings or ProbeSettings()).row(feature)
    except ValueError as exc:
        log.warning("linear probe skipped: %s", exc)
        return {}


@dataclass
class ProbeStage(Stage):
    """The graph node of a representation's linear probe: one per features / learned-codes key, shared by
    every cell of that representation (memoised and cached on disk by the executor like any stage)."""

    dataset: StageEntry
    learner: str | None = None  # the learner's label when the features carry its codes
    settings: ProbeSettings = field(default_factory=ProbeSettings)
    resources: Resources = field(default_factory=Resources)
    kind: ClassVar[str] = "probe"
    cache_stage: ClassVar[str | None] = "probe"

    def compute(self, inputs: Inputs, rt: Any) -> dict[str, Any]:
        from ..graph.stages import coded

        features = coded(inputs["features"], inputs.get("learned"), self.learner or "")
        return probe_entries(features, inputs["labels"], rt.dataset(self.dataset).num_classes, self.settings)

    def describe(self) -> str:
        return f"linear probe of {self.dataset.label}" + (
            f" x {self.learner} codes" if self.learner else " tokens"
        )


def probe_node(graph: Any, protocol: dict[str, Any], dataset: StageEntry, features: Any, learned: Any,
               labels: Any, learner: str | None, resources: Resources) -> Any | None:  # fmt: skip
    """Add the probe of a cell's representation to the stage graph (None when ``protocol.linear_probe`` is off).

    Its key: the representation's node key (features, or the learner's codes), the labels' key, the probe's
    settings and version, so every cell of one representation shares one probe.
    """
    if not protocol.get("linear_probe", True):
        return None
    from ..graph.nodes import Node

    settings = ProbeSettings()
    upstream = learned if learned is not None else features
    key = stable_hash({"probe": upstream.key, "labels": labels.key, "settings": settings.__dict__,
                       "version": PROBE_VERSION})  # fmt: skip
    inputs = {"features": features, "labels": labels, **({"learned": learned} if learned is not None else {})}
    return graph.add(Node(key, ProbeStage(dataset, learner if learned is not None else None, settings, resources),
                          inputs))  # fmt: skip
