"""Results table (one row per cell x seed) and the leaderboard (mean +- std over seeds)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from ..registry import KINDS
from .records import UNORDERED_KEY

STAGE_COLUMNS = list(KINDS)  # one column per stage, in the registry's order
PROBE_COLUMNS = [
    "probe_miou",
    "probe_acc",
]  # linear probe of the row's representation (ussbench.evaluation.probe)
ABSENT = "absent"  # per-class tables: the class has no ground-truth pixel in the scored images
TIME_COLUMNS = ["time_features_s", "time_feature_learner_s", "time_feature_learner_fit_s", "time_image_clusterer_s",
                "time_dataset_clusterer_s", "time_eval_s", "time_total_s"]  # fmt: skip


def results_frame(cells: list[dict[str, Any]]) -> pd.DataFrame:
    """Flatten cell records into one row per cell and seed, parameters and environment as JSON columns."""
    rows = []
    for cell in cells:
        row = dict(cell["row"])
        env = row.pop("environment", {})
        row["versions"] = json.dumps(env.get("versions", {}), sort_keys=True)
        row["machine"] = env.get("gpu") or env.get("processor", "")
        row["params"] = json.dumps(cell.get("params", {}), sort_keys=True, default=str)
        row["per_class_iou"] = json.dumps(cell.get("per_class_iou", {}))
        row["class_names"] = _ordered_class_names(cell)
        row["backbone_name"] = cell.get("backbone_report_name", row.get("backbone"))
        # what a report rebuilt without the cells (a fresh clone) still needs: protocol, plugin names, machine
        identity = cell.get("identity", {})
        row["protocol"] = json.dumps(identity.get("protocol", {}), sort_keys=True)
        row["stage_names"] = json.dumps(
            {s["kind"]: s["name"] for s in identity.get("stages", [])}, sort_keys=True
        )
        row["environment"] = json.dumps(env, sort_keys=True, default=str)
        row["dataset_description"] = cell.get("dataset_description", "")
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    first = [
        "cell_id",
        *STAGE_COLUMNS,
        "seed",
        "miou",
        "pixel_accuracy",
        "miou_no_crf",
        "pixel_accuracy_no_crf",
    ]
    return frame[[c for c in first if c in frame] + [c for c in frame if c not in first]]


def _ordered_class_names(cell: dict[str, Any]) -> str:
    """The cell's class names in the order of its counts' class axis (JSON), so a results table keeps it; "" if
    unknown (the per-class IoU keys are sorted by name)."""
    names = cell.get("class_names")
    return json.dumps(list(names)) if names and not cell.get(UNORDERED_KEY) else ""


def per_class_frame(chosen: list[dict[str, Any]], pixels: dict[str, dict[str, int]]) -> pd.DataFrame:
    """One row's per-class IoU (%, mean over its seeds) and whether each class occurs in its scored images."""
    frame = pd.DataFrame(
        [{k: (np.nan if v is None else v * 100) for k, v in c["per_class_iou"].items()} for c in chosen]
    )
    means = frame.mean()
    present = [_occurs(str(name), iou, chosen, pixels) for name, iou in means.items()]
    return pd.DataFrame({"class": frame.columns, "iou": means.to_numpy(), "present": present})


def _occurs(
    name: str, mean_iou: float, chosen: list[dict[str, Any]], pixels: dict[str, dict[str, int]]
) -> bool:
    """Whether a class has a ground-truth pixel in the row's scored images. Without the counts, only an
    undefined IoU says so (IoU is undefined only for a class that neither occurs nor is predicted)."""
    counted = [
        pixels[c["row"]["cell_id"]][name] for c in chosen if name in pixels.get(c["row"]["cell_id"], {})
    ]
    return any(n > 0 for n in counted) if counted else not pd.isna(mean_iou)


def per_class_table(rows: pd.DataFrame) -> pd.DataFrame:
    """The per-class table as shown (Markdown and HTML alike): IoU (%) to two decimals, or 'absent'."""
    return pd.DataFrame(
        {"class": rows["class"], "IoU (%)": [iou_text(v, p) for v, p in zip(rows["iou"], rows["present"])]}
    )


def iou_text(value: float, present: bool) -> str:
    """A class's IoU as shown: 'absent' when no scored image contains it (its 0 or nan measures nothing)."""
    if not present:
        return ABSENT
    return "n/a" if pd.isna(value) else f"{value:.2f}"


