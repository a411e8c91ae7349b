"""Frozen timm ViT feature extractor: patch tokens, last-block keys, CLS token and CLS attention.

Position embeddings are resampled to each image's patch grid with bicubic interpolation (align_corners
False, no antialias), once per grid size; this is the one interpolation ussbench uses for every ViT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..base import Backbone, Dataset, FeatureSet, ImageFeatures
from ..errors import BackboneWeightsError, ConfigError
from ..fingerprint import file_digest
from ..reports.profile import vit_gflops
from ..threads import decode_workers
from .loader import Prepared, prepared_images, shape_batches
from .precision import Precision, autocast, resolve_precision

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ViTExtractor(torch.nn.Module):
    """Wraps a timm VisionTransformer and returns every output the USS stages use from one forward pass.

    The last block runs once, as timm runs it; a hook on its ``attn.qkv`` keeps that projection's output,
    from which the keys and the CLS attention row are read (no second pass over the last block).
    ``precision`` ('fp32' or 'bf16', see :mod:`ussbench.backbones.precision`) sets the autocast of every
    forward; the backbone plugin sets it from its ``precision`` parameter.
    """

    def __init__(self, vit: torch.nn.Module, precision: str = "fp32"):
        super().__init__()
        self.vit = vit
        self.precision = precision
        self.patch_size = int(vit.patch_embed.patch_size[0])
        self.num_heads = int(vit.blocks[-1].attn.num_heads)
        self._pos_cache: dict[tuple[int, int], torch.Tensor] = {}
        n_prefix = int(getattr(vit, "num_prefix_tokens", 1))
        if n_prefix != 1:
            raise ValueError(f"only ViTs with exactly one CLS prefix token are supported (got {n_prefix})")

    def _pos_embed(self, h: int, w: int) -> torch.Tensor:
        key = (h, w)
        if key not in self._pos_cache:
            pos = self.vit.pos_embed
            cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
            side = int(round(patch_pos.shape[1] ** 0.5))
            grid = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
            if (side, side) != (h, w):
                grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=False)
            patch_pos = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1).to(pos.dtype)
            self._pos_cache[key] = torch.cat([cls_pos, patch_pos], dim=1)
        return self._pos_cache[key]

    def autocast(self, device: torch.device | None = None):
        """The autocast context this extractor's forwards run under (for callers that run its blocks)."""
        device = device if device is not None else self.vit.pos_embed.device
        return autocast(device, self.precision)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """images (B, 3, H, W), H and W multiples of the patch size -> dict of (B, ...) outputs.

        tokens (B, h, w, C) after the final norm; keys (B, h, w, C) of the last block, heads concatenated;
        cls (B, C); attn (B, heads, h, w): the last block's attention of CLS to the patches (float32).
        """
        B, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} is not a multiple of the patch size {p}")
        h, w = H // p, W // p
        vit = self.vit
        attn = vit.blocks[-1].attn
        captured: list[torch.Tensor] = []
        hook = attn.qkv.register_forward_hook(lambda _module, _args, out: captured.append(out))
        try:
            with autocast(images.device, self.precision):
                x = vit.patch_embed.proj(images).flatten(2).transpose(1, 2)  # B, hw, C
                if getattr(vit.patch_embed, "norm", None) is not None:
                    x = vit.patch_embed.norm(x)
                x = torch.cat([vit.cls_token.expand(B, -1, -1).to(x.dtype), x], dim=1)
                x = x + self._pos_embed(h, w).to(x.dtype)
                x = vit.norm_pre(vit.pos_drop(x))
                for blk in vit.blocks:
                    x = blk(x)
                x = vit.norm(x)
        finally:
            hook.remove()
        N, C = x.shape[1], x.shape[2]
        qkv = captured[-1].reshape(B, N, 3, attn.num_heads, -1)
        q = attn.q_norm(qkv[:, :, 0].transpose(1, 2))  # B, heads, N, hd
        k = attn.k_norm(qkv[:, :, 1].transpose(1, 2))
        scores = (q[:, :, :1].float() * attn.scale) @ k.float().transpose(-2, -1)  # B, heads, 1, N
        cls_attn = scores.softmax(-1)[:, :, 0, 1:]
        return {
            "tokens": x[:, 1:].reshape(B, h, w, C),
            "keys": k[:, :, 1:].transpose(1, 2).reshape(B, h, w, -1),
            "cls": x[:, 0],
            "attn": cls_attn.reshape(B, attn.num_heads, h, w),
        }


