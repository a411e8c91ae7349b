"""A user plugin that breaks the contract fails its cell with one line naming it; it never yields a score.

Each case is one violation an audit found scored silently before (float labels truncated, a transposed map
reshaped, vectors no pixel carries clustered, a float image divided by 255 twice, a parameter kept under
another name sharing one cache entry between settings).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from tests.conftest import tiny_grid
from ussbench import registry
from ussbench.base import DatasetClusterer, FeatureLearner, ImageClusterer, PostProcess, Segmentation
from ussbench.config import load_grid
from ussbench.datasets.folder import ImageMaskFolder
from ussbench.errors import ConfigError, PluginError
from ussbench.registry import register
from ussbench.runner import run_grid, validate_grid


@register("image_clusterer", "contract_segments")
class BrokenSegments(ImageClusterer):
    """Every patch a segment (as 'none'), then broken the way ``mode`` says."""

    def __init__(self, mode: str = "ok"):
        self.mode = mode

    def predict(self, features, ctx):
        out = []
        for im in features:
            h, w = im.grid
            smap = torch.arange(h * w).reshape(h, w)
            vectors = torch.nn.functional.normalize(im.dense("tokens").reshape(h * w, -1).float(), dim=1)
            if self.mode == "extra_rows":
                vectors = torch.cat([vectors, 100 * torch.randn(4, vectors.shape[1])])
            elif self.mode == "transposed":
                smap = smap.T.contiguous()
            elif self.mode == "float_map":
                smap = smap.float()
            elif self.mode == "nan":
                vectors = vectors.clone()
                vectors[0] = float("nan")
            elif self.mode == "mixed_width" and len(out) == 1:
                vectors = vectors[:, :8]
            elif self.mode == "one_cell":
                smap, vectors = torch.zeros(1, 1, dtype=torch.long), vectors[:1]
            out.append(Segmentation(smap, vectors))
        return out


@register("dataset_clusterer", "contract_labels")
class BrokenLabels(DatasetClusterer):
    """k-means-free labels (index mod k), returned the way ``mode`` says."""

    def __init__(self, n_clusters: int = 3, mode: str = "ok"):
        self.n_clusters = n_clusters
        self.mode = mode

    def fit(self, X):
        return None  # not self: ussbench must not need it

    def predict(self, X):
        labels = torch.arange(X.shape[0]) % self.n_clusters
        if self.mode == "float":
            return labels.float() + 0.9
        if self.mode == "numpy":
            return labels.numpy()
        if self.mode == "column":
            return labels[:, None]
        if self.mode == "bool":
            return labels > 0
        return labels


@register("postprocess", "contract_post")
class BrokenPost(PostProcess):
    def __init__(self, mode: str = "ok"):
        self.mode = mode

    def apply(self, image, labels, n_labels, probs=None):
        if self.mode == "transposed":
            return np.ascontiguousarray(labels.T)
        if self.mode == "float":
            return labels.astype(np.float32)
        return labels


@register("dataset", "contract_float_folder")
class FloatImageFolder(ImageMaskFolder):
    """Images in [0, 1] floats instead of uint8."""

    def load_image(self, index):
        return super().load_image(index).astype(np.float32) / 255.0


@register("feature_learner", "contract_codes")
class BrokenCodes(FeatureLearner):
    """Codes = the tokens, returned the way ``mode`` says."""

    def __init__(self, mode: str = "ok"):
        self.mode = mode

    def fit(self, features, ctx):
        return self

    def transform(self, features, ctx):
        codes = []
        for i, im in enumerate(features):
            code = im.dense("tokens").float()
            if self.mode == "flat":
                code = code.reshape(-1, code.shape[-1])
            elif self.mode == "nan":
                code = code.clone()
                code[0, 0, 0] = float("nan")
            elif self.mode == "mixed" and i == 1:
                code = code[..., :8]
            codes.append(code)
        return features.with_code(codes)


def _run(tmp_path, toy_root, **stages):
    """Run a one-seed grid (square-free toy grid: 2x3 patches) and return its failure lines."""
    grid = load_grid(tiny_grid(tmp_path, toy_root, seeds=[0], **stages))
    summary = run_grid(grid, progress=False, report=False)
    return summary


def _failure_line(tmp_path, toy_root, **stages) -> str:
    """Run the grid; every cell must fail (a broken plugin never scores), each with one line: the first."""
    summary = _run(tmp_path, toy_root, **stages)
    assert summary.n_failed >= 1 and summary.n_run == 0, "a broken plugin must fail its cells, not score them"
    assert all("\n" not in f for f in summary.failures)
    return summary.failures[0]


@pytest.mark.parametrize(
    "mode, message",
    [
        ("extra_rows", r"10 vectors but the map uses 6 segment ids"),
        ("transposed", r"segment_map is 3x2 but the image's patch grid is 2x3"),
        ("float_map", r"segment_map is torch.float32 \(2, 3\); expected an integer torch tensor"),
        ("nan", r"1 of 6 segment vectors hold NaN or inf"),
        ("one_cell", r"segment_map is 1x1 but the image's patch grid is 2x3"),
        ("mixed_width", r"image 1's vectors are 8-dimensional, image 0's \d+; expected one width"),
    ],
)
def test_a_broken_segmentation_fails_its_cell_naming_the_image_clusterer(tmp_path, toy_root, mode, message):
    line = _failure_line(
        tmp_path, toy_root, image_clusterers=[{"name": "contract_segments", "params": {"mode": mode}}],
        dataset_clusterers=["kmeans"],
    )  # fmt: skip
    assert "image clusterer 'contract_segments': image " in line
    assert re.search(message, line), line


@pytest.mark.parametrize(
    "mode, message",
    [
        ("float", r"predict returned torch.float32 labels; expected integer cluster ids"),
        ("column", r"predict returned labels of shape \(\d+, 1\) for \d+ vectors"),
        ("bool", r"predict returned torch.bool labels"),
    ],
)
def test_broken_labels_fail_the_cell_naming_the_dataset_clusterer(tmp_path, toy_root, mode, message):
    line = _failure_line(
        tmp_path, toy_root, image_clusterers=["none"],
        dataset_clusterers=[{"name": "contract_labels", "params": {"mode": mode}}],
    )  # fmt: skip
    assert "dataset clusterer 'contract_labels': " in line
    assert re.search(message, line), line


def test_integer_numpy_labels_and_a_fit_without_return_value_are_accepted(tmp_path, toy_root):
    summary = _run(
        tmp_path, toy_root, image_clusterers=["none"],
        dataset_clusterers=[{"name": "contract_labels", "params": {"mode": "numpy"}}],
    )  # fmt: skip
    assert (summary.n_run, summary.n_failed) == (1, 0), summary.failures


@pytest.mark.parametrize("mode", ["transposed", "float"])
def test_a_broken_post_processor_fails_its_cell(tmp_path, toy_root, mode):
    line = _failure_line(
        tmp_path, toy_root, image_clusterers=["none"], dataset_clusterers=["kmeans"],
        postprocess=[{"name": "contract_post", "params": {"mode": mode}}],
    )  # fmt: skip
    assert (
        "postprocess 'contract_post': image 0: returned a" in line
        and "expected integer cluster ids of the label's shape (48, 64)" in line
    )


def test_a_float_image_is_refused_naming_the_dataset(tmp_path, toy_root):
    line = _failure_line(
        tmp_path, toy_root, image_clusterers=["none"], dataset_clusterers=["kmeans"],
        datasets=[{"name": "contract_float_folder", "params": {"num_classes": 3}}],
    )  # fmt: skip
    assert (
        "dataset 'contract_float_folder': load_image(0) returned a float32 array of shape (48, 64, 3)" in line
    )


def test_a_parameter_kept_under_another_name_is_refused():
    """Its settings would share one cache key and one result (get_params reads self.<name>)."""

    @register("image_clusterer", "contract_hidden")
    class Hidden(ImageClusterer):
        def __init__(self, n_segments: int = 4):
            self.k = n_segments

        def predict(self, features, ctx):
            return []

    with pytest.raises(PluginError, match=r"does not keep its parameter\(s\) n_segments as attributes"):
        registry.instantiate(registry.get("image_clusterer", "contract_hidden"), {"n_segments": 9})


def test_a_mutable_default_and_a_second_class_of_one_name_are_refused_at_registration():
    with pytest.raises(
        PluginError, match=r"parameter 'history' has a mutable default \(\[\]\); use None or a tuple"
    ):

        @register("dataset_clusterer", "contract_mutable")
        class Mutable(DatasetClusterer):
            def __init__(self, n_clusters: int = 3, history: list = []):  # noqa: B006 - the point of the test
                self.n_clusters, self.history = n_clusters, history

    @register("postprocess", "contract_twice")
    class First(PostProcess):
        def apply(self, image, labels, n_labels, probs=None):
            return labels

    with pytest.raises(PluginError, match=r"'contract_twice' is already registered by .*First"):

        @register("postprocess", "contract_twice")
        class First(PostProcess):  # noqa: F811 - the same name again, another class
            def apply(self, image, labels, n_labels, probs=None):
                return labels + 1


def test_an_abstract_plugin_is_one_config_line_before_any_work(tmp_path, toy_root):
    @register("dataset_clusterer", "contract_abstract")
    class Abstract(DatasetClusterer):  # no predict
        def __init__(self, n_clusters: int = 3):
            self.n_clusters = n_clusters

        def fit(self, X):
            return self

    grid = load_grid(tiny_grid(tmp_path, toy_root, dataset_clusterers=["contract_abstract"]))
    with pytest.raises(
        ConfigError, match=r"dataset_clusterers\[0\] \(contract_abstract\): TypeError: Can't instantiate"
    ):
        validate_grid(grid)


def test_class_names_must_match_the_class_count(toy_root):
    folder = ImageMaskFolder(num_classes=3, root=str(toy_root))
    folder.class_names = ["a", "b"]  # a user dataset that lists fewer names than classes
    with pytest.raises(ConfigError, match=r"2 class names for 3 classes"):
        folder.check()


@pytest.mark.parametrize(
    "mode, message",
    [
        ("flat", r"image 0: code has shape \(6, \d+\); expected \(2, 3, D\) on the image's patch grid"),
        ("nan", r"image 0: code holds NaN or inf"),
        ("mixed", r"codes of different widths \[8, \d+\]"),
    ],
)
def test_broken_codes_fail_the_cell_naming_the_feature_learner(tmp_path, toy_root, mode, message):
    line = _failure_line(
        tmp_path, toy_root, image_clusterers=["none"], dataset_clusterers=["kmeans"],
        feature_learners=[{"name": "contract_codes", "params": {"mode": mode}}],
    )  # fmt: skip
    assert "feature learner 'contract_codes': " in line and re.search(message, line), line