def leaderboard_frame(results: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds per configuration, best mIoU first."""
    grouped = results.groupby(STAGE_COLUMNS, sort=False, dropna=False)
    board = grouped.agg(
        miou_mean=("miou", "mean"),
        miou_std=("miou", "std"),
        acc_mean=("pixel_accuracy", "mean"),
        acc_std=("pixel_accuracy", "std"),
        seeds=("seed", "nunique"),
        clusters=("n_clusters", "first"),
        segments=("n_segments", "mean"),
        **{c: (c, "mean") for c in TIME_COLUMNS if c in results},
        **{f"{c}_mean": (c, "mean") for c in nfcov_columns(results)},
        **(
            {"miou_no_crf_mean": ("miou_no_crf", "mean"), "miou_no_crf_std": ("miou_no_crf", "std")}
            if "miou_no_crf" in results
            else {}
        ),  # the protocol's CRF ran: the number before it
        **{c: (c, "mean") for c in PROBE_COLUMNS if c in results},
        peak_gpu_mb=("peak_gpu_mb", "max"),
        peak_rss_mb=("peak_rss_mb", "max"),
        **(
            {"code_rank_mean": ("code_effective_rank", "mean"), "collapsed": ("code_collapsed", "sum")}
            if "code_effective_rank" in results
            else {}
        ),  # feature learners' code health
    ).reset_index()
    if "miou_no_crf_std" in board:  # one seed: std 0 (rows without the number stay blank in the display)
        board["miou_no_crf_std"] = board.miou_no_crf_std.fillna(0.0)
    board[["miou_std", "acc_std"]] = board[["miou_std", "acc_std"]].fillna(0.0)
    # best first within each dataset (rows of different data are not ranked against each other); datasets in
    # the order of their best row, so a one-dataset grid is simply sorted by mIoU; tied means by label, so
    # the order (and the row numbers `compare` takes) does not depend on the order the cells were read in
    labels = [c for c in STAGE_COLUMNS if c in board]
    board = board.sort_values(["miou_mean", *labels], ascending=[False] + [True] * len(labels), kind="stable")
    order = {d: i for i, d in enumerate(dict.fromkeys(board.dataset))}
    return board.sort_values("dataset", key=lambda d: d.map(order), kind="stable").reset_index(drop=True)


def nfcov_columns(frame: pd.DataFrame) -> list[str]:
    """NFCovering columns (segments, then hierarchy levels) present in a results frame."""
    return sorted((c for c in frame if c == "nfcov" or (c.startswith("nfcov_") and not c.endswith("_mean"))),
                  key=lambda c: (c != "nfcov", c))  # fmt: skip


def pm(mean: float, std: float, n_seeds: int = 2) -> str:
    """mean ± std over seeds; a single seed has no spread to show."""
    return f"{mean:.2f} ± {std:.2f}" if n_seeds > 1 else f"{mean:.2f} (1 seed)"


def leaderboard_display(board: pd.DataFrame, stats: pd.DataFrame | None = None, paper: pd.DataFrame | None = None,
                        flags: pd.Series | None = None, n_resamples: int = 1000) -> pd.DataFrame:  # fmt: skip
    """Human-readable leaderboard columns.

    ``stats``: :attr:`comparisons.BoardStatistics.table` (intervals, Δ vs baseline, rank ranges, halving plan);
    ``paper``: :func:`paper.paper_columns`; ``flags``: a marker per row (rows from another code version or
    machine). Without per-image counts, interval columns read "n/a".
    """
    from .comparisons import fmt_p, halving_text

    varying = [c for c in STAGE_COLUMNS if board[c].nunique() > 1] or ["image_clusterer", "dataset_clusterer"]
    shown = board[varying].copy()
    within = board.groupby("dataset", sort=False).cumcount() + 1  # rank within the row's dataset
    has = stats is not None and stats["miou_lo"].notna().any()
    if has:
        shown.insert(0, "rank", [_rank_text(r, k) for (_, r), k in zip(stats.iterrows(), within)])
    else:
        shown.insert(0, "rank", within.values)
    if flags is not None and flags.astype(bool).any():
        shown["rank"] = [f"{r}{f}" for r, f in zip(shown["rank"], flags)]
    shown["mIoU (%)"] = [pm(m, s, n) for m, s, n in zip(board.miou_mean, board.miou_std, board.seeds)]
    if has:
        shown["mIoU 95% CI"] = [_interval(r.miou_lo, r.miou_hi) for _, r in stats.iterrows()]
        if stats["delta"].notna().any():
            shown["Δ mIoU vs baseline"] = [
                "baseline" if r.is_baseline else _delta(r.delta, r.delta_lo, r.delta_hi)
                for _, r in stats.iterrows()
            ]
            shown["p"] = ["" if r.is_baseline else fmt_p(r.delta_p, n_resamples) for _, r in stats.iterrows()]
    if "miou_no_crf_mean" in board and board.miou_no_crf_mean.notna().any():
        shown["mIoU no CRF (%)"] = [pm(m, s, n) if pd.notna(m) else "" for m, s, n in
                                    zip(board.miou_no_crf_mean, board.miou_no_crf_std, board.seeds)]  # fmt: skip
        if has and stats["miou_no_crf_lo"].notna().any():
            shown["no CRF 95% CI"] = [
                _interval(r.miou_no_crf_lo, r.miou_no_crf_hi) for _, r in stats.iterrows()
            ]
    shown["pixel acc. (%)"] = [pm(m, s, n) for m, s, n in zip(board.acc_mean, board.acc_std, board.seeds)]
    if has:
        shown["acc. 95% CI"] = [_interval(r.acc_lo, r.acc_hi) for _, r in stats.iterrows()]
    if paper is not None and paper["paper_miou"].notna().any():
        shown["paper mIoU (ratio)"] = [_paper(v, r) for v, r in zip(paper.paper_miou, paper.paper_miou_ratio)]
    if paper is not None and paper["paper_acc"].notna().any():
        shown["paper acc. (ratio)"] = [_paper(v, r) for v, r in zip(paper.paper_acc, paper.paper_acc_ratio)]
    for col, name in (("probe_miou", "probe mIoU (%)"), ("probe_acc", "probe acc. (%)")):
        if col in board and board[col].notna().any():
            shown[name] = board[col].map(lambda v: "" if pd.isna(v) else f"{v:.2f}")
    for col in nfcov_columns(board.rename(columns=lambda c: c.removesuffix("_mean"))):
        values = board[f"{col}_mean"]
        if values.notna().any():
            label = "NFCov segments (%)" if col == "nfcov" else f"NFCov {col.removeprefix('nfcov_')} (%)"
            shown[label] = values.map(lambda v: "" if pd.isna(v) else f"{v:.2f}")  # blank: no such level
    if "code_rank_mean" in board and board.code_rank_mean.notna().any():  # blank: no learner
        shown["code eff. rank"] = [("" if pd.isna(r) else f"{r:.1f}" + (f" (collapsed {int(c)}/{n})" if c else ""))
                                   for r, c, n in zip(board.code_rank_mean, board.collapsed.fillna(0), board.seeds)]  # fmt: skip
    shown["seeds"] = board.seeds
    if has:
        shown["CI width"] = stats.ci_width.map(lambda v: "n/a" if v is None or pd.isna(v) else f"{v:.2f}")
        shown["to halve it"] = [halving_text(r) for _, r in stats.iterrows()]
    shown["clusters"] = board.clusters
    shown["segments"] = board.segments.round().astype(int)
    for col, name in (("time_features_s", "features s"), ("time_feature_learner_s", "learner s"),
                      ("time_image_clusterer_s", "image-level s"), ("time_dataset_clusterer_s", "dataset-level s"),
                      ("time_total_s", "cell total s")):  # fmt: skip
        if col == "time_feature_learner_s" and not (board.feature_learner != "none").any():
            continue  # no row trains a learner
        if col in board:
            shown[name] = board[col].round(2)
        if col == "time_feature_learner_s" and "time_feature_learner_fit_s" in board:
            shown["learner training s"] = board.time_feature_learner_fit_s.map(
                lambda v: "" if pd.isna(v) else f"{v:.2f}"
            )  # blank: no learner, or codes trained before ussbench recorded it
    shown["peak RSS MB"] = board.peak_rss_mb.round(0).astype(int)
    if (board.peak_gpu_mb > 0).any():
        shown["peak GPU MB"] = board.peak_gpu_mb.round(0).astype(int)
    return shown


def times_note(board: pd.DataFrame) -> str:
    """The sentence under the leaderboard that says what its time columns hold."""
    note = ("Times are seconds per cell (mean over seeds); a stage shared by several cells shows, in each of them, "
            "the seconds of its first use in this run: its computation, or its load when an earlier run had "
            "cached it; 'cell total s' is what the cell itself ran, so the columns do not add up")  # fmt: skip
    if "time_feature_learner_fit_s" in board:
        note += ("; 'learner training s' is the feature learner's fit, stored with its codes, so it holds also when "
                 "this run loaded them from the cache")  # fmt: skip
    return note + "."


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and v != v)


def _interval(lo, hi) -> str:
    return "n/a" if _missing(lo) else f"[{lo:.2f}, {hi:.2f}]"


def _delta(d, lo, hi) -> str:
    return "n/a" if _missing(d) else f"{d:+.2f} [{lo:+.2f}, {hi:+.2f}]"


def _rank_text(stat_row: pd.Series, plain: int) -> str:
    if _missing(stat_row.rank_lo):
        return f"{plain}"
    lo, hi = int(stat_row.rank_lo), int(stat_row.rank_hi)
    return str(lo) if lo == hi else f"{lo}–{hi}"


def _paper(value, ratio) -> str:
    return "" if _missing(value) else f"{value:.1f} ({ratio:.2f}x)"


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table without extra dependencies."""
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(str(v) for v in r.tolist()) + " |")
    return "\n".join(lines)
