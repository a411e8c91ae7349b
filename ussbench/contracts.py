"""What a plugin's outputs must look like, checked where ussbench receives them.

A user plugin that returns float labels, a transposed map, NaN vectors or vectors no pixel carries would
otherwise be truncated, reshaped or clustered into a plausible-looking score. Each check raises one
ValueError naming the plugin and what is wrong, so the cell is recorded as failed with that line.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

__all__ = ["check_codes", "check_image", "check_label_map", "check_labels", "check_prediction",
           "check_segmentations"]  # fmt: skip


def _is_integer(dtype: Any) -> bool:
    """Integer (not bool, not float) for torch and numpy dtypes."""
    if isinstance(dtype, torch.dtype):
        return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
    return np.issubdtype(dtype, np.integer)


def check_image(image: Any, who: str, index: int) -> np.ndarray:
    """A dataset's image: (H, W, 3) uint8 (float images in [0, 1] would be divided by 255 a second time)."""
    if not isinstance(image, np.ndarray):
        raise ValueError(
            f"{who}: load_image({index}) returned {type(image).__name__}; expected a numpy array"
        )
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"{who}: load_image({index}) returned a {image.dtype} array of shape {tuple(image.shape)}; "
            "expected RGB uint8 (H, W, 3)"
        )
    return image


def check_label_map(label: Any, who: str, index: int) -> np.ndarray:
    """A dataset's label map: (H, W) integers (-1 = ignore)."""
    if not isinstance(label, np.ndarray):
        raise ValueError(
            f"{who}: load_label({index}) returned {type(label).__name__}; expected a numpy array"
        )
    if label.ndim != 2 or not _is_integer(label.dtype):
        raise ValueError(
            f"{who}: load_label({index}) returned a {label.dtype} array of shape {tuple(label.shape)}; "
            "expected integer class ids (H, W) with -1 = ignore"
        )
    return label


def check_segmentations(segments: Any, grids: Sequence[tuple[int, int]], who: str) -> None:
    """An image clusterer's output: one Segmentation per image, an integer map on (a multiple of) the image's
    patch grid whose ids use every vector row, and finite 2-D vectors."""
    from .base import Segmentation

    if not isinstance(segments, list):
        raise ValueError(
            f"{who}: predict returned {type(segments).__name__}; expected a list of Segmentation"
        )
    if len(segments) != len(grids):
        raise ValueError(f"{who}: predict returned {len(segments)} segmentations for {len(grids)} images")
    widths: dict[int, int] = {}  # vector width -> first image with it
    for i, (seg, (h, w)) in enumerate(zip(segments, grids)):
        where = f"{who}: image {i}"
        if not isinstance(seg, Segmentation):
            raise ValueError(f"{where}: got {type(seg).__name__}; expected a Segmentation")
        smap, vectors = seg.segment_map, seg.vectors
        if not isinstance(smap, torch.Tensor) or smap.ndim != 2 or not _is_integer(smap.dtype):
            got = (
                f"{smap.dtype} {tuple(smap.shape)}" if isinstance(smap, torch.Tensor) else type(smap).__name__
            )
            raise ValueError(f"{where}: segment_map is {got}; expected an integer torch tensor (h, w)")
        H, W = smap.shape
        if H < h or W < w or H * w != W * h:  # coarser than the patch grid, transposed or stretched
            raise ValueError(
                f"{where}: segment_map is {H}x{W} but the image's patch grid is {h}x{w}; expected the grid or a "
                "finer map of its aspect ratio"
            )
        if not isinstance(vectors, torch.Tensor) or vectors.ndim != 2 or not vectors.is_floating_point():
            got = (
                f"{vectors.dtype} {tuple(vectors.shape)}"
                if isinstance(vectors, torch.Tensor)
                else type(vectors)
            )
            raise ValueError(f"{where}: vectors are {got}; expected a float torch tensor (segments, D)")
        widths.setdefault(int(vectors.shape[1]), i)
        if len(widths) > 1:
            (d0, i0), (d1, i1) = sorted(widths.items(), key=lambda kv: kv[1])[:2]
            raise ValueError(
                f"{who}: image {i1}'s vectors are {d1}-dimensional, image {i0}'s {d0}; expected one width"
            )
        if not bool(torch.isfinite(vectors).all()):
            bad = int((~torch.isfinite(vectors)).any(1).sum())
            raise ValueError(f"{where}: {bad} of {vectors.shape[0]} segment vectors hold NaN or inf")
        used = torch.unique(smap)
        if used.numel() != vectors.shape[0]:
            raise ValueError(
                f"{where}: {vectors.shape[0]} vectors but the map uses {used.numel()} segment ids; every row "
                "must be a segment with pixels (rows no pixel carries would be clustered too)"
            )


