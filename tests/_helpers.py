"""Builders and checks shared by the dataset-clusterer tests: Gaussian blobs, degenerate inputs, cards."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from sklearn.datasets import make_blobs

from ussbench import registry
from ussbench.errors import NumericalError

ROOT = Path(__file__).resolve().parents[1]


def blobs(
    sizes: Sequence[int], dim: int = 16, std: float = 0.5, seed: int = 0
) -> tuple[torch.Tensor, np.ndarray]:
    """(X float32 (N, dim), true labels): well-separated Gaussian blobs of the given sizes."""
    X, y = make_blobs(sizes, n_features=dim, cluster_std=std, random_state=seed, center_box=(-10, 10))
    return torch.tensor(X, dtype=torch.float32), y


def assert_rejects_degenerate_inputs(
    fit: Callable[[torch.Tensor], Any],
    X: torch.Tensor,
    n_clusters: int,
    bad_entry: tuple[int, int, float],
    zero_row: int,
) -> None:
    """``fit`` fails clearly on fewer rows than clusters, a NaN/inf entry (naming its row) and a zero row."""
    with pytest.raises(ValueError, match=f"n_clusters={n_clusters} exceeds the number of vectors"):
        fit(X[: n_clusters - 1])
    row, col, value = bad_entry
    bad = X.clone()
    bad[row, col] = value
    with pytest.raises(NumericalError, match=f"row {row}"):
        fit(bad)
    zero = X.clone()
    zero[zero_row] = 0
    with pytest.raises(ValueError, match="zero vectors"):
        fit(zero)


def checked_card(kind: str, name: str, entry_point: str) -> dict[str, Any]:
    """The plugin's registry card, after checking its name, entry point, defaults and presets against the code."""
    spec = registry.get(kind, name)
    card = yaml.safe_load((ROOT / "registry" / kind / f"{name}.yaml").read_text())
    assert card["name"] == name and card["kind"] == kind
    assert card["entry_point"] == entry_point
    assert card["defaults"] == spec.defaults()
    assert card["presets"] == spec.presets
    return card
