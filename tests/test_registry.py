"""Plugin registration: decorator in a user's module named in the grid, and the ussbench.plugins entry point."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import tiny_grid
from ussbench import registry
from ussbench.base import DatasetClusterer
from ussbench.config import load_grid
from ussbench.errors import ConfigError, PluginError
from ussbench.runner import run_grid

USER_PLUGIN = '''
import torch
from ussbench import register
from ussbench.base import DatasetClusterer


@register("dataset_clusterer", "{name}")
class FirstCoordinate(DatasetClusterer):
    """Clusters by quantiles of the first coordinate (a deliberately simple user plugin)."""

    def __init__(self, n_clusters: int = 2, seed: int = 0):
        self.n_clusters = n_clusters
        self.seed = seed

    def fit(self, X):
        self.edges_ = torch.quantile(X[:, 0], torch.linspace(0, 1, self.n_clusters + 1)[1:-1])
        return self

    def predict(self, X):
        return torch.bucketize(X[:, 0].contiguous(), self.edges_)
'''


def test_builtins_cover_every_kind():
    plugins = registry.available()
    for kind in registry.KINDS:
        assert plugins[kind], f"no built-in {kind} plugin"
    assert {"msrc_v2", "camvid", "voc2012", "image_folder"} <= set(plugins["dataset"])
    assert {
        "dinov2_vits14_imgfocus",
        "dino_vits8",
        "dino_vits16",
        "dino_vitb8",
        "dino_vitb16",
        "random_vit",
    } <= set(plugins["backbone"])
    assert {"none", "kmeans_per_image"} <= set(plugins["image_clusterer"])
    assert "kmeans" in plugins["dataset_clusterer"]


def test_params_are_read_from_the_signature():
    spec = registry.get("image_clusterer", "kmeans_per_image")
    assert spec.defaults()["n_segments"] == 8
    assert spec.params["feature"].type_name().startswith("one of")


def test_unknown_plugin_lists_known_ones():
    with pytest.raises(PluginError, match="registered: .*kmeans"):
        registry.get("dataset_clusterer", "kmeanz")


def test_param_validation_names_the_parameter():
    spec = registry.get("image_clusterer", "kmeans_per_image")
    with pytest.raises(ConfigError, match="no parameter 'n_segmnts'"):
        registry.validate_params(spec, {"n_segmnts": 3})
    with pytest.raises(ConfigError, match="'n_segments' .* expects int, got 'three'"):
        registry.validate_params(spec, {"n_segments": "three"})
    with pytest.raises(ConfigError, match="expects one of"):
        registry.validate_params(spec, {"feature": "pixels"})
    registry.validate_params(spec, {"n_segments": 3, "feature": "keys"})


def test_a_parameter_without_a_type_hint_is_checked_against_its_default():
    """Before, an unannotated ``n_clusters=8`` took 7.9 unchecked and the plugin truncated it."""

    @registry.register("dataset_clusterer", "untyped_params")
    class Untyped(DatasetClusterer):
        def __init__(self, n_clusters=8, temperature=0.1, verbose=False, mode="fast", extra=None):
            self.n_clusters, self.temperature, self.verbose, self.mode, self.extra = (
                n_clusters, temperature, verbose, mode, extra)  # fmt: skip

    try:
        spec = registry.get("dataset_clusterer", "untyped_params")
        with pytest.raises(
            ConfigError, match=r"'n_clusters' .* expects int \(the type of its default 8; it has no"
        ):
            registry.validate_params(spec, {"n_clusters": 7.9})
        for bad in ({"verbose": 1}, {"mode": 3}, {"temperature": "hot"}):
            with pytest.raises(ConfigError, match="it has no type hint"):
                registry.validate_params(spec, bad)
        registry.validate_params(spec, {"n_clusters": 7, "temperature": 1, "verbose": True, "mode": "x",
                                        "extra": [1, 2]})  # fmt: skip
    finally:
        registry.unregister("dataset_clusterer", "untyped_params")


def test_name_clash_with_another_class_is_refused():
    with pytest.raises(PluginError, match="already registered"):

        @registry.register("dataset_clusterer", "kmeans")
        class Other(DatasetClusterer):  # noqa: F811
            def __init__(self):
                pass


def test_a_class_that_is_not_of_its_kind_is_refused():
    with pytest.raises(
        PluginError,
        match=r"Plain is registered as a postprocess but does not subclass ussbench\.base\.PostProcess",
    ):

        @registry.register("postprocess", "contract_plain")
        class Plain:
            def apply(self, image, labels, n_labels, probs=None):
                return labels


def test_decorator_in_a_user_module_named_in_the_grid(tmp_path, toy_root):
    plugin_file = tmp_path / "my_plugins.py"
    plugin_file.write_text(USER_PLUGIN.format(name="first_coord_file"))
    grid_path = tiny_grid(
        tmp_path, toy_root, plugins=[str(plugin_file)], seeds=[0],
        image_clusterers=["none"], dataset_clusterers=[{"name": "first_coord_file", "params": {"n_clusters": 3}}],
    )  # fmt: skip
    try:
        grid = load_grid(grid_path)
        summary = run_grid(grid, progress=False)
        assert summary.n_run == 1
        assert (summary.output / "leaderboard.md").read_text().count("first_coord_file") >= 1
    finally:
        registry.unregister("dataset_clusterer", "first_coord_file")


def test_entry_point_of_an_installed_package(tmp_path, monkeypatch):
    site = tmp_path / "site"
    pkg = site / "acme_uss"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "clusterers.py").write_text(USER_PLUGIN.format(name="first_coord_ep"))
    dist = site / "acme_uss-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-uss\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ussbench.plugins]\nacme = acme_uss.clusterers\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    try:
        loaded = registry.load_entry_points(force=True)
        assert "acme_uss.clusterers" in loaded
        spec = registry.get("dataset_clusterer", "first_coord_ep")
        assert spec.params["n_clusters"].default == 2
    finally:
        registry.unregister("dataset_clusterer", "first_coord_ep")
        sys.modules.pop("acme_uss.clusterers", None)


def test_broken_entry_point_names_itself(tmp_path, monkeypatch):
    site = tmp_path / "site"
    dist = site / "broken_uss-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-uss\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ussbench.plugins]\nbroken = no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    with pytest.raises(PluginError, match="entry point 'broken'"):
        registry.load_entry_points(force=True)


def test_cli_list_shows_kinds_params_and_defaults():
    out = subprocess.run(
        [sys.executable, "-m", "ussbench", "list"], capture_output=True, text=True, check=True
    ).stdout
    for kind in registry.KINDS:
        assert f"{kind}:" in out
    assert "n_segments: int = 8" in out
    assert "weights: str (required)" in out


def test_readme_plugin_example_runs(tmp_path, toy_root):
    """The README's 'add a plugin' example is real code: extract it and run it through a grid."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- plugin-example -->")[1].split("```python")[1].split("```")[0]
    assert len(block.strip().splitlines()) < 20
    plugin_file = tmp_path / "my_algo.py"
    plugin_file.write_text(textwrap.dedent(block))
    grid_path = tiny_grid(tmp_path, toy_root, plugins=[str(plugin_file)], seeds=[0], image_clusterers=["none"],
                          dataset_clusterers=["my_algo"])  # fmt: skip
    try:
        assert run_grid(load_grid(grid_path), progress=False).n_run == 1
    finally:
        registry.unregister("dataset_clusterer", "my_algo")