def target_size(height: int, width: int, short_side: int, patch: int) -> tuple[int, int]:
    """Resize target keeping aspect: short side ~ ``short_side``, each side a multiple of the patch size."""
    scale = short_side / min(height, width)
    return (max(1, round(height * scale / patch)) * patch, max(1, round(width * scale / patch)) * patch)


def normalise(image: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (H, W, 3) -> ImageNet-normalised float (3, size) with bilinear antialiased resizing."""
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)[None]
    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((t - mean) / std)[0]


file_sha256 = file_digest  # sha256 of a file (the fingerprints' reader)


def load_official_state_dict(path: Path, name: str) -> dict[str, torch.Tensor]:
    """Read a DINO / DINOv2 checkpoint in the official layout (plain, or a training checkpoint's teacher)."""
    if not path.is_file():
        raise BackboneWeightsError(
            f"weights file {str(path)!r} for backbone {name!r} does not exist; download the official "
            f"checkpoint on a machine with internet and pass its path as the backbone's 'weights' parameter"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("teacher", "state_dict", "model"):
        if isinstance(state, dict) and wrapper in state and isinstance(state[wrapper], dict):
            state = state[wrapper]
    cleaned = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            if key.startswith(prefix):
                key = key[len(prefix) :]
        if key.startswith("head.") or key == "mask_token":
            continue
        cleaned[key] = value.float()
    return cleaned


class TimmViTBackbone(Backbone):
    """Base for frozen timm ViTs; subclasses choose the architecture and where the weights come from.

    ``precision``: 'auto' (bf16 autocast where the device computes bf16 natively, else fp32), 'fp32' or
    'bf16'; ``device``: where the features will be computed ('auto': CUDA if available), injected by the
    runner so that the resolved precision is known for the cache key before any work.
    """

    arch: str = ""
    timm_kwargs: dict[str, Any] = {}
    version = "2"  # 2: precision auto by default (bf16 autocast on CPUs with native bf16)

    def __init__(
        self,
        resolution: int = 224,
        batch_size: int = 32,
        cache_dir: str | None = None,
        precision: Precision = "auto",
        device: str = "auto",
    ):
        self.resolution = resolution
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.precision = precision
        self.device = device
        self._model: ViTExtractor | None = None
        self._device: torch.device | None = None

    # -- weights --------------------------------------------------------------------------------------
    def state_dict_for_model(self) -> dict[str, torch.Tensor] | None:
        """Weights to load strictly into the timm model; None keeps random initialisation."""
        raise NotImplementedError

    def weights_identity(self) -> str:
        """A string identifying the weights (a checksum) for the feature cache key."""
        raise NotImplementedError

    def _build(self) -> ViTExtractor:
        import timm  # imported when a network is built: importing timm (and torchvision) costs seconds

        vit = timm.create_model(self.arch, pretrained=False, num_classes=0, **self.timm_kwargs)
        state = self.state_dict_for_model()
        if state is not None:
            missing, unexpected = vit.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise BackboneWeightsError(
                    f"weights for {self.plugin_name!r} do not fit timm {self.arch!r}: missing {missing[:5]}, "
                    f"unexpected {unexpected[:5]}"
                )
        return ViTExtractor(vit.eval())

    # -- Backbone API ---------------------------------------------------------------------------------
    @property
    def patch_size(self) -> int:  # type: ignore[override]
        return self._arch_patch()

    def _arch_patch(self) -> int:
        return int(self.arch.split("patch")[1].split("_")[0])

    def resolved_precision(self, device: torch.device | str | None = None) -> str:
        """'fp32' or 'bf16': the ``precision`` parameter resolved for ``device`` (default: the ``device`` param)."""
        return resolve_precision(self.precision, self.device if device is None else device)

    def model(self, device: torch.device) -> ViTExtractor:
        if self._model is None:
            self._model = self._build()
        if self._device != device:
            self._model = self._model.to(device)
            self._model._pos_cache.clear()
            self._device = device
        self._model.precision = self.resolved_precision(device)
        return self._model

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        return normalise(
            image, target_size(image.shape[0], image.shape[1], self.resolution, self._arch_patch())
        )

    def check(self) -> None:
        """Fail before any work on a resolution below one patch, a batch size below 1, or a precision that is
        not one of auto, fp32, bf16."""
        patch = self._arch_patch()
        for key, value, least in (("resolution", self.resolution, patch), ("batch_size", self.batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                unit = f" pixels (one {patch}-pixel patch of {self.arch})" if key == "resolution" else ""
                raise ConfigError(
                    f"{self.plugin_name}: '{key}' must be at least {least}{unit}, got {value!r}"
                )
        self.resolved_precision()

    def cache_identity(self) -> dict[str, Any]:
        ident = super().cache_identity()
        ident["params"] = {
            k: v for k, v in ident["params"].items() if k not in ("batch_size", "cache_dir", "device")
        }
        ident["params"]["precision"] = self.resolved_precision()
        ident["weights"] = self.weights_identity()
        ident["arch"] = self.arch
        return ident

    def _prepare(self, dataset: Dataset, index: int) -> Prepared:
        image = dataset.load_image(index)
        return Prepared(index, self.preprocess(image), (int(image.shape[0]), int(image.shape[1])))

    def extract(self, dataset: Dataset, device: torch.device, progress: bool = True) -> FeatureSet:
        """Features of every image: one forward per batch of equally sized images, decoding ahead in threads.

        Outputs are converted to float16 once per batch; each image's tensors are views of its batch's.
        """
        device = torch.device(device)
        model = self.model(device)
        n = len(dataset)
        ids = dataset.ids()
        out: list[ImageFeatures | None] = [None] * n
        items = prepared_images(
            n, lambda i: self._prepare(dataset, i), workers=decode_workers(str(device)), ahead=self.batch_size
        )
        bar = tqdm(total=n, desc=f"features {self.plugin_name}", disable=not progress, unit="img")
        for batch in shape_batches(items, self.batch_size):
            x = torch.stack([item.input for item in batch]).to(device, non_blocking=True)
            res = {k: v.to("cpu", torch.float16) for k, v in model(x).items()}
            for j, item in enumerate(batch):
                out[item.index] = ImageFeatures(
                    image_id=ids[item.index],
                    tokens=res["tokens"][j],
                    keys=res["keys"][j],
                    cls=res["cls"][j],
                    attn=res["attn"][j],
                    image_size=item.image_size,
                )
            bar.update(len(batch))
        bar.close()
        images = [f for f in out if f is not None]
        vit = model.vit
        gflops = vit_gflops([f.grid[0] * f.grid[1] for f in images], int(vit.embed_dim), len(vit.blocks),
                            int(vit.blocks[0].mlp.fc1.out_features), self._arch_patch())  # fmt: skip
        return FeatureSet(
            images=images,
            backbone=self.report_name or self.plugin_name,
            patch_size=self._arch_patch(),
            embed_dim=int(images[0].tokens.shape[-1]) if images else 0,
            meta={
                "resolution": self.resolution,
                "arch": self.arch,
                "precision": model.precision,
                "gflops": gflops,
            },
        )
