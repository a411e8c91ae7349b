"""Backbones: ViT extractor outputs, the official DINO checkpoint layout, grid sizing, never downloading."""

from __future__ import annotations

import warnings

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


def manual_last_block(vit, x):
    """The old two-pass reference: keys and CLS attention recomputed from the last block's input."""
    tokens = vit.patch_embed(x)
    tokens = vit._pos_embed(tokens)
    for blk in vit.blocks[:-1]:
        tokens = blk(tokens)
    last = vit.blocks[-1]
    attn = last.attn
    B, N, _ = tokens.shape
    qkv = attn.qkv(last.norm1(tokens)).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k = qkv[0], qkv[1]
    cls_attn = ((q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0, 1:]
    return k[:, :, 1:].permute(0, 2, 1, 3).reshape(B, -1, k.shape[1] * k.shape[3]), cls_attn


def test_one_pass_gives_the_last_blocks_keys_and_cls_attention():
    vit = tiny_vit()
    ex = ViTExtractor(vit)
    calls = []
    vit.blocks[-1].attn.qkv.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 224, 224)
    out = ex(x)
    assert len(calls) == 1  # the last block's projection runs once: no second pass
    with torch.no_grad():
        keys, cls_attn = manual_last_block(vit, x)
    assert torch.allclose(out["keys"].reshape(2, -1, 384), keys, atol=1e-5)
    assert torch.allclose(out["attn"].reshape(2, 6, -1), cls_attn, atol=1e-6)


def test_precision_resolution_and_cache_identity(monkeypatch):
    from ussbench.backbones import precision as prec
    from ussbench.errors import ConfigError

    assert prec.resolve_precision("fp32", "cpu") == "fp32" and prec.resolve_precision("bf16", "cpu") == "bf16"
    for native, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda native=native: native)
        assert prec.resolve_precision("auto", torch.device("cpu")) == expected
        # an explicit bf16 is kept; where the CPU would emulate it, with a warning naming the plugin
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert prec.resolve_precision("bf16", "cpu", "acg") == "bf16"
        assert [str(w.message).split(":")[0] for w in caught] == ([] if native else ["acg"])
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16; got 'fp16'"):
        prec.resolve_precision("fp16", "cpu")
    with pytest.raises(ConfigError, match="'half'"):
        RandomViT(precision="half").check()
    ids = {p: RandomViT(precision=p, device="cpu").cache_identity() for p in ("fp32", "bf16", "auto")}
    assert ids["fp32"]["params"]["precision"] == "fp32" and ids["bf16"]["params"]["precision"] == "bf16"
    assert ids["auto"] == ids["fp32"]  # auto is keyed by what it resolves to (monkeypatched: no bf16)
    assert ids["fp32"] != ids["bf16"]
    assert "device" not in ids["fp32"]["params"] and "batch_size" not in ids["fp32"]["params"]


def test_bf16_autocast_changes_little_and_is_recorded(toy_root):
    from ussbench.datasets.folder import ImageMaskFolder

    ds = ImageMaskFolder(num_classes=3, root=str(toy_root))
    fp32 = RandomViT(depth=2, resolution=64, precision="fp32").extract(
        ds, torch.device("cpu"), progress=False
    )
    bf16 = RandomViT(depth=2, resolution=64, precision="bf16").extract(
        ds, torch.device("cpu"), progress=False
    )
    assert fp32.meta["precision"] == "fp32" and bf16.meta["precision"] == "bf16"
    a, b = fp32[0].tokens.float().reshape(-1, 384), bf16[0].tokens.float().reshape(-1, 384)
    assert not torch.equal(a, b)  # autocast really ran
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.98
    assert bf16[0].tokens.dtype == torch.float16 and bf16[0].attn.dtype == torch.float16


