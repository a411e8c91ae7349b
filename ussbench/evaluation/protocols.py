"""Named evaluation protocols and the STEGO protocol's preprocessing, as pure functions and dataset views.

``default`` is ussbench's own protocol (original label resolution, one Hungarian match over all pixels of the
split, matched pixel counts). ``dsm_voc`` is Deep Spectral Methods' (original resolution, Hungarian on the
summed IoU). ``stego`` is the protocol every STEGO-family paper reports (reference study §1.2-1.6): images
and labels resized with NEAREST so their short side is 320 (RGB too: a faithful quirk), centre-cropped to
320x320, codes bilinearly upsampled to the crop before a cluster probe labels each pixel, optional flip
test-time augmentation, optional dense CRF, numbers reported with and without the CRF. Training sets of that
protocol are five-crops (ratio 0.5) of the train images, resized and centre-cropped at 224.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..base import Dataset
from ..errors import ConfigError

Interpolation = Literal["nearest", "bilinear"]
_PIL = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR}


# --------------------------------------------------------------------------- geometry (torchvision semantics)


def short_side_size(height: int, width: int, res: int) -> tuple[int, int]:
    """(H', W') after resizing so the short side is ``res``; the long side is truncated (torchvision)."""
    if res < 1:
        raise ValueError(f"res must be >= 1, got {res}")
    if width <= height:
        return int(res * height / width), res
    return res, int(res * width / height)


def _resize(array: np.ndarray, size: tuple[int, int], interpolation: Interpolation) -> np.ndarray:
    """PIL resize (as torchvision does for PIL images) of an RGB uint8 image or an integer label map."""
    h, w = size
    if array.shape[:2] == (h, w):
        return array.copy()
    if array.ndim == 3:
        return np.asarray(Image.fromarray(array).resize((w, h), _PIL[interpolation]), dtype=np.uint8)
    if interpolation != "nearest":
        raise ValueError("label maps can only be resized with nearest interpolation")
    pil = Image.fromarray(array.astype(np.int32), mode="I")
    return np.asarray(pil.resize((w, h), Image.NEAREST), dtype=np.int64)


def center_crop(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre crop to (h, w) with torchvision's offsets int(round((H - h) / 2)) (round half to even)."""
    H, W = array.shape[:2]
    h, w = size
    if h > H or w > W:
        raise ValueError(f"crop {size} is larger than the array ({H}, {W})")
    top, left = int(round((H - h) / 2.0)), int(round((W - w) / 2.0))
    return array[top : top + h, left : left + w].copy()


