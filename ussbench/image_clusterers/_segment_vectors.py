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
from ..dataset_clusterers._common import resolve_precision
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


def _cls_queries(
    last: torch.nn.Module, x: torch.Tensor, valid: torch.Tensor, masks: torch.Tensor
) -> torch.Tensor:
    """The last block's output for the CLS token only, once per query: x (B, L, C) tokens entering the last
    block, valid (B, L) real tokens, masks (B, Q, L) the tokens each query's CLS may attend to (CLS included).
    Every token's key and value are needed, but only the CLS row of the attention and of the MLP: (B, Q, C).
    """
    attn = last.attn
    B, L, C = x.shape
    h = attn.num_heads
    qkv = attn.qkv(last.norm1(x)).reshape(B, L, 3, h, -1).permute(2, 0, 3, 1, 4)  # 3, B, h, L, d
    q, k, v = attn.q_norm(qkv[0][:, :, :1]), attn.k_norm(qkv[1]), qkv[2]
    logits = ((q * attn.scale) @ k.transpose(-2, -1)).float()  # (B, h, 1, L): one CLS query per crop
    allowed = (masks & valid[:, None, :])[:, None]  # (B, 1, Q, L)
    att = logits.masked_fill(~allowed, float("-inf")).softmax(-1).to(v.dtype)  # (B, h, Q, L)
    out = (att @ v).transpose(1, 2).reshape(B, masks.shape[1], -1)  # (B, Q, h * d)
    out = attn.proj(attn.norm(out))
    cls = x[:, :1] + last.ls1(out)
    return cls + last.ls2(last.mlp(last.norm2(cls)))


