"""Helpers shared by image-level clusterers: parameter checks, device, picking the dense feature, pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import FeatureSet, ImageFeatures
from ..errors import ConfigError


def require(who: str, ok: bool, name: str, value: object, what: str) -> None:
    """Constructor check: unless ``ok``, a ConfigError "<who>: <name> must be <what>, got <value>"."""
    if not ok:
        raise ConfigError(f"{who}: {name} must be {what}, got {value!r}")


def plugin_device(device: str, who: str) -> torch.device:
    """torch.device of a plugin's ``device`` parameter; asking for CUDA without CUDA is a ConfigError."""
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{who}: device={device!r} but CUDA is not available")
    return dev


def pick_feature(features: FeatureSet, feature: str, fallback: str) -> str:
    """Resolve 'auto' to the learner's code when present, else to the clusterer's natural feature."""
    return features.default_feature(fallback) if feature == "auto" else feature


def dense_matrix(image: ImageFeatures, feature: str) -> torch.Tensor:
    """(h*w, C) float32 matrix of one image's dense feature."""
    x = image.dense(feature)
    return x.reshape(-1, x.shape[-1]).float()


def mean_pool(
    x: torch.Tensor, segment_map: torch.Tensor, n_segments: int, normalise: bool = True
) -> torch.Tensor:
    """Mean feature of each segment: x (P, C), segment_map (P,) ids in [0, n) -> (n, C) float32."""
    ids = segment_map.reshape(-1).long()
    sums = torch.zeros(n_segments, x.shape[1], dtype=torch.float32).index_add_(0, ids, x.float())
    counts = torch.bincount(ids, minlength=n_segments).clamp_min(1).unsqueeze(1)
    vec = sums / counts
    return F.normalize(vec, dim=1) if normalise else vec


def relabel_consecutive(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary ids to 0..n-1 (empty segments vanish); returns the new map and n."""
    uniq, inverse = torch.unique(labels, return_inverse=True)
    return inverse.reshape(labels.shape), int(uniq.numel())