def test_shape_batches_group_by_shape_in_order_with_bounded_pending():
    from ussbench.backbones.loader import Prepared, shape_batches

    shapes = [(3, 2, 2), (3, 2, 4), (3, 2, 2), (3, 4, 2), (3, 2, 4), (3, 2, 2), (3, 2, 2), (3, 4, 2)] * 3
    items = [Prepared(i, torch.zeros(s), (1, 1)) for i, s in enumerate(shapes)]
    consumed = []

    def source():
        for it in items:
            consumed.append(it.index)
            yield it

    seen = []
    for batch in shape_batches(source(), batch_size=3, max_pending=4):
        assert len({tuple(it.input.shape) for it in batch}) == 1 and 1 <= len(batch) <= 3
        assert [it.index for it in batch] == sorted(it.index for it in batch)
        seen += [it.index for it in batch]
        assert len(consumed) - len(seen) <= 4  # never more than max_pending images wait
    assert sorted(seen) == list(range(len(items)))
    full = [b for b in shape_batches(iter(items), batch_size=3, max_pending=100)]
    assert all(len(b) == 3 for b in full[:-3])  # with room to wait, batches are full
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        list(shape_batches(iter(items), 0))


def test_prepared_images_keep_order_and_raise_errors():
    from ussbench.backbones.loader import Prepared, prepared_images

    main_threads = torch.get_num_threads()
    seen_threads = {}

    def prepare(i):
        if i == 5:
            raise OSError("cannot read image 5")
        seen_threads[i] = torch.get_num_threads()
        return Prepared(i, torch.zeros(1), (1, 1))

    for workers in (0, 2):
        got = []
        with pytest.raises(OSError, match="image 5"):
            for item in prepared_images(8, prepare, workers=workers, ahead=3):
                got.append(item.index)
        assert got == [0, 1, 2, 3, 4]
        # decode threads run torch on one OpenMP thread; the caller's own setting is untouched
        assert set(seen_threads.values()) == ({main_threads} if workers == 0 else {1})
        assert torch.get_num_threads() == main_threads


def test_extract_batches_mixed_sizes_like_single_images(tmp_path):
    """Images of three sizes in mixed order: each keeps its own grid, size and id, as if extracted alone."""
    from PIL import Image

    from ussbench.datasets.folder import ImageMaskFolder

    rng = np.random.default_rng(0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    sizes = [(48, 64), (64, 48), (48, 64), (32, 80), (48, 64), (64, 48), (48, 64)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"i{i}.png"
        )
        Image.fromarray(np.zeros((h, w), dtype=np.uint8)).save(tmp_path / "labels" / f"i{i}.png")
    ds = ImageMaskFolder(num_classes=1, root=str(tmp_path))
    backbone = RandomViT(depth=1, resolution=32, batch_size=2, seed=1)
    feats = backbone.extract(ds, torch.device("cpu"), progress=False)
    model = backbone.model(torch.device("cpu"))
    assert [f.image_id for f in feats] == ds.ids()
    for i, f in enumerate(feats):
        image = ds.load_image(i)
        assert f.image_size == image.shape[:2]
        alone = model(backbone.preprocess(image)[None])
        assert f.grid == tuple(alone["tokens"].shape[1:3])
        assert torch.allclose(f.tokens.float(), alone["tokens"][0], atol=2e-3)
        assert torch.allclose(f.keys.float(), alone["keys"][0], atol=2e-3)


def test_features_node_key_holds_the_resolved_precision_and_version(tmp_path, toy_root, monkeypatch):
    """The graph's features key changes with the precision the forward runs at and with the backbone's
    version; 'auto' is keyed as what it resolves to on the grid's device."""
    from tests.conftest import tiny_grid
    from ussbench.backbones import precision as prec
    from ussbench.config import load_grid
    from ussbench.runner import plan_grid

    monkeypatch.setattr(prec, "cpu_has_native_bf16", lambda: True)

    def features_key(precision: str) -> str:
        folder = tmp_path / f"{precision}-{RandomViT.version}"
        folder.mkdir()
        backbone = {"name": "random_vit", "params": {"depth": 2, "resolution": 32, "precision": precision}}
        plan, rt = plan_grid(load_grid(tiny_grid(folder, toy_root, backbones=[backbone])))
        [node] = [n for n in plan.graph if n.kind == "features"]
        assert rt.backbone(node.stage.backbone).device == "cpu"  # the grid's device, injected by the runtime
        return node.key

    keys = {p: features_key(p) for p in ("fp32", "bf16", "auto")}
    assert keys["fp32"] != keys["bf16"] and keys["auto"] == keys["bf16"]
    monkeypatch.setattr(RandomViT, "version", RandomViT.version + "-next")
    assert features_key("bf16") != keys["bf16"]
