"""STEGO-protocol datasets on synthetic fixtures in their standard layouts, and the label mapping tables."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from ussbench import registry
from ussbench.datasets.cityscapes import CITYSCAPES27_CLASSES, Cityscapes27, cityscapes27_lookup
from ussbench.datasets.cocostuff import CocoStuff27, coarse_lookup, fine_to_coarse_table
from ussbench.datasets.potsdam import Potsdam3, potsdam3_lookup
from ussbench.errors import ConfigError, DataError

# ---------------------------------------------------------------- COCO-Stuff fine -> coarse table


def test_coco_table_shape_and_class_counts():
    coarse, coarse_names, fine_names = fine_to_coarse_table()
    assert coarse.shape == (182,) and len(fine_names) == 182 and len(coarse_names) == 27
    assert sorted(set(coarse.tolist())) == list(range(27))  # every coarse class is reached
    assert (coarse[:91] < 12).all() and (coarse[91:] >= 12).all()  # things 0..11, stuff 12..26
    counts = Counter(coarse.tolist())
    expected = {  # fine ids per coarse class (things incl. COCO's unannotated ids; stuff as in COCO-Stuff)
        0: 6, 1: 6, 2: 10, 3: 10, 4: 8, 5: 8, 6: 8, 7: 10, 8: 6, 9: 1, 10: 10, 11: 8,
        12: 2, 13: 6, 14: 4, 15: 11, 16: 4, 17: 11, 18: 7, 19: 2, 20: 6, 21: 11, 22: 9, 23: 2, 24: 6,
        25: 5, 26: 5,
    }  # fmt: skip
    assert dict(counts) == expected and sum(expected.values()) == 182


def test_coco_table_values_from_the_study():
    coarse, names, fine = fine_to_coarse_table()
    # things, by range (reference study §1.1)
    ranges = {9: [0], 11: range(1, 9), 8: range(9, 15), 7: range(15, 25), 6: range(25, 33), 10: range(33, 43),
              5: range(43, 51), 2: range(51, 61), 3: range(61, 71), 0: range(71, 77), 1: range(77, 83),
              4: range(83, 91)}  # fmt: skip
    for c, ids in ranges.items():
        assert all(coarse[i] == c for i in ids), c
    # stuff examples quoted by the study
    for fid, c in {91: 17, 92: 17, 93: 22, 94: 20, 95: 20, 105: 23, 119: 26}.items():
        assert coarse[fid] == c, fid
    assert (fine[0], fine[91], fine[105], fine[181]) == ("person", "banner", "clouds", "wood")
    assert names[9] == "person-things" and names[23] == "sky-stuff" and names[2] != names[14]  # food x2
    # round trip: every fine name's coarse class contains it, and the name says thing/stuff consistently
    for fid in range(182):
        assert names[coarse[fid]].endswith("-things" if fid < 91 else "-stuff")
    table = coarse_lookup()
    assert table[255] == -1 and table[200] == -2 and (table[:182] == coarse).all()


# ---------------------------------------------------------------- COCO-Stuff-27 dataset


def write_coco(
    root: Path, fine_maps: dict[str, np.ndarray], split: str = "val", grey: str | None = None
) -> Path:
    base = root / "cocostuff"
    for sub in (f"images/{split}2017", f"annotations/{split}2017", f"curated/{split}2017"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, fine in fine_maps.items():
        h, w = fine.shape
        if name == grey:
            Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8), mode="L").save(
                base / "images" / f"{split}2017" / f"{name}.jpg"
            )
        else:
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
                base / "images" / f"{split}2017" / f"{name}.jpg"
            )
        Image.fromarray(fine.astype(np.uint8), mode="L").save(
            base / "annotations" / f"{split}2017" / f"{name}.png"
        )
    (base / "curated" / f"{split}2017" / "Coco164kFull_Stuff_Coarse_7.txt").write_text(
        "\n".join(fine_maps) + "\n", encoding="utf-8"
    )
    return root


def test_cocostuff27_reads_curated_layout(tmp_path):
    fine = np.array([[0, 8, 91, 105], [119, 181, 255, 50]])
    maps = {"000000000139": fine, "000000000285": np.full((3, 5), 123)}
    write_coco(tmp_path, maps, grey="000000000285")
    ds = CocoStuff27(data_root=str(tmp_path), strict_count=False)
    ds.check()
    assert ds.ids() == ["000000000139", "000000000285"] and ds.num_classes == 27 and len(ds.class_names) == 27
    assert ds.load_label(0).tolist() == [[9, 11, 17, 23], [26, 24, -1, 5]]
    assert (ds.load_label(1) == 22).all()  # grass -> plant
    image = ds.load_image(1)
    assert image.shape == (3, 5, 3) and image.dtype == np.uint8  # greyscale JPEG -> RGB
    assert ds[0].label.dtype == np.int64


def test_cocostuff27_list_checks(tmp_path):
    write_coco(tmp_path, {"a": np.zeros((2, 2))})
    with pytest.raises(DataError, match="2175"):
        CocoStuff27(data_root=str(tmp_path)).ids()  # the curated val list must have 2,175 ids
    with pytest.raises(DataError, match="list_file"):
        CocoStuff27(data_root=str(tmp_path), split="train", strict_count=False).ids()
    custom = tmp_path / "cocostuff" / "mine.txt"
    custom.write_text("a\n", encoding="utf-8")
    assert CocoStuff27(data_root=str(tmp_path), list_file="mine.txt").ids() == ["a"]  # relative to the root
    with pytest.raises(ConfigError, match="list_file"):
        CocoStuff27(data_root=str(tmp_path), split="train+val", list_file="mine.txt")
    custom.write_text("a\nmissing\n", encoding="utf-8")
    with pytest.raises(DataError, match="missing.jpg"):
        CocoStuff27(data_root=str(tmp_path), list_file=str(custom)).check()


def test_cocostuff27_names_the_official_label_folder(tmp_path):
    """COCO-Stuff ships its labels as stuffthingmaps_trainval2017/; STEGO's layout calls them annotations/. Before,
    the error named a missing annotations/... file without saying why."""
    write_coco(tmp_path, {"a": np.zeros((2, 2))})
    base = tmp_path / "cocostuff"
    (base / "annotations").rename(base / "stuffthingmaps_trainval2017")
    with pytest.raises(DataError, match=r"holds COCO's stuffthingmaps_trainval2017/ .* ln -s"):
        CocoStuff27(data_root=str(tmp_path), strict_count=False).check()
    (base / "annotations").symlink_to(base / "stuffthingmaps_trainval2017")
    CocoStuff27(data_root=str(tmp_path), strict_count=False).check()  # the link the message suggests works


def test_cocostuff27_rejects_values_outside_cocostuff(tmp_path):
    write_coco(tmp_path, {"a": np.array([[3, 200]])})
    with pytest.raises(DataError, match="value 200"):
        CocoStuff27(data_root=str(tmp_path), strict_count=False).load_label(0)


# ---------------------------------------------------------------- Cityscapes-27


def write_cityscapes(root: Path, labels: dict[str, np.ndarray], split: str = "val") -> Path:
    base = root / "cityscapes"
    for key, lab in labels.items():
        city, stem = key.split("/")
        (base / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        (base / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
        img = np.random.default_rng(1).integers(0, 255, (*lab.shape, 3), dtype=np.uint8)
        Image.fromarray(img).save(base / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
        Image.fromarray(lab.astype(np.uint8), mode="L").save(
            base / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png"
        )
        # other gtFine files of the standard layout are ignored
        Image.fromarray(lab.astype(np.uint8), mode="L").save(
            base / "gtFine" / split / city / f"{stem}_gtFine_instanceIds.png"
        )
    return root


def test_cityscapes27_mapping_and_layout(tmp_path):
    table = cityscapes27_lookup()
    assert (table[:7] == -1).all() and table[7] == 0 and table[33] == 26 and (table[34:] == -1).all()
    assert len(CITYSCAPES27_CLASSES) == 27 and CITYSCAPES27_CLASSES[0] == "road"
    assert CITYSCAPES27_CLASSES[33 - 7] == "bicycle" and CITYSCAPES27_CLASSES[26 - 7] == "car"
    write_cityscapes(
        tmp_path,
        {
            "munster/munster_000001_000019": np.array([[0, 6, 7, 8], [26, 33, 34, 255]]),
            "frankfurt/frankfurt_000000_000294": np.full((2, 4), 21),
        },
    )
    ds = Cityscapes27(data_root=str(tmp_path), strict_count=False)
    assert ds.ids() == ["frankfurt/frankfurt_000000_000294", "munster/munster_000001_000019"]
    assert (ds.load_label(0) == 14).all()  # vegetation
    assert ds.load_label(1).tolist() == [[-1, -1, 0, 1], [19, 26, -1, -1]]
    assert ds.load_image(1).shape == (2, 4, 3)
    with pytest.raises(DataError, match="500"):
        Cityscapes27(data_root=str(tmp_path)).ids()
    with pytest.raises(DataError, match="train"):
        Cityscapes27(data_root=str(tmp_path), split="train", strict_count=False).ids()


def test_cityscapes27_missing_label_fails(tmp_path):
    write_cityscapes(tmp_path, {"ulm/ulm_000000_000019": np.zeros((2, 2))})
    next((tmp_path / "cityscapes" / "gtFine").rglob("*_labelIds.png")).unlink()
    with pytest.raises(DataError, match="labelIds"):
        Cityscapes27(data_root=str(tmp_path), strict_count=False).ids()


# ---------------------------------------------------------------- Potsdam-3


def write_potsdam(root: Path, tiles: dict[str, np.ndarray | None], list_name: str = "labelled_test.txt",
                  float_image: bool = False) -> Path:  # fmt: skip
    base = root / "potsdam"
    (base / "imgs").mkdir(parents=True, exist_ok=True)
    (base / "gt").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    for name, gt in tiles.items():
        shape = (4, 5) if gt is None else gt.shape
        img = rng.integers(0, 255, (*shape, 4), dtype=np.uint8)  # R, G, B, IR
        scipy.io.savemat(base / "imgs" / f"{name}.mat", {"img": img / 255.0 if float_image else img})
        if gt is not None:
            scipy.io.savemat(base / "gt" / f"{name}.mat", {"gt": gt.astype(np.int32)})
    (base / list_name).write_text("\n".join(tiles) + "\n", encoding="utf-8")
    return root


def test_potsdam3_merges_classes_and_drops_ir(tmp_path):
    table = potsdam3_lookup()
    assert table[:6].tolist() == [0, 1, 2, 2, 0, 1] and table[255] == -1 and table[6] == -2
    gt = np.array([[0, 1, 2, 3, 4], [5, 255, 0, 0, 1]])
    write_potsdam(tmp_path, {"1234": gt, "77": np.full((2, 5), 3)})
    ds = Potsdam3(data_root=str(tmp_path))
    ds.check()
    assert ds.ids() == ["1234", "77"] and ds.num_classes == 3
    assert ds.load_label(0).tolist() == [[0, 1, 2, 2, 0], [1, -1, 0, 0, 1]]
    raw = scipy.io.loadmat(tmp_path / "potsdam" / "imgs" / "1234.mat")["img"]
    image = ds.load_image(0)
    assert image.dtype == np.uint8 and image.shape == (2, 5, 3) and np.array_equal(image, raw[:, :, :3])


def test_potsdam3_float_images_and_unlabelled_split(tmp_path):
    write_potsdam(tmp_path, {"5": None, "6": None}, list_name="unlabelled_train.txt", float_image=True)
    ds = Potsdam3(data_root=str(tmp_path), split="unlabelled_train")
    ds.check()  # images only: unlabelled tiles have no gt
    assert ds.load_image(0).dtype == np.uint8 and ds.load_image(0).shape == (4, 5, 3)
    assert (ds.load_label(1) == -1).all() and ds.load_label(1).shape == (4, 5)
    with pytest.raises(DataError, match="labelled_test.txt"):
        Potsdam3(data_root=str(tmp_path)).ids()


def test_potsdam3_bad_label_values_fail(tmp_path):
    write_potsdam(tmp_path, {"9": np.array([[0, 7]])})
    with pytest.raises(DataError, match="value 7"):
        Potsdam3(data_root=str(tmp_path)).load_label(0)


def test_registered():
    for name, cls in (("cocostuff27", CocoStuff27), ("cityscapes27", Cityscapes27), ("potsdam3", Potsdam3)):
        assert registry._registry["dataset"][name].cls is cls  # registered on import
