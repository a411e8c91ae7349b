"""Helpers shared by image-level clusterers: parameter checks, device, picking the dense feature, pooling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..base import Dataset, FeatureSet, ImageFeatures
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


def dataset_background_class(dataset: Dataset) -> int | None:
    """The dataset's background class id: its ``background_class`` attribute if it sets one, else the class
    named 'background' (VOC), else None (MSRC-v2, CamVid, ...). Protocol views are looked through."""
    while True:
        explicit = getattr(dataset, "background_class", None)
        if explicit is not None:
            return int(explicit)
        names = [str(n).lower() for n in getattr(dataset, "class_names", [])]
        if "background" in names:
            return names.index("background")
        inner = getattr(dataset, "dataset", None)
        if inner is None or inner is dataset:
            return None
        dataset = inner


def recorded_choices(artifacts: dict) -> dict:
    """Row fields for the choices an image clusterer resolved at run time (e.g. DSM's background rule under
    'auto'), read from its artifacts so that cached segmentations report them too."""
    resolved = artifacts.get("resolved") if isinstance(artifacts, dict) else None
    return {f"image_clusterer_{k}": v for k, v in (resolved or {}).items() if v is not None}