def _check_pair(image: np.ndarray, label: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    if label.shape != image.shape[:2]:
        raise ValueError(f"label shape {label.shape} differs from the image's {image.shape[:2]}")


def stego_resize_image(
    image: np.ndarray, res: int = 320, rgb_interpolation: Interpolation = "nearest"
) -> np.ndarray:
    """Short side -> ``res`` (NEAREST by default, as the reference), then the centre res x res crop."""
    if rgb_interpolation not in _PIL:
        raise ValueError(f"rgb_interpolation must be 'nearest' or 'bilinear', got {rgb_interpolation!r}")
    resized = _resize(image, short_side_size(*image.shape[:2], res), rgb_interpolation)
    return center_crop(resized, (res, res))


def stego_resize_label(label: np.ndarray, res: int = 320) -> np.ndarray:
    """The label counterpart: NEAREST short-side resize and centre crop; -1 (ignore) survives."""
    resized = _resize(np.asarray(label), short_side_size(*label.shape[:2], res), "nearest")
    return center_crop(resized, (res, res)).astype(np.int64)


def stego_resize_crop(
    image: np.ndarray, label: np.ndarray, res: int = 320, rgb_interpolation: Interpolation = "nearest"
) -> tuple[np.ndarray, np.ndarray]:
    """STEGO's ``get_transform(res, crop='center')`` for an (image, label) pair -> (res, res, 3), (res, res)."""
    _check_pair(image, label)
    return stego_resize_image(image, res, rgb_interpolation), stego_resize_label(label, res)


def five_crop(
    image: np.ndarray, label: np.ndarray, ratio: float = 0.5
) -> list[tuple[np.ndarray, np.ndarray]]:
    """STEGO's training crops: torchvision five_crop at (int(H ratio), int(W ratio)) -> [tl, tr, bl, br, centre]."""
    _check_pair(image, label)
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
    H, W = label.shape
    h, w = int(H * ratio), int(W * ratio)
    if h < 1 or w < 1:
        raise ValueError(f"ratio {ratio} leaves an empty crop of a {H}x{W} image")
    corners = [(0, 0), (0, W - w), (H - h, 0), (H - h, W - w)]
    crops = [(image[t : t + h, s : s + w].copy(), label[t : t + h, s : s + w].copy()) for t, s in corners]
    crops.append((center_crop(image, (h, w)), center_crop(label, (h, w))))
    return crops


# --------------------------------------------------------------------------- codes -> pixel scores


def flip_average(code: torch.Tensor, code_of_flipped: torch.Tensor) -> torch.Tensor:
    """Flip TTA of the STEGO eval script: (code + unflipped code of the mirrored image) / 2; maps (..., h, w, D)."""
    if code.shape != code_of_flipped.shape:
        raise ValueError(f"code shapes differ: {tuple(code.shape)} vs {tuple(code_of_flipped.shape)}")
    return (code + code_of_flipped.flip(-2)) / 2


def upsample_code(code: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w, D) code map -> (H, W, D), bilinear, align_corners=False (the reference upsamples before the probe)."""
    if code.ndim != 3:
        raise ValueError(f"code must be (h, w, D), got shape {tuple(code.shape)}")
    up = F.interpolate(
        code.permute(2, 0, 1)[None].float(), size=tuple(size), mode="bilinear", align_corners=False
    )
    return up[0].permute(1, 2, 0)


def stego_pixel_logits(
    code: torch.Tensor, probe: Any, size: tuple[int, int], code_of_flipped: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-pixel cluster scores (K, H, W) = log_softmax(alpha cos) of the upsampled (flip-averaged) code.

    ``probe`` is a fitted dataset clusterer with ``logits(X)`` (the ``cluster_probe`` plugin). argmax over K
    is the prediction without CRF; the scores are the CRF's unary (``crf_batch(..., probs_list=...)``).
    """
    if code_of_flipped is not None:
        code = flip_average(code, code_of_flipped)
    return probe.logits(upsample_code(code, size)).permute(2, 0, 1)


# --------------------------------------------------------------------------- dataset views


class ProtocolView(Dataset):
    """A dataset seen through the STEGO preprocessing (short side ``res``, centre crop; optional h-flip).

    Images and labels come out res x res, so features, labels, panels and the CRF all share one grid.
    Not a registered plugin; its cache identity extends the wrapped dataset's with the view's parameters.
    """

    def __init__(self, dataset: Dataset, res: int = 320, rgb_interpolation: Interpolation = "nearest",
                 flip: bool = False):  # fmt: skip
        if res < 1:
            raise ConfigError(f"protocol view: res must be >= 1, got {res}")
        if rgb_interpolation not in _PIL:
            raise ConfigError(
                f"protocol view: rgb_interpolation must be nearest or bilinear, got {rgb_interpolation!r}"
            )
        self.dataset = dataset
        self.res = res
        self.rgb_interpolation = rgb_interpolation
        self.flip = flip
        self.plugin_kind = dataset.plugin_kind
        self.plugin_name = dataset.plugin_name
        self.num_classes = dataset.num_classes
        self.class_names = dataset.class_names
        self.description = f"{dataset.description} [{res}x{res} centre crop{', flipped' if flip else ''}]"

    def ids(self) -> list[str]:
        return self.dataset.ids()

    def check(self) -> None:
        self.dataset.check()

    def load_image(self, index: int) -> np.ndarray:
        image = stego_resize_image(self.dataset.load_image(index), self.res, self.rgb_interpolation)
        return np.ascontiguousarray(image[:, ::-1]) if self.flip else image

    def load_label(self, index: int) -> np.ndarray:
        label = stego_resize_label(self.dataset.load_label(index), self.res)
        return np.ascontiguousarray(label[:, ::-1]) if self.flip else label

    def cache_identity(self) -> dict[str, Any]:
        view = {"view": "stego_resize_crop", "res": self.res, "rgb_interpolation": self.rgb_interpolation,
                "flip": self.flip}  # fmt: skip
        return {**self.dataset.cache_identity(), "view": view}


class FiveCropView(Dataset):
    """Five crops (tl, tr, bl, br, centre) of every image, crop i*5+k as in STEGO's cropped datasets.

    ``jpeg_quality`` re-encodes each image crop as the reference's saved JPEGs did (PIL default 75); None
    keeps the pixels exact. Labels are exact either way.
    """

    def __init__(self, dataset: Dataset, ratio: float = 0.5, jpeg_quality: int | None = None):
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(f"five-crop view: ratio must lie in (0, 1], got {ratio}")
        if jpeg_quality is not None and not 1 <= jpeg_quality <= 100:
            raise ConfigError(f"five-crop view: jpeg_quality must be in 1..100, got {jpeg_quality}")
        self.dataset = dataset
        self.ratio = ratio
        self.jpeg_quality = jpeg_quality
        self.plugin_kind = dataset.plugin_kind
        self.plugin_name = dataset.plugin_name
        self.num_classes = dataset.num_classes
        self.class_names = dataset.class_names
        self.description = f"{dataset.description} [five crops, ratio {ratio}]"
        self._last: tuple[int, list[tuple[np.ndarray, np.ndarray]]] | None = None

    def ids(self) -> list[str]:
        return [f"{i}#crop{k}" for i in self.dataset.ids() for k in range(5)]

    def check(self) -> None:
        self.dataset.check()

    def _crop(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        base, k = divmod(index, 5)
        if self._last is None or self._last[0] != base:  # crops of one image are read in a row
            self._last = (
                base,
                five_crop(self.dataset.load_image(base), self.dataset.load_label(base), self.ratio),
            )
        return self._last[1][k]

    def load_image(self, index: int) -> np.ndarray:
        image = self._crop(index)[0].copy()
        if self.jpeg_quality is None:
            return image
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=self.jpeg_quality)
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.uint8)

    def load_label(self, index: int) -> np.ndarray:
        return self._crop(index)[1].astype(np.int64)

    def cache_identity(self) -> dict[str, Any]:
        view = {"view": "five_crop", "ratio": self.ratio, "jpeg_quality": self.jpeg_quality}
        return {**self.dataset.cache_identity(), "n": len(self), "view": view}


