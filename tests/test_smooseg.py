"""SmooSeg learner: smoothness energy and pseudo-label loss against hand-computed values, EMA, training."""

from __future__ import annotations

import math

import pytest
import torch
from _learner_toys import early_late, toy_ctx, toy_features

from ussbench import registry
from ussbench.errors import ConfigError
from ussbench.feature_learners._heads import ProjectionHead, ema_update
from ussbench.feature_learners.smooseg import SmooSeg, smooseg_loss, smooth_term

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors on 2 shared cores: one torch thread


def _points(*vectors):
    return torch.tensor(vectors, dtype=torch.float32).t()[None, :, None, :]


def test_smooth_term_hand_value():
    f = _points((1, 0), (1, 0), (0, 1))  # centred Fc = [[8,8,-1],[8,8,-1],[2,2,11]] / 9 (see test_stego)
    p = _points((1, 0), (0, 1), (0, 1))  # 1 - corr(p, p) = [[0,1,1],[1,0,0],[1,0,0]]
    b = 0.1
    energy = smooth_term(f, f, p, p, b).reshape(3, 3)
    expected = torch.tensor([[0, 8 / 9 - b, -1 / 9 - b], [8 / 9 - b, 0, 0], [2 / 9 - b, 0, 0]])
    torch.testing.assert_close(energy, expected)
    assert float(energy.mean()) == pytest.approx((17 / 9 - 0.4) / 9, abs=1e-6)


def test_smooseg_loss_hand_value():
    # two identical one-pixel images, so the derangement (a swap) pairs each image with its copy
    feats = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1).repeat(2, 1, 1, 1)
    z = torch.tensor([1.0, 0.0]).reshape(1, 2, 1, 1).repeat(2, 1, 1, 1)
    student = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # scores (1, 0)
    teacher = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # scores (0, 1) -> pseudo-label 1
    loss, parts = smooseg_loss(feats, z, student, teacher, shift_intra=0.2, shift_inter=0.7)
    # one point per image: Fc = 1 and 1 - corr(p, p) = 0, so both energies vanish; CE = log(1 + e)
    assert float(parts["smooth_intra"]) == pytest.approx(0.0, abs=1e-6)
    assert float(parts["smooth_inter"]) == pytest.approx(0.0, abs=1e-6)
    assert float(parts["data"]) == pytest.approx(math.log(1 + math.e), rel=1e-6)
    assert float(loss) == pytest.approx(math.log(1 + math.e), rel=1e-6)


def test_smooseg_gradients_reach_code_through_teacher_scores_only():
    torch.manual_seed(0)
    feats = torch.randn(2, 4, 3, 3)
    z = torch.randn(2, 5, 3, 3, requires_grad=True)
    student = torch.randn(3, 5, requires_grad=True)
    teacher = torch.randn(3, 5, requires_grad=True)
    _, parts = smooseg_loss(feats, z, student, teacher, 0.1, 0.5)
    parts["data"].backward(retain_graph=True)
    assert z.grad is None and teacher.grad is None and student.grad.abs().sum() > 0  # CE uses sg(z)
    (parts["smooth_intra"] + parts["smooth_inter"]).backward()
    assert z.grad.abs().sum() > 0 and teacher.grad is None  # teacher is never trained by gradient


def test_ema_update():
    a, b = ProjectionHead(3, 2), ProjectionHead(3, 2)
    before = a.linear.weight.detach().clone()
    ema_update(a, b, 0.75)
    torch.testing.assert_close(a.linear.weight, 0.75 * before + 0.25 * b.linear.weight)


def test_smooseg_training_lowers_loss():
    fs, ctx = toy_features(), toy_ctx()
    learner = SmooSeg(steps=50, batch_size=4, crop_size=8, lr=1e-3, prototype_lr=5e-3).fit(fs, ctx)
    log = learner.artifacts()["loss"]
    first, last = early_late(log["loss"])
    assert last < first
    assert learner.artifacts()["prototypes"].shape == (3, 64)
    assert learner.transform(fs, ctx)[0].code.shape == (8, 10, 64)
    scores = SmooSeg(steps=2, batch_size=4, crop_size=8, output="scores").fit(fs, ctx).transform(fs, ctx)
    assert scores[0].code.shape == (8, 10, 3) and float(scores[0].code.abs().max()) <= 1.0 + 1e-5


def test_smooseg_presets_load_and_bad_params():
    for name in ("smooseg", "smooseg_omh"):
        spec = registry.get("feature_learner", name)
        assert {"cityscapes27_vits8", "cocostuff27_vits8", "potsdam3_vitb8", "potsdam3_dinov2_vitb14"} <= set(
            spec.presets
        )
        for preset in spec.presets:
            learner = registry.instantiate(spec, registry.resolve_params(spec, {"num_classes": 27}, preset))
            assert learner.dim == 64 and learner.steps == 3000
    spec = registry.get("feature_learner", "smooseg")
    assert registry.resolve_params(spec, None, "cocostuff27_vits8")["shift_inter"] == 0.48
    with pytest.raises(ConfigError, match="temperature"):
        SmooSeg(temperature=0.0)
    with pytest.raises(ConfigError, match="batch_size"):
        SmooSeg(batch_size=1)


def test_auto_teacher_momentum_leaves_the_initial_prototypes_on_a_short_run():
    """With the reference's 0.998 a short run's teacher stays at its random start (the collapse of issue 13);
    'auto' keeps the reference's half-life as a fraction of the run, so the teacher follows the student."""
    fs, ctx = toy_features(), toy_ctx()
    kw = dict(steps=40, batch_size=4, crop_size=8, lr=1e-3, prototype_lr=5e-3)
    moved = {
        m: SmooSeg(ema_momentum=m, **kw).fit(fs, ctx).artifacts()["teacher_cosine_to_init"]
        for m in ("auto", 0.998)
    }
    assert moved[0.998] > 0.95 and moved["auto"] < moved[0.998] - 0.1
