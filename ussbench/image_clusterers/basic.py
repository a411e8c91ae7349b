"""The two trivial image-level clusterers: every patch its own segment, and per-image k-means."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans

from ..base import FeatureSet, ImageClusterer, Segmentation, StageContext
from ..errors import ConfigError
from ..registry import register
from ._common import dense_matrix, mean_pool, pick_feature, relabel_consecutive
from ._spectral import kmeans_batched


@register("image_clusterer", "none")
class PatchSegments(ImageClusterer):
    """No image-level grouping: every patch is a segment and its feature is the segment vector."""

    def __init__(self, feature: Literal["auto", "tokens", "keys", "code"] = "auto", normalise: bool = True):
        self.feature = feature
        self.normalise = normalise

    def predict(self, features: FeatureSet, ctx: StageContext) -> list[Segmentation]:
        name = pick_feature(features, self.feature, "tokens")
        out = []
        for im in features:
            x = dense_matrix(im, name)
            h, w = im.grid
            vec = F.normalize(x, dim=1) if self.normalise else x
            out.append(Segmentation(torch.arange(h * w).reshape(h, w), vec))
        return out


@register("image_clusterer", "kmeans_per_image")
class PerImageKMeans(ImageClusterer):
    """Per-image k-means of patch features (L2-normalised: spherical); segment vector = mean patch feature."""

    def __init__(
        self,
        n_segments: int = 8,
        feature: Literal["auto", "tokens", "keys", "code"] = "auto",
        n_init: int = 3,
        max_iter: int = 100,
        engine: Literal["torch", "sklearn"] = "torch",
        seed: int = 0,
        device: str = "cpu",
    ):
        for key, value in (("n_segments", n_segments), ("n_init", n_init), ("max_iter", max_iter)):
            if value < 1:
                raise ConfigError(f"kmeans_per_image: {key} must be >= 1, got {value}")
        self.n_segments = n_segments
        self.feature = feature
        self.n_init = n_init
        self.max_iter = max_iter
        self.engine = engine
        self.seed = seed
        self.device = device

    def predict(self, features: FeatureSet, ctx: StageContext) -> list[Segmentation]:
        name = pick_feature(features, self.feature, "tokens")
        xs = [F.normalize(dense_matrix(im, name), dim=1) for im in features]
        labels_of: dict[int, torch.Tensor] = {}
        if self.engine == "torch":  # images of one grid size are clustered together, one tensor op per step
            groups: dict[tuple[int, int], list[int]] = {}
            for i, im in enumerate(features):
                groups.setdefault(im.grid, []).append(i)
            gen = torch.Generator().manual_seed(self.seed)
            for members in groups.values():
                batch = torch.stack([xs[i] for i in members]).to(self.device)
                labels = kmeans_batched(batch, self.n_segments, self.n_init, self.max_iter, gen).cpu()
                labels_of.update({i: labels[j] for j, i in enumerate(members)})
        else:
            for i, x in enumerate(xs):
                km = KMeans(
                    min(self.n_segments, x.shape[0]),
                    n_init=self.n_init,
                    max_iter=self.max_iter,
                    random_state=self.seed,
                )
                labels_of[i] = torch.from_numpy(km.fit_predict(x.numpy().astype("float64"))).long()
        out = []
        for i, im in enumerate(features):
            labels, n = relabel_consecutive(labels_of[i].long())
            out.append(Segmentation(labels.reshape(im.grid), mean_pool(xs[i], labels, n)))
        return out
