"""Normalisation layers whose results do not depend on the number of CPU threads.

torch's CPU ``layer_norm`` backward and ``batch_norm`` (forward statistics and backward) sum over rows in
per-thread partial buffers, so the same step gives numbers that differ in the last bits with 1 or 2
threads (measured: weight gradients up to 2e-3 apart on a (64, 384, 384) input), and a trained image
clusterer (ACG, HSG) then cuts hundreds of images differently (docs/reproducibility.md). These drop-in
modules run exactly those kernels with one thread: the result is what torch computes on one thread, on
any machine and under any thread setting. Layer norm's forward, which normalises row by row, keeps all
threads. Same parameters, buffers and state-dict keys as the torch modules they replace; CUDA tensors and
inference (no grad) use torch's modules unchanged.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

_MKL_CBWR_ALL, _MKL_CBWR_STRICT = -1, 0x10000


def mkl_strict_reproducibility() -> bool | None:
    """Whether torch's MKL runs in strict CNR mode (GEMM results independent of the thread count; set by
    ``import ussbench`` through ``MKL_CBWR`` before MKL's first call). None when torch carries no MKL."""
    import ctypes

    try:
        lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
        get = lib.mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.restype = ctypes.c_int
    return bool(get(_MKL_CBWR_ALL) & _MKL_CBWR_STRICT)


_ONEDNN_BELOW_AMX = (
    "SSE41",
    "AVX",
    "AVX2",
    "AVX2_VNNI",
    "AVX2_VNNI_2",
    "AVX512_CORE",
    "AVX512_CORE_VNNI",
    "AVX512_CORE_BF16",
    "AVX512_CORE_FP16",
)


def onednn_uses_amx() -> bool:
    """Whether torch's bf16 products run on oneDNN's AMX kernels here (an AMX CPU, ONEDNN_MAX_CPU_ISA not capping
    below it). Those kernels split a product's inner dimension by thread count, so bf16 *training* is not
    thread-invariant on such CPUs (measured on an Intel Xeon, 2026-12-01; see docs/reproducibility.md)."""
    from .cpuinfo import cpu_flag_set

    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    return "amx_bf16" in cpu_flag_set() and cap not in _ONEDNN_BELOW_AMX


def rowvec_linear(v: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``weight @ v + bias`` for one vector v (K,), computed as a one-row matrix product: ``weight @ v`` goes to
    BLAS's gemv, whose transposed form (the backward) MKL splits over threads (on an Intel Xeon v's gradient
    differed with 1 and 2 threads); a GEMM in MKL's strict mode does not."""
    return F.linear(v[None], weight, bias)[0]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU kernels on one intra-op thread inside the block (restored afterwards)."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, shape, eps):
        out, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)  # row by row: thread-invariant
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.shape = shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        with one_thread():  # the weight/bias gradients are cross-row sums
            gx, gw, gb = torch.ops.aten.native_layer_norm_backward(
                grad.contiguous(), x, ctx.shape, mean, rstd, weight, bias, mask
            )
        return gx, gw, gb, None, None


class ThreadInvariantLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose weight/bias gradients are taken on one thread (same forward, same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled() or x.device.type != "cpu" or self.weight is None:
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return _LayerNormFn.apply(x, self.weight, self.bias, list(self.normalized_shape), self.eps)


class _BatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, factor, eps):
        with one_thread():  # batch statistics are cross-row sums; the running buffers update in place
            out, save_mean, save_invstd = torch.native_batch_norm(
                x, weight, bias, running_mean, running_var, True, factor, eps
            )
        ctx.save_for_backward(x, weight, running_mean, running_var, save_mean, save_invstd)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, running_mean, running_var, save_mean, save_invstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]]
        with one_thread():
            gx, gw, gb = torch.ops.aten.native_batch_norm_backward(
                grad.contiguous(),
                x,
                weight,
                running_mean,
                running_var,
                save_mean,
                save_invstd,
                True,
                ctx.eps,
                mask,
            )
        return gx, gw, gb, None, None, None, None


class ThreadInvariantBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training-mode statistics and gradients are taken on one thread."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and x.device.type == "cpu" and self.track_running_stats and self.affine):
            return super().forward(x)
        self._check_input_dim(x)
        self.num_batches_tracked.add_(1)  # torch's exponential average factor, as nn.BatchNorm computes it
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return _BatchNormFn.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, factor, self.eps
        )
