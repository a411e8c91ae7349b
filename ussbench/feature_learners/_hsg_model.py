"""HSG (Ke et al., CVPR 2022) on frozen ViT features: projection head, base k-means grouping, clustering
transformers, the pixel-to-segment contrastive and goodness-of-grouping losses, training and inference.

Shared by the ``hsg`` feature learner and the ``hsg_groups`` image clusterer. Notation follows the paper:
v = unit pixel (patch) features, G0/X0 = base k-means grouping and its centroids, C_l^{l+1} = transition
from level l to l+1 (row-stochastic), M_l = C_0^1 ... C_{l-1}^l = soft assignment of base segments to
level l, so that the pixel-level P_l = P_0 M_l with one-hot P_0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..determinism import ThreadInvariantBatchNorm1d, ThreadInvariantLayerNorm  # thread-invariant
from ..errors import ConfigError


# ------------------------------------------------------------------------------------------------------
# configuration
# ------------------------------------------------------------------------------------------------------
@dataclass
class HSGConfig:
    """Every hyperparameter of the HSG model and its training (the plugins expose each as a parameter)."""

    feature: str = "tokens"
    dim: int = 128
    hidden_dim: int = 384
    n0: int = 36
    n0_train: int = 16
    n1: int = 8
    n2: int = 4
    kmeans_iters: int = 15
    grouping: str = "transformer"
    assignment: str = "nested"
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    dropout: float = 0.1
    norm: str = "batch"
    temperature: float = 0.0625
    negatives: str = "all"
    lambda_e: float = 1.0
    lambda_f: float = 0.1
    lambda_g: float = 0.2
    knn: int = 2
    edge_grouping: str = "slic"
    n_superpixels: int = 48
    slic_compactness: float = 10.0
    felzenszwalb_scale: float = 50.0
    superpixel_upsample: int = 4
    views: int = 2
    crop: int = 12
    crop_scale_min: float = 0.5
    flip: bool = True
    feature_dropout: float = 0.1
    epochs: int = 3
    batch_size: int = 8
    optimizer: str = "adamw"
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0001
    lr_schedule: str = "step"

    def __post_init__(self) -> None:
        positive = ("dim", "hidden_dim", "n0", "n0_train", "n1", "n2", "kmeans_iters", "heads", "knn",
                    "n_superpixels", "superpixel_upsample", "views", "crop", "epochs", "batch_size")  # fmt: skip
        for name in positive:
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"hsg: {name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("encoder_layers", "decoder_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"hsg: {name} must be >= 0, got {getattr(self, name)!r}")
        if self.n2 > self.n1:
            raise ConfigError(f"hsg: n2 ({self.n2}) must not exceed n1 ({self.n1}): levels coarsen")
        if self.dim % self.heads:
            raise ConfigError(f"hsg: dim ({self.dim}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"hsg: dropout must lie in [0, 1), got {self.dropout!r}")
        if not 0.0 <= self.feature_dropout < 1.0:
            raise ConfigError(f"hsg: feature_dropout must lie in [0, 1), got {self.feature_dropout!r}")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ConfigError(f"hsg: crop_scale_min must lie in (0, 1], got {self.crop_scale_min!r}")
        if self.temperature <= 0:
            raise ConfigError(f"hsg: temperature must be > 0, got {self.temperature!r}")
        if self.lr <= 0:
            raise ConfigError(f"hsg: lr must be > 0, got {self.lr!r}")
        for name in ("lambda_e", "lambda_f", "lambda_g", "weight_decay", "momentum"):
            if getattr(self, name) < 0:
                raise ConfigError(f"hsg: {name} must be >= 0, got {getattr(self, name)!r}")
        choices = {
            "grouping": ("transformer", "kmeans"),
            "assignment": ("nested", "soft"),
            "norm": ("batch", "layer"),
            "negatives": ("all", "image"),
            "edge_grouping": ("slic", "felzenszwalb", "none"),
            "optimizer": ("adamw", "sgd"),
            "lr_schedule": ("step", "constant"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"hsg: {name} must be one of {allowed}, got {getattr(self, name)!r}")

    @classmethod
    def from_object(cls, obj: Any) -> HSGConfig:
        """Build from any object carrying the config fields as attributes (the plugins)."""
        return cls(**{f.name: getattr(obj, f.name) for f in fields(cls)})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def n_groups(self) -> tuple[int, int]:
        return (self.n1, self.n2)


# ------------------------------------------------------------------------------------------------------
# grouping primitives (batched, no loops over pixels)
# ------------------------------------------------------------------------------------------------------
def grid_shape(h: int, w: int, n: int) -> tuple[int, int]:
    """A gh x gw grid of about n cells following the map's aspect ratio (6x6 for a square map and n=36)."""
    gh = max(1, min(h, round(math.sqrt(n * h / w))))
    gw = max(1, min(w, round(n / gh)))
    return gh, gw


