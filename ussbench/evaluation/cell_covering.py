"""NFCovering of patch-grid segmentations from per-cell class histograms: the same numbers, no pixel pass.

:func:`ussbench.evaluation.nfcovering.nf_covering` upsamples every segment map to its label
(``F.interpolate`` nearest) and intersects it with the foreground classes pixel by pixel. Every pixel of a
patch cell lands in the same segment, so each (segment, class) intersection is the sum of the cells' class
histograms (computed once per dataset and grid, see :mod:`ussbench.evaluation.upsample`), and a segment's
size is its cells' valid pixels. All images are scored at once on the cells: the same NFCovering
('class' regions: one region per foreground class per image; void pixels left out of regions and
segments), at a small fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..base import Dataset, Segmentation
from .upsample import CellHistograms, HistogramMemo


def nf_covering_cells(maps: Sequence[torch.Tensor], hist: CellHistograms, foreground: Sequence[int]) -> float:
    """Mean NFCovering over the images with a foreground region (NaN if none), maps on ``hist``'s grids."""
    n_images = len(hist.offsets) - 1
    if len(maps) != n_images:
        raise ValueError(f"{len(maps)} segment maps for {n_images} images")
    counts = hist.counts.to(torch.float64)  # (M, C); exact integers
    n_classes = counts.shape[1]
    seg_ids, n_segs, total = [], [], 0
    for m in maps:
        m = torch.as_tensor(m).reshape(-1).long()
        if m.numel() and int(m.min()) < 0:
            raise ValueError(f"nf_covering: segment ids must be >= 0, got {int(m.min())}")
        n_segs.append(int(m.max()) + 1 if m.numel() else 0)
        seg_ids.append(m + total)
        total += n_segs[-1]
    sizes = torch.from_numpy(np.diff(hist.offsets))
    cell_seg = torch.cat(seg_ids)
    if cell_seg.numel() != counts.shape[0]:
        raise ValueError(f"segment maps cover {cell_seg.numel()} cells, the histograms {counts.shape[0]}")
    inter = torch.zeros(total, n_classes, dtype=torch.float64).index_add_(0, cell_seg, counts)  # (S, C)
    seg_size = inter.sum(1, keepdim=True)
    image_of_cell = torch.repeat_interleave(torch.arange(n_images), sizes)
    region = torch.zeros(n_images, n_classes, dtype=torch.float64).index_add_(0, image_of_cell, counts)
    image_of_seg = torch.repeat_interleave(torch.arange(n_images), torch.tensor(n_segs, dtype=torch.long))
    union = region[image_of_seg] + seg_size - inter
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))
    best = torch.zeros(n_images, n_classes, dtype=torch.float64)
    best.scatter_reduce_(0, image_of_seg[:, None].expand_as(iou), iou, reduce="amax", include_self=True)
    fg = torch.zeros(n_classes, dtype=torch.bool)
    fg[torch.as_tensor(list(foreground), dtype=torch.long)] = True
    present = (region > 0) & fg  # the image's foreground regions
    n_regions = present.sum(1)
    scored = n_regions > 0
    if not bool(scored.any()):
        return float("nan")
    per_image = (best * present).sum(1)[scored] / n_regions[scored]
    return float(per_image.mean())


def segment_covering_cells(
    segments: list[Segmentation],
    dataset: Dataset,
    dataset_name: str,
    memo: HistogramMemo,
) -> dict[str, float]:
    """The evaluation's ``segment_covering`` (``nfcov`` and ``nfcov_<level>`` in %) from the cell histograms
    of ``memo`` (the split's labels)."""
    from .nfcovering import BACKGROUND_CLASSES, foreground_classes

    try:
        foreground = foreground_classes(
            dataset.class_names, dataset_name if dataset_name in BACKGROUND_CLASSES else None
        )
    except ValueError:
        return {}
    n_classes = dataset.num_classes

    def score(maps: list[torch.Tensor]) -> float:
        hist = memo.get([tuple(m.shape) for m in maps], n_classes, mapping="interpolate")
        return nf_covering_cells(maps, hist, foreground) * 100.0

    out = {"nfcov": score([s.segment_map for s in segments])}
    names: list[str] = []
    for s in segments:
        names += [n for n in s.levels if n not in names]
    for name in names:
        if any(name not in s.levels for s in segments):
            raise ValueError(f"nf_covering: a segmentation lacks level {name!r}")
        out[f"nfcov_{name}"] = score([s.levels[name] for s in segments])
    return out
