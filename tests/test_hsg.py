"""HSG clustering transformers: transitions, nesting, contrastive loss, training, plugins and cards."""

import numpy as np
import pytest
import torch

from ussbench.base import Dataset, FeatureSet, ImageFeatures, StageContext
from ussbench.errors import ConfigError
from ussbench.feature_learners._hsg_model import (
    HSGConfig,
    HSGModel,
    base_grouping,
    grid_superpixels,
    infer_hierarchy,
    kmeans_hierarchy,
    make_views,
    segment_contrastive,
    training_step,
)
from ussbench.feature_learners.hsg import HSGLearner, superpixels_for
from ussbench.image_clusterers.hsg import HSGGroups

TINY = dict(
    dim=16, hidden_dim=16, heads=4, n0=9, n0_train=4, n1=4, n2=2, crop=6, batch_size=3, kmeans_iters=5
)
COLOURS = np.array([[220, 30, 30], [30, 200, 40], [30, 40, 220]], dtype=np.uint8)


def toy_layout(i: int) -> np.ndarray:
    """An 8x8 patch grid of 3 classes: a vertical band, a horizontal band and the rest, varying by image."""
    cls = np.zeros((8, 8), dtype=np.int64)
    cls[:, (i % 3) + 1 : (i % 3) + 4] = 1
    cls[5 + (i % 2) :, :] = 2
    return cls


class ToyDataset(Dataset):
    """Images whose 8x8 blocks of 4x4 pixels are coloured by the toy layout's class."""

    def __init__(self, n: int = 6):
        self.n = n
        self.num_classes = 3
        self.class_names = ["a", "b", "c"]

    def ids(self):
        return [f"toy{i}" for i in range(self.n)]

    def load_image(self, index):
        return COLOURS[toy_layout(index)].repeat(4, 0).repeat(4, 1)

    def load_label(self, index):
        return toy_layout(index).repeat(4, 0).repeat(4, 1)


def toy_features(n: int = 6, dim: int = 12, noise: float = 0.3, per_image: bool = False) -> FeatureSet:
    """Noisy class prototypes on the toy layout; per_image: each image has its own prototypes (so that
    HSG's between-image discrimination can be satisfied and the loss can approach zero)."""
    gen = torch.Generator().manual_seed(1)
    protos = torch.randn(3, dim, generator=gen)
    images = []
    for i in range(n):
        if per_image:
            protos = torch.randn(3, dim, generator=gen)
        layout = torch.from_numpy(toy_layout(i))
        tokens = (protos[layout] + noise * torch.randn(8, 8, dim, generator=gen)).half()
        images.append(ImageFeatures(f"toy{i}", tokens, tokens, tokens[0, 0], torch.ones(1, 8, 8), (32, 32)))
    return FeatureSet(images, "toy", 4, dim)


def toy_ctx(n: int = 6) -> StageContext:
    return StageContext(torch.device("cpu"), 0, ToyDataset(n), backbone=None, num_classes=3, progress=False)  # type: ignore[arg-type]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on 2 shared cores: one torch thread


def test_transitions_are_row_stochastic_and_compose():
    torch.manual_seed(0)
    model = HSGModel(12, HSGConfig(**TINY)).eval()
    x = torch.randn(3, 8 * 8, 12)
    with torch.no_grad():
        v = model.project(x)
        g0, x0, mask0 = base_grouping(v, (8, 8), 9, 5)
        h = model.hierarchy(x0, mask0)
    c01, c12 = h.transitions
    assert c01.shape == (3, x0.shape[1], 4) and c12.shape == (3, 4, 2)
    for c in (c01, c12):
        assert torch.all(c >= 0) and torch.allclose(c.sum(-1), torch.ones(c.shape[:2]), atol=1e-5)
    assert torch.allclose(h.assignments[0], c01) and torch.allclose(h.assignments[1], c01 @ c12, atol=1e-6)
    # pixel level: P_2 = P_0 C_0^1 C_1^2 with one-hot P_0 is the base segment's row; rows sum to one
    p0 = torch.nn.functional.one_hot(g0, x0.shape[1]).float()
    p2 = p0 @ c01 @ c12
    assert torch.allclose(p2, torch.gather(h.assignments[1], 1, g0[..., None].expand(-1, -1, 2)), atol=1e-6)
    assert torch.allclose(p2.sum(-1), torch.ones(3, 64), atol=1e-5)


def _assert_nested(fine: torch.Tensor, coarse: torch.Tensor) -> None:
    pairs = torch.unique(torch.stack([fine.reshape(-1), coarse.reshape(-1)], 1), dim=0)
    assert pairs.shape[0] == torch.unique(fine).numel(), "a fine segment spans several coarse segments"


@pytest.mark.parametrize("grouping", ["transformer", "kmeans"])
def test_fine_segment_maps_to_exactly_one_coarse_segment(grouping):
    torch.manual_seed(0)
    model = HSGModel(12, HSGConfig(**TINY, grouping=grouping)).eval()
    out = infer_hierarchy(model, [im.tokens for im in toy_features(3)], torch.device("cpu"))
    for res in out:
        l0, l1, l2 = res["levels"]
        assert l1.max() < 4 and l2.max() < 2
        _assert_nested(l0, l1), _assert_nested(l1, l2), _assert_nested(l0, l2)


