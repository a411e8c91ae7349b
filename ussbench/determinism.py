"""Normalisation layers whose gradients do not depend on the number of CPU threads.

torch's CPU ``layer_norm`` and ``batch_norm`` backward kernels sum the weight and bias gradients over the
rows in per-thread partial buffers, so the same step gives gradients that differ in the last bits with 1 or
2 threads (measured: up to 2e-3 on a (64, 384, 384) input), and a trained image clusterer (ACG, HSG) then
cuts hundreds of images differently. These drop-in modules keep torch's forward (bit-identical outputs)
and torch's per-row input gradient, and sum the parameter gradients in float64 over a fixed order of rows
before rounding to the parameter's dtype, which makes them independent of the thread count (see
docs/reproducibility.md). Same parameters and state-dict keys as the torch modules they replace.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _column_sum(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Sum over every dimension but the last, in float64 (order effects stay far below float32 rounding)."""
    return x.reshape(-1, x.shape[-1]).double().sum(0).to(dtype)


class _LayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, shape, eps):
        out, mean, rstd = torch.native_layer_norm(x, shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.shape = shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gx = gw = gb = None
        grad = grad.contiguous()
        if need_x:  # per row: no cross-thread reduction
            gx = torch.ops.aten.native_layer_norm_backward(grad, x, ctx.shape, mean, rstd, weight, bias,
                                                           [True, False, False])[0]  # fmt: skip
        if need_w and weight is not None:
            gw = _column_sum(grad * ((x - mean) * rstd), weight.dtype).reshape(weight.shape)
        if need_b and bias is not None:
            gb = _column_sum(grad, bias.dtype).reshape(bias.shape)
        return gx, gw, gb, None, None


class ThreadInvariantLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` with thread-count-independent weight/bias gradients (same forward, same parameters)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            not torch.is_grad_enabled()
            or x.device.type != "cpu"
            or not self.elementwise_affine
            or len(self.normalized_shape) != 1
        ):
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)  # fmt: skip
        return _LayerNormFn.apply(x, self.weight, self.bias, list(self.normalized_shape), self.eps)


class _BatchNormFn(torch.autograd.Function):
    """Training-mode batch norm of (N, C) rows with float64 column sums (forward statistics and backward)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        n = x.shape[0]
        mean = _column_sum(x, torch.float64) / n
        centred = x.double() - mean
        var = _column_sum(centred * centred, torch.float64) / n
        rstd = torch.rsqrt(var + eps)
        xhat = (centred * rstd).to(x.dtype)
        out = xhat * weight + bias if weight is not None else xhat
        ctx.save_for_backward(xhat, weight, rstd.to(x.dtype))
        return out, mean.to(x.dtype), var.to(x.dtype)

    @staticmethod
    def backward(ctx, grad, _grad_mean, _grad_var):
        xhat, weight, rstd = ctx.saved_tensors
        n = xhat.shape[0]
        gb = _column_sum(grad, grad.dtype)
        gw = _column_sum(grad * xhat, grad.dtype)
        scale = rstd * (weight if weight is not None else 1.0) / n
        gx = scale * (n * grad - gb - xhat * gw) if ctx.needs_input_grad[0] else None
        return gx, gw if ctx.needs_input_grad[1] else None, gb if ctx.needs_input_grad[2] else None, None


class ThreadInvariantBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` on (N, C) rows whose training-mode statistics and gradients do not depend on the
    thread count (float64 column sums); running statistics, eval mode and parameters as torch's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            self.training
            and x.dim() == 2
            and x.device.type == "cpu"
            and self.affine
            and self.track_running_stats
        ):
            return super().forward(x)  # fmt: skip
        out, mean, var = _BatchNormFn.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            n = x.shape[0]
            self.running_mean.lerp_(mean, m)
            self.running_var.lerp_(var * n / max(n - 1, 1), m)
        return out
