"""Results table (one row per cell x seed) and the leaderboard (mean +- std over seeds)."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

STAGE_COLUMNS = [
    "dataset",
    "backbone",
    "feature_learner",
    "image_clusterer",
    "dataset_clusterer",
    "postprocess",
]
TIME_COLUMNS = ["time_features_s", "time_feature_learner_s", "time_image_clusterer_s", "time_dataset_clusterer_s",
                "time_eval_s", "time_total_s"]  # fmt: skip


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
        row["backbone_name"] = cell.get("backbone_report_name", row.get("backbone"))
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
    return board.sort_values("miou_mean", ascending=False).reset_index(drop=True)


def nfcov_columns(frame: pd.DataFrame) -> list[str]:
    """NFCovering columns (segments, then hierarchy levels) present in a results frame."""
    return sorted((c for c in frame if c == "nfcov" or (c.startswith("nfcov_") and not c.endswith("_mean"))),
                  key=lambda c: (c != "nfcov", c))  # fmt: skip


def pm(mean: float, std: float, n_seeds: int = 2) -> str:
    """mean ± std over seeds; a single seed has no spread to show."""
    return f"{mean:.2f} ± {std:.2f}" if n_seeds > 1 else f"{mean:.2f} (1 seed)"


def leaderboard_display(board: pd.DataFrame) -> pd.DataFrame:
    """Human-readable leaderboard columns."""
    varying = [c for c in STAGE_COLUMNS if board[c].nunique() > 1] or ["image_clusterer", "dataset_clusterer"]
    shown = board[varying].copy()
    shown.insert(0, "rank", range(1, len(board) + 1))
    shown["mIoU (%)"] = [pm(m, s, n) for m, s, n in zip(board.miou_mean, board.miou_std, board.seeds)]
    if "miou_no_crf_mean" in board and board.miou_no_crf_mean.notna().any():
        shown["mIoU no CRF (%)"] = [pm(m, s, n) if pd.notna(m) else "" for m, s, n in
                                    zip(board.miou_no_crf_mean, board.miou_no_crf_std, board.seeds)]  # fmt: skip
    shown["pixel acc. (%)"] = [pm(m, s, n) for m, s, n in zip(board.acc_mean, board.acc_std, board.seeds)]
    for col in nfcov_columns(board.rename(columns=lambda c: c.removesuffix("_mean"))):
        values = board[f"{col}_mean"]
        if values.notna().any():
            label = "NFCov segments (%)" if col == "nfcov" else f"NFCov {col.removeprefix('nfcov_')} (%)"
            shown[label] = values.map(lambda v: "" if pd.isna(v) else f"{v:.2f}")  # blank: no such level
    if "code_rank_mean" in board and board.code_rank_mean.notna().any():  # blank: no learner
        shown["code eff. rank"] = [("" if pd.isna(r) else f"{r:.1f}" + (f" (collapsed {int(c)}/{n})" if c else ""))
                                   for r, c, n in zip(board.code_rank_mean, board.collapsed.fillna(0), board.seeds)]  # fmt: skip
    shown["seeds"] = board.seeds
    shown["clusters"] = board.clusters
    shown["segments"] = board.segments.round().astype(int)
    for col, name in (("time_features_s", "features s"), ("time_feature_learner_s", "learner s"),
                      ("time_image_clusterer_s", "image-level s"), ("time_dataset_clusterer_s", "dataset-level s"),
                      ("time_total_s", "cell total s")):  # fmt: skip
        if col in board:
            shown[name] = board[col].round(2)
    shown["peak RSS MB"] = board.peak_rss_mb.round(0).astype(int)
    if (board.peak_gpu_mb > 0).any():
        shown["peak GPU MB"] = board.peak_gpu_mb.round(0).astype(int)
    return shown


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table without extra dependencies."""
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in frame.iterrows():
        lines.append("| " + " | ".join(str(v) for v in r.tolist()) + " |")
    return "\n".join(lines)
