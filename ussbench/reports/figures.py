"""Seaborn figures: image-level x dataset-level mIoU heatmap, mIoU vs runtime, bars per feature learner."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
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


def miou_vs_runtime(board: pd.DataFrame, path: Path, intervals: pd.DataFrame | None = None) -> Path:
    """Each configuration's mean mIoU against its mean total time per cell; bars: the 95% intervals
    (``intervals`` with miou_lo/miou_hi for every row), else the std over seeds."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = board.image_clusterer + " + " + board.dataset_clusterer
    if board.feature_learner.nunique() > 1:
        labels = board.feature_learner + " / " + labels
    sns.scatterplot(x=board.time_total_s, y=board.miou_mean, hue=labels, s=70, ax=ax, legend="brief")
    have = intervals is not None and intervals["miou_lo"].notna().all()
    yerr = (np.vstack([board.miou_mean - intervals.miou_lo.astype(float), intervals.miou_hi.astype(float) - board.miou_mean])
            if have else board.miou_std)  # fmt: skip
    ax.errorbar(board.time_total_s, board.miou_mean, yerr=yerr, fmt="none", ecolor="gray", alpha=0.6)
    ax.set_xscale("log")
    log_ticks(ax, board.time_total_s)
    ax.set_xlabel("seconds per cell (mean over seeds; shared stages counted at first computation)")
    ax.set_ylabel("mIoU (%)" + (" (bars: 95% interval)" if have else " (bars: std over seeds)"))
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


def log_ticks(ax, values: pd.Series) -> None:
    """Readable log-axis ticks: plain numbers at the coarsest of 1-2-5 / 1-1.5-2-3-5-7 / 1..9 steps that puts
    at least three inside the data's range, at most eight labels, no minor labels.

    Matplotlib labels minor ticks (2x10^0, 3x10^0, ...) when the range spans less than a few decades, and
    they overlap; here only the chosen major ticks are labelled.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    finite = values[(values > 0) & values.notna()]
    if finite.empty:
        return
    lo, hi = float(finite.min()), float(finite.max())
    decades = range(int(np.floor(np.log10(lo))) - 1, int(np.ceil(np.log10(hi))) + 1)
    inside: list[float] = []
    for steps in ((1, 2, 5), (1, 1.5, 2, 3, 5, 7), (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [float(f"{m * 10.0**e:.6g}") for e in decades for m in steps]
        inside = [t for t in ticks if lo / 1.15 <= t <= hi * 1.15]  # the axis' margins show a little more
        if sum(lo <= t <= hi for t in ticks) >= 3:
            break
    if len(inside) > 8:  # wide range: decades only, then every other decade
        inside = [t for t in inside if np.isclose(np.log10(t) % 1, 0) or np.isclose(np.log10(t) % 1, 1)]
        while len(inside) > 8:
            inside = inside[::2]
    ax.xaxis.set_major_locator(FixedLocator(inside))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def significance_matrix(panels: list[tuple[str, list[str], np.ndarray, np.ndarray, np.ndarray]], path: Path,
                        level: float = 0.95) -> Path | None:  # fmt: skip
    """Pairwise Δ mIoU (row minus column) of the top rows, one panel per dataset: colour = Δ where the paired
    interval excludes 0 (decided), hatched grey where it does not; annotation = Δ with * (p < 0.05) / ** (p < 0.01).
    ``panels``: (title, row labels, Δ matrix, p-value matrix, decided matrix)."""
    panels = [p for p in panels if len(p[1]) >= 2]
    if not panels:
        return None
    n_max = max(len(p[1]) for p in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(max(6.0, 0.75 * n_max + 3.5) * len(panels), 0.6 * n_max + 2.5),
                             squeeze=False)  # fmt: skip
    for ax, (title, labels, delta, pvals, decided) in zip(axes[0], panels):
        n = len(labels)
        limit = _colour_limit(delta)
        shown = np.where(decided | np.eye(n, dtype=bool), delta, np.nan)
        sns.heatmap(shown, cmap="RdBu_r", center=0, vmin=-limit, vmax=limit, ax=ax, cbar_kws={"label": "Δ mIoU (row − column)"},
                    xticklabels=[str(i + 1) for i in range(n)], yticklabels=[f"{i + 1}. {lab}" for i, lab in enumerate(labels)],
                    linewidths=0.5, linecolor="white")  # fmt: skip
        for a in range(n):
            for b in range(n):
                if a == b:
                    continue
                if not decided[a, b]:
                    ax.add_patch(
                        plt.Rectangle(
                            (b, a), 1, 1, facecolor="#dddddd", edgecolor="white", hatch="///", lw=0.5
                        )
                    )
                stars = "**" if pvals[a, b] < 0.01 else ("*" if pvals[a, b] < 0.05 else "")
                text = f"{delta[a, b]:+.1f}{stars}" if np.isfinite(delta[a, b]) else "no Δ"
                ax.text(b + 0.5, a + 0.5, text, ha="center", va="center", fontsize=7,
                        color="black" if not decided[a, b] or abs(delta[a, b]) < 0.6 * limit else "white")  # fmt: skip
        ax.set_title(
            f"{title}: paired Δ mIoU of the top {n} rows (grey: not decided at {level:.0%})", fontsize=9
        )
        ax.set_xlabel("column row (rank)")
        ax.set_ylabel("")
        ax.tick_params(axis="y", labelsize=7)
    return _save(fig, path)


def _colour_limit(delta: np.ndarray) -> float:
    """The largest |Δ| shown (1 when none): the colour scale's ends; pairs with no seed in common have no Δ."""
    finite = np.abs(delta[np.isfinite(delta)])
    return float(finite.max()) if finite.size and finite.max() > 0 else 1.0
