"""The measured pull fraction of same-image pairs (own-image share of a patch's neighbourhood; issue 13, CamVid)."""

from __future__ import annotations

import pytest
import torch
from _learner_toys import toy_ctx, toy_features

from ussbench.base import FeatureSet, ImageFeatures
from ussbench.errors import ConfigError
from ussbench.feature_learners import calibration
from ussbench.feature_learners._training import build_bank
from ussbench.feature_learners.stego import STEGO

TOY = dict(batch_size=4, crop_size=8, lr=5e-3)


def distinct_images(n: int = 16, channels: int = 16, seed: int = 0) -> FeatureSet:
    """Object-photo-like: every image shows two classes of its own (no class shared between images)."""
    g = torch.Generator().manual_seed(seed)
    images = []
    for i in range(n):
        h, w = (8, 8) if i % 2 else (8, 10)
        protos = torch.randn(2, channels, generator=g) * 2
        label = torch.zeros(h, w, dtype=torch.long)
        label[:, w // 2 :] = 1
        tokens = protos[label] + 0.6 * torch.randn(h, w, channels, generator=g)
        attn = torch.rand(2, h, w, generator=g)
        images.append(
            ImageFeatures(
                f"d{i}", tokens.half(), tokens.half(), tokens.mean((0, 1)).half(), attn.half(), (h * 8, w * 8)
            )
        )
    return FeatureSet(images, "distinct", 8, channels)


def _share(fs: FeatureSet, seed: int = 0) -> float:
    bank = build_bank(fs, 8, "random", torch.device("cpu"))
    return calibration.own_image_share(bank.tokens, bank.grids, seed)


def test_own_image_share_separates_distinct_from_shared_content():
    # road-scene-like toys: 3 classes shared by all 16 images, so a patch's neighbours come from many images
    shared, distinct = _share(toy_features(n=16)), _share(distinct_images())
    assert distinct > 0.7, distinct  # a patch's 30 neighbours: mostly its own ~40-patch band
    assert shared < 0.4, shared
    assert distinct - shared > 0.4
    assert _share(distinct_images(), seed=0) == _share(distinct_images(), seed=0)  # seeded


def test_stego_auto_pulls_follow_the_measured_share_and_numbers_are_kept():
    ctx = toy_ctx()
    fits = {}
    for name, fs in (("shared", toy_features(n=16)), ("distinct", distinct_images())):
        learner = STEGO(steps=2, **TOY).fit(fs, ctx)
        r = learner.resolved_
        share = r["own_image_share"]
        assert share == pytest.approx(_share(fs, seed=0))
        assert r["pull_self"] == r["pull_knn"] == calibration.share_to_pull(share)
        assert r["pull_rand"] == 0.03
        fits[name] = r
    # fewer same-image pairs pulled where images share their content, so a higher self shift
    assert fits["shared"]["pull_self"] < fits["distinct"]["pull_self"] - 0.3
    fixed = STEGO(steps=2, pull_self=0.8, pull_knn=0.8, **TOY).fit(toy_features(n=16), ctx).resolved_
    assert "own_image_share" not in fixed and fixed["pull_self"] == 0.8
    assert fixed["shift_self"] < fits["shared"]["shift_self"]  # pulling 80% lowers the shift
    with pytest.raises(ConfigError, match="pull_rand"):
        STEGO(pull_rand="auto")  # random pairs keep a fixed fraction
    with pytest.raises(ConfigError, match="pull_self"):
        STEGO(pull_self="median")


def test_share_to_pull_is_the_square_and_stays_a_fraction():
    assert calibration.share_to_pull(1.0) == calibration.SHARE_BOUNDS[1] < 1.0
    assert calibration.share_to_pull(0.0) == calibration.SHARE_BOUNDS[0] > 0.0
    assert calibration.share_to_pull(0.5) == pytest.approx(0.25)  # CamVid-like share: a quarter pulled
    assert calibration.share_to_pull(0.86) == pytest.approx(0.7396)  # MSRC-like share