def test_kmeans_hierarchy_recovers_separated_groups():
    x = torch.nn.functional.normalize(torch.eye(4)[[0, 0, 1, 1, 2, 2, 3, 3]] + 0.01, dim=1)[None]
    labels, _ = kmeans_hierarchy(x, torch.ones(1, 8, dtype=torch.bool), (4, 2), 10)
    assert torch.unique(labels[0][0].reshape(4, 2), dim=1).shape[1] == 1  # pairs stay together
    assert labels[0][0].unique().numel() == 4 and labels[1][0].unique().numel() == 2


def test_contrastive_loss_lower_for_separated_segments_than_shuffled():
    gen = torch.Generator().manual_seed(0)
    cls = torch.arange(3).repeat_interleave(20)
    v = torch.nn.functional.normalize(torch.eye(8)[cls] + 0.05 * torch.randn(60, 8, generator=gen), dim=1)
    view = torch.arange(60) % 2  # two "views": each class has a segment in each
    inst = torch.zeros(60, dtype=torch.long)
    good = segment_contrastive(v, torch.stack([inst, cls, view], 1), 2, 1 / 16)
    shuffled = cls[torch.randperm(60, generator=gen)]
    bad = segment_contrastive(v, torch.stack([inst, shuffled, view], 1), 2, 1 / 16)
    assert good < 0.1 < bad


def test_training_lowers_the_loss_and_is_deterministic():
    feats, ctx = toy_features(per_image=True), toy_ctx()
    params = dict(TINY, epochs=8, lr=0.01, lr_schedule="constant", n_superpixels=6, superpixel_upsample=2)
    params.update(dropout=0.0, feature_dropout=0.0)
    learner = HSGLearner(**params).fit(feats, ctx)
    hist = learner.artifacts()["loss_history"]
    assert len(hist) == 8 and {"edge", "levels", "modularity", "collapse", "separation"} <= set(hist[0])
    # the full loss of one fixed batch of views: an untrained model vs the trained one
    config = learner.config()
    sps = superpixels_for(feats, ctx, config)
    x, sp = make_views(
        [im.tokens for im in feats], sps, config, torch.Generator().manual_seed(5), torch.device("cpu")
    )
    torch.manual_seed(0)
    untrained = HSGModel(12, config).train()
    with torch.no_grad():
        before = float(training_step(untrained, x, sp)["total"])
        after = float(training_step(learner.model_.train(), x, sp)["total"])
    assert after < 0.8 * before
    learner.model_.eval()
    out = learner.transform(feats, ctx)
    assert out.has_code and out[0].code.shape == (8, 8, 16)
    assert torch.allclose(out[0].code.float().norm(dim=-1), torch.ones(8, 8), atol=1e-2)
    one = dict(params, epochs=1, edge_grouping="none")
    a = HSGLearner(**one).fit(feats, ctx).transform(feats, ctx)
    b = HSGLearner(**one).fit(feats, ctx).transform(feats, ctx)
    assert torch.equal(a[3].code, b[3].code)


def test_image_clusterer_keeps_every_level(tmp_path):
    feats, ctx = toy_features(), toy_ctx()
    learner = HSGLearner(**TINY, epochs=1, edge_grouping="none").fit(feats, ctx)
    segs = HSGGroups.from_model(learner.model_, level=1).predict(feats, ctx)
    assert len(segs) == 6
    for s in segs:
        assert set(s.levels) == {"level0", "level1", "level2"}
        assert torch.equal(s.segment_map, s.levels["level1"]) and s.n_segments <= 4
        assert s.vectors.shape[1] == 16
        _assert_nested(s.levels["level1"], s.levels["level2"])
    # a saved model gives the same segments through the checkpoint parameter
    path = tmp_path / "hsg.pt"
    learner.save(str(path))
    again = HSGGroups(level=1, checkpoint=str(path)).fit(feats, ctx).predict(feats, ctx)
    assert all(torch.equal(a.segment_map, b.segment_map) for a, b in zip(segs, again))
    # trains its own model when given none
    own = HSGGroups(**TINY, level=0, epochs=1, edge_grouping="none").fit(feats, ctx).predict(feats, ctx)
    assert torch.equal(own[0].segment_map, own[0].levels["level0"])


def test_superpixels_follow_colour_boundaries():
    image = np.zeros((32, 48, 3), dtype=np.uint8)
    image[:, :24] = [255, 0, 0]
    image[:, 24:] = [0, 0, 255]
    sp = grid_superpixels(image, (8, 12), "slic", n_segments=6, upsample=4)
    assert sp.shape == (8, 12) and sp.min() == 0
    assert not set(np.unique(sp[:, :6])) & set(np.unique(sp[:, 6:]))


def test_bad_parameters_name_themselves():
    with pytest.raises(ConfigError, match="n2"):
        HSGLearner(n1=4, n2=6)
    with pytest.raises(ConfigError, match="level"):
        HSGGroups(level=3)
    with pytest.raises(ConfigError, match="heads"):
        HSGLearner(dim=30, heads=4)
