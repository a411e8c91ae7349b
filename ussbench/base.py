"""The contracts between pipeline stages: data containers and the abstract plugin classes.

Flow of one grid cell (see docs in README): dataset -> backbone features (cached) -> [feature learner]
-> image-level clusterer (segments + one vector per segment) -> dataset-level clusterer (one label per
segment) -> evaluation. Every plugin follows scikit-learn's estimator contract: all parameters in
``__init__`` with defaults, learned state set in ``fit`` with a trailing underscore, no global state.
"""

from __future__ import annotations

import abc
import functools
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache import stable_hash
from .errors import ConfigError, DataError

# Dense feature names a FeatureSet may hold; "code" is written by feature learners.
DENSE_FEATURES = ("tokens", "keys", "code")


@dataclass
class ImageFeatures:
    """Frozen-backbone outputs for one image on its patch grid (h, w).

    tokens: (h, w, C) patch tokens after the final norm; keys: (h, w, C) last-block attention keys (heads
    concatenated); cls: (C,) CLS token; attn: (heads, h, w) last-block attention of CLS to patches;
    code: (h, w, D) refined features written by a feature learner (None without one).
    """

    image_id: str
    tokens: torch.Tensor
    keys: torch.Tensor
    cls: torch.Tensor
    attn: torch.Tensor
    image_size: tuple[int, int]
    code: torch.Tensor | None = None

    @property
    def grid(self) -> tuple[int, int]:
        return int(self.tokens.shape[0]), int(self.tokens.shape[1])

    def dense(self, name: str) -> torch.Tensor:
        """One dense feature map (h, w, C) by name: 'tokens', 'keys' or 'code'."""
        if name not in DENSE_FEATURES:
            raise ValueError(f"unknown dense feature {name!r}; expected one of {DENSE_FEATURES}")
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"image {self.image_id!r} has no {name!r} features (no feature learner ran)")
        return value


@dataclass
class FeatureSet(Sequence):
    """All images' features of one dataset under one backbone (and optionally one feature learner)."""

    images: list[ImageFeatures]
    backbone: str
    patch_size: int
    embed_dim: int
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):  # type: ignore[override]
        return self.images[i]

    def __iter__(self) -> Iterator[ImageFeatures]:
        return iter(self.images)

    @property
    def has_code(self) -> bool:
        return bool(self.images) and self.images[0].code is not None

    def default_feature(self, fallback: str) -> str:
        """Which dense feature a clusterer set to 'auto' should use: a learner's code if any, else fallback."""
        return "code" if self.has_code else fallback

    def with_code(self, codes: Sequence[torch.Tensor], **meta: Any) -> FeatureSet:
        """A copy whose images carry the given refined features (h, w, D) as ``code``."""
        if len(codes) != len(self.images):
            raise ValueError(f"got {len(codes)} code maps for {len(self.images)} images")
        images = [replace(im, code=c) for im, c in zip(self.images, codes)]
        return FeatureSet(images, self.backbone, self.patch_size, self.embed_dim, {**self.meta, **meta})


@dataclass
class Segmentation:
    """One image cut into segments: a segment-id map and one vector per segment.

    segment_map: (h, w) int64 ids in [0, S) on the patch grid (or any grid; it is upsampled to the label);
    vectors: (S, D) float32, the vector the dataset-level clusterer labels; background: id of a segment
    that keeps its own label instead of being clustered (DSM's border rule), or None.
    levels: optional extra segment maps (e.g. HSG's hierarchy), name -> (h, w) int64.
    """

    segment_map: torch.Tensor
    vectors: torch.Tensor
    background: int | None = None
    levels: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = int(self.vectors.shape[0])
        if self.segment_map.numel() and (int(self.segment_map.min()) < 0 or int(self.segment_map.max()) >= n):
            raise ValueError(
                f"segment ids must lie in [0, {n}); got [{int(self.segment_map.min())}, "
                f"{int(self.segment_map.max())}]"
            )
        if self.background is not None and not 0 <= self.background < n:
            raise ValueError(f"background segment {self.background} is not in [0, {n})")

    @property
    def n_segments(self) -> int:
        return int(self.vectors.shape[0])


@dataclass
class Sample:
    """One dataset item: RGB image (H, W, 3) uint8 and label map (H, W) int64 with -1 = ignore."""

    image_id: str
    image: np.ndarray
    label: np.ndarray