# --------------------------------------------------------------------------- named protocols


@dataclass(frozen=True)
class ProtocolSpec:
    """What a named protocol fixes: preprocessing, how predictions reach pixels, matching, TTA, CRF, reporting.

    resize: 'original' (labels at their own resolution) or 'short_side_center_crop' (``res``, see
    :func:`stego_resize_crop`); upsample: 'nearest_labels' (per-patch labels, nearest) or 'bilinear_code'
    (codes bilinear to the pixels, then the pixel-level clusterer); crf: run the dense CRF (preset
    ``crf_preset``); report_without_crf: also score the predictions before the CRF.
    """

    name: str
    description: str
    resize: Literal["original", "short_side_center_crop"] = "original"
    res: int | None = None
    rgb_interpolation: Interpolation = "nearest"
    matching: Literal["auto", "hungarian", "many_to_one"] = "auto"
    objective: Literal["pixels", "iou"] = "pixels"
    upsample: Literal["nearest_labels", "bilinear_code"] = "nearest_labels"
    dataset_clusterer: str | None = None
    logit_alpha: float = 2.0
    flip_tta: bool = False
    crf: bool = False
    crf_preset: str | None = None
    report_without_crf: bool = True
    train_five_crop: bool = False
    five_crop_ratio: float = 0.5
    train_res: int | None = None
    checkpoint: Literal["last"] = "last"  # never selected on the evaluation split

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def view(self, dataset: Dataset, flip: bool = False) -> Dataset:
        """The dataset as this protocol evaluates it (unchanged for 'original')."""
        if self.resize == "original":
            if flip:
                raise ConfigError(f"protocol {self.name!r}: flip views need a fixed-size resize")
            return dataset
        return ProtocolView(dataset, int(self.res or 320), self.rgb_interpolation, flip)

    def train_view(self, dataset: Dataset) -> Dataset:
        """The training set as the protocol's learners see it (five crops at ``train_res``), else unchanged."""
        if not self.train_five_crop:
            return dataset
        crops = FiveCropView(dataset, self.five_crop_ratio)
        return (
            ProtocolView(crops, int(self.train_res or 224), self.rgb_interpolation)
            if self.train_res
            else crops
        )


PROTOCOLS: dict[str, ProtocolSpec] = {
    "default": ProtocolSpec(
        name="default",
        description="ussbench: original label resolution, per-patch labels upsampled nearest, one Hungarian "
        "match over all pixels of the split (matched pixel counts; extra clusters by majority)",
    ),
    "dsm_voc": ProtocolSpec(
        name="dsm_voc",
        description="Deep Spectral Methods (VOC 2012 val): original resolution, nearest upsampling, Hungarian "
        "maximising the summed IoU",
        objective="iou",
        crf_preset="dsm",
    ),
    "stego": ProtocolSpec(
        name="stego",
        description="STEGO family: NEAREST resize of the short side to 320 and centre 320x320 crop, codes "
        "bilinear to pixels, cluster probe log_softmax(2 cos), flip TTA, dense CRF, one Hungarian over all "
        "pixels (counts), reported with and without CRF; training on five-crops (0.5) at 224",
        resize="short_side_center_crop",
        res=320,
        matching="hungarian",
        upsample="bilinear_code",
        dataset_clusterer="cluster_probe",
        flip_tta=True,
        crf=True,
        crf_preset="stego",
        train_five_crop=True,
        train_res=224,
    ),
}


def get_protocol(name: str, **overrides: Any) -> ProtocolSpec:
    """The named protocol, optionally with fields overridden (e.g. ``get_protocol('stego', crf=False)``)."""
    if name not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}")
    spec = PROTOCOLS[name]
    unknown = sorted(set(overrides) - set(spec.as_dict()))
    if unknown:
        raise ConfigError(
            f"protocol {name!r} has no field(s) {', '.join(unknown)}; fields: {', '.join(spec.as_dict())}"
        )
    spec = replace(spec, **overrides)
    if spec.resize == "short_side_center_crop" and not (isinstance(spec.res, int) and spec.res >= 1):
        raise ConfigError(
            f"protocol {name!r}: res must be a positive int for resize {spec.resize!r}, got {spec.res!r}"
        )
    if spec.rgb_interpolation not in _PIL:
        raise ConfigError(
            f"protocol {name!r}: rgb_interpolation must be nearest or bilinear, got {spec.rgb_interpolation!r}"
        )
    return spec