def grid_cells(h: int, w: int, n: int, device: torch.device | None = None) -> tuple[torch.Tensor, int]:
    """(h*w,) id of the grid cell each position falls in, and the number of cells."""
    gh, gw = grid_shape(h, w, n)
    ys = torch.arange(h, device=device) * gh // h
    xs = torch.arange(w, device=device) * gw // w
    return (ys[:, None] * gw + xs[None, :]).reshape(-1), gh * gw


def segment_means(x: torch.Tensor, labels: torch.Tensor, k: int, weights: torch.Tensor | None = None):
    """Unit-length mean of x (B, N, D) per label in [0, k) -> (B, k, D) and the (B, k) weighted counts."""
    onehot = F.one_hot(labels, k).to(x.dtype)
    if weights is not None:
        onehot = onehot * weights.unsqueeze(-1).to(x.dtype)
    sums = onehot.transpose(1, 2) @ x
    return F.normalize(sums, dim=-1), onehot.sum(1)


def spherical_kmeans(
    x: torch.Tensor,
    centroids: torch.Tensor,
    valid: torch.Tensor,
    iters: int,
    weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched cosine k-means: x (B, N, D) unit rows, initial centroids (B, K, D) of which ``valid`` (B, K)
    may be used; ``iters`` Lloyd steps, empty clusters keep their centroid. Returns labels (B, N), centroids."""
    c = centroids
    for _ in range(iters):
        labels = (x @ c.transpose(1, 2)).masked_fill(~valid[:, None, :], float("-inf")).argmax(-1)
        new, counts = segment_means(x, labels, c.shape[1], weights)
        c = torch.where((counts > 0).unsqueeze(-1), new, c)
    labels = (x @ c.transpose(1, 2)).masked_fill(~valid[:, None, :], float("-inf")).argmax(-1)
    return labels, c


def farthest_point_init(x: torch.Tensor, k: int, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic k-means init: start at the first valid row, then repeatedly take the valid row least
    similar to those chosen. x (B, N, D) unit; returns centroids (B, k, D) and their validity (B, k)."""
    B, N, _ = x.shape
    batch = torch.arange(B, device=x.device)
    idx = valid.to(torch.int64).argmax(1)
    chosen = [idx]
    best = (x @ x[batch, idx].unsqueeze(-1)).squeeze(-1)
    for _ in range(k - 1):
        idx = best.masked_fill(~valid, float("inf")).argmin(1)
        chosen.append(idx)
        best = torch.maximum(best, (x @ x[batch, idx].unsqueeze(-1)).squeeze(-1))
    idx = torch.stack(chosen, 1)
    init_valid = torch.arange(k, device=x.device)[None, :] < valid.sum(1, keepdim=True)
    return x[batch[:, None], idx], init_valid


def base_grouping(v: torch.Tensor, hw: tuple[int, int], n0: int, iters: int):
    """G0: per-image spherical k-means of v (B, h*w, D), grid-initialised with about n0 cells.

    Returns labels (B, h*w), centroid features X0 (B, K0, D) carrying gradients to v, and validity (B, K0)."""
    cells, k = grid_cells(hw[0], hw[1], n0, v.device)
    with torch.no_grad():
        vd = v.detach()
        init, counts = segment_means(vd, cells.expand(v.shape[0], -1), k)
        labels, _ = spherical_kmeans(vd, init, counts > 0, iters)
    x0, counts = segment_means(v, labels, k)
    return labels, x0, counts > 0


def nest(token_labels: list[torch.Tensor]) -> list[torch.Tensor]:
    """Compose per-level parent maps into base-token labels: [(B, K0)->n1, (B, n1)->n2, ...] -> per level."""
    out = [token_labels[0]]
    for parent in token_labels[1:]:
        out.append(torch.gather(parent, 1, out[-1]))
    return out


def kmeans_hierarchy(x0: torch.Tensor, mask0: torch.Tensor, n_groups: tuple[int, ...], iters: int):
    """The non-parametric alternative of the paper's Table 4: spherical k-means of X0 into n1 groups, of
    their centroids into n2, ... Returns the nested labels of the base tokens per level and the centroids."""
    x, valid = x0, mask0
    parents, centroids = [], []
    for n in n_groups:
        init, init_valid = farthest_point_init(x, n, valid)
        labels, c = spherical_kmeans(x, init, init_valid, iters, weights=valid.to(x.dtype))
        _, counts = segment_means(x, labels, n, valid.to(x.dtype))
        parents.append(labels)
        centroids.append(c)
        x, valid = c, counts > 0
    return nest(parents), centroids


# ------------------------------------------------------------------------------------------------------
# clustering transformer
# ------------------------------------------------------------------------------------------------------
class MaskedNorm(nn.Module):
    """BatchNorm over the valid tokens of a (B, N, m) token set (the paper's choice) or plain LayerNorm."""

    def __init__(self, dim: int, kind: str = "batch", momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.kind = kind
        self.momentum = momentum
        self.eps = eps
        if kind == "layer":
            self.ln = ThreadInvariantLayerNorm(dim)
        else:
            self.weight = nn.Parameter(torch.ones(dim))
            self.bias = nn.Parameter(torch.zeros(dim))
            self.register_buffer("running_mean", torch.zeros(dim))
            self.register_buffer("running_var", torch.ones(dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "layer":
            return self.ln(x)
        if self.training:
            w = mask.unsqueeze(-1).to(x.dtype)
            n = w.sum().clamp_min(1.0)
            mean = (x * w).sum((0, 1)) / n
            var = (((x - mean) ** 2) * w).sum((0, 1)) / n
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_((var * n / (n - 1).clamp_min(1.0)).detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias


def _ffn(dim: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(2 * dim, dim))


class EncoderLayer(nn.Module):
    """Post-norm self-attention + FFN block (DETR) over a masked token set."""

    def __init__(self, dim: int, heads: int, dropout: float, norm: str):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = _ffn(dim, dropout)
        self.norm1, self.norm2 = MaskedNorm(dim, norm), MaskedNorm(dim, norm)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        a = self.attn(x, x, x, key_padding_mask=~mask, need_weights=False)[0]
        x = self.norm1(x + self.drop(a), mask)
        return self.norm2(x + self.drop(self.ffn(x)), mask)


class DecoderLayer(nn.Module):
    """Post-norm query self-attention, cross-attention to the encoded tokens, FFN (DETR decoder block)."""

    def __init__(self, dim: int, heads: int, dropout: float, norm: str):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = _ffn(dim, dropout)
        self.norms = nn.ModuleList([MaskedNorm(dim, norm) for _ in range(3)])
        self.drop = nn.Dropout(dropout)

    def forward(self, q: torch.Tensor, y: torch.Tensor, ymask: torch.Tensor) -> torch.Tensor:
        qmask = torch.ones(q.shape[:2], dtype=torch.bool, device=q.device)
        a = self.self_attn(q, q, q, need_weights=False)[0]
        q = self.norms[0](q + self.drop(a), qmask)
        a = self.cross_attn(q, y, y, key_padding_mask=~ymask, need_weights=False)[0]
        q = self.norms[1](q + self.drop(a), qmask)
        return self.norms[2](q + self.drop(self.ffn(q)), qmask)


class ClusteringTransformer(nn.Module):
    """C_l^{l+1}: encoder X_l -> Y_l; decoder on learnable queries Q_{l+1} plus fc(mean, std of Y_l) ->
    X_{l+1}; Z_{l+1} = fc(X_{l+1}); transition C = softmax(Y_l Z_{l+1}^T / sqrt(m)) over the n_{l+1} groups."""

    def __init__(self, dim: int, n_out: int, heads: int, enc: int, dec: int, dropout: float, norm: str):
        super().__init__()
        self.dim = dim
        self.encoder = nn.ModuleList([EncoderLayer(dim, heads, dropout, norm) for _ in range(enc)])
        self.decoder = nn.ModuleList([DecoderLayer(dim, heads, dropout, norm) for _ in range(dec)])
        self.queries = nn.Parameter(torch.randn(n_out, dim))
        self.fc_mean = nn.Linear(dim, dim)
        self.fc_std = nn.Linear(dim, dim)
        self.fc_z = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor):
        """x (B, n_l, m) with validity mask (B, n_l) -> Y_l, X_{l+1} (B, n_{l+1}, m), Z_{l+1}, C (B, n_l, n_{l+1})."""
        y = x
        for layer in self.encoder:
            y = layer(y, mask)
        w = mask.unsqueeze(-1).to(y.dtype)
        count = w.sum(1).clamp_min(1.0)
        mean = (y * w).sum(1) / count
        std = ((((y - mean.unsqueeze(1)) ** 2) * w).sum(1) / count + 1e-6).sqrt()
        q = self.queries.unsqueeze(0) + (self.fc_mean(mean) + self.fc_std(std)).unsqueeze(1)
        for layer in self.decoder:
            q = layer(q, y, mask)
        z = self.fc_z(q)
        transition = torch.softmax(y @ z.transpose(1, 2) / math.sqrt(self.dim), dim=-1)
        return y, q, z, transition


@dataclass
class Hierarchy:
    """Per level l = 1, 2: transitions C (B, n_{l-1}, n_l), soft base assignments M (B, K0, n_l), projected
    centroids Z (B, n_l, m) (empty for k-means), and the hard labels of the base tokens (B, K0)."""

    transitions: list[torch.Tensor]
    assignments: list[torch.Tensor]
    z: list[torch.Tensor]
    token_labels: list[torch.Tensor]


class HSGModel(nn.Module):
    """Projection head f (FCN-style 1x1 conv head on frozen features) plus one clustering transformer per level."""

    def __init__(self, in_dim: int, config: HSGConfig):
        super().__init__()
        self.in_dim = in_dim
        self.config = config
        c = config
        self.head = nn.Sequential(
            nn.Linear(in_dim, c.hidden_dim), ThreadInvariantBatchNorm1d(c.hidden_dim), nn.ReLU(), nn.Linear(c.hidden_dim, c.dim)
        )  # fmt: skip
        self.transformers = nn.ModuleList()
        if c.grouping == "transformer":
            self.transformers.extend(
                ClusteringTransformer(
                    c.dim, n, c.heads, c.encoder_layers, c.decoder_layers, c.dropout, c.norm
                )
                for n in c.n_groups
            )

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen features (..., C) -> unit pixel features v (..., dim)."""
        shape = x.shape[:-1]
        v = self.head(x.reshape(-1, x.shape[-1]))
        return F.normalize(v, dim=-1).reshape(*shape, -1)

    def hierarchy(self, x0: torch.Tensor, mask0: torch.Tensor) -> Hierarchy:
        """Group the base tokens X0 (B, K0, m) level by level (transformers, or k-means for Table 4)."""
        c = self.config
        if c.grouping == "kmeans":
            labels, _ = kmeans_hierarchy(x0, mask0, c.n_groups, c.kmeans_iters)
            return Hierarchy([], [], [], labels)
        transitions, assignments, zs = [], [], []
        x, mask, m = x0, mask0, None
        for transformer in self.transformers:
            _, x, z, trans = transformer(x, mask)
            m = trans if m is None else m @ trans
            transitions.append(trans)
            assignments.append(m)
            zs.append(z)
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        if c.assignment == "nested":
            labels = nest([t.argmax(-1) for t in transitions])
        else:
            labels = [a.argmax(-1) for a in assignments]
        return Hierarchy(transitions, assignments, zs, labels)

    def save(self, path: str) -> None:
        torch.save({"in_dim": self.in_dim, "config": self.config.as_dict(), "state": self.state_dict()}, path)

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> HSGModel:
        blob = torch.load(path, map_location=device, weights_only=True)
        model = cls(int(blob["in_dim"]), HSGConfig(**blob["config"]))
        model.load_state_dict(blob["state"])
        return model.to(device)


# ------------------------------------------------------------------------------------------------------
# losses
# ------------------------------------------------------------------------------------------------------
def _dense_ids(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ids of an (N, k) non-negative integer key matrix: (N,) ids in [0, U) and the (U, k) unique rows.
    Columns are folded into one int64 key so the 1-D unique is used (unique over rows is slow on CPU)."""
    span = keys.max(0).values + 1
    flat = torch.zeros(keys.shape[0], dtype=torch.int64, device=keys.device)
    for j in range(keys.shape[1]):
        flat = flat * span[j] + keys[:, j]
    uniq, ids = torch.unique(flat, return_inverse=True)
    rows = torch.empty(uniq.shape[0], keys.shape[1], dtype=keys.dtype, device=keys.device)
    rows[ids] = keys
    return ids, rows


def segment_contrastive(
    v: torch.Tensor, keys: torch.Tensor, group_cols: int, temperature: float, same_image: bool = False
) -> torch.Tensor:
    """Pixel-to-segment contrastive loss (eq. 3), averaged over pixels.

    v (N, D) unit pixel features; keys (N, k) non-negative integer rows whose distinct values define the
    segments, the first ``group_cols`` columns (instance, group, ...) defining the semantic group.
    Positives of a pixel: the other segments of its group (other views, other pieces); if it has none, its
    own segment. Negatives: every segment of another group (same or other instance). The own segment is
    left out of both sums when other positives exist, so attraction comes from other views and pieces.
    same_image: negatives only from the pixel's own image (column 0 of keys), not from other images.
    Memory and time are O(N * S) with a few passes (no (N, S) masks)."""
    seg, rows = _dense_ids(keys)
    n_seg = rows.shape[0]
    group, _ = _dense_ids(rows[:, :group_cols])
    n_group = int(group.max()) + 1
    sums = torch.zeros(n_seg, v.shape[1], dtype=v.dtype, device=v.device).index_add(0, seg, v)
    logits = v @ F.normalize(sums, dim=1).T / temperature  # (N, S)
    shift = logits.detach().max(1, keepdim=True).values
    e = torch.exp(logits - shift)
    arange = torch.arange(v.shape[0], device=v.device)
    own = e[arange, seg]
    e = e.index_put((arange, seg), torch.zeros_like(own))  # drop the own segment
    if same_image:
        e = e * (rows[:, 0].unsqueeze(0) == keys[:, :1]).to(e.dtype)
    others_in_group = torch.zeros(v.shape[0], n_group, dtype=e.dtype, device=e.device).index_add(1, group, e)
    pixel_group = group[seg]
    pos_other = others_in_group[arange, pixel_group]
    has_other = (torch.bincount(group, minlength=n_group) > 1)[pixel_group]
    tiny = torch.finfo(e.dtype).tiny
    pos = torch.where(has_other, pos_other, own).clamp_min(tiny)
    total = torch.where(has_other, e.sum(1), e.sum(1) + own)
    return (total.log() - pos.log()).mean()


def knn_graph(x0: torch.Tensor, mask0: torch.Tensor, views: int, k: int) -> torch.Tensor:
    """Binary symmetric kNN graph (B, T, T) of the base centroids of all views of an image (T = views*K0):
    each token links to its k most similar tokens in its own view and k in each other view (suppl. 5.7)."""
    B, T, _ = x0.shape
    per_view = T // views
    view = torch.arange(T, device=x0.device) // per_view
    sim = x0 @ x0.transpose(1, 2)
    invalid = ~(mask0.unsqueeze(1) & mask0.unsqueeze(2)) | torch.eye(T, dtype=torch.bool, device=x0.device)
    sim = sim.masked_fill(invalid, float("-inf"))
    adj = torch.zeros_like(sim)
    for target in range(views):
        s = sim.masked_fill((view != target)[None, None, :], float("-inf"))
        val, idx = s.topk(min(k, per_view), dim=-1)
        adj.scatter_(-1, idx, torch.isfinite(val).to(adj.dtype))
    adj = torch.maximum(adj, adj.transpose(1, 2))
    return adj * (mask0.unsqueeze(1) & mask0.unsqueeze(2)).to(adj.dtype)


def grouping_loss(
    adj: torch.Tensor, mask0: torch.Tensor, assignments: list[torch.Tensor], zs: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Goodness of grouping (eq. 8), summed over levels and averaged over images: negative modularity of
    the soft assignment M_l on the kNN graph, collapse regulariser, and centroid separation of Z_l."""
    w = mask0.unsqueeze(-1).to(adj.dtype)
    deg = adj.sum(-1)
    two_e = deg.sum(-1).clamp_min(1.0)
    n0 = mask0.sum(-1).clamp_min(1).to(adj.dtype)
    out = {"modularity": adj.new_zeros(()), "collapse": adj.new_zeros(()), "separation": adj.new_zeros(())}
    for m, z in zip(assignments, zs):
        m = m * w
        within = (m * (adj @ m)).sum((1, 2))
        expected = ((deg.unsqueeze(-1) * m).sum(1) ** 2).sum(-1) / two_e
        out["modularity"] = out["modularity"] - ((within - expected) / two_e).mean()
        n_l = m.shape[-1]
        out["collapse"] = out["collapse"] + (math.sqrt(n_l) / n0 * m.sum(1).norm(dim=-1) - 1).mean()
        zn = F.normalize(z, dim=-1)
        logits = zn @ zn.transpose(1, 2)
        target = torch.arange(n_l, device=z.device).expand(z.shape[0], -1)
        out["separation"] = out["separation"] + F.cross_entropy(logits.transpose(1, 2), target)
    return out


# ------------------------------------------------------------------------------------------------------
# low-level grouping G_e (stand-in for OWT-UCM) and feature-level views
# ------------------------------------------------------------------------------------------------------
def grid_superpixels(
    image: np.ndarray,
    grid: tuple[int, int],
    method: str = "slic",
    n_segments: int = 48,
    compactness: float = 10.0,
    scale: float = 50.0,
    upsample: int = 4,
) -> np.ndarray:
    """Superpixels of an RGB image on the patch grid (h, w): SLIC / Felzenszwalb on the image resized to
    (h*upsample, w*upsample), then the majority superpixel of each upsample x upsample block. int64 ids."""
    from PIL import Image
    from skimage.segmentation import felzenszwalb, slic

    h, w = grid
    r = upsample
    small = np.asarray(Image.fromarray(image).resize((w * r, h * r), Image.BILINEAR))
    if method == "slic":
        sp = slic(small, n_segments=n_segments, compactness=compactness, start_label=0)
    elif method == "felzenszwalb":
        sp = felzenszwalb(small, scale=scale, sigma=0.5, min_size=max(1, (h * w * r * r) // (4 * n_segments)))
    else:
        raise ConfigError(f"hsg: edge_grouping must be 'slic' or 'felzenszwalb', got {method!r}")
    _, sp = np.unique(sp, return_inverse=True)
    n = int(sp.max()) + 1
    blocks = sp.reshape(h, r, w, r).transpose(0, 2, 1, 3).reshape(h * w, r * r)
    votes = np.zeros((h * w, n), dtype=np.int64)
    np.add.at(votes, (np.repeat(np.arange(h * w), r * r), blocks.reshape(-1)), 1)
    _, pooled = np.unique(votes.argmax(1), return_inverse=True)
    return pooled.reshape(h, w).astype(np.int64)


def make_views(
    maps: list[torch.Tensor],
    superpixels: list[torch.Tensor] | None,
    config: HSGConfig,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature-level augmented views: per image ``views`` random square crops (side a random fraction of the
    short side, area scale in [crop_scale_min, 1]) resampled to crop x crop patches, random horizontal flips.
    maps: (h, w, C) per image. Returns x (B*views, crop*crop, C) and superpixel ids (B*views, crop*crop)."""
    size = config.crop
    rnd = torch.rand(len(maps), config.views, 4, generator=generator)
    xs, ss = [], []
    for i, fmap in enumerate(maps):
        h, w = int(fmap.shape[0]), int(fmap.shape[1])
        short = min(h, w)
        for j in range(config.views):
            scale = config.crop_scale_min + (1 - config.crop_scale_min) * float(rnd[i, j, 0])
            side = max(1, min(short, round(math.sqrt(scale) * short)))
            y0 = int(float(rnd[i, j, 1]) * (h - side + 1))
            x0 = int(float(rnd[i, j, 2]) * (w - side + 1))
            crop = fmap[y0 : y0 + side, x0 : x0 + side].to(device).float().permute(2, 0, 1)[None]
            crop = F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False)[0]
            if superpixels is not None:
                sp = superpixels[i][y0 : y0 + side, x0 : x0 + side].to(device).float()[None, None]
                sp = F.interpolate(sp, size=(size, size), mode="nearest")[0, 0].long()
            else:
                sp = torch.zeros(size, size, dtype=torch.long, device=device)
            if config.flip and float(rnd[i, j, 3]) < 0.5:
                crop, sp = crop.flip(-1), sp.flip(-1)
            xs.append(crop.permute(1, 2, 0).reshape(size * size, -1))
            ss.append(sp.reshape(-1))
    return torch.stack(xs), torch.stack(ss)


# ------------------------------------------------------------------------------------------------------
# training and inference
# ------------------------------------------------------------------------------------------------------
def training_step(model: HSGModel, x: torch.Tensor, sp: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """All losses for one batch of views: x (B*V, P, C) frozen features, sp (B*V, P) superpixel ids or None."""
    c = model.config
    V = c.views
    BV, P, _ = x.shape
    B = BV // V
    side = int(round(math.sqrt(P)))
    if c.feature_dropout > 0:
        x = F.dropout(x, c.feature_dropout, training=True)
    v = model.project(x)  # (BV, P, D)
    g0, x0, mask0 = base_grouping(v, (side, P // side), c.n0_train, c.kmeans_iters)
    k0 = x0.shape[1]
    # joint token set of all views of an image: token index of each pixel is view * K0 + g0
    x0j = x0.reshape(B, V * k0, -1)
    mask0j = mask0.reshape(B, V * k0)
    view_id = torch.arange(V, device=x.device).repeat(B)[:, None].expand(BV, P)
    inst = torch.arange(B, device=x.device).repeat_interleave(V)[:, None].expand(BV, P)
    token = (view_id * k0 + g0).reshape(B, V * P)
    hier = model.hierarchy(x0j, mask0j)

    vf = v.reshape(BV * P, -1)
    flat = [t.reshape(-1) for t in (inst, view_id, g0)]
    if sp is not None and c.edge_grouping != "none":
        # G_e: G0 regions split by superpixels; group = superpixel of the source image (shared by views)
        keys, group_cols = torch.stack([flat[0], sp.reshape(-1), flat[1], flat[2]], 1), 2
    else:  # no low-level grouping: each G0 segment of each view is its own group
        keys, group_cols = torch.stack([flat[0], flat[1], flat[2]], 1), 3
    same_image = c.negatives == "image"
    losses = {"edge": segment_contrastive(vf, keys, group_cols, c.temperature, same_image)}
    feat_loss = v.new_zeros(())
    for labels in hier.token_labels:
        g = torch.gather(labels, 1, token).reshape(-1)
        feat_loss = feat_loss + segment_contrastive(
            vf, torch.stack([flat[0], g, flat[1]], 1), 2, c.temperature, same_image
        )
    losses["levels"] = feat_loss
    if hier.assignments:
        adj = knn_graph(x0j.detach(), mask0j, V, c.knn)
        losses.update(grouping_loss(adj, mask0j, hier.assignments, hier.z))
        goodness = losses["modularity"] + losses["collapse"] + losses["separation"]
    else:
        goodness = v.new_zeros(())
    losses["total"] = c.lambda_e * losses["edge"] + c.lambda_f * feat_loss + c.lambda_g * goodness
    return losses


def train_hsg(
    maps: list[torch.Tensor],
    superpixels: list[torch.Tensor] | None,
    config: HSGConfig,
    device: torch.device,
    seed: int,
    progress: bool = False,
) -> tuple[HSGModel, list[dict[str, float]]]:
    """Train HSG on frozen feature maps (h, w, C) per image; returns the model (eval mode) and per-epoch
    mean losses. Deterministic for a seed on CPU: all randomness comes from generators seeded here."""
    from tqdm.auto import tqdm

    if not maps:
        raise ValueError("hsg: no feature maps to train on")
    n = len(maps)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = HSGModel(int(maps[0].shape[-1]), config).to(device)
        gen = torch.Generator().manual_seed(seed)
        if config.optimizer == "sgd":
            opt = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)  # fmt: skip
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        steps_per_epoch = math.ceil(n / config.batch_size)
        total = config.epochs * steps_per_epoch
        milestones = [int(f * total) for f in (0.32, 0.56, 0.75)] if config.lr_schedule == "step" else []
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        history: list[dict[str, float]] = []
        model.train()
        bar = tqdm(total=total, desc="hsg fit", disable=not progress, unit="step")
        for epoch in range(config.epochs):
            perm = torch.randperm(n, generator=gen).tolist()
            sums: dict[str, float] = {}
            for s in range(steps_per_epoch):
                idx = perm[s * config.batch_size : (s + 1) * config.batch_size]
                sps = [superpixels[i] for i in idx] if superpixels is not None else None
                x, sp = make_views([maps[i] for i in idx], sps, config, gen, device)
                losses = training_step(model, x, sp if superpixels is not None else None)
                if not torch.isfinite(losses["total"]):
                    from ..errors import NumericalError

                    raise NumericalError(f"hsg: loss became {float(losses['total'])} at epoch {epoch}")
                opt.zero_grad(set_to_none=True)
                losses["total"].backward()
                opt.step()
                sched.step()
                for key, val in losses.items():
                    sums[key] = sums.get(key, 0.0) + float(val.detach())
                bar.update(1)
            history.append({"epoch": epoch, **{k: v / steps_per_epoch for k, v in sums.items()}})
        bar.close()
    return model.eval(), history


@torch.no_grad()
def infer_hierarchy(
    model: HSGModel, maps: list[torch.Tensor], device: torch.device, batch_size: int = 64
) -> list[dict[str, Any]]:
    """Per image: unit projected features ``code`` (h, w, dim) and the nested segment maps of levels 0..2
    (``levels``, list of (h, w) int64), with G0 from n0 grid-initialised k-means; on CPU."""
    model.eval()
    c = model.config
    out: list[dict[str, Any] | None] = [None] * len(maps)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, fmap in enumerate(maps):
        by_shape.setdefault((int(fmap.shape[0]), int(fmap.shape[1])), []).append(i)
    for (h, w), members in by_shape.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            x = torch.stack([maps[i] for i in chunk]).to(device).float().reshape(len(chunk), h * w, -1)
            v = model.project(x)
            g0, x0, mask0 = base_grouping(v, (h, w), c.n0, c.kmeans_iters)
            hier = model.hierarchy(x0, mask0)
            levels = [g0] + [torch.gather(t, 1, g0) for t in hier.token_labels]
            for j, i in enumerate(chunk):
                out[i] = {
                    "code": v[j].reshape(h, w, -1).cpu(),
                    "levels": [lv[j].reshape(h, w).cpu() for lv in levels],
                }
    return [o for o in out if o is not None]
