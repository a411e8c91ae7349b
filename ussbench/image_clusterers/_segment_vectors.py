"""One vector per segment, shared by DSM and ACG: the CLS of a crop around the segment, or a mean feature.

``crop_cls`` follows DSM: the segment mask is eroded (x n_erode, an erosion that would empty it is skipped)
and dilated (x n_dilate) on the patch grid; its tight box, times the patch size, crops the normalised image
at the resolution the features were extracted at, and the crop's CLS output is the vector.
``masked_attention_cls`` (the semester study's variant) takes the same crop but lets the CLS query of the
last block attend only to itself and the segment's own patches. ``mean`` averages the segment's patch
features (no extra forward). Crops of any size run batched: tokens are padded and masked out of attention.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..base import FeatureSet, Segmentation, StageContext
from ._common import dense_matrix, mean_pool, pick_feature, require
from ._spectral import border_segment

SegmentVector = Literal["crop_cls", "mean", "masked_attention_cls"]
SEGMENT_VECTORS: tuple[str, ...] = ("crop_cls", "mean", "masked_attention_cls")


def check_segment_vector_params(who: str, n_erode: int, n_dilate: int, crop_batch_size: int) -> None:
    """ConfigError naming the first crop parameter out of range (the same checks for DSM and ACG)."""
    require(who, n_erode >= 0, "n_erode", n_erode, ">= 0")
    require(who, n_dilate >= 0, "n_dilate", n_dilate, ">= 0")
    require(who, crop_batch_size >= 1, "crop_batch_size", crop_batch_size, ">= 1")


def erode(masks: torch.Tensor) -> torch.Tensor:
    """One binary erosion of (S, h, w) masks with the 3x3 cross; outside the image counts as inside."""
    p = F.pad(masks, (1, 1, 1, 1), value=True)
    return masks & p[:, :-2, 1:-1] & p[:, 2:, 1:-1] & p[:, 1:-1, :-2] & p[:, 1:-1, 2:]


def dilate(masks: torch.Tensor) -> torch.Tensor:
    """One binary dilation of (S, h, w) masks with the 3x3 cross."""
    p = F.pad(masks, (1, 1, 1, 1), value=False)
    return masks | p[:, :-2, 1:-1] | p[:, 2:, 1:-1] | p[:, 1:-1, :-2] | p[:, 1:-1, 2:]


def segment_boxes(segment_map: torch.Tensor, n_segments: int, n_erode: int, n_dilate: int) -> torch.Tensor:
    """(S, 4) boxes (y0, x0, y1, x1), inclusive, on the patch grid around each eroded-then-dilated segment."""
    masks = F.one_hot(segment_map.long(), n_segments).permute(2, 0, 1).bool()  # (S, h, w)
    for _ in range(n_erode):
        eroded = erode(masks)
        keep = eroded.flatten(1).any(1)
        masks = torch.where(keep[:, None, None], eroded, masks)
    for _ in range(n_dilate):
        masks = dilate(masks)
    rows, cols = masks.any(2), masks.any(1)  # (S, h), (S, w)
    h, w = segment_map.shape
    ar_h, ar_w = torch.arange(h), torch.arange(w)
    big = max(h, w)
    y0 = torch.where(rows, ar_h, big).amin(1)
    y1 = torch.where(rows, ar_h, -1).amax(1)
    x0 = torch.where(cols, ar_w, big).amin(1)
    x1 = torch.where(cols, ar_w, -1).amax(1)
    return torch.stack([y0, x0, y1, x1], dim=1)


def _embed(extractor: torch.nn.Module, crop: torch.Tensor) -> torch.Tensor:
    """Tokens (1 + hh*ww, C) entering the first block for one normalised crop (3, hh*p, ww*p)."""
    vit = extractor.vit
    p = extractor.patch_size
    hh, ww = crop.shape[1] // p, crop.shape[2] // p
    x = vit.patch_embed.proj(crop[None]).flatten(2).transpose(1, 2)
    if getattr(vit.patch_embed, "norm", None) is not None:
        x = vit.patch_embed.norm(x)
    x = torch.cat([vit.cls_token.to(x.dtype), x], dim=1)
    x = x + extractor._pos_embed(hh, ww).to(x.dtype)
    return vit.norm_pre(vit.pos_drop(x))[0]


@torch.no_grad()
def crops_cls(
    extractor: torch.nn.Module,
    crops: Sequence[torch.Tensor],
    last_block_masks: Sequence[torch.Tensor | None] | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """CLS outputs (n, C) float32 on CPU of crops of any sizes (multiples of the patch size), batched.

    last_block_masks[i], if given, is a (hh*ww,) bool mask of the patches the last block may attend to
    (the CLS token always may). Padding tokens are masked out of every block, so each result equals the
    crop's own unpadded forward.
    """
    vit = extractor.vit
    device = vit.cls_token.device
    n = len(crops)
    out = torch.zeros(n, vit.embed_dim, dtype=torch.float32)
    if n == 0:
        return out
    p = extractor.patch_size
    sizes = [(c.shape[1] // p) * (c.shape[2] // p) for c in crops]
    order = sorted(range(n), key=lambda i: sizes[i])
    use_amp = device.type == "cuda"
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        length = 1 + max(sizes[i] for i in idx)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
            toks = [_embed(extractor, crops[i].to(device)) for i in idx]
            x = torch.zeros(len(idx), length, toks[0].shape[-1], dtype=toks[0].dtype, device=device)
            valid = torch.zeros(len(idx), length, dtype=torch.bool, device=device)
            last = torch.zeros_like(valid)
            for j, (i, t) in enumerate(zip(idx, toks)):
                x[j, : t.shape[0]] = t
                valid[j, : t.shape[0]] = True
                last[j, 0] = True
                m = None if last_block_masks is None else last_block_masks[i]
                last[j, 1 : t.shape[0]] = True if m is None else m.to(device).reshape(-1)
            mask = valid[:, None, None, :]
            for blk in vit.blocks[:-1]:
                x = blk(x, attn_mask=mask)
            x = vit.blocks[-1](x, attn_mask=last[:, None, None, :])
            cls = vit.norm(x)[:, 0]
        out[idx] = cls.float().cpu()
    return out


def _normalised_image(ctx: StageContext, index: int, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """The dataset image as the backbone normalises it, resized if needed to exactly the feature grid."""
    img = ctx.backbone.preprocess(ctx.dataset.load_image(index))
    size = (grid[0] * patch, grid[1] * patch)
    if tuple(img.shape[-2:]) != size:
        img = F.interpolate(img[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return img


def segment_vectors(
    method: str,
    features: FeatureSet,
    segment_maps: Sequence[torch.Tensor],
    ctx: StageContext,
    *,
    mean_feature: str = "auto",
    n_erode: int = 2,
    n_dilate: int = 5,
    batch_size: int = 64,
    device: torch.device | None = None,
) -> list[torch.Tensor]:
    """One (S_i, D) float32 tensor per image for its segment map (ids 0..S_i-1), by the chosen method."""
    if method not in SEGMENT_VECTORS:
        raise ValueError(f"segment_vector must be one of {SEGMENT_VECTORS}, got {method!r}")
    n_segs = [int(m.max()) + 1 for m in segment_maps]
    if method == "mean":
        name = pick_feature(features, mean_feature, "tokens")
        return [
            mean_pool(dense_matrix(im, name), m.reshape(-1), s)
            for im, m, s in zip(features, segment_maps, n_segs)
        ]
    if len(ctx.dataset) != len(features):
        raise ValueError(
            f"segment_vector={method!r} crops dataset images, but the dataset has {len(ctx.dataset)} images "
            f"for {len(features)} feature maps"
        )
    device = device or ctx.device
    extractor = ctx.backbone.model(device)
    patch = int(extractor.patch_size)
    masked = method == "masked_attention_cls"
    flush_at = 8 * batch_size  # crops are views of their image: run them in chunks to bound memory
    crops: list[torch.Tensor] = []
    masks: list[torch.Tensor | None] = []
    parts: list[torch.Tensor] = []
    # which crop gives each segment its vector: plain crops with the same box share one forward
    source: list[int] = []
    bar = tqdm(total=len(features), desc=f"segment vectors ({method})", disable=not ctx.progress, leave=False)
    for i, (im, seg) in enumerate(zip(features, segment_maps)):
        bar.update(1)
        seg = seg.cpu().long()
        img = _normalised_image(ctx, i, im.grid, patch)
        boxes = segment_boxes(seg, n_segs[i], n_erode, n_dilate).tolist()
        seen: dict[tuple[int, ...], int] = {}
        for s, (y0, x0, y1, x1) in enumerate(boxes):
            key = (y0, x0, y1, x1)
            if not masked and key in seen:
                source.append(seen[key])
                continue
            seen[key] = sum(len(p) for p in parts) + len(crops)
            source.append(seen[key])
            crops.append(img[:, y0 * patch : (y1 + 1) * patch, x0 * patch : (x1 + 1) * patch])
            masks.append((seg[y0 : y1 + 1, x0 : x1 + 1] == s).reshape(-1) if masked else None)
        if len(crops) >= flush_at or i == len(features) - 1:
            parts.append(crops_cls(extractor, crops, masks if masked else None, batch_size=batch_size))
            crops, masks = [], []
    bar.close()
    if not source:
        return [torch.zeros(0, extractor.vit.embed_dim) for _ in n_segs]
    cls = torch.cat(parts)[torch.tensor(source, dtype=torch.long)]
    out, start = [], 0
    for s in n_segs:
        out.append(cls[start : start + s])
        start += s
    return out


def segmentations(
    clusterer: Any,
    features: FeatureSet,
    maps: Sequence[torch.Tensor],
    ctx: StageContext,
    device: torch.device,
    background: str | None = None,
) -> list[Segmentation]:
    """Segmentations of the maps with a clusterer's segment-vector parameters (DSM's and ACG's names) and a
    background rule (default: the clusterer's ``background``; 'border': the segment owning most border
    patches keeps its own label)."""
    rule = clusterer.background if background is None else background
    vectors = segment_vectors(
        clusterer.segment_vector, features, maps, ctx, mean_feature=clusterer.mean_feature,
        n_erode=clusterer.n_erode, n_dilate=clusterer.n_dilate, batch_size=clusterer.crop_batch_size,
        device=device,
    )  # fmt: skip
    out = []
    for m, v in zip(maps, vectors):
        bg = border_segment(m, int(v.shape[0])) if rule == "border" else None
        out.append(Segmentation(m, v.float(), background=bg))
    return out
