"""Dense CRF inference for one image with pydensecrf (numpy only, so pool workers start without torch).

Follows the STEGO-family ``dense_crf`` (reference study §1.6): image RGB -> BGR uint8 contiguous, unary
-log(p) from per-pixel probabilities, one Gaussian and one bilateral Potts kernel, mean-field inference,
argmax of Q. Hard labels become a unary either as pydensecrf's ``unary_from_labels`` (confidence
``gt_prob``) or as SimpleCRF's clipped one-hot (DSM), see :class:`CRFParams`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# SimpleCRF (DSM's CRF) clips every probability to [0.01, 0.99] before taking -log.
SIMPLECRF_CLIP = (0.01, 0.99)


@dataclass(frozen=True)
class CRFParams:
    """The CRF constants; defaults are the STEGO/HP/SmooSeg reference values."""

    max_iter: int = 10
    pos_xy_std: float = 1.0
    pos_w: float = 3.0
    bi_xy_std: float = 67.0
    bi_rgb_std: float = 3.0
    bi_w: float = 4.0
    gt_prob: float = 0.9
    label_unary: str = "gt_prob"  # or "clipped_onehot" (SimpleCRF / DSM)
    softmax_clip: float = 1e-5  # pydensecrf unary_from_softmax's default clip


def _unary_from_labels(labels: np.ndarray, n_labels: int, params: CRFParams) -> np.ndarray:
    """(n_labels, H*W) float32 energies for hard labels."""
    flat = labels.reshape(-1)
    if params.label_unary == "clipped_onehot":
        lo, hi = SIMPLECRF_CLIP
        on, off = -np.log(hi), -np.log(lo)
    else:
        on = -np.log(params.gt_prob)
        off = -np.log((1.0 - params.gt_prob) / (n_labels - 1))
    unary = np.full((n_labels, flat.size), off, dtype=np.float32)
    unary[flat, np.arange(flat.size)] = on
    return unary


def _unary_from_probs(probs: np.ndarray, params: CRFParams) -> np.ndarray:
    """(n_labels, H*W) float32 energies -log(clip(p)), as pydensecrf's unary_from_softmax."""
    p = np.clip(probs.reshape(probs.shape[0], -1), params.softmax_clip, 1.0)
    return (-np.log(p)).astype(np.float32)


def dense_crf(
    image: np.ndarray,
    n_labels: int,
    params: CRFParams,
    labels: np.ndarray | None = None,
    probs: np.ndarray | None = None,
) -> np.ndarray:
    """Refined (H, W) int64 labels from an RGB uint8 image and either probs (K, H, W) or hard labels."""
    import pydensecrf.densecrf as dcrf

    h, w = image.shape[:2]
    if probs is not None:
        unary = _unary_from_probs(probs, params)
    elif labels is not None:
        unary = _unary_from_labels(labels, n_labels, params)
    else:
        raise ValueError("dense_crf needs probs or labels")
    bgr = np.ascontiguousarray(image[:, :, ::-1], dtype=np.uint8)
    crf = dcrf.DenseCRF2D(w, h, n_labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary))
    crf.addPairwiseGaussian(sxy=params.pos_xy_std, compat=params.pos_w)
    crf.addPairwiseBilateral(sxy=params.bi_xy_std, srgb=params.bi_rgb_std, rgbim=bgr, compat=params.bi_w)
    q = np.asarray(crf.inference(params.max_iter), dtype=np.float32).reshape(n_labels, h, w)
    return q.argmax(axis=0).astype(np.int64)


def run_task(task: tuple) -> np.ndarray:
    """Pool entry point: task = (image, n_labels, params, labels, probs)."""
    image, n_labels, params, labels, probs = task
    return dense_crf(image, n_labels, params, labels=labels, probs=probs)
