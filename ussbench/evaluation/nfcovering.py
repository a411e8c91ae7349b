"""Normalized Foreground Covering (HSG, Ke et al. CVPR 2022, eq. 10) of per-image segmentations.

NFCovering(S' -> S_fg) = 1/|S_fg| * sum over ground-truth foreground regions R of max over predicted
segments R' of |R n R'| / |R u R'|: each foreground region's best-overlap IoU, averaged over the image's
foreground regions, then over the images that have any. Unlike Segmentation Covering it is not weighted
by region size, so a trivial all-foreground mask does not score high. Void pixels (label < 0) are
removed from both ground-truth regions and predicted segments.

Foreground, per dataset (``BACKGROUND_CLASSES``): VOC 2012 - every class but 'background' (the paper's
setting); MSRC-v2 - the object classes, i.e. all but the 'stuff' classes building, grass, tree, sky,
mountain, water, road; CamVid - the movable things car, pedestrian, bicyclist (Cityscapes' 'thing'
convention), all other classes (sky, building, pole, road, pavement, tree, sign/symbol, fence) being
background. A region is one foreground class's pixels in an image (``regions='class'``), or one 4-connected
component of them (``regions='connected'``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

BACKGROUND_CLASSES: dict[str, tuple[str, ...]] = {
    "voc2012": ("background",),
    "msrc_v2": ("building", "grass", "tree", "sky", "mountain", "water", "road"),
    "camvid": ("sky", "building", "pole", "road", "pavement", "tree", "sign/symbol", "fence"),
}

Regions = Literal["class", "connected"]


def foreground_classes(class_names: Sequence[str], dataset: str | None = None) -> list[int]:
    """Ids of the foreground classes: by the dataset's rule above, else all but a class named 'background'."""
    if dataset is not None:
        if dataset not in BACKGROUND_CLASSES:
            known = ", ".join(sorted(BACKGROUND_CLASSES))
            raise ValueError(f"nf_covering: no foreground rule for dataset {dataset!r}; known: {known}")
        background = set(BACKGROUND_CLASSES[dataset])
    elif "background" in class_names:
        background = {"background"}
    else:
        raise ValueError(
            "nf_covering: class_names have no 'background' class; pass dataset= (one of "
            f"{', '.join(sorted(BACKGROUND_CLASSES))}) or explicit foreground class ids"
        )
    return [i for i, name in enumerate(class_names) if name not in background]


@dataclass
class NFCoveringResult:
    """Mean NFCovering over images with a foreground region; per-image values (NaN: no foreground)."""

    score: float
    per_image: np.ndarray
    n_images: int
    n_regions: int

    def as_dict(self) -> dict:
        return {"nf_covering": self.score, "n_images": self.n_images, "n_regions": self.n_regions}


def _upsample(segment_map: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> np.ndarray:
    """Nearest upsampling of a segment-id map to the label's shape (the runner's convention)."""
    seg = torch.as_tensor(np.asarray(segment_map)).long()
    if tuple(seg.shape) != tuple(shape):
        seg = F.interpolate(seg[None, None].float(), size=shape, mode="nearest")[0, 0].long()
    return seg.numpy()


def _region_map(label: np.ndarray, foreground: np.ndarray, regions: Regions) -> tuple[np.ndarray, int]:
    """Per pixel the id of its ground-truth foreground region (-1 elsewhere) and the number of regions."""
    fg = np.isin(label, foreground) & (label >= 0)
    out = np.full(label.shape, -1, dtype=np.int64)
    if regions == "class":
        classes, inverse = np.unique(label[fg], return_inverse=True)
        out[fg] = inverse
        return out, int(classes.size)
    if regions != "connected":
        raise ValueError(f"nf_covering: regions must be 'class' or 'connected', got {regions!r}")
    from scipy.ndimage import label as connected

    n = 0
    for c in np.unique(label[fg]):
        comp, k = connected(label == c)
        out[comp > 0] = comp[comp > 0] - 1 + n
        n += k
    return out, n


def nf_covering_image(
    segment_map: np.ndarray | torch.Tensor,
    label: np.ndarray,
    foreground: Sequence[int],
    regions: Regions = "class",
) -> tuple[float, int]:
    """NFCovering of one image (NaN without foreground) and its number of foreground regions."""
    label = np.asarray(label)
    seg = _upsample(segment_map, label.shape)
    region, n = _region_map(label, np.asarray(list(foreground), dtype=np.int64), regions)
    if n == 0:
        return float("nan"), 0
    valid = label >= 0
    seg, region = seg[valid], region[valid]
    if seg.min() < 0:
        raise ValueError(f"nf_covering: segment ids must be >= 0, got {int(seg.min())}")
    _, seg = np.unique(seg, return_inverse=True)
    k = int(seg.max()) + 1
    in_fg = region >= 0
    inter = np.bincount(region[in_fg] * k + seg[in_fg], minlength=n * k).reshape(n, k)
    seg_size = np.bincount(seg, minlength=k)
    region_size = inter.sum(1, keepdims=True)
    iou = inter / (region_size + seg_size[None, :] - inter)
    return float(iou.max(1).mean()), n


def nf_covering(
    segment_maps: Sequence[np.ndarray | torch.Tensor],
    labels: Sequence[np.ndarray],
    foreground: Sequence[int] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    dataset: str | None = None,
    regions: Regions = "class",
) -> NFCoveringResult:
    """NFCovering of a split: segment maps (any grid; upsampled nearest to each label), labels (H, W) with
    classes >= 0 and void < 0. Foreground: explicit class ids, or from class_names (+ dataset's rule)."""
    if len(segment_maps) != len(labels):
        raise ValueError(f"nf_covering: {len(segment_maps)} segment maps for {len(labels)} label maps")
    if foreground is None:
        if class_names is None:
            raise ValueError("nf_covering: give foreground class ids or class_names (and dataset)")
        foreground = foreground_classes(class_names, dataset)
    per_image = np.full(len(labels), np.nan)
    n_regions = 0
    for i, (seg, lab) in enumerate(zip(segment_maps, labels)):
        per_image[i], n = nf_covering_image(seg, lab, foreground, regions)
        n_regions += n
    scored = ~np.isnan(per_image)
    score = float(per_image[scored].mean()) if scored.any() else float("nan")
    return NFCoveringResult(score, per_image, int(scored.sum()), n_regions)


def nf_covering_levels(
    segmentations: Sequence[object],
    labels: Sequence[np.ndarray],
    foreground: Sequence[int] | None = None,
    **kwargs,
) -> dict[str, NFCoveringResult]:
    """NFCovering of every hierarchy level of ``Segmentation`` objects (their ``levels``; the segment map
    itself under 'segments' when they carry no levels)."""
    names: list[str] = []
    for s in segmentations:
        for name in getattr(s, "levels", {}) or {}:
            if name not in names:
                names.append(name)
    if not names:
        return {"segments": nf_covering([s.segment_map for s in segmentations], labels, foreground, **kwargs)}
    out = {}
    for name in names:
        maps = []
        for s in segmentations:
            levels: Mapping = s.levels
            if name not in levels:
                raise ValueError(f"nf_covering: a segmentation lacks level {name!r}")
            maps.append(levels[name])
        out[name] = nf_covering(maps, labels, foreground, **kwargs)
    return out
