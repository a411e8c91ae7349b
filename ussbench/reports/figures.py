"""Seaborn figures: image-level x dataset-level mIoU heatmap, mIoU vs runtime, bars per feature learner."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from ..atomic import atomic_write  # noqa: E402


def _save(fig, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=130, bbox_inches="tight"))
    plt.close(fig)
    return path


def heatmap(board: pd.DataFrame, path: Path) -> Path | None:
    """Mean mIoU of image-level (rows) x dataset-level (columns) clusterer, one panel per dataset/learner."""
    groups = list(board.groupby(["dataset", "backbone", "feature_learner", "postprocess"], sort=False))
    if not groups:
        return None
    fig, axes = plt.subplots(1, len(groups), figsize=(max(5.0, 1.4 * board.dataset_clusterer.nunique() + 3) * len(groups),
                                                        0.6 * board.image_clusterer.nunique() + 2.2), squeeze=False)  # fmt: skip
    for ax, (key, sub) in zip(axes[0], groups):
        table = sub.pivot_table(
            index="image_clusterer", columns="dataset_clusterer", values="miou_mean", aggfunc="max"
        )
        sns.heatmap(table, annot=True, fmt=".1f", cmap="viridis", cbar_kws={"label": "mIoU (%)"}, ax=ax)
        ax.set_title(f"{key[0]} · {key[1]} · learner {key[2]}", fontsize=9)
        ax.set_xlabel("dataset-level clusterer")
        ax.set_ylabel("image-level clusterer")
    return _save(fig, path)


def miou_vs_runtime(board: pd.DataFrame, path: Path) -> Path:
    """Each configuration's mean mIoU (with std) against its mean total time per cell."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = board.image_clusterer + " + " + board.dataset_clusterer
    if board.feature_learner.nunique() > 1:
        labels = board.feature_learner + " / " + labels
    sns.scatterplot(x=board.time_total_s, y=board.miou_mean, hue=labels, s=70, ax=ax, legend="brief")
    ax.errorbar(
        board.time_total_s, board.miou_mean, yerr=board.miou_std, fmt="none", ecolor="gray", alpha=0.6
    )
    ax.set_xscale("log")
    ax.set_xlabel("seconds per cell (mean over seeds; shared stages counted at first computation)")
    ax.set_ylabel("mIoU (%)")
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    return _save(fig, path)


def learner_bars(results: pd.DataFrame, path: Path) -> Path | None:
    """mIoU per feature learner (bars: mean, error bars: std over seeds), one hue per dataset-level clusterer."""
    if results.feature_learner.nunique() < 2:
        return None
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * results.feature_learner.nunique() + 3), 4))
    sns.barplot(data=results, x="feature_learner", y="miou", hue="dataset_clusterer", errorbar="sd", ax=ax)
    ax.set_ylabel("mIoU (%)")
    ax.set_xlabel("feature learner")
    ax.tick_params(axis="x", rotation=30)
    return _save(fig, path)
