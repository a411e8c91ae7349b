"""DSM's block-Krylov eigensolver: the eigenpairs of scipy's eigsh on graphs with a crowded spectrum, the dense
fallbacks, seeding, and identical DSM segmentations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ussbench.base import FeatureSet, ImageFeatures
from ussbench.image_clusterers import _krylov as kr
from ussbench.image_clusterers import _spectral as sp
from ussbench.image_clusterers.dsm import DeepSpectral


def crowded_graphs(B: int, P: int, seed: int, dim: int = 128) -> torch.Tensor:
    """Affinities max(f f^T, 0) of uncentred features around one mean (as DINOv2 keys: most pairwise cosines
    high), with a few groups: a few small Laplacian eigenvalues, then a cluster close to 1. Rank min(P, dim)."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(1, 1, dim, generator=g, dtype=torch.float64)
    groups = torch.randn(B, 5, dim, generator=g, dtype=torch.float64)
    member = torch.randint(5, (B, P), generator=g)
    feats = (
        3 * mean
        + groups.gather(1, member[..., None].expand(-1, -1, dim))
        + torch.randn(B, P, dim, generator=g, dtype=torch.float64)
    )
    return sp.feature_affinity(feats)


def dino_like_graphs(B: int, P: int, seed: int, dim: int = 384) -> torch.Tensor:
    """Affinities of features with a decaying spectrum (scale 1/j on dimension j) around a strong common mean:
    as MSRC-v2's DINOv2 keys, the Laplacian eigenvalues 2..20 crowd into [0.93, 1) with gaps down to 1e-5,
    and a block-Krylov basis of 81 vectors resolves them."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, dim + 1, dtype=torch.float64) ** -1.0
    mean = torch.randn(1, 1, dim, generator=g, dtype=torch.float64)
    z = torch.randn(B, P, dim, generator=g, dtype=torch.float64) * scale
    return sp.feature_affinity(3.0 * mean / mean.norm() * scale.norm() + z)


@pytest.fixture
def no_dense_fallback(monkeypatch):
    """Fail if the Krylov solver falls back to the dense one (the tests below must exercise the Krylov path)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the Krylov solver fell back to the dense solver")

    monkeypatch.setattr(sp, "eigh_smallest", refuse)
    monkeypatch.setattr(sp, "lapack_smallest", refuse)


def test_krylov_matches_eigsh_on_a_crowded_spectrum(no_dense_fallback):
    W = dino_like_graphs(3, 384, seed=0)
    evals, vecs = kr.krylov_smallest(W.float(), 20)
    assert evals.shape == (3, 20) and vecs.shape == (3, 384, 20) and vecs.dtype == torch.float32
    vecs = sp.fix_signs(vecs.double())
    for b in range(3):
        ref_vals, ref_vecs = sp.eigsh_smallest(W[b].numpy(), 20)
        assert np.diff(ref_vals[5:]).min() < 1e-4  # the test's point: crowded eigenvalues
        ref_vecs = sp.fix_signs(torch.from_numpy(ref_vecs))
        assert np.abs(evals[b].numpy() - ref_vals).max() < 1e-5
        assert float((vecs[b, :, 1:] - ref_vecs[:, 1:]).abs().max()) < 1e-4
        d = sp.degrees(W[b])
        torch.testing.assert_close((vecs[b] * d[:, None] * vecs[b]).sum(0), torch.ones(20, dtype=torch.float64),
                                   atol=1e-4, rtol=0)  # fmt: skip  # v^T D v = 1


def vector_error(vecs: torch.Tensor, ref: torch.Tensor) -> float:
    return float((sp.fix_signs(vecs.double())[..., 1:] - sp.fix_signs(ref)[..., 1:]).abs().max())


