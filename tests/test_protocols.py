"""STEGO-protocol preprocessing against torchvision's transforms, dataset views, pixel logits, named protocols."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ussbench.base import Dataset
from ussbench.dataset_clusterers.cluster_probe import ClusterProbe
from ussbench.errors import ConfigError
from ussbench.evaluation.protocols import (
    FiveCropView,
    ProtocolView,
    center_crop,
    five_crop,
    flip_average,
    get_protocol,
    short_side_size,
    stego_pixel_logits,
    stego_resize_crop,
    upsample_code,
)

tvF = pytest.importorskip("torchvision.transforms.functional")
from torchvision.transforms import InterpolationMode  # noqa: E402


def pair(h: int, w: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.integers(0, 27, (h, w)).astype(np.int64)
    label[: h // 2 + 1, : w // 2 + 1] = np.where(rng.random((h // 2 + 1, w // 2 + 1)) < 0.5, -1, 5)
    return image, label


class Toy(Dataset):
    """An in-memory dataset of random pairs of different sizes."""

    plugin_name = "toy"

    def __init__(self, sizes=((40, 60), (50, 30))):
        self.sizes = sizes
        self.num_classes = 27
        self.class_names = [str(i) for i in range(27)]

    def ids(self):
        return [f"im{i}" for i in range(len(self.sizes))]

    def load_image(self, index):
        return pair(*self.sizes[index], seed=index)[0]

    def load_label(self, index):
        return pair(*self.sizes[index], seed=index)[1]


def tv_reference(image, label, res, interp):
    """The reference transform on PIL images: Resize(res, interp) then CenterCrop(res)."""
    mode = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR}[interp]
    img = tvF.center_crop(tvF.resize(Image.fromarray(image), res, interpolation=mode), res)
    lab = tvF.resize(
        Image.fromarray(label.astype(np.int32), mode="I"), res, interpolation=InterpolationMode.NEAREST
    )
    return np.asarray(img), np.asarray(tvF.center_crop(lab, res)).astype(np.int64)


def test_short_side_size_truncates_the_long_side():
    assert short_side_size(375, 500, 320) == (320, 426)  # 500 * 320 / 375 = 426.67
    assert short_side_size(500, 375, 320) == (426, 320)
    assert short_side_size(320, 320, 320) == (320, 320)
    with pytest.raises(ValueError, match="res"):
        short_side_size(10, 10, 0)


@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (24, 24), (11, 90)])
@pytest.mark.parametrize("interp", ["nearest", "bilinear"])
def test_resize_crop_matches_torchvision(shape, interp):
    image, label = pair(*shape)
    img, lab = stego_resize_crop(image, label, res=16, rgb_interpolation=interp)
    ref_img, ref_lab = tv_reference(image, label, 16, interp)
    assert img.shape == (16, 16, 3) and lab.shape == (16, 16) and lab.dtype == np.int64
    assert np.array_equal(img, ref_img)
    assert np.array_equal(lab, ref_lab)
    assert (lab == -1).any()  # ignore survives nearest resizing


def test_nearest_rgb_keeps_only_source_colours():
    image, label = pair(30, 45)
    img, _ = stego_resize_crop(image, label, res=20)
    colours = {tuple(c) for c in image.reshape(-1, 3)}
    assert all(tuple(c) in colours for c in img.reshape(-1, 3))  # NEAREST: no blended colours


def test_center_crop_rounds_half_to_even_like_torchvision():
    a = np.arange(7 * 6).reshape(7, 6)
    for size in [(2, 2), (4, 3), (5, 6)]:
        ref = np.asarray(tvF.center_crop(torch.as_tensor(a), list(size)))
        assert np.array_equal(center_crop(a, size), ref), size
    with pytest.raises(ValueError, match="larger"):
        center_crop(a, (8, 2))


def test_five_crop_matches_torchvision_order():
    image, label = pair(21, 34)
    crops = five_crop(image, label, ratio=0.5)
    ref = tvF.five_crop(torch.as_tensor(image).permute(2, 0, 1), [10, 17])  # (int(21*.5), int(34*.5))
    assert len(crops) == 5
    for (img, lab), r in zip(crops, ref):
        assert np.array_equal(img, r.permute(1, 2, 0).numpy())
        assert lab.shape == (10, 17)
    assert np.array_equal(crops[3][1], label[11:, 17:])  # bottom-right
    with pytest.raises(ValueError, match="ratio"):
        five_crop(image, label, ratio=0.0)


def test_protocol_view_and_flip():
    ds = Toy()
    view = ProtocolView(ds, res=16)
    flipped = ProtocolView(ds, res=16, flip=True)
    assert len(view) == 2 and view.num_classes == 27 and view.plugin_name == "toy"
    img, lab = stego_resize_crop(ds.load_image(1), ds.load_label(1), 16)
    assert np.array_equal(view.load_image(1), img) and np.array_equal(view.load_label(1), lab)
    assert np.array_equal(flipped.load_image(1), img[:, ::-1]) and np.array_equal(
        flipped.load_label(1), lab[:, ::-1]
    )
    ids = [ProtocolView(ds, res=r, flip=f).cache_identity()["view"] for r in (16, 32) for f in (False, True)]
    assert len({str(i) for i in ids}) == 4


def test_five_crop_view():
    ds = Toy()
    crops = FiveCropView(ds, ratio=0.5)
    assert len(crops) == 10 and crops.ids()[6] == "im1#crop1"
    expected = five_crop(ds.load_image(1), ds.load_label(1), 0.5)[1]
    assert np.array_equal(crops.load_image(6), expected[0]) and np.array_equal(
        crops.load_label(6), expected[1]
    )
    jpeg = FiveCropView(ds, jpeg_quality=75).load_image(6)
    assert jpeg.shape == expected[0].shape and not np.array_equal(
        jpeg, expected[0]
    )  # lossy, as the reference
    assert crops.cache_identity()["n"] == 10


def test_flip_average_and_pixel_logits():
    g = torch.Generator().manual_seed(0)
    code = torch.randn(4, 5, 8, generator=g)
    assert torch.allclose(flip_average(code, code.flip(-2)), code)  # mirrored image, mirrored code
    up = upsample_code(code, (16, 20))
    assert up.shape == (16, 20, 8)
    assert torch.allclose(upsample_code(code, (4, 5)), code, atol=1e-6)
    probe = ClusterProbe(n_clusters=3, steps=20, batch_size=10, init="kmeans++").fit(code.reshape(-1, 8))
    logits = stego_pixel_logits(code, probe, (16, 20))
    assert logits.shape == (3, 16, 20)
    assert torch.equal(logits.argmax(0).reshape(-1), probe.predict(up.reshape(-1, 8)))
    tta = stego_pixel_logits(code, probe, (16, 20), code_of_flipped=torch.zeros_like(code))
    assert torch.allclose(tta, probe.logits(upsample_code(code / 2, (16, 20))).permute(2, 0, 1), atol=1e-6)


def test_named_protocols():
    default, dsm, stego = get_protocol("default"), get_protocol("dsm_voc"), get_protocol("stego")
    assert (default.resize, default.matching, default.objective, default.crf) == (
        "original",
        "auto",
        "pixels",
        False,
    )
    assert (dsm.resize, dsm.objective) == ("original", "iou")
    assert (stego.res, stego.rgb_interpolation, stego.upsample, stego.dataset_clusterer) == (
        320, "nearest", "bilinear_code", "cluster_probe",
    )  # fmt: skip
    assert stego.crf and stego.report_without_crf and stego.flip_tta and stego.logit_alpha == 2.0
    assert stego.checkpoint == "last" and stego.train_five_crop and stego.train_res == 224
    assert get_protocol("stego", crf=False, flip_tta=False).crf is False
    ds = Toy()
    assert default.view(ds) is ds
    assert isinstance(get_protocol("stego", res=16).view(ds), ProtocolView)
    train = get_protocol("stego", train_res=8).train_view(ds)
    assert len(train) == 10 and train.load_image(0).shape == (8, 8, 3)
    with pytest.raises(ConfigError, match="known: default, dsm_voc, stego"):
        get_protocol("picie")
    with pytest.raises(ConfigError, match="no field"):
        get_protocol("stego", crf_weight=1.0)
    with pytest.raises(ConfigError, match="res"):
        get_protocol("stego", res=0)
    with pytest.raises(ConfigError, match="flip"):
        default.view(ds, flip=True)
