"""Shared settings of the numba kernels (ACG's pixel attention and modularity), so every kernel compiles alike.

FASTMATH holds only the flags the kernels need to vectorise their reductions: 'reassoc' (a sum may be split
into SIMD lanes) and 'contract' (fused multiply-add). numba's ``fastmath=True`` also sets 'nsz', 'arcp',
'afn', 'nnan' and 'ninf'; with 'nsz' + 'reassoc' a kernel JIT-compiled in this process and the same kernel
loaded from numba's on-disk cache (``cache=True``) give different float32 results on the same input
(measured 2026-11-30, numba 0.68.1, AMD EPYC AVX-512). ACG amplifies that difference over training, so a fresh
clone's first run (compiling) and every later run (loading) disagreed: ACG + k-means seed 0 on MSRC-v2 gave
12.26 vs 17.07 mIoU. With {'reassoc', 'contract'} both paths agree bit for bit at the same speed (7.8 ms per
attention forward + backward on 64 images, 2 cores; 47.7 ms without fastmath).
``tests/test_numba_determinism.py`` compiles in one process and loads from the cache in another.
"""

from __future__ import annotations

import os

import torch

try:
    import numba
except ImportError:  # pragma: no cover - exercised only without numba
    numba = None

FASTMATH = frozenset({"reassoc", "contract"})

# numba's parallel loops run on its own 'workqueue' pool, not on OpenMP: with the 'omp' layer (numba's default
# where an OpenMP runtime is found) numba and torch share one OpenMP runtime, and on an Intel Xeon (2026-12-01)
# an ACG fit then gave different weights from the same fit run earlier in the same process (fp32 and bf16; not
# with 'workqueue', nor without the numba kernels), so a cell's result depended on what ran before it. The
# kernels parallelise over images; the ACG study preset ran about 15% slower on this pool (median of 3 runs
# each, docs/reproducibility.md). A user's NUMBA_THREADING_LAYER wins; it takes effect before the first parallel
# call only.
if numba is not None and "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"


def match_torch_threads() -> None:
    """numba's parallel loops use as many threads as torch does (never more than numba's pool holds)."""
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
