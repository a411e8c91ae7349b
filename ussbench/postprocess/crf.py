"""Dense CRF post-process (pydensecrf2) with the STEGO reference constants, and a pooled batch helper.

The STEGO family (STEGO, HP, SmooSeg, EAGLE, ...) refines each prediction with the same fully connected
CRF (reference study §1.6): 10 mean-field iterations, Gaussian kernel sxy=1 compat=3, bilateral kernel
sxy=67 srgb=3 compat=4, image fed as BGR uint8, unary from the softmax of the cluster logits. STEGO's
evaluation runs it in a worker pool, which can hang (STEGO #16), so :func:`crf_batch` bounds the pool with
a timeout and finishes serially, with a warning, whatever the pool did not return.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..base import PostProcess
from ..errors import ConfigError
from ..registry import register
from ._crf_core import CRFParams, dense_crf, run_task

log = logging.getLogger(__name__)
STARTUP_TIMEOUT_S = 60.0  # longest wait for a fresh pool's workers to answer

ScoreKind = Literal["auto", "probs", "logits"]
StartMethod = Literal["forkserver", "spawn", "fork"]

# DSM's CRF: SimpleCRF densecrf(image, one_hot, (w1=10, alpha=80, beta=13, w2=3, gamma=3, it=5)) on hard
# labels; SimpleCRF clips the one-hot to [0.01, 0.99]. Translated to pydensecrf's names.
DSM_PRESET = {
    "max_iter": 5,
    "pos_xy_std": 3.0,
    "pos_w": 3.0,
    "bi_xy_std": 80.0,
    "bi_rgb_std": 13.0,
    "bi_w": 10.0,
    "use_probs": False,
    "label_unary": "clipped_onehot",
}
STEGO_PRESET = {
    "max_iter": 10,
    "pos_xy_std": 1.0,
    "pos_w": 3.0,
    "bi_xy_std": 67.0,
    "bi_rgb_std": 3.0,
    "bi_w": 4.0,
    "use_probs": True,
}


def default_workers() -> int:
    """Pool size: the usable CPUs, at most 8 (STEGO's eval used a small pool)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


def _main_importable() -> bool:
    """Whether spawn/forkserver workers can re-import the parent's __main__ (not so for stdin scripts)."""
    main = sys.modules.get("__main__")
    if main is None or getattr(getattr(main, "__spec__", None), "name", None):
        return True
    path = getattr(main, "__file__", None)
    return path is None or os.path.isfile(path)


def _check_image(image: np.ndarray, where: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{where}: image must be (H, W, 3), got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"{where}: image must be uint8 RGB, got dtype {image.dtype}")
    return image


def _check_labels(labels: np.ndarray, shape: tuple[int, int], n_labels: int, where: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != shape:
        raise ValueError(f"{where}: labels shape {labels.shape} does not match the image's {shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= n_labels):
        raise ValueError(
            f"{where}: labels must lie in [0, n_labels={n_labels}), got [{labels.min()}, {labels.max()}]"
        )
    return labels.astype(np.int64, copy=False)


def prepare_probs(
    scores: np.ndarray | torch.Tensor, size: tuple[int, int], kind: ScoreKind = "auto"
) -> np.ndarray:
    """Soft scores (K, h, w) -> probabilities (K, H, W) float32 at the image size.

    Logits (e.g. the cluster probe's log_softmax(2 cos)) are bilinearly upsampled, then softmaxed, as the
    reference does; probabilities are upsampled and renormalised. 'auto' calls scores probabilities when
    they are non-negative and sum to 1 over K, logits otherwise.
    """
    s = torch.as_tensor(np.asarray(scores) if not isinstance(scores, torch.Tensor) else scores)
    s = s.detach().float().cpu()
    if s.ndim != 3:
        raise ValueError(f"crf: probs must be (n_labels, H, W), got shape {tuple(s.shape)}")
    if kind == "auto":
        is_prob = bool((s >= 0).all()) and bool(torch.allclose(s.sum(0), torch.ones(()), atol=1e-3))
        kind = "probs" if is_prob else "logits"
    if tuple(s.shape[1:]) != tuple(size):
        s = F.interpolate(s[None], size=tuple(size), mode="bilinear", align_corners=False)[0]
    if kind == "logits":
        s = torch.softmax(s, dim=0)
    elif kind == "probs":
        s = s.clamp_min(0)
        s = s / s.sum(0, keepdim=True).clamp_min(1e-12)
    else:
        raise ValueError(f"crf: scores must be 'auto', 'probs' or 'logits', got {kind!r}")
    return np.ascontiguousarray(s.numpy(), dtype=np.float32)


class CRFPool:
    """A reusable process pool for CRF tasks; a pool that stops answering is killed (see ``map``).

    The default start method, forkserver, forks workers from a clean server process: safe after torch has
    started threads or CUDA, unlike 'fork'. Like 'spawn', its workers re-import the parent's ``__main__``
    (seconds when that imports torch, so reuse one pool across batches); a ``__main__`` that cannot be
    re-imported (a stdin script) is detected and the work runs serially instead of respawning dying workers.
    """

    def __init__(self, workers: int | None = None, start_method: StartMethod = "forkserver"):
        self.workers = default_workers() if workers is None else int(workers)
        if self.workers < 1:
            raise ConfigError(f"crf: workers must be >= 1 for a pool, got {self.workers}")
        self.start_method = start_method
        self._pool = None

    def _make_pool(self, timeout: float):
        if self.start_method in ("spawn", "forkserver") and not _main_importable():
            raise RuntimeError(
                f"__main__ ({getattr(sys.modules['__main__'], '__file__', None)!r}) cannot be re-imported by "
                f"{self.start_method} workers"
            )
        pool = multiprocessing.get_context(self.start_method).Pool(self.workers)
        try:  # workers that die at start-up make Pool respawn them forever: probe once
            pool.apply_async(os.getpid).get(timeout=min(timeout, STARTUP_TIMEOUT_S))
        except Exception:
            pool.terminate()
            pool.join()
            raise RuntimeError("workers did not start") from None
        return pool

    def map(self, make_task: Callable[[int], tuple], n: int, timeout: float) -> list[np.ndarray | None]:
        """Run tasks 0..n-1 (built lazily by ``make_task``, a bounded window in flight); entries the pool did
        not return are None. The pool counts as hung, and is killed, when no result arrives for ``timeout``
        seconds."""
        results: list[np.ndarray | None] = [None] * n
        if n == 0:
            return results
        try:
            if self._pool is None:
                self._pool = self._make_pool(timeout)
        except (OSError, RuntimeError, ValueError) as exc:
            log.warning("crf: could not start a worker pool (%s); running serially", exc)
            return results
        window = 4 * self.workers
        pending: deque[tuple[int, Any]] = deque()
        submitted = 0
        hung = False
        while submitted < n or pending:
            while submitted < n and len(pending) < window:
                pending.append((submitted, self._pool.apply_async(run_task, (make_task(submitted),))))
                submitted += 1
            i, res = pending.popleft()
            try:
                results[i] = res.get(timeout=timeout)
            except multiprocessing.TimeoutError:
                hung = True
                break
            except Exception as exc:  # a worker died or a task could not be pickled: finish serially
                log.warning("crf: pool task %d failed (%s: %s)", i, type(exc).__name__, exc)
        if hung:
            self.terminate()
        return results

    def terminate(self) -> None:
        """Kill the workers now (a hung pool cannot be joined)."""
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> CRFPool:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is not None:
            self.terminate()
        else:
            self.close()


def crf_batch(
    images: Sequence[np.ndarray],
    labels_list: Sequence[np.ndarray],
    n_labels: int,
    probs_list: Sequence[np.ndarray | torch.Tensor | None] | None = None,
    workers: int | None = None,
    timeout: float = 600.0,
    params: CRFParams | None = None,
    scores: ScoreKind = "auto",
    pool: CRFPool | None = None,
    start_method: StartMethod = "forkserver",
) -> list[np.ndarray]:
    """CRF-refine many images in a process pool, finishing serially what the pool did not return.

    images: RGB uint8 (H, W, 3); labels_list: (H, W) ints in [0, n_labels) (the unary when an image has no
    probs); probs_list: per image soft scores (n_labels, h, w) or None (see :func:`prepare_probs`);
    workers <= 1 runs serially (workers=None: up to 8, serial below 2 images per worker); pool: a
    :class:`CRFPool` to reuse across calls (start-up costs seconds); timeout: seconds without any result before the pool counts as hung and is
    killed. Returns refined (H, W) int64 label maps in order; every fallback logs a warning.
    """
    n = len(images)
    if len(labels_list) != n:
        raise ValueError(f"crf_batch: {n} images but {len(labels_list)} label maps")
    if probs_list is not None and len(probs_list) != n:
        raise ValueError(f"crf_batch: {n} images but {len(probs_list)} probability maps")
    if timeout <= 0:
        raise ConfigError(f"crf_batch: timeout must be > 0 seconds, got {timeout}")
    params = params or CRFParams()

    def make_task(i: int) -> tuple:
        where = f"crf_batch image {i}"
        image = _check_image(images[i], where)
        labels = _check_labels(labels_list[i], image.shape[:2], n_labels, where)
        probs = None if probs_list is None else probs_list[i]
        if probs is not None:
            probs = prepare_probs(probs, image.shape[:2], scores)
            if probs.shape[0] != n_labels:
                raise ValueError(f"{where}: probs have {probs.shape[0]} labels, n_labels is {n_labels}")
        return image, n_labels, params, labels, probs

    if n_labels < 2:  # a single label: nothing to refine
        return [make_task(i)[3].copy() for i in range(n)]
    for i in range(n):  # validate everything before any work starts
        _check_labels(labels_list[i], _check_image(images[i], f"crf_batch image {i}").shape[:2], n_labels,
                      f"crf_batch image {i}")  # fmt: skip

    n_workers = default_workers() if workers is None else int(workers)
    if workers is None and pool is None and n < 2 * n_workers:
        n_workers = 1  # starting workers (they re-import __main__) costs more than a few CRFs
    results: list[np.ndarray | None] = [None] * n
    if n and (pool is not None or n_workers > 1):
        own = pool is None
        pool = pool or CRFPool(n_workers, start_method)
        try:
            results = pool.map(make_task, n, timeout)
        finally:
            if own:
                pool.terminate()
        missing = sum(r is None for r in results)
        if missing:
            log.warning(
                "crf: worker pool returned %d of %d images (timeout %.3g s); computing %d serially",
                n - missing, n, timeout, missing,
            )  # fmt: skip
    return [r if r is not None else run_task(make_task(i)) for i, r in enumerate(results)]


@register("postprocess", "crf", presets={"stego": STEGO_PRESET, "dsm": DSM_PRESET})
class DenseCRF(PostProcess):
    """Dense CRF (pydensecrf2) with STEGO's constants: 10 iters, Gaussian 1/3, bilateral 67/3/4."""

    def __init__(
        self,
        max_iter: int = 10,
        pos_xy_std: float = 1.0,
        pos_w: float = 3.0,
        bi_xy_std: float = 67.0,
        bi_rgb_std: float = 3.0,
        bi_w: float = 4.0,
        use_probs: bool = True,
        scores: Literal["auto", "probs", "logits"] = "auto",
        gt_prob: float = 0.9,
        label_unary: Literal["gt_prob", "clipped_onehot"] = "gt_prob",
        workers: int | None = None,
        timeout: float = 600.0,
        start_method: Literal["forkserver", "spawn", "fork"] = "forkserver",
    ):
        if max_iter < 1:
            raise ConfigError(f"crf: max_iter must be >= 1, got {max_iter}")
        for name, value in (("pos_xy_std", pos_xy_std), ("bi_xy_std", bi_xy_std), ("bi_rgb_std", bi_rgb_std)):
            if value <= 0:
                raise ConfigError(f"crf: {name} must be > 0, got {value}")
        if not 0.0 < gt_prob < 1.0:
            raise ConfigError(f"crf: gt_prob must lie in (0, 1), got {gt_prob}")
        if scores not in ("auto", "probs", "logits"):
            raise ConfigError(f"crf: scores must be 'auto', 'probs' or 'logits', got {scores!r}")
        if label_unary not in ("gt_prob", "clipped_onehot"):
            raise ConfigError(f"crf: label_unary must be 'gt_prob' or 'clipped_onehot', got {label_unary!r}")
        if timeout <= 0:
            raise ConfigError(f"crf: timeout must be > 0 seconds, got {timeout}")
        if start_method not in ("forkserver", "spawn", "fork"):
            raise ConfigError(f"crf: start_method must be forkserver, spawn or fork, got {start_method!r}")
        self.max_iter = max_iter
        self.pos_xy_std = pos_xy_std
        self.pos_w = pos_w
        self.bi_xy_std = bi_xy_std
        self.bi_rgb_std = bi_rgb_std
        self.bi_w = bi_w
        self.use_probs = use_probs
        self.scores = scores
        self.gt_prob = gt_prob
        self.label_unary = label_unary
        self.workers = workers
        self.timeout = timeout
        self.start_method = start_method

    @property
    def params(self) -> CRFParams:
        return CRFParams(
            max_iter=self.max_iter, pos_xy_std=self.pos_xy_std, pos_w=self.pos_w, bi_xy_std=self.bi_xy_std,
            bi_rgb_std=self.bi_rgb_std, bi_w=self.bi_w, gt_prob=self.gt_prob, label_unary=self.label_unary,
        )  # fmt: skip

    def apply(
        self, image: np.ndarray, labels: np.ndarray, n_labels: int, probs: np.ndarray | None = None
    ) -> np.ndarray:
        image = _check_image(image, "crf")
        labels = _check_labels(labels, image.shape[:2], n_labels, "crf")
        if n_labels < 2:
            return labels.copy()
        if probs is not None and self.use_probs:
            p = prepare_probs(probs, image.shape[:2], self.scores)
            if p.shape[0] != n_labels:
                raise ValueError(f"crf: probs have {p.shape[0]} labels, n_labels is {n_labels}")
            return dense_crf(image, n_labels, self.params, probs=p)
        return dense_crf(image, n_labels, self.params, labels=labels)

    def apply_batch(
        self,
        images: Sequence[np.ndarray],
        labels_list: Sequence[np.ndarray],
        n_labels: int,
        probs_list: Sequence[np.ndarray | None] | None = None,
    ) -> list[np.ndarray]:
        """``apply`` over many images through the worker pool (timeout, serial fallback)."""
        return crf_batch(
            images, labels_list, n_labels, probs_list if self.use_probs else None, workers=self.workers,
            timeout=self.timeout, params=self.params, scores=self.scores, start_method=self.start_method,
        )  # fmt: skip
