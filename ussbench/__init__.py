"""ussbench: benchmark clustering strategies for unsupervised semantic segmentation on frozen ViT features."""

from __future__ import annotations

import os as _os

# Before any product runs: Intel MKL (torch's CPU BLAS) splits a GEMM's inner dimension over threads on some
# CPUs (an Intel Xeon with AMX: a (1536 x 3546) x (3546 x 384) weight gradient differs in the last bits with
# 1 and 2 threads), so ACG and HSG trained to different weights at different thread counts. MKL's strict
# conditional-numerical-reproducibility mode makes GEMM results independent of the thread count; MKL reads the
# setting once, at its first call. An explicit user setting wins. See docs/reproducibility.md.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

__version__ = "0.1.0"

from .registry import available, get, register  # noqa: E402

__all__ = ["__version__", "available", "get", "register"]
