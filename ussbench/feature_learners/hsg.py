"""HSG (Ke et al., CVPR 2022) as a feature learner: a projection head on frozen ViT features trained by
multiview pixel-to-segment contrast over superpixels and a clustering-transformer hierarchy."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch

from ..base import FeatureLearner, FeatureSet, StageContext
from ..errors import ConfigError, DataError
from ..registry import register
from ._hsg_model import HSGConfig, HSGModel, grid_superpixels, infer_hierarchy, train_hsg

# Table 7 of the paper (COCO-stuff row) and suppl. 5.9 (ImageNet-initialised VOC fine-tuning): optimiser,
# learning rate, weight decay, batch size, epochs and loss weights. Crop sizes in pixels do not transfer to
# patch grids; crop=16 covers the short side of a 224-px MSRC/CamVid grid.
PAPER_PRESETS: dict[str, dict[str, Any]] = {
    "paper_cocostuff": {
        "optimizer": "sgd", "lr": 0.003, "momentum": 0.9, "weight_decay": 0.0005, "batch_size": 8,
        "epochs": 5, "lambda_e": 1.0, "lambda_g": 0.2, "lambda_f": 0.1, "lr_schedule": "step", "crop": 16,
    },
    "paper_imagenet_voc": {
        "optimizer": "sgd", "lr": 0.002, "momentum": 0.9, "weight_decay": 0.0005, "batch_size": 16,
        "epochs": 15, "lambda_e": 1.0, "lambda_g": 1.0, "lambda_f": 0.1, "lr_schedule": "step", "crop": 16,
    },
}  # fmt: skip


def superpixels_for(features: FeatureSet, ctx: StageContext, config: HSGConfig) -> list[torch.Tensor] | None:
    """The low-level grouping G_e of every image on its patch grid (None when edge_grouping is 'none')."""
    if config.edge_grouping == "none":
        return None
    dataset = getattr(ctx, "dataset", None)
    if dataset is None:
        raise DataError(
            "hsg: edge_grouping needs the images (ctx.dataset); set edge_grouping: none without them"
        )
    ids = dataset.ids()
    if len(ids) != len(features):
        raise DataError(f"hsg: dataset has {len(ids)} images but the features cover {len(features)}")
    out = []
    for i, im in enumerate(features):
        if ids[i] != im.image_id:
            raise DataError(
                f"hsg: image {i} is {ids[i]!r} in the dataset but {im.image_id!r} in the features"
            )
        sp = grid_superpixels(
            np.asarray(dataset.load_image(i)), im.grid, config.edge_grouping, config.n_superpixels,
            config.slic_compactness, config.felzenszwalb_scale, config.superpixel_upsample,
        )  # fmt: skip
        out.append(torch.from_numpy(sp))
    return out


def feature_maps(features: FeatureSet, name: str) -> list[torch.Tensor]:
    """The chosen dense feature (h, w, C) of every image, as stored (float16 on CPU)."""
    return [im.dense(name) for im in features]


def store_params(obj: Any, values: dict[str, Any]) -> None:
    """Keep every constructor argument under its own name (scikit-learn contract) and validate them."""
    for key, value in values.items():
        if key not in ("self", "__class__"):
            setattr(obj, key, value)
    HSGConfig.from_object(obj)  # raises ConfigError naming a bad parameter


@register("feature_learner", "hsg", presets=PAPER_PRESETS)
class HSGLearner(FeatureLearner):
    """HSG hierarchical segment grouping: projected pixel features (unit, dim-d) as code; trained on frozen features."""

    version = "2"  # 2: thread-invariant normalisation (ussbench.determinism)

    # explicit signature (registry reads it), repeated by hsg_groups on purpose; store_params validates both
    def __init__(
        self,
        feature: Literal["tokens", "keys", "code"] = "tokens",
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
        store_params(self, locals())

    def config(self) -> HSGConfig:
        return HSGConfig.from_object(self)

    def fit(self, features: FeatureSet, ctx: StageContext) -> HSGLearner:
        config = self.config()
        if config.feature == "code" and not features.has_code:
            raise ConfigError("hsg: feature 'code' needs an earlier feature learner; use 'tokens' or 'keys'")
        device = torch.device(self.device)
        superpixels = superpixels_for(features, ctx, config)
        self.model_, self.history_ = train_hsg(
            feature_maps(features, config.feature), superpixels, config, device, self.seed,
            progress=getattr(ctx, "progress", False),
        )  # fmt: skip
        return self

    def transform(self, features: FeatureSet, ctx: StageContext) -> FeatureSet:
        if not hasattr(self, "model_"):
            raise RuntimeError("hsg: call fit before transform")
        out = infer_hierarchy(self.model_, feature_maps(features, self.feature), torch.device(self.device))
        codes = [o["code"].to(torch.float16) for o in out]
        return features.with_code(codes, feature_learner="hsg", code_dim=self.dim)

    def save(self, path: str) -> None:
        """Write the trained model (config + weights) for ``hsg_groups(checkpoint=path)``."""
        self.model_.save(path)

    @classmethod
    def from_model(cls, model: HSGModel, **params: Any) -> HSGLearner:
        """A fitted learner around an existing model (its config wins over ``params``)."""
        learner = cls(**{**params, **model.config.as_dict()})
        learner.model_, learner.history_ = model, []
        return learner

    def artifacts(self) -> dict[str, Any]:
        return {"loss_history": getattr(self, "history_", [])}
