"""HSG (Ke et al., CVPR 2022) as an image-level clusterer: the segments are the model's nested hierarchical
grouping at one level (0 = base k-means, 1 = n1 groups, 2 = n2 groups); every level is kept for reports."""

from __future__ import annotations

from typing import Any, Literal

import torch

from ..base import FeatureSet, ImageClusterer, Segmentation, StageContext
from ..errors import ConfigError
from ..feature_learners._hsg_model import HSGConfig, HSGModel, infer_hierarchy, train_hsg
from ..feature_learners.hsg import PAPER_PRESETS, feature_maps, store_params, superpixels_for
from ..registry import register
from ._common import mean_pool, pick_feature, relabel_consecutive

LEVEL_NAMES = ("level0", "level1", "level2")


@register("image_clusterer", "hsg_groups", presets=PAPER_PRESETS)
class HSGGroups(ImageClusterer):
    """HSG clustering-transformer hierarchy; segments = the nested grouping at ``level``; levels 0-2 kept."""

    version = "2"  # 2: thread-invariant normalisation (ussbench.determinism)

    # explicit signature (registry reads it): the model parameters repeat the hsg learner's on purpose
    def __init__(
        self,
        level: int = 2,
        vector: Literal["code", "input"] = "code",
        checkpoint: str | None = None,
        feature: Literal["auto", "tokens", "keys", "code"] = "auto",
        dim: int = 128,
        hidden_dim: int = 384,
        n0: int = 36,
        n0_train: int = 16,
        n1: int = 8,
        n2: int = 4,
        kmeans_iters: int = 15,
        grouping: Literal["transformer", "kmeans"] = "transformer",
        assignment: Literal["nested", "soft"] = "nested",
        heads: int = 4,
        encoder_layers: int = 2,
        decoder_layers: int = 2,
        dropout: float = 0.1,
        norm: Literal["batch", "layer"] = "batch",
        temperature: float = 0.0625,
        negatives: Literal["all", "image"] = "all",
        lambda_e: float = 1.0,
        lambda_f: float = 0.1,
        lambda_g: float = 0.2,
        knn: int = 2,
        edge_grouping: Literal["slic", "felzenszwalb", "none"] = "slic",
        n_superpixels: int = 48,
        slic_compactness: float = 10.0,
        felzenszwalb_scale: float = 50.0,
        superpixel_upsample: int = 4,
        views: int = 2,
        crop: int = 12,
        crop_scale_min: float = 0.5,
        flip: bool = True,
        feature_dropout: float = 0.1,
        epochs: int = 3,
        batch_size: int = 8,
        optimizer: Literal["adamw", "sgd"] = "adamw",
        lr: float = 0.001,
        momentum: float = 0.9,
        weight_decay: float = 0.0001,
        lr_schedule: Literal["step", "constant"] = "step",
        seed: int = 0,
        device: str = "cpu",
    ):
        if level not in (0, 1, 2):
            raise ConfigError(f"hsg_groups: level must be 0, 1 or 2, got {level!r}")
        store_params(self, locals())

    @classmethod
    def from_model(cls, model: HSGModel, **params: Any) -> HSGGroups:
        """An image clusterer around an already trained model (e.g. ``HSGLearner(...).fit(...).model_``)."""
        clusterer = cls(**{**model.config.as_dict(), **params, "feature": model.config.feature})
        clusterer.model_, clusterer.history_ = model, []
        return clusterer

    def _input_feature(self, features: FeatureSet) -> str:
        return pick_feature(features, self.feature, "tokens")

    def fit(self, features: FeatureSet, ctx: StageContext) -> HSGGroups:
        if hasattr(self, "model_"):
            return self
        device = torch.device(self.device)
        if self.checkpoint is not None:
            self.model_ = HSGModel.load(self.checkpoint, device).eval()
            self.history_ = []
            return self
        config = HSGConfig.from_object(self)
        config.feature = self._input_feature(features)
        superpixels = superpixels_for(features, ctx, config)
        self.model_, self.history_ = train_hsg(
            feature_maps(features, config.feature), superpixels, config, device, self.seed,
            progress=getattr(ctx, "progress", False),
        )  # fmt: skip
        return self

    def predict(self, features: FeatureSet, ctx: StageContext) -> list[Segmentation]:
        if not hasattr(self, "model_"):
            self.fit(features, ctx)
        name = self.model_.config.feature if self.checkpoint is not None else self._input_feature(features)
        maps = feature_maps(features, name)
        out = infer_hierarchy(self.model_, maps, torch.device(self.device))
        segs = []
        for fmap, res in zip(maps, out):
            levels = {}
            for key, lv in zip(LEVEL_NAMES, res["levels"]):
                levels[key] = relabel_consecutive(lv)[0]
            labels, n = relabel_consecutive(res["levels"][self.level])
            source = res["code"] if self.vector == "code" else fmap.float()
            x = source.reshape(-1, source.shape[-1]).float()
            segs.append(Segmentation(labels, mean_pool(x, labels, n), levels=levels))
        return segs

    def artifacts(self) -> dict[str, Any]:
        return {"loss_history": getattr(self, "history_", [])}
