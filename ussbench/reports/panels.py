"""Qualitative panels: image, ground truth and the matched predictions of the best configurations."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..atomic import atomic_write  # noqa: E402


def palette(n: int) -> np.ndarray:
    """n distinct RGB colours (uint8), stable across runs; index n is black for ignore."""
    cmap = plt.get_cmap("tab20", max(n, 1))
    colours = (np.array([cmap(i)[:3] for i in range(n)]) * 255).astype(np.uint8)
    return np.vstack([colours, np.zeros((1, 3), dtype=np.uint8)])


def colourise(classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Class map (ignore = -1) -> RGB image."""
    idx = np.where(classes < 0, n_classes, classes)
    return palette(n_classes)[idx]


def draw_panels(
    images: list[np.ndarray],
    labels: list[np.ndarray],
    predictions: dict[str, list[np.ndarray]],
    n_classes: int,
    path: Path,
    n_pred_colours: int | None = None,
) -> Path:
    """Grid of rows = images, columns = image | ground truth | one column per configuration.

    Predictions are class maps coloured like the ground truth, unless ``n_pred_colours`` is given: then they
    are segment maps with that many ids, coloured from their own palette.
    """
    cols = 2 + len(predictions)
    fig, axes = plt.subplots(len(images), cols, figsize=(2.6 * cols, 2.1 * len(images)), squeeze=False)
    for r, (img, gt) in enumerate(zip(images, labels)):
        panels = [("image", img), ("ground truth", colourise(gt, n_classes))]
        n_pred = n_pred_colours or n_classes
        panels += [(name, colourise(preds[r], n_pred)) for name, preds in predictions.items()]
        for c, (title, im) in enumerate(panels):
            ax = axes[r][c]
            ax.imshow(im)
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path
