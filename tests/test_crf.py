"""Dense CRF post-process: cleans a noisy toy labelling, pool == serial, timeouts fall back serially."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

pytest.importorskip("pydensecrf.densecrf")

from ussbench import registry  # noqa: E402
from ussbench.errors import ConfigError  # noqa: E402
from ussbench.postprocess._crf_core import CRFParams, run_task  # noqa: E402
from ussbench.postprocess.crf import CRFPool, DenseCRF, crf_batch, prepare_probs  # noqa: E402

H, W = 36, 44


def toy(seed: int = 0, flip: float = 0.25):
    """Two colour regions (red left, blue right), the true two-region map and a noisy copy of it."""
    rng = np.random.default_rng(seed)
    image = np.zeros((H, W, 3), np.int64)
    image[:, : W // 2] = (200, 40, 40)
    image[:, W // 2 :] = (40, 60, 200)
    image = np.clip(image + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
    truth = np.zeros((H, W), np.int64)
    truth[:, W // 2 :] = 1
    noisy = truth.copy()
    flips = rng.random((H, W)) < flip
    noisy[flips] = 1 - noisy[flips]
    return image, truth, noisy


def test_hard_labels_are_cleaned_toward_colour_regions():
    image, truth, noisy = toy()
    assert (noisy != truth).mean() > 0.2
    out = DenseCRF().apply(image, noisy, 2)
    assert out.shape == (H, W) and out.dtype == np.int64
    assert (out != truth).mean() < 0.02


def test_soft_scores_are_cleaned_and_logits_equal_probs():
    image, truth, noisy = toy(seed=1)
    probs = np.stack([1 - noisy, noisy]).astype(np.float32) * 0.4 + 0.3  # 0.7 on the noisy label
    crf = DenseCRF()
    out = crf.apply(image, noisy, 2, probs=probs)
    assert (out != truth).mean() < 0.02
    # log-probabilities (what the cluster probe gives) are recognised as logits: softmax(log p) = p
    assert np.array_equal(crf.apply(image, noisy, 2, probs=np.log(probs)), out)
    # low-resolution scores are upsampled to the image
    small = prepare_probs(probs[:, ::2, ::2], (H, W))
    assert small.shape == (2, H, W) and np.allclose(small.sum(0), 1.0, atol=1e-5)


def test_unary_from_labels_matches_pydensecrf():
    from pydensecrf.utils import unary_from_labels

    from ussbench.postprocess._crf_core import _unary_from_labels

    labels = np.array([[0, 2], [1, 2]])
    ours = _unary_from_labels(labels, 3, CRFParams(gt_prob=0.8))
    ref = unary_from_labels(labels, 3, 0.8, zero_unsure=False)
    assert np.allclose(ours, ref)
    onehot = _unary_from_labels(labels, 3, CRFParams(label_unary="clipped_onehot"))
    assert np.isclose(onehot[0, 0], -np.log(0.99)) and np.isclose(onehot[1, 0], -np.log(0.01))


def test_pool_and_serial_agree(caplog):
    images, labels = [], []
    for s in range(4):
        image, _, noisy = toy(seed=s)
        images.append(image)
        labels.append(noisy)
    serial = crf_batch(images, labels, 2, workers=1)
    with caplog.at_level(logging.WARNING, logger="ussbench.postprocess.crf"):
        pooled = crf_batch(images, labels, 2, workers=2, timeout=120)
        with CRFPool(2) as pool:  # one pool reused across batches
            first = crf_batch(images[:2], labels[:2], 2, pool=pool, timeout=120)
            assert pool._pool is not None
            second = crf_batch(images[2:], labels[2:], 2, pool=pool, timeout=120)
    assert not caplog.records, [r.getMessage() for r in caplog.records]  # the pools really did the work
    assert all(np.array_equal(a, b) for a, b in zip(serial, pooled))
    assert all(np.array_equal(a, b) for a, b in zip(serial, first + second))
    assert all(np.array_equal(a, DenseCRF().apply(i, lab, 2)) for a, i, lab in zip(serial, images, labels))


def test_pool_that_cannot_answer_in_time_falls_back_serially(caplog):
    image, _, noisy = toy()
    expected = DenseCRF().apply(image, noisy, 2)
    with caplog.at_level(logging.WARNING, logger="ussbench.postprocess.crf"):
        out = crf_batch([image, image], [noisy, noisy], 2, workers=2, timeout=1e-4)
    assert any("serially" in r.getMessage() for r in caplog.records)
    assert all(np.array_equal(o, expected) for o in out)


def test_hung_pool_is_killed_after_timeout():
    big = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    task = (big, 21, CRFParams(max_iter=50), np.zeros((700, 700), np.int64), None)
    pool = CRFPool(1, start_method="fork")
    pool._pool = pool._make_pool(60.0)  # started: what follows tests the per-result timeout only
    t0 = time.monotonic()
    results = pool.map(lambda i: task, 2, timeout=0.3)
    assert results == [None, None]
    assert pool._pool is None  # terminated, not joined on a busy worker
    assert time.monotonic() - t0 < 10


def test_plugin_registration_presets_and_errors():
    spec = registry._registry["postprocess"]["crf"]  # registered on import; get() would load every plugin
    assert spec.cls is DenseCRF
    dsm = DenseCRF(**spec.presets["dsm"])
    assert (dsm.max_iter, dsm.bi_xy_std, dsm.bi_rgb_std, dsm.bi_w) == (5, 80.0, 13.0, 10.0)
    assert DenseCRF(**spec.presets["stego"]).params == DenseCRF().params
    image, _, noisy = toy()
    # the DSM preset ignores soft scores and uses the hard labels
    probs = np.stack([noisy, 1 - noisy]).astype(np.float32)  # adversarial scores
    assert np.array_equal(dsm.apply(image, noisy, 2, probs=probs), dsm.apply(image, noisy, 2))
    with pytest.raises(ConfigError, match="gt_prob"):
        DenseCRF(gt_prob=1.0)
    with pytest.raises(ValueError, match="n_labels=2"):
        DenseCRF().apply(image, noisy + 1, 2)
    with pytest.raises(ValueError, match="shape"):
        DenseCRF().apply(image, noisy[:-1], 2)
    assert np.array_equal(run_task((image, 2, CRFParams(), noisy, None)), DenseCRF().apply(image, noisy, 2))