class Plugin:
    """Common base: scikit-learn style parameter access; the registry fills plugin_kind/plugin_name."""

    plugin_kind: str = ""
    plugin_name: str = ""
    # Bump when a change alters results, so cached stage outputs keyed on this plugin are recomputed.
    version: str = "1"

    def get_params(self) -> dict[str, Any]:
        """The constructor parameters as currently set (the plugin must store each under its own name)."""
        sig = inspect.signature(type(self).__init__)
        return {
            name: getattr(self, name)
            for name, p in sig.parameters.items()
            if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and hasattr(self, name)
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


class Dataset(Plugin, abc.ABC):
    """A labelled image set; labels use -1 for ignored pixels. ``data_root`` is injected by the runner."""

    num_classes: int
    class_names: list[str]
    description: str = ""

    @abc.abstractmethod
    def ids(self) -> list[str]:
        """Image ids in a fixed order."""

    @abc.abstractmethod
    def load_image(self, index: int) -> np.ndarray:
        """RGB uint8 (H, W, 3)."""

    @abc.abstractmethod
    def load_label(self, index: int) -> np.ndarray:
        """int64 (H, W), classes in [0, num_classes), -1 = ignore."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every subclass's ``load_image`` / ``load_label`` returns what the contract says (uint8 RGB, integer
        labels) or raises one line naming the dataset: a float image in [0, 1] would otherwise be divided by
        255 again and scored."""
        super().__init_subclass__(**kwargs)
        from .contracts import check_image, check_label_map

        for name, check in (("load_image", check_image), ("load_label", check_label_map)):
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "_contract_checked", False):
                setattr(cls, name, _checked_loader(method, check))

    def __len__(self) -> int:
        return len(self.ids())

    def check(self) -> None:
        """Fail early (DataError naming the path) if the data is not where the parameters say."""
        if len(self) == 0:
            raise DataError(f"dataset {self.plugin_name!r} found no images ({self.get_params()})")
        names = getattr(self, "class_names", None)
        if names is not None and len(names) != self.num_classes:
            raise ConfigError(
                f"dataset {self.plugin_name!r}: {len(names)} class names for {self.num_classes} classes"
            )

    def __getitem__(self, index: int) -> Sample:
        return Sample(self.ids()[index], self.load_image(index), self.load_label(index))

    def data_files(self) -> list[Path] | None:
        """Every file the images and labels are read from, in order (the data fingerprint hashes them).

        None (the default): the dataset cannot list them, and its fingerprint hashes the decoded arrays.
        """
        return None

    def cache_identity(self) -> dict[str, Any]:
        """What identifies this dataset's content for the feature cache: plugin, parameters and image ids.

        ``data_root`` is left out on purpose, so a copy of the same data elsewhere (another checkout, the GPU
        machine) reuses the cached features; the ids and their count identify the content.
        """
        params = {k: v for k, v in self.get_params().items() if k != "data_root"}
        return {
            "plugin": self.plugin_name,
            "params": params,
            "n": len(self),
            "ids": stable_hash(self.ids(), 16),
            "version": self.version,
        }


def _checked_loader(method, check):
    """``method`` (a dataset's load_image / load_label) with its result checked by ``check``."""

    @functools.wraps(method)
    def load(self, index: int):
        return check(method(self, index), f"dataset {self.plugin_name!r}", index)

    load._contract_checked = True  # type: ignore[attr-defined]
    return load


class Backbone(Plugin, abc.ABC):
    """A frozen ViT producing ImageFeatures; ``report_name`` is how reports label it."""

    patch_size: int
    embed_dim: int
    report_name: str = ""

    @abc.abstractmethod
    def extract(self, dataset: Dataset, device: torch.device, progress: bool = True) -> FeatureSet:
        """Features for every image of the dataset."""

    @abc.abstractmethod
    def model(self, device: torch.device) -> torch.nn.Module:
        """The loaded network (for plugins that need extra forwards, e.g. DSM's CLS of segment crops)."""

    @abc.abstractmethod
    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """Image (H, W, 3) uint8 -> normalised (3, H', W') tensor at the backbone's working resolution."""

    def cache_identity(self) -> dict[str, Any]:
        return {"plugin": self.plugin_name, "params": self.get_params(), "version": self.version}


@dataclass
class StageContext:
    """What a stage may use besides its input features: device, seed, dataset, backbone and scratch cache."""

    device: torch.device
    seed: int
    dataset: Dataset
    backbone: Backbone
    num_classes: int
    progress: bool = True

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU torch generator seeded from the cell seed (plus an offset for independent streams)."""
        return torch.Generator().manual_seed(int(self.seed) * 1_000_003 + offset)


class FeatureLearner(Plugin, abc.ABC):
    """Trains a head on frozen features without labels, then maps features to refined codes."""

    @abc.abstractmethod
    def fit(self, features: FeatureSet, ctx: StageContext) -> FeatureLearner:
        """Train on the dataset's (unlabelled) features."""

    @abc.abstractmethod
    def transform(self, features: FeatureSet, ctx: StageContext) -> FeatureSet:
        """Return features whose ``code`` holds the refined per-patch features."""

    def artifacts(self) -> dict[str, Any]:
        """Optional extra outputs to save with the cell (loss curves, hierarchy matrices, ...)."""
        return {}


class ImageClusterer(Plugin, abc.ABC):
    """Cuts each image into segments and gives one vector per segment."""

    def fit(self, features: FeatureSet, ctx: StageContext) -> ImageClusterer:
        """Learn from the dataset's features (trainable clusterers such as ACG); default: nothing to learn."""
        return self

    @abc.abstractmethod
    def predict(self, features: FeatureSet, ctx: StageContext) -> list[Segmentation]:
        """One Segmentation per image, in order."""

    def artifacts(self) -> dict[str, Any]:
        return {}


class DatasetClusterer(Plugin, abc.ABC):
    """Labels N vectors with K clusters. Runner injects ``n_clusters``, ``seed`` and ``device`` if accepted."""

    @abc.abstractmethod
    def fit(self, X: torch.Tensor) -> DatasetClusterer:
        """Learn clusters from (N, D) float32 vectors."""

    @abc.abstractmethod
    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """(N,) int64 labels in [0, n_clusters)."""

    def fit_predict(self, X: torch.Tensor) -> torch.Tensor:
        return self.fit(X).predict(X)

    def artifacts(self) -> dict[str, Any]:
        return {}


class PostProcess(Plugin, abc.ABC):
    """Refines a full-resolution prediction using the image (e.g. dense CRF)."""

    @abc.abstractmethod
    def apply(
        self, image: np.ndarray, labels: np.ndarray, n_labels: int, probs: np.ndarray | None = None
    ) -> np.ndarray:
        """image (H, W, 3) uint8, labels (H, W) int64 in [0, n_labels), optional soft scores
        (n_labels, H, W) -> refined labels of the same shape."""
