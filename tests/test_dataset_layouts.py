"""Datasets read from tiny copies of their standard on-disk layouts, with the variations real copies have."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ussbench.datasets.cityscapes import Cityscapes27
from ussbench.datasets.folder import ImageMaskFolder
from ussbench.datasets.voc import VOC2012
from ussbench.errors import DataError

VOC_IDS = ["2007_000033", "2007_000042"]


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map (index -> RGB) as a flat 768-entry PIL palette."""
    palette = []
    for index in range(256):
        r = g = b = 0
        c = index
        for bit in range(8):
            r |= (c & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette += [r, g, b]
    return palette


def band_label(values: list[int], size: tuple[int, int] = (24, 32)) -> np.ndarray:
    """(H, W) uint8 map of vertical bands, one per value, left to right."""
    h, w = size
    label = np.zeros((h, w), dtype=np.uint8)
    for k, v in enumerate(values):
        label[:, k * w // len(values) : (k + 1) * w // len(values)] = v
    return label


def write_voc(root: Path) -> Path:
    """VOCdevkit/VOC2012 with JPEGImages, palette SegmentationClass PNGs (background, person, void, cat)."""
    base = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (base / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in VOC_IDS:
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(
            base / "JPEGImages" / f"{i}.jpg"
        )
        label = Image.fromarray(band_label([0, 15, 255, 8]), mode="P")
        label.putpalette(voc_palette())
        label.save(base / "SegmentationClass" / f"{i}.png")
    (base / "ImageSets/Segmentation/val.txt").write_text("\n".join(VOC_IDS) + "\n")
    return base


def test_voc_palette_indices_are_the_classes_and_255_is_void(tmp_path):
    write_voc(tmp_path)
    ds = VOC2012(data_root=str(tmp_path))
    ds.check()
    label = ds.load_label(0)
    assert label[0, [0, 8, 16, 24]].tolist() == [0, 15, -1, 8]  # background, person, void, cat


def test_voc_labels_resaved_as_grey_levels_fail_instead_of_being_ignored(tmp_path):
    """A palette PNG converted to grey levels holds luminances (person 147, cat 38): they used to become void
    silently, leaving only the background to score."""
    base = write_voc(tmp_path)
    path = base / "SegmentationClass" / f"{VOC_IDS[0]}.png"
    Image.open(path).convert("L").save(path)
    ds = VOC2012(data_root=str(tmp_path))
    with pytest.raises(DataError, match=rf"{VOC_IDS[0]}.png' has value \d+; VOC labels hold palette indices"):
        ds.load_label(0)


def write_folder(root: Path, n: int = 2) -> Path:
    """images/<name>.jpg + labels/<name>.png (classes 0, 1, 2 and void 255) for an image_folder dataset."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(0)
    for k in range(n):
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(
            root / "images" / f"im{k}.jpg"
        )
        Image.fromarray(band_label([0, 1, 2, 255])).save(root / "labels" / f"im{k}.png")
    return root


def test_a_16_bit_grey_image_keeps_its_contrast(tmp_path):
    """PIL's convert("RGB") clips 16-bit grey values at 255: every such image used to be read as pure white."""
    root = write_folder(tmp_path / "folder")
    grey = np.linspace(0, 65535, 24 * 32).reshape(24, 32).astype(np.uint16)
    (root / "images" / "im0.jpg").unlink()
    Image.fromarray(grey).save(root / "images" / "im0.png")
    image = ImageMaskFolder(num_classes=3, data_root=str(root)).load_image(0)
    assert image.dtype == np.uint8 and image.shape == (24, 32, 3)
    assert image[0, 0].tolist() == [0, 0, 0] and image[-1, -1].tolist() == [255, 255, 255]
    assert np.abs(image[:, :, 0].astype(int) - grey // 257).max() <= 1


@pytest.mark.parametrize("points_at", ["VOCdevkit", "VOCdevkit/VOC2012", ".."])
def test_a_data_root_one_level_off_names_the_folder_to_pass(tmp_path, points_at):
    """--data-root at VOCdevkit/ (or inside it), or at the folder above the one holding it: the error names
    the folder that holds VOCdevkit/VOC2012/ (it used to repeat the generic hint only)."""
    root = tmp_path / "pascal"
    write_voc(root)
    with pytest.raises(DataError, match=rf"'{root}' holds VOCdevkit/VOC2012/: pass --data-root {root}$"):
        VOC2012(data_root=str(root / points_at)).ids()


@pytest.mark.parametrize("points_at", ["images", ".."])
def test_an_image_folder_root_one_level_off_names_the_folder_to_pass(tmp_path, points_at):
    """An image_folder data root at images/ itself, or one folder above the dataset: the error names the folder
    holding images/ and labels/ (it used to say only that <root>/images does not exist)."""
    root = write_folder(tmp_path / "mine" / "toy")
    start = root / points_at if points_at == "images" else root.parent
    with pytest.raises(DataError, match=rf"'{root}' holds images/ and labels/: pass it as --data-root$"):
        ImageMaskFolder(num_classes=3, data_root=str(start)).ids()
    with pytest.raises(DataError, match=r"pass it as the dataset's root$"):
        ImageMaskFolder(num_classes=3, root=str(start)).ids()


def test_a_folder_without_readable_images_names_the_folder_and_what_it_holds(tmp_path):
    """TIFF images (or images one folder deeper) used to give "found no images" and the parameter dict."""
    root = write_folder(tmp_path / "folder")
    for path in (root / "images").iterdir():
        path.rename(path.with_suffix(".tif"))
    with pytest.raises(
        DataError, match=r"no .jpg/.jpeg/.png/.bmp images in '.*images': it holds 2 other .* 'im0.tif'"
    ):
        ImageMaskFolder(num_classes=3, data_root=str(root)).check()


def write_cityscapes(root: Path) -> Path:
    """cityscapes/leftImg8bit/val/<city>/*_leftImg8bit.png + gtFine/val/<city>/*_gtFine_labelIds.png."""
    base = root / "cityscapes"
    for city in ("frankfurt", "lindau"):
        (base / "leftImg8bit/val" / city).mkdir(parents=True)
        (base / "gtFine/val" / city).mkdir(parents=True)
        stem = f"{city}_000000_000019"
        Image.fromarray(np.zeros((16, 32, 3), dtype=np.uint8)).save(
            base / "leftImg8bit/val" / city / f"{stem}_leftImg8bit.png"
        )
        label = band_label([0, 6, 7, 26, 33, 255], (16, 32))  # unlabeled, ground, road, car, bicycle, void
        Image.fromarray(label).save(base / "gtFine/val" / city / f"{stem}_gtFine_labelIds.png")
    return base


def test_cityscapes_label_ids_map_to_the_27_classes(tmp_path):
    write_cityscapes(tmp_path)
    ds = Cityscapes27(data_root=str(tmp_path), strict_count=False)
    ds.check()
    assert ds.ids() == ["frankfurt/frankfurt_000000_000019", "lindau/lindau_000000_000019"]
    row = ds.load_label(0)[0]
    assert row[[0, 6, 11, 16, 22, 27]].tolist() == [-1, -1, 0, 19, 26, -1]
    assert ds.class_names[19] == "car" and ds.class_names[26] == "bicycle"


def test_cityscapes_images_without_city_folders_name_the_layout(tmp_path):
    base = write_cityscapes(tmp_path)
    for path in (base / "leftImg8bit/val").glob("*/*.png"):
        path.rename(base / "leftImg8bit/val" / path.name)
    with pytest.raises(DataError, match=r"no <city>/\*_leftImg8bit.png images in '.*val': it holds 4 other"):
        Cityscapes27(data_root=str(tmp_path), strict_count=False).check()


def test_upper_case_suffixes_are_found(tmp_path):
    """``IM0.JPG`` / ``im0.PNG`` (cameras, Windows tools): the image was found, its ``.PNG`` label was not."""
    root = write_folder(tmp_path / "folder")
    for path in [*(root / "images").iterdir(), *(root / "labels").iterdir()]:
        path.rename(path.with_suffix(path.suffix.upper()))
    ds = ImageMaskFolder(num_classes=3, data_root=str(root))
    ds.check()
    assert ds.ids() == ["im0", "im1"] and ds.load_label(1)[0, [0, 8, 16, 24]].tolist() == [0, 1, 2, -1]


def test_a_jpeg_label_is_refused_by_name(tmp_path):
    root = write_folder(tmp_path / "folder")
    label = root / "labels" / "im1.png"
    Image.open(label).save(label.with_suffix(".jpg"))
    label.unlink()
    with pytest.raises(
        DataError, match=r"label file '.*im1.jpg' is a JPEG, whose compression alters label values"
    ):
        ImageMaskFolder(num_classes=3, data_root=str(root)).check()


def test_a_1_bit_mask_is_read_as_0_and_1(tmp_path):
    """A binary mask saved as a 1-bit PNG (mode "1") is single-channel: it used to be refused as not one."""
    root = write_folder(tmp_path / "folder")
    Image.fromarray(band_label([0, 255])).convert("1").save(root / "labels" / "im0.png")
    label = ImageMaskFolder(num_classes=2, data_root=str(root)).load_label(0)
    assert label[0, [0, 24]].tolist() == [0, 1]


def test_a_colour_label_is_one_line_naming_the_file_once(tmp_path):
    base = write_voc(tmp_path)
    path = base / "SegmentationClass" / f"{VOC_IDS[0]}.png"
    Image.open(path).convert("RGB").save(path)
    with pytest.raises(
        DataError, match=r"^label file '[^']*' has mode 'RGB'; expected a single-channel PNG"
    ) as err:
        VOC2012(data_root=str(tmp_path)).load_label(0)
    assert str(err.value).count(VOC_IDS[0]) == 1


def test_a_listed_voc_image_without_its_label_is_named_before_work(tmp_path):
    base = write_voc(tmp_path)
    (base / "SegmentationClass" / f"{VOC_IDS[1]}.png").unlink()
    with pytest.raises(
        DataError, match=rf"^dataset 'voc2012': file '[^']*{VOC_IDS[1]}.png' named by the image list"
    ):
        VOC2012(data_root=str(tmp_path)).check()


def _voc_grid(tmp_path: Path, data_root: Path) -> Path:
    from tests.conftest import tiny_grid

    return tiny_grid(tmp_path, data_root, datasets=["voc2012"], image_clusterers=["none"],
                     dataset_clusterers=["kmeans"], seeds=[0], protocol={"panels": 0, "n_clusters": 2})  # fmt: skip


def test_a_bad_label_stops_the_run_while_planning_before_any_feature(tmp_path, capsys):
    """Label values used to be read at cell time, after the features: now every label is decoded at planning."""
    from ussbench.cli import main

    base = write_voc(tmp_path / "data")
    path = base / "SegmentationClass" / f"{VOC_IDS[1]}.png"
    Image.open(path).convert("L").save(path)
    code = main(["run", "--grid", str(_voc_grid(tmp_path, tmp_path / "data"))])
    err = capsys.readouterr().err
    assert code != 0 and f"{VOC_IDS[1]}.png' has value" in err and "VOC labels hold palette indices" in err
    assert not (tmp_path / "cache" / "features").exists() and not (tmp_path / "out" / "cells").exists()


def test_a_passed_label_check_is_remembered_until_a_label_changes(tmp_path, monkeypatch):
    from ussbench.config import load_grid
    from ussbench.runner import plan_grid

    base = write_voc(tmp_path / "data")
    grid = _voc_grid(tmp_path, tmp_path / "data")
    decoded = []
    original = VOC2012.load_label
    monkeypatch.setattr(VOC2012, "load_label", lambda self, i: decoded.append(i) or original(self, i))
    plan_grid(load_grid(grid))
    assert decoded == [0, 1]
    plan_grid(load_grid(grid))
    assert decoded == [0, 1]  # the same content: nothing decoded again
    path = base / "SegmentationClass" / f"{VOC_IDS[0]}.png"
    Image.open(path).convert("L").save(path)
    with pytest.raises(DataError, match=f"{VOC_IDS[0]}.png' has value"):
        plan_grid(load_grid(grid))


def test_a_label_check_passed_under_other_values_void_does_not_cover_the_default(tmp_path):
    """The remembered check is keyed by every dataset parameter: a label value 7 with num_classes 3 passes with
    other_values: void, and is still refused at planning with the default other_values: error."""
    from tests.conftest import tiny_grid, write_toy_folder
    from ussbench.config import load_grid
    from ussbench.runner import plan_grid

    root = write_toy_folder(tmp_path / "toy", n_images=3)
    Image.fromarray(np.full((48, 64), 7, dtype=np.uint8), mode="L").save(root / "labels" / "img01.png")

    def grid(**params):
        dataset = {"name": "image_folder", "params": {"num_classes": 3, **params}}
        return load_grid(tiny_grid(tmp_path, root, datasets=[dataset], seeds=[0], image_clusterers=["none"],
                                   dataset_clusterers=["kmeans"], protocol={"panels": 0}))  # fmt: skip

    plan_grid(grid(other_values="void"))
    with pytest.raises(DataError, match=r"img01.png' has value 7; it is neither one of the 3 classes"):
        plan_grid(grid())


@pytest.mark.parametrize("suffix", [".JPG", ".jpeg"])
def test_voc_images_under_another_jpeg_suffix_are_found(tmp_path, suffix):
    """A VOC copy whose images were re-saved as .JPG or .jpeg: each listed image is taken under its suffix."""
    base = write_voc(tmp_path)
    for i in VOC_IDS:
        (base / "JPEGImages" / f"{i}.jpg").rename(base / "JPEGImages" / f"{i}{suffix}")
    ds = VOC2012(data_root=str(tmp_path))
    ds.check()
    assert ds.load_image(1).shape == (24, 32, 3)
    (base / "JPEGImages" / f"{VOC_IDS[0]}{suffix}").unlink()
    with pytest.raises(DataError, match=rf"{VOC_IDS[0]}.jpg"):
        VOC2012(data_root=str(tmp_path)).check()
