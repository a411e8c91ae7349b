"""The training loop shared by the head learners: views of cached feature maps, kNN positives, seeded steps.

Training never runs the backbone per step: it reads the FeatureSet's cached tokens (float16 on CPU) once
into a padded bank (N, Hmax, Wmax, C), on the GPU when it fits. Images have different patch grids, so each
training sample is a fixed-size square window of ``crop`` x ``crop`` patches cut from a feature map (no
resampling of features, which would blur them):

* ``crop_mode="random"``: a fresh random window of a random image at every draw (feature-level random
  crop); kNN positives are computed between whole images (mean-pooled tokens).
* ``crop_mode="five"``: a fixed training set of five windows per image (four corners and the centre), the
  feature-level analogue of the reference "five-crop" training sets; kNN positives between windows.

``crop`` is ``crop_size`` clipped to the smallest grid side in the set. kNN: cosine similarity of the
L2-normalised mean-pooled tokens, k = min(30, V - 1) neighbours excluding the view itself (STEGO's
``precompute_knns`` keeps the top 30 including itself). Device-side randomness (dropout, sample points)
draws from the global generator seeded inside ``torch.random.fork_rng`` (the caller's RNG state is
restored); view sampling uses a CPU generator seeded from the learner's seed.
"""

from __future__ import annotations

import abc
import contextlib
import copy
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..base import FeatureLearner, FeatureSet, StageContext
from ..determinism import one_thread
from ..errors import ConfigError, NumericalError
from . import health
from .omh import OMHHeads, check_omh_params

log = logging.getLogger(__name__)
KNN_K = 30
CROP_MODES = ("random", "five")


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's global generators for the block and restore the caller's state afterwards."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


@contextlib.contextmanager
def thread_invariant(device: torch.device) -> Iterator[None]:
    """On the CPU, run the block's kernels on one intra-op thread (``ussbench.determinism.one_thread``).

    A training step holds several cross-element reductions whose CPU kernels sum in per-thread partial
    buffers: the 1x1 convolutions' bias (and weight) gradients, the loss means, the centred feature
    correlation's ``fd.mean()``, the calibration quantiles' inputs. With 1 vs 2 threads a learner's weights
    drifted 5e-5..9e-5 apart in 20 steps (and the codes of equal weights 5e-6 apart); on one thread both are
    bit-identical whatever the caller's thread count. CUDA runs unchanged.
    """
    if device.type == "cpu":
        with one_thread():
            yield
    else:
        yield


def resolve_steps(steps: int, epochs: float | None, n_views: int, batch_size: int) -> int:
    """Number of optimisation steps: ``epochs`` passes over the views when given, else ``steps``."""
    if epochs is not None:
        return max(1, math.ceil(epochs * n_views / batch_size))
    return steps


