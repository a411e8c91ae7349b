"""DSM: flat regions give exactly their segments; torch eigen path agrees with scipy eigsh; crop CLS;
border background; bad parameters fail naming the parameter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from ussbench.backbones.dino import RandomViT
from ussbench.base import FeatureSet, ImageFeatures, StageContext
from ussbench.datasets.folder import ImageMaskFolder
from ussbench.errors import ConfigError
from ussbench.image_clusterers import _spectral as sp
from ussbench.image_clusterers._segment_vectors import crops_cls, segment_boxes
from ussbench.image_clusterers.dsm import DeepSpectral

COLOURS = np.array([[220, 30, 30], [30, 200, 40], [40, 40, 210], [230, 220, 30]], dtype=np.uint8)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on 2 shared cores: one torch thread


def stripes(k: int, h: int, w: int) -> torch.Tensor:
    """(h, w) map of k vertical bands."""
    return (torch.arange(w) * k // w).expand(h, w).clone()


def region_features(regions: list[torch.Tensor], dim: int = 32, noise: float = 0.05, seed: int = 0):
    """Synthetic keys: one random direction per region id plus small noise."""
    g = torch.Generator().manual_seed(seed)
    k = max(int(r.max()) for r in regions) + 1
    dirs = F.normalize(torch.randn(k, dim, generator=g), dim=1)
    out = []
    for n, reg in enumerate(regions):
        h, w = reg.shape
        keys = dirs[reg] + noise * torch.randn(h, w, dim, generator=g)
        tokens = keys.clone()
        out.append(
            ImageFeatures(
                f"im{n}", tokens.half(), keys.half(), torch.zeros(dim), torch.zeros(1, h, w), (h * 16, w * 16)
            )
        )
    return FeatureSet(out, "synthetic", 16, dim)


@pytest.fixture(scope="module")
def flat_world(tmp_path_factory):
    """Two 64x96 images of 3 flat colour bands (32 px wide) and a 2-block random ViT at 64 px (grid 4x6)."""
    root = Path(tmp_path_factory.mktemp("flat"))
    (root / "images").mkdir()
    (root / "labels").mkdir()
    label = np.repeat(np.arange(3), 32)[None].repeat(64, 0).astype(np.uint8)
    for n in range(2):
        Image.fromarray(COLOURS[label]).save(root / "images" / f"im{n}.png")
        Image.fromarray(label).save(root / "labels" / f"im{n}.png")
    dataset = ImageMaskFolder(num_classes=3, root=str(root))
    backbone = RandomViT(arch="vit_small_patch16_224", depth=2, resolution=64)
    ctx = StageContext(torch.device("cpu"), 0, dataset, backbone, 3, progress=False)
    real = backbone.extract(dataset, torch.device("cpu"), progress=False)
    assert real[0].grid == (4, 6)
    synth = region_features([stripes(3, 4, 6)] * 2)
    feats = FeatureSet(
        [ImageFeatures(r.image_id, r.tokens, s.keys, r.cls, r.attn, r.image_size) for r, s in zip(real, synth)],
        real.backbone, real.patch_size, real.embed_dim,
    )  # fmt: skip
    return feats, ctx


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("engine", ["sklearn", "torch"])
def test_k_flat_regions_give_exactly_k_segments(k, engine):
    regions = [stripes(k, 8, 10), stripes(k, 10, 8).T.contiguous()]
    feats = region_features(regions, seed=k)
    dsm = DeepSpectral(n_eigenvectors=k, n_segments=k, kmeans_engine=engine, segment_vector="mean")
    for reg, seg in zip(regions, dsm.predict(feats, ctx=None)):  # type: ignore[arg-type]
        assert seg.n_segments == k
        assert sp.same_partition(seg.segment_map, reg)


def test_adaptive_eigengap_finds_the_number_of_regions():
    regions = [stripes(k, 8, 12) for k in (2, 3, 4)]
    dsm = DeepSpectral(n_eigenvectors=6, adaptive=True, segment_vector="mean")
    segs = dsm.predict(region_features(regions), ctx=None)  # type: ignore[arg-type]
    assert [s.n_segments for s in segs] == [2, 3, 4]
    assert all(sp.same_partition(s.segment_map, r) for s, r in zip(segs, regions))


@pytest.mark.parametrize("vector", ["crop_cls", "masked_attention_cls"])
def test_flat_regions_with_colour_term_and_crop_cls(flat_world, vector):
    feats, ctx = flat_world
    dsm = DeepSpectral(
        n_eigenvectors=3,
        n_segments=3,
        color_lambda=10.0,
        segment_vector=vector,
        n_dilate=1,
        background="border",
    )
    segs = dsm.predict(feats, ctx)
    for seg in segs:
        assert sp.same_partition(seg.segment_map, stripes(3, 4, 6))
        assert seg.vectors.shape == (3, 384) and torch.isfinite(seg.vectors).all()
        assert seg.background == sp.border_segment(seg.segment_map, 3)
    # crops of different segments see different pixels, so their CLS vectors differ
    assert torch.cdist(segs[0].vectors, segs[0].vectors).triu(1).max() > 1e-3


def test_crop_cls_of_boxes_covering_the_image_is_the_image_cls(flat_world):
    feats, ctx = flat_world  # 4x6 grid: every segment dilated 5 times covers the whole image
    segs = DeepSpectral(n_eigenvectors=3, n_segments=3, precision="fp32").predict(feats, ctx)
    ext = ctx.backbone.model(torch.device("cpu"))
    for i, seg in enumerate(segs):
        whole = ext(ctx.backbone.preprocess(ctx.dataset.load_image(i))[None])["cls"][0]
        assert torch.allclose(seg.vectors, whole.expand(3, -1), atol=1e-4)
    # bfloat16 crops (precision 'bf16', the default 'auto' on CPUs with native bf16): the same vectors to
    # bf16 accuracy
    bf16 = DeepSpectral(n_eigenvectors=3, n_segments=3, precision="bf16").predict(feats, ctx)
    for a, b in zip(segs, bf16):
        assert F.cosine_similarity(a.vectors, b.vectors, dim=1).min() > 0.995


def test_crop_cls_batched_with_padding_equals_single_forward(flat_world):
    _, ctx = flat_world
    ext = ctx.backbone.model(torch.device("cpu"))
    img = ctx.backbone.preprocess(ctx.dataset.load_image(0))
    crops = [img[:, :32, :48], img[:, 16:64, 16:96], img, img[:, :16, :16]]
    batched = crops_cls(ext, crops, batch_size=3)
    for crop, vec in zip(crops, batched):
        assert torch.allclose(ext(crop[None])["cls"][0], vec, atol=1e-4)


def test_masked_attention_cls_restricts_last_block_attention(flat_world):
    _, ctx = flat_world
    ext = ctx.backbone.model(torch.device("cpu"))
    vit = ext.vit
    crop = ctx.backbone.preprocess(ctx.dataset.load_image(0))[:, :48, :64]  # 3x4 patches
    mask = torch.zeros(12, dtype=torch.bool)
    mask[[0, 1, 4, 5]] = True
    got = crops_cls(ext, [crop, crop], [mask, None])
    # independent computation: CLS attention softmax over CLS + masked patches only
    with torch.no_grad():
        x = ext.vit.patch_embed.proj(crop[None]).flatten(2).transpose(1, 2)
        x = torch.cat([vit.cls_token, x], 1) + ext._pos_embed(3, 4)
        for blk in vit.blocks[:-1]:
            x = blk(x)
        last = vit.blocks[-1]
        a = last.attn
        qkv = a.qkv(last.norm1(x)).reshape(1, 13, 3, a.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0][:, :, :1], qkv[1], qkv[2]
        logits = (q * a.scale) @ k.transpose(-2, -1)
        allowed = torch.cat([torch.tensor([True]), mask])
        logits = logits.masked_fill(~allowed, float("-inf"))
        o = (logits.softmax(-1) @ v).transpose(1, 2).reshape(1, 1, -1)
        cls = x[:, :1] + last.ls1(a.proj(o))
        cls = cls + last.ls2(last.mlp(last.norm2(cls)))
        want = vit.norm(cls)[0, 0]
    assert torch.allclose(got[0], want, atol=1e-4)
    assert torch.allclose(got[1], ext(crop[None])["cls"][0], atol=1e-4)
    assert not torch.allclose(got[0], got[1], atol=1e-3)


def test_several_queries_of_one_crop_equal_separate_forwards(flat_world):
    """Segments sharing a box share the crop's trunk: each masked query equals its own full forward."""
    from ussbench.image_clusterers._segment_vectors import crops_cls_queries

    _, ctx = flat_world
    ext = ctx.backbone.model(torch.device("cpu"))
    img = ctx.backbone.preprocess(ctx.dataset.load_image(0))
    crop = img[:, :48, :64]  # 3x4 patches
    masks = [torch.arange(12) % 2 == 0, torch.arange(12) < 5, None]
    shared = crops_cls_queries(ext, [crop, img[:, :32, :32]], [masks, [None]], batch_size=4)
    separate = crops_cls(ext, [crop] * 3, masks)
    assert shared[0].shape == (3, 384) and shared[1].shape == (1, 384)
    torch.testing.assert_close(shared[0], separate, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared[1][0], ext(img[:, :32, :32][None])["cls"][0], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(shared[0][0], shared[0][1], atol=1e-3)


def test_segment_boxes_erode_then_dilate():
    seg = torch.zeros(10, 10, dtype=torch.long)
    seg[2:5, 2:5] = 1  # a 3x3 square: one erosion leaves its centre, a second would empty it (skipped)
    boxes = segment_boxes(seg, 2, n_erode=2, n_dilate=1)
    assert boxes[1].tolist() == [2, 2, 4, 4]  # centre (3, 3) dilated once by the cross
    assert segment_boxes(seg, 2, n_erode=0, n_dilate=0)[1].tolist() == [2, 2, 4, 4]
    assert segment_boxes(seg, 2, n_erode=2, n_dilate=5)[1].tolist() == [0, 0, 8, 8]
    assert segment_boxes(seg, 2, n_erode=2, n_dilate=5)[0].tolist() == [0, 0, 9, 9]


@pytest.mark.parametrize(
    ("class_names", "background", "expected"),
    [
        (["red", "green", "blue"], "auto", "none"),  # no background class (MSRC-v2, CamVid): off
        (["background", "cat", "dog"], "auto", "border"),  # VOC-like: on
        (["red", "green", "blue"], "border", "border"),  # the grid's choice wins
        (["background", "cat", "dog"], "none", "none"),
    ],
)
def test_background_rule_follows_the_dataset_unless_set(flat_world, class_names, background, expected):
    feats, ctx = flat_world
    dataset = ImageMaskFolder(num_classes=3, class_names=class_names, root=ctx.dataset.root)
    ctx = StageContext(ctx.device, 0, dataset, ctx.backbone, 3, progress=False)
    dsm = DeepSpectral(n_eigenvectors=3, n_segments=3, segment_vector="mean", background=background)
    segs = dsm.predict(feats, ctx)
    assert dsm.artifacts()["resolved"] == {"background": expected}
    if expected == "border":
        assert all(s.background == sp.border_segment(s.segment_map, s.n_segments) for s in segs)
    else:
        assert all(s.background is None for s in segs)


def test_background_is_the_segment_owning_most_border():
    seg = torch.tensor([[2, 2, 2, 2], [2, 0, 1, 2], [2, 0, 1, 1], [0, 0, 1, 1]])
    assert sp.border_segment(seg, 3) == 2


@pytest.mark.parametrize("P", [30, 64, 90])
def test_torch_eigen_path_agrees_with_scipy_eigsh_on_random_graphs(P):
    g = torch.Generator().manual_seed(P)
    feats = torch.randn(3, P, 16, generator=g, dtype=torch.float64)
    feats[:, : P // 2] += 2.0 * torch.randn(1, 16, generator=g, dtype=torch.float64)  # some structure
    W = sp.feature_affinity(feats)
    evals, vecs = sp.eigh_smallest(W, 10)
    vecs = sp.fix_signs(vecs)
    sub_evals, sub_vecs = sp.lapack_smallest(W, 10)  # only the 10 wanted pairs
    torch.testing.assert_close(sub_evals, evals, atol=1e-10, rtol=0)
    torch.testing.assert_close(sp.fix_signs(sub_vecs)[..., 1:], vecs[..., 1:], atol=1e-8, rtol=0)
    torch.testing.assert_close(sub_vecs[..., 0].abs(), vecs[..., 0].abs(), atol=1e-8, rtol=0)  # constant
    for b in range(3):
        ref_vals, ref_vecs = sp.eigsh_smallest(W[b].numpy(), 10)
        ref_vecs = sp.fix_signs(torch.from_numpy(ref_vecs))
        assert np.abs(evals[b].numpy() - ref_vals).max() < 1e-4
        # both normalised v^T D v = 1: equal up to sign, which fix_signs settles (eigenvalues are simple here)
        assert torch.allclose(vecs[b, :, 1:], ref_vecs[:, 1:], atol=1e-5)
        a = sp.kmeans_sklearn(vecs[b, :, 1:].numpy(), 5, n_init=3, max_iter=100, seed=0)
        c = sp.kmeans_sklearn(ref_vecs[:, 1:].numpy(), 5, n_init=3, max_iter=100, seed=0)
        assert sp.same_partition(a, c)


def test_dsm_solvers_give_identical_segmentations():
    regions = [stripes(3, 6, 8), stripes(4, 6, 8)]
    feats = region_features(regions, noise=0.3, seed=3)
    a = DeepSpectral(n_eigenvectors=8, n_segments=4, segment_vector="mean", eig_solver="torch").predict(
        feats, None
    )
    b = DeepSpectral(n_eigenvectors=8, n_segments=4, segment_vector="mean", eig_solver="scipy").predict(
        feats, None
    )
    c = DeepSpectral(n_eigenvectors=8, n_segments=4, segment_vector="mean", eig_solver="lapack").predict(
        feats, None
    )
    assert all(sp.same_partition(x.segment_map, y.segment_map) for x, y in zip(a, b))
    assert all(sp.same_partition(x.segment_map, y.segment_map) for x, y in zip(a, c))


def test_knn_colour_affinity_structure():
    img = torch.rand(2, 5, 6, 3, generator=torch.Generator().manual_seed(0))
    W = sp.knn_color_affinity(img)
    assert W.shape == (2, 30, 30)
    assert torch.equal(W, W.transpose(1, 2))
    # every pixel is its own neighbour in both graphs, counted in both directions: 2 + 2
    assert torch.equal(W.diagonal(dim1=1, dim2=2), torch.full((2, 30), 4.0))
    # out-edges per pixel: 20 + 10 (self included) in A, so row sums of A + A^T average 2 * 30
    assert torch.allclose(W.sum((1, 2)) / 30, torch.full((2,), 60.0))


def test_sign_fix_and_eigengap():
    v = torch.tensor([[1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]])  # column 0 is 2/3 positive -> flipped
    assert sp.fix_signs(v).tolist() == [[-1.0, -1.0], [-1.0, -1.0], [1.0, 1.0]]
    evals = torch.tensor([[0.0, 0.01, 0.02, 0.6, 0.62, 0.65], [0.0, 0.3, 0.31, 0.32, 0.33, 0.9]])
    assert sp.eigengap_count(evals).tolist() == [3, 5]


def test_batched_kmeans_is_seeded_and_finds_blobs():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]], dtype=torch.float64)
    truth = torch.arange(60) % 3
    x = torch.stack(
        [centres[truth] + 0.3 * torch.randn(60, 2, generator=g, dtype=torch.float64) for _ in range(4)]
    )
    a = sp.kmeans_batched(x, 3, 4, 100, torch.Generator().manual_seed(1))
    b = sp.kmeans_batched(x, 3, 4, 100, torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert all(sp.same_partition(lab, truth) for lab in a)


def test_batched_kmeans_dropping_converged_runs_changes_nothing():
    """Runs at a fixed point leave the batch early: labels equal iterating every run until all stop, on a batch
    whose runs converge after very different numbers of iterations (tol 0: only repeated labels stop)."""
    g = torch.Generator().manual_seed(3)
    easy = torch.randn(6, 3, 4, generator=g) * 8  # well-separated blobs: a few iterations
    truth = torch.arange(90) % 3
    x_easy = easy[:, truth] + 0.2 * torch.randn(6, 90, 4, generator=g)
    x_hard = torch.randn(6, 90, 4, generator=g)  # no structure: many iterations
    x = torch.cat([x_easy, x_hard])
    fast = sp.kmeans_batched(x, 5, 3, 100, torch.Generator().manual_seed(1), tol=0.0)
    full = sp.kmeans_batched(x, 5, 3, 100, torch.Generator().manual_seed(1), tol=0.0, drop_converged=False)
    assert torch.equal(fast, full)


def test_bad_parameters_raise_naming_the_parameter():
    with pytest.raises(ConfigError, match="n_segments"):
        DeepSpectral(n_segments=0)
    with pytest.raises(ConfigError, match="n_eigenvectors"):
        DeepSpectral(n_eigenvectors=1)
    with pytest.raises(ConfigError, match="kmeans_eigenvectors"):
        DeepSpectral(n_eigenvectors=5, kmeans_eigenvectors=5)
    with pytest.raises(ConfigError, match="color_lambda"):
        DeepSpectral(color_lambda=-1.0)
    feats = region_features([stripes(2, 3, 4)])
    with pytest.raises(ConfigError, match=r"n_eigenvectors=20 exceeds the 12 patches"):
        DeepSpectral(segment_vector="mean").predict(feats, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("names", "expected"), [(None, "none"), (["background", "green", "blue"], "border")])
def test_grid_rows_record_the_background_rule_used(tmp_path, toy_root, names, expected):
    """A grid that leaves DSM's background at 'auto' gets the dataset's rule, and each result row says which."""
    import pandas as pd
    from conftest import tiny_grid

    from ussbench.config import load_grid
    from ussbench.runner import run_grid

    dataset = {"name": "image_folder", "params": {"num_classes": 3, "class_names": names or ["r", "g", "b"]}}
    path = tiny_grid(
        tmp_path, toy_root, seeds=[0], datasets=[dataset], dataset_clusterers=["kmeans"],
        image_clusterers=[{"name": "dsm", "params": {"segment_vector": "mean", "n_eigenvectors": 4,
                                                     "n_segments": 3, "kmeans_engine": "torch"}}],
    )  # fmt: skip
    grid = load_grid(path)
    run_grid(grid, progress=False)
    results = pd.read_csv(grid.output / "results.csv")
    assert results.image_clusterer_background.tolist() == [expected]
    assert results.n_clusters.tolist() == [3]  # with a background segment: 2 clusters + the background
