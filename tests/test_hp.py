"""HP learner: hidden-positive loss and local propagation against hand-computed values, training, presets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _learner_toys import early_late, toy_ctx, toy_features

from ussbench import registry
from ussbench.backbones.dino import RandomViT
from ussbench.base import FeatureSet, ImageFeatures, StageContext
from ussbench.errors import ConfigError, DataError
from ussbench.feature_learners.hp import (
    HP,
    _view_terms,
    backbone_attention,
    hp_loss,
    keys_attention,
    lhp,
    lhp_weights,
    ramp,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on 2 shared cores: one torch thread


def _pairs_setup():
    """4 patches in 2 views of 2; features and codes pair (0,1) and (2,3); one reference vector (0.6, 0.8)."""
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    z = f.clone()
    pool = torch.tensor([[0.6, 0.8]])  # thresholds 0.6 for patches 0,1 and 0.8 for 2,3
    return f, z, pool


def test_hp_loss_task_agnostic_positives_hand_value():
    f, z, pool = _pairs_setup()
    tau = 0.5
    # each anchor: one positive (its partner, logit 1/tau), denominator over the other three (rho = 1)
    expected = (tau / 0.07) * (math.log(math.exp(1 / tau) + 2) - 1 / tau)
    loss, parts = hp_loss(z, z, f, f, pool, pool, lam=0.0, tau=tau, rho=1.0, view_size=2)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(parts["hp"]) == pytest.approx(expected, rel=1e-5)


def test_hp_loss_task_specific_positives_hand_value():
    f, z, pool = _pairs_setup()
    s_ema = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # pairs (0,2) and (1,3)
    tau = 0.5
    # lambda = 1: anchor 0 averages log p over partner 1 (logit 2) and 2 (logit 0): 1 - log(e^2 + 2)
    expected = (tau / 0.07) * (math.log(math.exp(2) + 2) - 1)
    loss, _ = hp_loss(z, z, f, s_ema, pool, pool, lam=1.0, tau=tau, rho=1.0, view_size=2)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_hp_loss_chunked_gradient_is_exact():
    torch.manual_seed(0)
    n_views, p = 3, 4
    z = F.normalize(torch.randn(n_views * p, 5), dim=1).requires_grad_(True)
    z_mix = F.normalize(torch.randn(n_views * p, 5), dim=1).requires_grad_(True)
    f = F.normalize(torch.randn(n_views * p, 6), dim=1)
    s = F.normalize(torch.randn(n_views * p, 5), dim=1)
    pool_f, pool_s = F.normalize(torch.randn(3, 6), dim=1), F.normalize(torch.randn(3, 5), dim=1)
    loss, _ = hp_loss(z, z_mix, f, s, pool_f, pool_s, 0.3, 0.4, 1.0, p, max_elements=1)  # one view per chunk
    gz, gm = torch.autograd.grad(loss, (z, z_mix))
    # direct: all views in one differentiable expression, same masks (rho = 1 is deterministic)
    rows = torch.arange(n_views * p).reshape(n_views, p)
    not_self = rows[..., None] != torch.arange(n_views * p)
    thr_f, thr_s = (f @ pool_f.t()).max(1).values, (s @ pool_s.t()).max(1).values
    cf, cs = f[rows] @ f.t(), s[rows] @ s.t()
    p_ag = ((cf > thr_f[rows][..., None]) | (cf > thr_f[None, None])) & not_self
    p_sp = ((cs > thr_s[rows][..., None]) | (cs > thr_s[None, None])) & not_self
    w, den, valid = p_ag.float() + 0.3 * p_sp.float(), not_self.float(), p_ag.any(-1).float()
    direct = (
        _view_terms(z[rows], z, w, den, valid, 0.4, True)
        + _view_terms(z_mix[rows], z_mix, w, den, valid, 0.4, True)
    ) / (2 * n_views)
    assert float(loss.detach()) == pytest.approx(float(direct.detach()), rel=1e-5)
    dz, dm = torch.autograd.grad(direct, (z, z_mix))
    torch.testing.assert_close(gz, dz)
    torch.testing.assert_close(gm, dm)


def test_lhp_weights_hand_value():
    # one row of 3 patches; patch 0 attends (0.6, 0.3, 0.1): quantile clip to [0.14, 0.54], softmax,
    # times sqrt(3), entries below the row mean (sqrt(3)/3) set to 0 -> only itself survives
    attn = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    w = lhp_weights(attn, 1, 3)
    assert w.shape == (1, 3, 9)
    e = [math.exp(v) for v in (0.54, 0.3, 0.14)]
    assert float(w[0, 0, 4]) == pytest.approx(math.sqrt(3) * e[0] / sum(e), rel=1e-5)  # self
    assert float(w[0, 0, 5]) == 0.0  # right neighbour below the row mean
    assert float(w[0, 0, :3].abs().sum() + w[0, 0, 6:].abs().sum()) == 0.0  # rows above / below: none
    assert float(w[0, 1, 3:6].sum()) > 0


def test_lhp_propagation_hand_value():
    code = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 1, 1, 3)
    out = lhp(code, torch.ones(1, 1, 3, 9))
    # neighbours inside the 1x3 window: {0,1}, {0,1,2}, {1,2}; weights 1, divided by their count
    torch.testing.assert_close(out.reshape(3), torch.tensor([1.5, 2.0, 2.5]))


def test_keys_attention_rows_are_distributions():
    keys = torch.randn(3, 4, 8)
    a = keys_attention(keys, n_heads=2)
    assert a.shape == (12, 12)
    torch.testing.assert_close(a.sum(1), torch.ones(12))


def test_ramp_schedule():
    assert ramp(0, 10, 110) == 0.0 and ramp(10, 10, 110) == 0.0
    assert ramp(60, 10, 110) == pytest.approx(0.5) and ramp(110, 10, 110) == pytest.approx(1.0)


def test_hp_training_lowers_loss():
    fs, ctx = toy_features(), toy_ctx()
    kw = dict(batch_size=4, crop_size=8, pool_size=16, rho=1.0, warmup=10, renew_interval=10, dim=32, lr=5e-3)
    learner = HP(steps=50, **kw).fit(fs, ctx)
    log = learner.artifacts()["loss"]
    first, last = early_late(log["loss"])
    assert last < first
    assert log["lambda"][10] == 0.0 and log["lambda"][-1] == pytest.approx((49 - 10) / (50 - 10))
    out = learner.transform(fs, ctx)
    assert out[0].code.shape == (8, 10, 32)


def test_hp_backbone_attention_path():
    """local_attention='backbone' re-runs a (random, 1-block) ViT once per image and hooks its last qkv."""
    backbone = RandomViT(depth=1, resolution=32)

    class Images:  # the one Dataset method the learner needs
        def load_image(self, i):
            return np.random.default_rng(i).integers(0, 255, (32, 48, 3), dtype=np.uint8)

    data, device = Images(), torch.device("cpu")
    model = backbone.model(device)
    images = []
    for i in range(2):
        out = model(backbone.preprocess(data.load_image(i))[None])
        images.append(
            ImageFeatures(
                f"im{i}",
                out["tokens"][0].half(),
                out["keys"][0].half(),
                out["cls"][0].half(),
                out["attn"][0].half(),
                (32, 48),
            )  # fmt: skip
        )
    fs = FeatureSet(images, "random", 16, 384)
    ctx = StageContext(device, 0, data, backbone, 2, progress=False)  # type: ignore[arg-type]
    attn = backbone_attention(ctx, 0, (2, 3))
    assert attn.shape == (6, 6)
    assert ((attn.sum(1) > 0) & (attn.sum(1) < 1)).all()  # the CLS column was dropped after the softmax
    with pytest.raises(DataError, match="grid"):
        backbone_attention(ctx, 0, (3, 3))
    learner = HP(steps=2, batch_size=2, crop_size=2, pool_size=4, dim=8, local_attention="backbone")
    assert learner.fit(fs, ctx).transform(fs, ctx)[0].code.shape == (2, 3, 8)


def test_hp_presets_load_and_bad_params():
    for name in ("hp", "hp_omh"):
        spec = registry.get("feature_learner", name)
        assert {"cocostuff27_vits8", "cityscapes27_vits8", "potsdam3_vitb8"} <= set(spec.presets)
        for preset in spec.presets:
            learner = registry.instantiate(spec, registry.resolve_params(spec, {"num_classes": 27}, preset))
            assert learner.local_attention == "backbone" and learner.epochs is not None
    assert (
        registry.resolve_params(registry.get("feature_learner", "hp"), None, "potsdam3_vitb8")["tau"] == 0.4
    )
    with pytest.raises(ConfigError, match="rho"):
        HP(rho=1.5)
    with pytest.raises(ConfigError, match="tau"):
        HP(tau=0)


def test_hp_cross_view_share_counts_positives_outside_the_anchor_view():
    f, z, pool = _pairs_setup()  # positive pairs (0,1) and (2,3)
    args = (pool, pool, 0.0, 0.5, 0.0)
    _, same = hp_loss(z, z, f, z, *args, view_size=2)  # views {0,1} {2,3}: every positive in its own view
    order = torch.tensor([0, 2, 1, 3])  # views {0,2} {1,3}: every positive in the other view
    _, crossed = hp_loss(z[order], z[order], f[order], z[order], *args, view_size=2)
    assert float(same["cross_view_share"]) == pytest.approx(0.0)
    assert float(crossed["cross_view_share"]) == pytest.approx(1.0)


def test_hp_smaller_pool_lets_other_image_positives_through():
    """Patches of one image share an offset (as DINOv2 tokens do): a large pool sets thresholds that only
    same-image patches pass; the 'auto' pool, scaled to the batch, admits same-class patches of other images."""
    g = torch.Generator().manual_seed(0)
    classes = torch.randn(3, 32, generator=g)

    def images(n: int, per_image: int) -> torch.Tensor:
        label = torch.randint(3, (n, per_image), generator=g)
        offset = 1.5 * torch.randn(n, 1, 32, generator=g)
        x = classes[label] + offset + 0.3 * torch.randn(n, per_image, 32, generator=g)
        return F.normalize(x.reshape(-1, 32), dim=1)

    per_view = 36
    f, others = images(8, per_view), images(200, per_view)  # the pool comes from the whole dataset
    shares = {}
    for size in (2048, 42):
        pool = others[torch.randperm(len(others), generator=g)[:size]]
        _, parts = hp_loss(f, f, f, f, pool, pool, 0.0, 0.6, 0.02, per_view)
        shares[size] = float(parts["cross_view_share"])
    assert shares[2048] < 0.05 and shares[42] > 4 * shares[2048], shares  # measured: 1.4% vs 10.6%