def test_unconverged_images_are_caught_and_solved_densely(monkeypatch):
    """A basis too small for the spectrum leaves vectors off by > 1e-4 (check off: tol = inf); the residual
    check sends exactly those images to the dense solver, whose pairs equal the reference."""
    W = dino_like_graphs(3, 384, seed=1)
    _, ref = sp.eigh_smallest(W, 20)
    unchecked = kr.krylov_smallest(W.float(), 20, block=20, steps=1, tol=float("inf"))[1]
    assert vector_error(unchecked, ref) > 1e-4
    dense_calls: list[int] = []
    dense = kr._dense_smallest
    monkeypatch.setattr(kr, "_dense_smallest", lambda W, k: (dense_calls.append(len(W)), dense(W, k))[1])
    checked = kr.krylov_smallest(W.float(), 20, block=20, steps=1)[1]
    assert vector_error(checked, ref) < 1e-4 and sum(dense_calls) >= 1
    # random graphs (wanted eigenvalues at the edge of a continuous bulk) do not converge in the default basis
    # either: every image is caught
    W = crowded_graphs(3, 200, seed=0, dim=256)
    _, ref = sp.eigh_smallest(W, 20)
    dense_calls.clear()
    assert vector_error(kr.krylov_smallest(W.float(), 20)[1], ref) < 1e-4 and sum(dense_calls) == 3


def test_krylov_is_fixed_by_its_seed(no_dense_fallback):
    W = dino_like_graphs(2, 200, seed=2).float()
    a, b, c = (kr.krylov_smallest(W, 12, seed=s) for s in (0, 0, 1))
    assert torch.equal(a[1], b[1]) and torch.equal(a[0], b[0])
    assert not torch.equal(a[1], c[1])


def test_small_or_degenerate_graphs_fall_back_to_the_dense_solver():
    small = crowded_graphs(2, 40, seed=3)  # 40 nodes < the 81-vector basis
    e, v = kr.krylov_smallest(small, 10)
    e_ref, v_ref = sp.eigh_smallest(small, 10)
    torch.testing.assert_close(e, e_ref)
    # three disconnected complete blocks: rank 3, the Krylov space ends after the start block
    blocks = torch.block_diag(*[torch.ones(50, 50, dtype=torch.float64)] * 3)[None].repeat(2, 1, 1)
    e, v = kr.krylov_smallest(blocks, 5)
    torch.testing.assert_close(e, sp.eigh_smallest(blocks, 5)[0])
    assert torch.isfinite(v).all()


def test_eigh_split_over_threads_equals_one_batched_call():
    H = torch.randn(7, 30, 30, dtype=torch.float64)
    H = H + H.transpose(1, 2)
    vals, vecs = kr._eigh_threads(H)
    ref_vals, ref_vecs = torch.linalg.eigh(H)
    torch.testing.assert_close(vals, ref_vals)
    torch.testing.assert_close(vecs.abs(), ref_vecs.abs())


def test_krylov_rejects_bad_arguments():
    with pytest.raises(ValueError, match="block"):
        kr.krylov_smallest(torch.eye(100)[None], 5, block=0)
    with pytest.raises(ValueError, match="eigenvectors"):
        kr.krylov_smallest(torch.eye(10)[None], 11)


def test_dsm_krylov_solver_gives_the_lapack_segmentations():
    g = torch.Generator().manual_seed(4)
    h, w, dim = 10, 12, 32
    regions = (torch.arange(w) * 4 // w).expand(h, w)  # 4 bands on a 10 x 12 grid (120 patches > 81)
    dirs = F.normalize(torch.randn(4, dim, generator=g), dim=1)
    ims = []
    for n in range(3):
        keys = (dirs[regions] + 0.3 * torch.randn(h, w, dim, generator=g)).half()
        ims.append(
            ImageFeatures(f"im{n}", keys, keys, torch.zeros(dim), torch.zeros(1, h, w), (h * 16, w * 16))
        )
    feats = FeatureSet(ims, "synthetic", 16, dim)
    common = dict(n_eigenvectors=10, n_segments=4, segment_vector="mean")
    dsm_k = DeepSpectral(eig_solver="krylov", **common)
    assert dsm_k._dtype(torch.device("cpu")) == torch.float32
    a = dsm_k.predict(feats, None)
    b = DeepSpectral(eig_solver="lapack", **common).predict(feats, None)
    assert all(sp.same_partition(x.segment_map, y.segment_map) for x, y in zip(a, b))
