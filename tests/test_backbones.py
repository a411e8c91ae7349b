"""Backbones: ViT extractor outputs, the official DINO checkpoint layout, grid sizing, never downloading."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from ussbench.backbones.dino import DinoViTS16, RandomViT
from ussbench.backbones.vit import ViTExtractor, target_size
from ussbench.errors import BackboneWeightsError


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=2).eval()


def test_extractor_outputs_match_timm_and_manual_keys():
    vit = tiny_vit()
    ex = ViTExtractor(vit)
    x = torch.randn(2, 3, 224, 224)
    out = ex(x)
    assert out["tokens"].shape == (2, 14, 14, 384) and out["cls"].shape == (2, 384)
    assert out["keys"].shape == (2, 14, 14, 384) and out["attn"].shape == (2, 6, 14, 14)
    with torch.no_grad():
        ref = vit.forward_features(x)  # at the native grid no resampling happens: must equal timm exactly
    assert torch.allclose(out["tokens"].reshape(2, -1, 384), ref[:, 1:], atol=1e-5)
    assert torch.allclose(out["cls"], ref[:, 0], atol=1e-5)
    attn_sum = out["attn"].sum((2, 3))
    assert (attn_sum < 1).all() and (attn_sum > 0).all()  # CLS also attends to itself


def test_non_square_grid_and_patch_multiple_check():
    ex = ViTExtractor(tiny_vit())
    out = ex(torch.randn(1, 3, 96, 160))
    assert out["tokens"].shape == (1, 6, 10, 384)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        ex(torch.randn(1, 3, 100, 160))


def test_target_size_keeps_aspect_and_patch_multiple():
    assert target_size(213, 320, 224, 14) == (224, 336)
    assert target_size(360, 480, 224, 16) == (224, 304)


def test_official_dino_checkpoint_layout_loads(tmp_path):
    """A DINO training checkpoint (teacher, module.backbone. prefix, head) loads into timm strictly."""
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    state = {f"module.backbone.{k}": v for k, v in ref.state_dict().items()}
    state["module.head.mlp.0.weight"] = torch.zeros(3, 3)
    path = tmp_path / "dino_deitsmall16_pretrain_full_checkpoint.pth"
    torch.save({"teacher": state, "epoch": 100}, path)
    backbone = DinoViTS16(weights=str(path))
    model = backbone.model(torch.device("cpu"))
    assert torch.equal(model.vit.pos_embed, ref.pos_embed)
    assert len(backbone.weights_identity()) == 64


def test_missing_weights_message_says_how_to_provide():
    with pytest.raises(
        BackboneWeightsError,
        match=r"weights file '/missing/dino.pth' for backbone 'dino_vits16' does not exist.*'weights' parameter",
    ):
        DinoViTS16(weights="/missing/dino.pth").check()


def test_random_vit_is_seeded_and_extracts_a_dataset(toy_root):
    from ussbench.datasets.folder import ImageMaskFolder

    ds = ImageMaskFolder(num_classes=3, root=str(toy_root))
    a = RandomViT(depth=1, resolution=32, seed=3).extract(ds, torch.device("cpu"), progress=False)
    b = RandomViT(depth=1, resolution=32, seed=3).extract(ds, torch.device("cpu"), progress=False)
    assert len(a) == len(ds) and a[0].tokens.dtype == torch.float16
    assert torch.equal(a[0].tokens, b[0].tokens)
    assert a[0].image_size == (48, 64) and a[0].grid == (2, 3)
    assert np.isfinite(a[0].keys.float().numpy()).all()