@dataclass
class ViewBank:
    """Cached feature maps of a dataset, padded into one tensor, and the square training views on them.

    tokens (N, Hmax, Wmax, C) float16 on ``store``; grids (N, 2) int64 on CPU; ``views`` (V, 3) rows of
    (image, top, left) for five-crop mode (None in random mode, where V = N and windows are drawn anew).
    ``extras`` holds more per-patch maps laid out like ``tokens`` (e.g. HP's local attention weights).
    """

    tokens: torch.Tensor
    grids: torch.Tensor
    crop: int
    mode: str
    device: torch.device
    views: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_views(self) -> int:
        return int(self.views.shape[0]) if self.views is not None else self.n_images

    @property
    def channels(self) -> int:
        return int(self.tokens.shape[-1])

    def windows(self, view_idx: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """(image, top, left) int64 CPU tensors of the given views (random windows in random mode)."""
        view_idx = view_idx.long().cpu()
        if self.views is not None:
            v = self.views[view_idx]
            return v[:, 0], v[:, 1], v[:, 2]
        span = self.grids[view_idx] - self.crop + 1  # valid offsets per axis
        u = torch.rand(len(view_idx), 2, generator=generator)
        off = (u * span).long().clamp_max(span - 1)
        return view_idx, off[:, 0], off[:, 1]

    def gather(self, name: str, image: torch.Tensor, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        """The windows of map ``name`` ('tokens' or an extra) as (B, crop, crop, X) float32 on the device."""
        src = self.tokens if name == "tokens" else self.extras[name]
        ar = torch.arange(self.crop)
        rows = (top[:, None] + ar[None]).to(src.device)
        cols = (left[:, None] + ar[None]).to(src.device)
        out = src[image.to(src.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
        return out.to(self.device, torch.float32, non_blocking=True)

    def pooled(self) -> torch.Tensor:
        """(V, C) float32 mean token of every view (of the whole image in random mode)."""
        out = torch.empty(self.n_views, self.channels)
        if self.views is None:
            for i, (h, w) in enumerate(self.grids.tolist()):
                out[i] = self.tokens[i, :h, :w].float().mean((0, 1)).cpu()
        else:
            c = self.crop
            for j, (i, t, l) in enumerate(self.views.tolist()):
                out[j] = self.tokens[i, t : t + c, l : l + c].float().mean((0, 1)).cpu()
        return out


def five_crop_views(grids: torch.Tensor, crop: int) -> torch.Tensor:
    """(V, 3) rows (image, top, left): the four corner windows and the centre window of every image, each
    distinct window once (V <= 5N). Where the window spans a grid side the corners coincide; repeated, they
    would be duplicate training views, each other's nearest neighbours in the kNN table (STEGO's kNN term
    would then mostly pair a window with itself) and extra passes in an epoch."""
    rows = []
    for i, (h, w) in enumerate(grids.tolist()):
        corners = (
            (0, 0),
            (0, w - crop),
            (h - crop, 0),
            (h - crop, w - crop),
            ((h - crop) // 2, (w - crop) // 2),
        )
        rows.extend((i, t, l) for t, l in dict.fromkeys(corners))
    return torch.tensor(rows, dtype=torch.long)


def build_bank(features: FeatureSet, crop_size: int, crop_mode: str, device: torch.device) -> ViewBank:
    """Pad the set's tokens into one tensor (on the device when it fits in a quarter of free memory)."""
    if len(features) == 0:
        raise ValueError("feature learner: the feature set is empty")
    if crop_mode not in CROP_MODES:
        raise ConfigError(f"crop_mode must be one of {CROP_MODES}, got {crop_mode!r}")
    grids = torch.tensor([im.grid for im in features], dtype=torch.long)
    crop = min(int(crop_size), int(grids.min()))
    if crop < 1:
        raise ConfigError(f"crop_size must be >= 1, got {crop_size}")
    n, (hmax, wmax) = len(features), grids.max(0).values.tolist()
    c = int(features[0].tokens.shape[-1])
    nbytes = n * hmax * wmax * c * 2
    store = torch.device("cpu")
    if device.type == "cuda" and nbytes < torch.cuda.mem_get_info(device)[0] // 4:
        store = device
    tokens = torch.zeros(n, hmax, wmax, c, dtype=torch.float16, device=store)
    for i, im in enumerate(features):
        h, w = im.grid
        tokens[i, :h, :w] = im.tokens.to(store, torch.float16)
    views = five_crop_views(grids, crop) if crop_mode == "five" else None
    if views is not None and len(views) < 5 * n:
        log.warning(
            "five-crop: the %d-patch window spans a side of %d of %d feature grids, so their corner windows "
            "coincide: %d distinct views instead of %d (the references' five crops are half the image side: "
            "extract features at a larger resolution, or lower crop_size)",
            crop, int((grids <= crop).any(1).sum()), n, len(views), 5 * n,
        )  # fmt: skip
    return ViewBank(tokens, grids, crop, crop_mode, device, views)


def knn_table(pooled: torch.Tensor, device: torch.device, k: int = KNN_K, chunk: int = 4096) -> torch.Tensor:
    """(V, min(k, V-1)) int64 CPU: cosine nearest neighbours of each row, itself excluded, nearest first."""
    v = int(pooled.shape[0])
    k = min(k, v - 1)
    if k < 1:
        raise ValueError(f"kNN positives need at least 2 views, got {v}")
    x = torch.nn.functional.normalize(pooled.float().to(device), dim=1)
    out = []
    for start in range(0, v, chunk):
        sim = x[start : start + chunk] @ x.t()
        rows = torch.arange(sim.shape[0], device=device)
        sim[rows, rows + start] = -float("inf")
        out.append(sim.topk(k, dim=1).indices.cpu())
    return torch.cat(out)


class ViewSampler:
    """Batches of view indices: shuffled passes over all views (seeded), wrapping across passes."""

    def __init__(self, n_views: int, batch_size: int, generator: torch.Generator):
        self.n_views = n_views
        self.batch_size = min(batch_size, n_views)
        self.generator = generator
        self._order = torch.empty(0, dtype=torch.long)

    def next(self) -> torch.Tensor:
        while len(self._order) < self.batch_size:
            self._order = torch.cat([self._order, torch.randperm(self.n_views, generator=self.generator)])
        batch, self._order = self._order[: self.batch_size], self._order[self.batch_size :]
        return batch


def derangement(n: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random permutation without fixed points (one random cycle through all n >= 2 indices).

    With a (CPU) ``generator`` the draw comes from it, else from the device's global generator.
    """
    if generator is not None:
        order = torch.randperm(n, generator=generator).to(device)
    else:
        order = torch.randperm(n, device=device)
    perm = torch.empty_like(order)
    perm[order] = order.roll(1)
    return perm


def encode_maps(
    features: FeatureSet,
    fn: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    batch_size: int = 32,
) -> list[torch.Tensor]:
    """Apply ``fn`` ((B, C, h, w) float32 -> (B, D, h, w)) to every image's tokens, batched by grid size."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, im in enumerate(features):
        groups[im.grid].append(i)
    out: list[torch.Tensor | None] = [None] * len(features)
    with torch.no_grad():
        for members in groups.values():
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                x = torch.stack([features[i].tokens for i in chunk]).to(device, torch.float32)
                code = fn(x.permute(0, 3, 1, 2).contiguous())
                code = code.permute(0, 2, 3, 1).to("cpu", torch.float32)
                for j, i in enumerate(chunk):
                    out[i] = code[j].contiguous()
    return [c for c in out if c is not None]


@dataclass
class LossLog:
    """Per-step training losses, kept as device scalars while training and converted once at the end."""

    names: list[str] = field(default_factory=list)
    rows: list[torch.Tensor] = field(default_factory=list)

    def append(self, values: dict[str, torch.Tensor]) -> None:
        if not self.names:
            self.names = list(values)
        self.rows.append(torch.stack([values[n].detach().float().reshape(()) for n in self.names]))

    def as_dict(self) -> dict[str, list[float]]:
        if not self.rows:
            return {}
        table = torch.stack(self.rows).cpu().numpy()
        return {n: table[:, j].astype(float).tolist() for j, n in enumerate(self.names)}


def check_common_params(**params: Any) -> None:
    """Validate the training parameters shared by all head learners (one error naming the parameter)."""
    positive_int = ("dim", "steps", "batch_size", "crop_size", "curve_every")
    for name in positive_int:
        if name in params and (not isinstance(params[name], int) or params[name] < 1):
            raise ConfigError(f"{name} must be an integer >= 1, got {params[name]!r}")
    if "checkpoints" in params and (not isinstance(params["checkpoints"], int) or params["checkpoints"] < 0):
        raise ConfigError(f"checkpoints must be an integer >= 0, got {params['checkpoints']!r}")
    if params.get("epochs") is not None and params["epochs"] <= 0:
        raise ConfigError(f"epochs must be > 0 or null, got {params['epochs']!r}")
    if params.get("num_classes") is not None and params["num_classes"] < 1:
        raise ConfigError(f"num_classes must be >= 1, got {params['num_classes']!r}")
    for name in ("lr", "omh_lr"):
        if name in params and params[name] <= 0:
            raise ConfigError(f"{name} must be > 0, got {params[name]!r}")
    if "dropout" in params and not 0.0 <= params["dropout"] < 1.0:
        raise ConfigError(f"dropout must lie in [0, 1), got {params['dropout']!r}")
    if params.get("crop_mode", "random") not in CROP_MODES:
        raise ConfigError(f"crop_mode must be one of {CROP_MODES}, got {params['crop_mode']!r}")
    check_omh_params(**{k: v for k, v in params.items() if k.startswith("omh")})


def checkpoint_steps(n_steps: int, checkpoints: int) -> list[int]:
    """Steps done at which a head snapshot is kept: 0 (untrained) and ``checkpoints`` evenly spaced up to n."""
    if checkpoints < 1:
        return []
    return sorted({round(n_steps * i / checkpoints) for i in range(checkpoints + 1)})


@dataclass
class Curve:
    """The learning curve: every ``every`` steps the mean loss parts since the last point and the codes' health."""

    every: int
    points: dict[str, list[float]] = field(default_factory=dict)

    def add(self, step: int, values: dict[str, float]) -> None:
        """Append a point; series stay aligned with ``step`` (NaN where a point lacks a value, e.g. step 0's loss)."""
        n = len(self.points.setdefault("step", []))
        self.points["step"].append(float(step))
        for name, value in values.items():
            self.points.setdefault(name, [math.nan] * n).append(float(value))
        for series in self.points.values():
            if len(series) == n:
                series.append(math.nan)

    def last(self, name: str) -> float:
        values = self.points.get(name) or [math.nan]
        return values[-1]


class HeadLearner(FeatureLearner, abc.ABC):
    """Template for learners that train heads on cached features: fit = seeded loop, transform = encode.

    Subclasses implement ``_setup`` (modules and optimisers), ``_draw`` (gather the next batch from the
    bank), ``_loss_on`` (a batch's base loss, the code map OMH clusters, and named parts for the log) and
    ``_encode`` (test-time code); optional hooks
    ``_calibrate`` (settings left at 'auto', measured on the features before training), ``_before_step``
    (gradient clipping), ``_after_step`` (EMA updates) and ``_prototypes`` (for the assignment entropy).
    With ``omh=True`` the OMH heads are trained beside the method's own modules and discarded at test time.

    Every ``curve_every`` steps the mean loss parts and the health of the codes of a fixed probe of patches
    (:mod:`.health`) are recorded (``artifacts()["curve"]``); ``checkpoints`` evenly spaced snapshots of the
    test-time modules (plus the untrained one) are kept in memory for :meth:`transform_at` (evaluation
    only: the learner always returns its last step). A collapsed run logs one warning line.
    """

    display = "head learner"
    version = "2"  # 2: calibrated settings ('auto'), balanced OMH, health curve, calibration-generator draws
    _snapshot_attrs: tuple[str, ...] = ("head_",)  # what _encode reads (modules or tensors)

    def _set_params(self, params: dict[str, Any]) -> None:
        params = {k: v for k, v in params.items() if k not in ("self", "__class__")}
        check_common_params(**params)
        for key, value in params.items():
            setattr(self, key, value)

    # -- hooks ------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def _setup(
        self, bank: ViewBank, features: FeatureSet, ctx: StageContext, n_classes: int, n_steps: int
    ) -> list[Any]:
        """Build modules on ``bank.device`` (and extra per-patch maps in ``bank.extras``); return optimisers."""

    @abc.abstractmethod
    def _draw(self, step: int) -> Any:
        """The next training batch, gathered from the bank (everything the loss reads that is not a module)."""

    @abc.abstractmethod
    def _loss_on(self, batch: Any, step: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The base loss of a drawn batch: (base loss, code map (B, D, h, w) for OMH, named loss parts)."""

    def train_step(self, batch: Any, step: int, optimisers: Sequence[Any]) -> dict[str, torch.Tensor]:
        """One optimisation step on a drawn batch (base loss + OMH terms, backward, clip, optimisers, EMA)."""
        for opt in optimisers:
            opt.zero_grad(set_to_none=True)
        base, code, parts = self._loss_on(batch, step)
        loss = base
        values = {"loss": loss, "base": base, **parts}
        if self.omh_heads_ is not None:
            cluster, match = self.omh_heads_.losses(code, with_match=self.omh_match)
            loss = base + self.omh_sparsity * cluster + self.omh_structure * match
            values.update(loss=loss, omh_cluster=cluster, omh_match=match)
        loss.backward()
        self._before_step()
        for opt in optimisers:
            opt.step()
        self._after_step(step)
        return values

    @abc.abstractmethod
    def _encode(self, feats: torch.Tensor) -> torch.Tensor:
        """Test-time code: (B, C, h, w) float32 -> (B, D, h, w)."""

    def _calibrate(self) -> dict[str, Any]:
        """Settings resolved before training (calibrated where 'auto', else as given); runs after _setup."""
        return {}

    def _before_step(self) -> None:
        return None

    def _after_step(self, step: int) -> None:
        return None

    def _prototypes(self) -> torch.Tensor | None:
        """Prototypes whose arg-max usage the health curve reports (the first OMH level by default)."""
        heads = getattr(self, "omh_heads_", None)
        return heads.heads[0].weight.detach() if heads is not None else None

    # -- FeatureLearner API -----------------------------------------------------------------------------
    def fit(self, features: FeatureSet, ctx: StageContext) -> HeadLearner:
        device = ctx.device
        n_classes = int(self.num_classes or ctx.num_classes)
        with seeded(self.seed, device), thread_invariant(device):
            self.bank_ = build_bank(features, self.crop_size, self.crop_mode, device)
            self.generator_ = torch.Generator().manual_seed(int(self.seed))
            self.sampler_ = ViewSampler(self.bank_.n_views, self.batch_size, self.generator_)
            self.n_steps_ = resolve_steps(
                self.steps, self.epochs, self.bank_.n_views, self.sampler_.batch_size
            )
            optimisers = self._setup(self.bank_, features, ctx, n_classes, self.n_steps_)
            self.resolved_ = self._calibrate()
            self.omh_heads_ = None
            if self.omh:
                self.omh_heads_ = OMHHeads(
                    n_classes, self.dim, self.omh_levels, self.omh_expansion, self.omh_epsilon,
                    self.omh_sinkhorn_iters, init=self._omh_init, balance=self.omh_balance,
                ).to(device)  # fmt: skip
                optimisers.append(torch.optim.Adam(self.omh_heads_.parameters(), lr=self.omh_lr))
            index = health.probe_indices([im.grid for im in features])
            self.probe_ = health.gather_probe([im.tokens for im in features], index).to(device)
            self.input_rank_ = health.effective_rank(self.probe_)
            self.snapshots_: list[tuple[int, dict[str, Any]]] = []
            self.loss_log_, self.curve_ = self._train(optimisers, ctx.progress)
        del self.bank_, self.probe_  # the padded copy of the features is not needed after training
        initial = self.curve_.points["effective_rank"][0]
        self.collapsed_ = health.is_collapsed(self.curve_.last("effective_rank"), initial)
        if self.collapsed_:
            log.warning(
                "%s: codes collapsed (effective rank %.1f after %d steps, %.1f untrained, %d dimensions; mean "
                "cosine %.2f); its scores measure a collapsed code",
                self.plugin_name or self.display, self.curve_.last("effective_rank"), self.n_steps_, initial,
                self.dim, self.curve_.last("mean_cosine"),
            )  # fmt: skip
        return self

    _omh_init = "randn"

    @torch.no_grad()
    def _health(self) -> dict[str, float]:
        """Health of the current test-time codes of the probe patches (modules briefly in eval mode)."""
        modules = [
            m for m in (getattr(self, a, None) for a in self._snapshot_attrs) if isinstance(m, nn.Module)
        ]
        modes = [m.training for m in modules]
        code = self._encode(self.probe_[:, :, None, None])[:, :, 0, 0]
        for m, mode in zip(modules, modes):
            m.train(mode)
        return health.code_health(code, self._prototypes())

    def _capture(self) -> dict[str, Any]:
        out = {}
        for attr in self._snapshot_attrs:
            obj = getattr(self, attr)
            out[attr] = (
                copy.deepcopy(obj.state_dict()) if isinstance(obj, nn.Module) else obj.detach().clone()
            )
        return out

    def _restore(self, state: dict[str, Any]) -> None:
        for attr, value in state.items():
            obj = getattr(self, attr)
            if isinstance(obj, nn.Module):
                obj.load_state_dict(value)
            else:
                obj.copy_(value)

    def _train(self, optimisers: Sequence[Any], progress: bool) -> tuple[LossLog, Curve]:
        log_ = LossLog()
        curve = Curve(self.curve_every)
        keep = set(checkpoint_steps(self.n_steps_, self.checkpoints))
        window: list[dict[str, torch.Tensor]] = []
        curve.add(0, self._health())
        if 0 in keep:
            self.snapshots_.append((0, self._capture()))
        bar = tqdm(range(self.n_steps_), desc=f"fit {self.plugin_name or self.display}", disable=not progress)
        for step in bar:
            values = self.train_step(self._draw(step), step, optimisers)
            log_.append(values)
            window.append(values)
            done = step + 1
            if done % self.curve_every == 0 or done == self.n_steps_:
                means = {
                    k: float(torch.stack([w[k].detach().float() for w in window]).mean()) for k in values
                }
                window.clear()
                if not math.isfinite(means["loss"]):
                    raise NumericalError(
                        f"{self.plugin_name}: training loss became {means['loss']} by step {done}; lower lr or check features"
                    )
                curve.add(done, {**means, **self._health()})
                bar.set_postfix_str(f"loss {means['loss']:.4f} rank {curve.last('effective_rank'):.1f}")
            if done in keep:
                self.snapshots_.append((done, self._capture()))
        bar.close()
        return log_, curve

    def transform(self, features: FeatureSet, ctx: StageContext) -> FeatureSet:
        if not hasattr(self, "loss_log_"):
            raise RuntimeError(f"{self.plugin_name}: call fit() before transform()")
        with thread_invariant(ctx.device):  # the 1x1 convolutions' CPU kernels differ by thread count too
            codes = encode_maps(features, self._encode, ctx.device)
        return features.with_code(codes, learner=self.plugin_name)

    def transform_at(self, index: int, features: FeatureSet, ctx: StageContext) -> FeatureSet:
        """Codes of the ``index``-th kept snapshot (step ``snapshots_[index][0]``); the learner is unchanged."""
        current = self._capture()
        self._restore(self.snapshots_[index][1])
        try:
            return self.transform(features, ctx)
        finally:
            self._restore(current)

    def artifacts(self) -> dict[str, Any]:
        if not hasattr(self, "loss_log_"):
            return {}
        out: dict[str, Any] = {
            "loss": self.loss_log_.as_dict(),
            "curve": dict(self.curve_.points),
            "calibrated": dict(self.resolved_),
            "health": {
                "input_effective_rank": self.input_rank_,
                "initial_effective_rank": self.curve_.points["effective_rank"][0],
                "final": {k: v[-1] for k, v in self.curve_.points.items() if k in health.HEALTH_KEYS},
                "collapsed": bool(self.collapsed_),
                "steps": int(self.n_steps_),
            },
        }
        if getattr(self, "omh_heads_", None) is not None:
            out["omh"] = self.omh_heads_.hierarchy()
        return out