def check_labels(labels: Any, n: int, k: int, who: str) -> torch.Tensor:
    """A dataset-level clusterer's labels for its n vectors: 1-D integers in [0, k) (numpy accepted)."""
    if isinstance(labels, np.ndarray) and _is_integer(labels.dtype):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{who}: predict returned {type(labels).__name__}; expected a 1-D integer tensor")
    if not _is_integer(labels.dtype):
        raise ValueError(f"{who}: predict returned {labels.dtype} labels; expected integer cluster ids")
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"{who}: predict returned labels of shape {tuple(labels.shape)} for {n} vectors")
    labels = labels.long().cpu()
    if n and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(
            f"{who}: predict returned labels in [{int(labels.min())}, {int(labels.max())}]; expected [0, {k})"
        )
    return labels


def check_prediction(pred: Any, shape: tuple[int, ...], who: str, index: int) -> np.ndarray:
    """A post-processor's map for image ``index``: integer cluster ids of the label's exact shape."""
    pred_array = pred.numpy() if isinstance(pred, torch.Tensor) else pred
    if not isinstance(pred_array, np.ndarray):
        raise ValueError(f"{who}: image {index}: returned {type(pred).__name__}; expected an integer array")
    if tuple(pred_array.shape) != tuple(shape) or not _is_integer(pred_array.dtype):
        raise ValueError(
            f"{who}: image {index}: returned a {pred_array.dtype} map of shape {tuple(pred_array.shape)}; "
            f"expected integer cluster ids of the label's shape {tuple(shape)}"
        )
    return pred_array


def check_codes(transformed: Any, grids: Sequence[tuple[int, int]], who: str) -> list[torch.Tensor]:
    """A feature learner's ``transform``: one float code (h, w, D) per image on its patch grid, one D for all,
    finite; returns the codes."""
    images = getattr(transformed, "images", transformed)
    if not isinstance(images, Sequence) or len(images) != len(grids):
        got = len(images) if isinstance(images, Sequence) else type(transformed).__name__
        raise ValueError(f"{who}: transform returned {got} images for {len(grids)}; expected a FeatureSet")
    codes, dims = [], set()
    for i, (im, (h, w)) in enumerate(zip(images, grids)):
        code = getattr(im, "code", None)
        if not isinstance(code, torch.Tensor) or not code.is_floating_point():
            got = code.dtype if isinstance(code, torch.Tensor) else type(code).__name__
            raise ValueError(
                f"{who}: image {i}: code is {got}; expected a float tensor (h, w, D) (FeatureSet.with_code)"
            )
        if code.ndim != 3 or tuple(code.shape[:2]) != (h, w):
            raise ValueError(f"{who}: image {i}: code has shape {tuple(code.shape)}; expected ({h}, {w}, D) on the "
                             "image's patch grid")  # fmt: skip
        if not bool(torch.isfinite(code).all()):
            raise ValueError(f"{who}: image {i}: code holds NaN or inf")
        dims.add(int(code.shape[2]))
        codes.append(code)
    if len(dims) > 1:
        raise ValueError(f"{who}: codes of different widths {sorted(dims)}; expected one D for every image")
    return codes
