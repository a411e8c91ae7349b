"""ACG's numba kernels give the same bits whether JIT-compiled in the process or loaded from numba's disk cache.

With ``fastmath=True`` they did not (see ``ussbench/image_clusterers/_jit.py``): a fresh clone's first run and
every later run then trained different ACG models from the same features.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba")

REPO = Path(__file__).resolve().parents[1]

KERNEL_RUN = """
import hashlib, numpy as np, torch
torch.set_num_threads(2)
from ussbench.image_clusterers import _modularity as mod, _pixel_attention as pa
rng = np.random.default_rng(0)
b, M, C, P = 8, 6, 384, 300
q = rng.standard_normal((b, M, C)).astype(np.float32)
x = (rng.standard_normal((b, P, C)) * 0.1).astype(np.float32)
lengths = rng.integers(150, P, b).astype(np.int64)
att = np.empty((b, M, P), np.float32); r = np.empty((b, M, C), np.float32); dq = np.empty_like(q)
pa.match_torch_threads()
pa._attend_kernel(q, x, lengths, att, r)
pa._attend_backward_kernel(r, att, x, lengths, dq)
S = torch.from_numpy(rng.random((b, P, M)).astype(np.float32)).softmax(-1)
G = mod.modularity_graph(torch.from_numpy(x))
qm, H = mod._max_intensity_numba(S.transpose(1, 2), G, torch.from_numpy(lengths))
blob = b"".join(a.tobytes() for a in (att, r, dq, qm.numpy(), H.numpy()))
print(hashlib.sha1(blob).hexdigest())
"""


def _run(cache_dir: Path) -> str:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", KERNEL_RUN], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_compiled_and_cache_loaded_kernels_agree_bit_for_bit(tmp_path: Path) -> None:
    compiled = _run(tmp_path)
    cached_files = list(tmp_path.rglob("*.nbc"))
    assert len(cached_files) >= 3, "the first run should have written the three kernels to numba's cache"
    loaded = _run(tmp_path)
    assert loaded == compiled
