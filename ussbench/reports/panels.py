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


def _fit(image: np.ndarray, height: int, width: int, smooth: bool) -> np.ndarray:
    """``image`` (h, w, 3) uint8 scaled to fit (height, width) keeping its aspect, centred on white."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = min(height / h, width / w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    scaled = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize(size, resample))
    out = np.full((height, width, 3), 255, dtype=np.uint8)
    top, left = (height - size[1]) // 2, (width - size[0]) // 2
    out[top : top + size[1], left : left + size[0]] = scaled
    return out


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
    are segment maps with that many ids, coloured from their own palette. The grid is composed as one
    picture (one axes, one image: drawing dozens of axes took seconds) at 110 dpi.
    """
    dpi, cell_h, cell_w, gap, title_h = 110, 220, 276, 6, 44
    titles = ["image", "ground truth", *predictions]
    cols, rows = len(titles), len(images)
    canvas = np.full((title_h + rows * (cell_h + gap), cols * (cell_w + gap), 3), 255, dtype=np.uint8)
    n_pred = n_pred_colours or n_classes
    for r, (img, gt) in enumerate(zip(images, labels)):
        panels = [(img, True), (colourise(gt, n_classes), False)]
        panels += [(colourise(preds[r], n_pred), False) for preds in predictions.values()]
        y = title_h + r * (cell_h + gap)
        for c, (im, smooth) in enumerate(panels):
            x = c * (cell_w + gap)
            canvas[y : y + cell_h, x : x + cell_w] = _fit(im, cell_h, cell_w, smooth)
    fig = plt.figure(figsize=(canvas.shape[1] / dpi, canvas.shape[0] / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(canvas, interpolation="nearest")
    ax.set_axis_off()
    for c, title in enumerate(titles):
        ax.text(c * (cell_w + gap) + cell_w / 2, title_h - 4, title, ha="center", va="bottom", fontsize=7)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    plt.close(fig)
    return path