@torch.no_grad()
def crops_cls_queries(
    extractor: torch.nn.Module,
    crops: Sequence[torch.Tensor],
    queries: Sequence[Sequence[torch.Tensor | None]],
    batch_size: int = 64,
    precision: str = "fp32",
) -> list[torch.Tensor]:
    """CLS outputs of crops of any sizes (multiples of the patch size), several per crop: one per query.

    queries[i] lists, for crop i, the last-block masks of its queries: None lets the CLS attend to every patch
    (the crop's plain CLS), a (hh*ww,) bool mask to those patches only (the CLS token always may). The blocks
    before the last run once per crop (padding tokens masked out of attention, so each crop's result equals
    its own unpadded forward); the last block runs for the CLS token only. Returns per crop (n_i, C) float32
    on CPU. ``precision='bf16'`` runs the forwards under bfloat16 autocast.
    """
    vit = extractor.vit
    device = vit.cls_token.device
    n = len(crops)
    out: list[torch.Tensor] = [torch.zeros(len(qs), vit.embed_dim) for qs in queries]
    if n == 0:
        return out
    p = extractor.patch_size
    sizes = [(c.shape[1] // p) * (c.shape[2] // p) for c in crops]
    order = sorted(range(n), key=lambda i: sizes[i])
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        length = 1 + max(sizes[i] for i in idx)
        n_q = max(1, max(len(queries[i]) for i in idx))
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            toks = [_embed(extractor, crops[i].to(device)) for i in idx]
            x = torch.zeros(len(idx), length, toks[0].shape[-1], dtype=toks[0].dtype, device=device)
            valid = torch.zeros(len(idx), length, dtype=torch.bool, device=device)
            masks = torch.zeros(len(idx), n_q, length, dtype=torch.bool, device=device)
            for j, (i, t) in enumerate(zip(idx, toks)):
                x[j, : t.shape[0]] = t
                valid[j, : t.shape[0]] = True
                masks[j, :, 0] = True
                for r, m in enumerate(queries[i]):
                    masks[j, r, 1 : t.shape[0]] = True if m is None else m.to(device).reshape(-1)
            mask = valid[:, None, None, :]
            for blk in vit.blocks[:-1]:
                x = blk(x, attn_mask=mask)
            cls = vit.norm(_cls_queries(vit.blocks[-1], x, valid, masks)).float().cpu()
        for j, i in enumerate(idx):
            out[i] = cls[j, : len(queries[i])]
    return out


def crops_cls(
    extractor: torch.nn.Module,
    crops: Sequence[torch.Tensor],
    last_block_masks: Sequence[torch.Tensor | None] | None = None,
    batch_size: int = 64,
    precision: str = "fp32",
) -> torch.Tensor:
    """CLS outputs (n, C) float32 on CPU of crops of any sizes, one per crop; last_block_masks[i], if given,
    is a (hh*ww,) bool mask of the patches the last block's CLS may attend to (see crops_cls_queries)."""
    masks = [None] * len(crops) if last_block_masks is None else list(last_block_masks)
    per_crop = crops_cls_queries(extractor, crops, [[m] for m in masks], batch_size, precision)
    if not per_crop:
        return torch.zeros(0, extractor.vit.embed_dim)
    return torch.cat(per_crop)


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
    precision: str = "fp32",
    stats: dict | None = None,
) -> list[torch.Tensor]:
    """One (S_i, D) float32 tensor per image for its segment map (ids 0..S_i-1), by the chosen method.

    Crops: segments of one image whose boxes coincide share one forward (a masked-attention query each);
    ``stats``, if given, receives the number of crops forwarded and of segments served."""
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
    queries: list[list[torch.Tensor | None]] = []
    owners: list[list[int]] = []  # per crop, the global segment index of each query
    vectors = torch.zeros(sum(n_segs), extractor.vit.embed_dim)
    n_crops = 0

    def flush() -> None:
        nonlocal crops, queries, owners
        for rows, cls in zip(owners, crops_cls_queries(extractor, crops, queries, batch_size, precision)):
            vectors[rows] = cls if len(rows) == cls.shape[0] else cls.expand(len(rows), -1)
        crops, queries, owners = [], [], []

    bar = tqdm(total=len(features), desc=f"segment vectors ({method})", disable=not ctx.progress, leave=False)
    offset = 0
    for i, (im, seg) in enumerate(zip(features, segment_maps)):
        bar.update(1)
        seg = seg.cpu().long()
        img = _normalised_image(ctx, i, im.grid, patch)
        boxes = segment_boxes(seg, n_segs[i], n_erode, n_dilate).tolist()
        by_box: dict[tuple[int, ...], list[int]] = {}
        for s, box in enumerate(boxes):  # segments with the same box share the crop's forward
            by_box.setdefault(tuple(box), []).append(s)
        for (y0, x0, y1, x1), members in by_box.items():
            crops.append(img[:, y0 * patch : (y1 + 1) * patch, x0 * patch : (x1 + 1) * patch])
            if masked:
                window = seg[y0 : y1 + 1, x0 : x1 + 1]
                queries.append([(window == s).reshape(-1) for s in members])
            else:
                queries.append([None])
            owners.append([offset + s for s in members])
            n_crops += 1
        offset += n_segs[i]
        if len(crops) >= flush_at:
            flush()
    if crops:
        flush()
    bar.close()
    if stats is not None:
        stats.update(crops=n_crops, segments=int(sum(n_segs)))
    out, start = [], 0
    for s in n_segs:
        out.append(vectors[start : start + s])
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
    """Segmentations of the maps with a clusterer's segment-vector parameters (DSM's and ACG's names: the
    vector, crop morphology and batch, ``precision``) and a background rule (default: the clusterer's
    ``background``; 'border': the segment owning most border patches keeps its own label). The crop counts
    and the precision used are left on the clusterer as ``segment_vector_stats_``."""
    rule = clusterer.background if background is None else background
    precision = resolve_precision(getattr(clusterer, "precision", "fp32"), device, clusterer.plugin_name)
    stats: dict = {"precision": precision if clusterer.segment_vector != "mean" else None}
    vectors = segment_vectors(
        clusterer.segment_vector, features, maps, ctx, mean_feature=clusterer.mean_feature,
        n_erode=clusterer.n_erode, n_dilate=clusterer.n_dilate, batch_size=clusterer.crop_batch_size,
        device=device, precision=precision, stats=stats,
    )  # fmt: skip
    clusterer.segment_vector_stats_ = stats
    out = []
    for m, v in zip(maps, vectors):
        bg = border_segment(m, int(v.shape[0])) if rule == "border" else None
        out.append(Segmentation(m, v.float(), background=bg))
    return out
