"""The named ``stego`` protocol in the grid runner: codes bilinear to the pixels, flip TTA, dense CRF."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.conftest import tiny_grid
from ussbench import registry
from ussbench.base import Backbone, FeatureSet, ImageFeatures
from ussbench.cache import read_entry
from ussbench.config import load_grid
from ussbench.dataset_clusterers.cluster_probe import ClusterProbe
from ussbench.errors import ConfigError
from ussbench.evaluation.metrics import ConfusionMatrix, evaluate_counts
from ussbench.evaluation.protocols import get_protocol, stego_pixel_logits
from ussbench.pipeline import upsample_nearest
from ussbench.postprocess import crf as crf_module
from ussbench.runner import run_grid

PROBE = {"name": "cluster_probe", "params": {"steps": 60, "batch_size": 64, "init": "kmeans++"}}
VIT = {"name": "random_vit", "params": {"depth": 2, "resolution": 64, "arch": "vit_small_patch16_224"}}


def stego_grid(tmp_path: Path, data_root: Path, run: str, protocol: dict, **overrides) -> Path:
    """A one-seed grid under the stego protocol at res 32 (4x4 patch grids); runs share one cache."""
    folder = tmp_path / run
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "seeds": [0],
        "backbones": [VIT],
        "image_clusterers": ["none"],
        "dataset_clusterers": [PROBE],
        "cache_dir": str(tmp_path / "cache"),
        "protocol": {"name": "stego", "res": 32, "panels": 2, **protocol},
    }
    settings.update(overrides)
    return tiny_grid(folder, data_root, **settings)


def run_cells(path: Path) -> list[dict]:
    grid = load_grid(path)
    run_grid(grid, progress=False)
    return [json.loads(p.read_text()) for p in sorted((grid.output / "cells").glob("*.json"))]


def image_folder(root: Path):
    spec = registry.get("dataset", "image_folder")
    return registry.instantiate(spec, {"num_classes": 3, "data_root": str(root)})


def test_bilinear_code_path_matches_a_hand_computation(tmp_path, toy_root):
    """image clusterer none + cluster probe: pixels are labelled from bilinearly upsampled tokens.

    Six clusters for three classes: a code interpolated between two patches then passes other centroids, so
    the bilinear path labels some pixels differently from the patch labels upsampled nearest.
    """
    probe6 = {"name": "cluster_probe", "params": {**PROBE["params"], "n_clusters": 6}}
    (cell,) = run_cells(
        stego_grid(tmp_path, toy_root, "a", {"crf": False, "flip_tta": False}, dataset_clusterers=[probe6])
    )
    row = cell["row"]
    assert row["upsample"] == "bilinear_code" and row["flip_tta"] is False and row["protocol_crf"] == "none"
    assert "miou_no_crf" not in row

    (entry,) = (tmp_path / "cache" / "features").glob("*.pt")  # no flipped features without flip TTA
    features: FeatureSet = read_entry(entry, "features", entry.stem)
    assert features[0].grid == (4, 4)
    X = torch.cat([F.normalize(im.tokens.reshape(-1, im.tokens.shape[-1]).float(), dim=1) for im in features])
    probe = ClusterProbe(n_clusters=6, steps=60, batch_size=64, init="kmeans++", seed=0).fit(X)
    dataset = get_protocol("stego", res=32).view(image_folder(toy_root))
    bilinear, nearest = ConfusionMatrix(6, 3), ConfusionMatrix(6, 3)
    for i, im in enumerate(features):
        gt = dataset.load_label(i)
        bilinear.update(stego_pixel_logits(im.tokens.float(), probe, gt.shape).argmax(0).numpy(), gt)
        patch_labels = probe.predict(F.normalize(im.tokens.reshape(16, -1).float(), dim=1)).reshape(4, 4)
        nearest.update(upsample_nearest(patch_labels.numpy(), gt.shape), gt)
    assert np.array_equal(np.asarray(cell["confusion"]), bilinear.counts)
    assert not np.array_equal(bilinear.counts, nearest.counts)  # the check tells the two paths apart
    assert row["miou"] == pytest.approx(evaluate_counts(bilinear.counts, "hungarian", "pixels").miou * 100.0)


def test_segment_clusterers_keep_the_nearest_label_path(tmp_path, toy_root):
    grid = stego_grid(
        tmp_path,
        toy_root,
        "a",
        {"crf": False, "flip_tta": True},
        dataset_clusterers=["kmeans"],
        image_clusterers=["none", {"name": "kmeans_per_image", "params": {"n_segments": 3}, "label": "km3"}],
    )
    rows = {c["row"]["image_clusterer"]: c["row"] for c in run_cells(grid)}
    assert rows["none"]["upsample"] == "bilinear_code" and rows["none"]["flip_tta"] is True  # predict path
    assert rows["km3"]["upsample"] == "nearest_labels" and rows["km3"]["flip_tta"] is False


class MirrorPool(Backbone):
    """Patch-mean colours from exact integer sums: the features of a mirrored image are the mirrored features."""

    def __init__(self, patch: int = 8):
        self.patch = patch
        self.patch_size = patch
        self.embed_dim = 6

    def extract(self, dataset, device, progress=True) -> FeatureSet:
        images = []
        for i, image_id in enumerate(dataset.ids()):
            image = dataset.load_image(i).astype(np.int64)
            p = self.patch
            h, w = image.shape[0] // p, image.shape[1] // p
            sums = image[: h * p, : w * p].reshape(h, p, w, p, 3).sum((1, 3))
            mean = torch.from_numpy(sums / (p * p * 255.0)).float()
            tokens = torch.cat([mean, mean**2], dim=-1)
            images.append(
                ImageFeatures(
                    image_id, tokens, tokens, tokens.mean((0, 1)), torch.ones(1, h, w), image.shape[:2]
                )
            )
        return FeatureSet(images, "mirror_pool", self.patch, self.embed_dim)

    def model(self, device):
        raise NotImplementedError

    def preprocess(self, image):
        raise NotImplementedError


@pytest.fixture
def mirror_backbone():
    registry.register("backbone", "mirror_pool_test")(MirrorPool)
    yield {"name": "mirror_pool_test"}
    registry.unregister("backbone", "mirror_pool_test")


def write_mirrored_folder(root: Path, n_images: int = 6, size: int = 32, seed: int = 0) -> Path:
    """Square images (the stego view leaves them as they are) that equal their own mirror image, labels too."""
    rng = np.random.default_rng(seed)
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], dtype=np.uint8)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(n_images):
        a, b, c = rng.permutation(3)
        half = np.full((size, size // 2), a, dtype=np.uint8)
        half[:, rng.integers(4, 9) :] = b
        half[size // 2 :, rng.integers(10, 14) :] = c
        label = np.concatenate([half, half[:, ::-1]], axis=1)
        noise = rng.integers(0, 40, size=(size, size // 2, 3), dtype=np.uint8)
        image = colours[label] + np.concatenate([noise, noise[:, ::-1]], axis=1)
        label[0] = 255  # a void row keeps the symmetry
        assert np.array_equal(image, image[:, ::-1]) and np.array_equal(label, label[:, ::-1])
        Image.fromarray(image).save(root / "images" / f"m{i:02d}.png")
        Image.fromarray(label, mode="L").save(root / "labels" / f"m{i:02d}.png")
    return root


def test_flip_tta_changes_nothing_on_mirror_symmetric_images(tmp_path, mirror_backbone):
    root = write_mirrored_folder(tmp_path / "mirrored")
    with_flip = run_cells(
        stego_grid(tmp_path, root, "flip", {"crf": False, "flip_tta": True}, backbones=[mirror_backbone])
    )
    without = run_cells(
        stego_grid(tmp_path, root, "plain", {"crf": False, "flip_tta": False}, backbones=[mirror_backbone])
    )
    assert with_flip[0]["row"]["flip_tta"] is True and without[0]["row"]["flip_tta"] is False
    assert len(list((tmp_path / "cache" / "features").glob("*.pt"))) == 2  # the flipped view was extracted
    assert with_flip[0]["row"]["miou"] == without[0]["row"]["miou"]
    assert with_flip[0]["confusion"] == without[0]["confusion"]


def test_flip_tta_caches_flipped_features_and_learned_flipped_codes(tmp_path, toy_root):
    stego = {
        "name": "stego",
        "label": "stego",
        "params": {
            "steps": 2,
            "batch_size": 2,
            "dim": 8,
            "crop_size": 2,
            "feature_samples": 2,
            "neg_samples": 1,
            "num_neighbors": 2,
        },
    }
    cells = run_cells(
        stego_grid(
            tmp_path, toy_root, "a", {"crf": False, "flip_tta": True}, feature_learners=["none", stego]
        )
    )
    assert {c["row"]["feature_learner"] for c in cells} == {"none", "stego"}
    assert all(c["row"]["flip_tta"] and c["row"]["upsample"] == "bilinear_code" for c in cells)
    entries = [read_entry(p, "features", p.stem) for p in (tmp_path / "cache" / "features").glob("*.pt")]
    assert len(entries) == 2  # the protocol view and its mirror image
    assert entries[0][0].image_id == entries[1][0].image_id
    assert not torch.equal(entries[0][0].tokens, entries[1][0].tokens)
    (learned,) = [read_entry(p, "learned", p.stem) for p in (tmp_path / "cache" / "learned").glob("*.pt")]
    assert len(learned["flipped_codes"]) == len(learned["codes"]) == 6
    assert learned["flipped_codes"][0].shape == learned["codes"][0].shape
    assert not torch.equal(learned["flipped_codes"][0], learned["codes"][0])


def test_crf_reports_both_numbers_with_soft_unaries(tmp_path, toy_root, monkeypatch):
    calls = []
    original = crf_module.crf_batch

    def spy(images, labels_list, n_labels, probs_list=None, **kwargs):
        calls.append(probs_list is not None)
        return original(images, labels_list, n_labels, probs_list=probs_list, **kwargs)

    monkeypatch.setattr(crf_module, "crf_batch", spy)
    km3 = {"name": "kmeans_per_image", "params": {"n_segments": 3}, "label": "km3"}
    plain = run_cells(
        stego_grid(
            tmp_path, toy_root, "plain", {"crf": False, "flip_tta": False}, image_clusterers=["none", km3]
        )
    )
    assert not calls
    crf = run_cells(
        stego_grid(
            tmp_path, toy_root, "crf", {"crf": True, "flip_tta": False}, image_clusterers=["none", km3]
        )
    )
    assert True in calls and False in calls  # soft unaries on the code path, hard labels on the segment path
    before = {c["row"]["image_clusterer"]: c["row"] for c in plain}
    after = {c["row"]["image_clusterer"]: c["row"] for c in crf}
    assert after["none"]["protocol_crf"] == "soft" and after["km3"]["protocol_crf"] == "labels"
    for ic in ("none", "km3"):
        assert after[ic]["miou_no_crf"] == pytest.approx(before[ic]["miou"])
        assert after[ic]["pixel_accuracy_no_crf"] == pytest.approx(before[ic]["pixel_accuracy"])
        assert 0.0 < after[ic]["miou"] <= 100.0
    md = (tmp_path / "crf" / "out" / "leaderboard.md").read_text()
    assert (
        "mIoU no CRF (%)" in md
        and "dense CRF (stego preset)" in md
        and "flip TTA" not in md
        and "codes bilinear, cluster probe per pixel (segment" in md
    )
    assert "mIoU no CRF" not in (tmp_path / "plain" / "out" / "leaderboard.md").read_text()


def test_dsm_voc_protocol_crf_refines_hard_labels(tmp_path, toy_root):
    grid = tiny_grid(
        tmp_path,
        toy_root,
        seeds=[0],
        dataset_clusterers=["kmeans"],
        protocol={"name": "dsm_voc", "crf": True},
    )
    for cell in run_cells(grid):
        row = cell["row"]
        assert (
            row["upsample"] == "nearest_labels" and row["protocol_crf"] == "labels" and "miou_no_crf" in row
        )


@pytest.mark.parametrize(
    ("protocol", "overrides", "needle"),
    [
        ({"name": "stego", "flip_tta": 3}, {}, "protocol.flip_tta: expected true or false, got 3"),
        ({"name": "stego", "crf": "yes"}, {}, "protocol.crf: expected true or false"),
        (
            {"name": "stego", "crf": True},
            {"postprocess": ["crf"]},
            "postprocess[0] (crf) with protocol.crf on",
        ),
        ({"name": "stego"}, {"postprocess": ["crf"]}, "postprocess[0] (crf) with protocol.crf on"),
        ({"flip_tta": True}, {}, "protocol.flip_tta:"),
        ({"crf": True}, {}, "protocol.crf:"),
    ],
)
def test_protocol_flag_errors_are_one_line(tmp_path, toy_root, protocol, overrides, needle):
    with pytest.raises(ConfigError) as err:
        load_grid(tiny_grid(tmp_path, toy_root, protocol=protocol, **overrides))
    message = str(err.value)
    assert needle in message and "\n" not in message


def test_protocol_flags_enter_cell_ids_only_where_they_matter(tmp_path, toy_root):
    assert "crf" not in load_grid(tiny_grid(tmp_path, toy_root)).protocol  # ids of default grids unchanged
    assert (
        load_grid(tiny_grid(tmp_path, toy_root, protocol={"name": "dsm_voc"}))
        .protocol.keys()
        .isdisjoint({"crf", "flip_tta"})
    )
    stego = load_grid(tiny_grid(tmp_path, toy_root, protocol={"name": "stego", "crf": False})).protocol
    assert stego["crf"] is False and stego["flip_tta"] is True
