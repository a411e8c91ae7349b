"""Published numbers beside measured ones: a row gets its plugin's paper number when the dataset and metric match.

Rule: for a row, its plugins are looked up in the order feature learner, image-level clusterer, dataset-level
clusterer, postprocess; the first registry-card ``published`` entry whose ``dataset`` equals the row's
dataset plugin name and whose ``metric`` is mIoU (resp. pixel accuracy) is shown with the ratio
measured / published. The card's backbone and setting may still differ (the column's note says so);
everything else stays in the report's separate table of published numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from ..cards import published_numbers
from .comparisons import row_cells, stage_names

LOOKUP_ORDER = ("feature_learner", "image_clusterer", "dataset_clusterer", "postprocess")
METRICS = {"miou": "miou", "mIoU": "miou", "MIOU": "miou", "pixel_accuracy": "acc", "accuracy": "acc",
           "pixel accuracy": "acc", "acc": "acc"}  # fmt: skip


def normalise_metric(name: str) -> str | None:
    return METRICS.get(str(name).strip()) or METRICS.get(str(name).strip().lower())


def paper_match(names: dict[str, str], root: Path | None = None) -> dict[str, dict[str, Any]]:
    """{'miou': ref, 'acc': ref} of the first matching published entries for a row's plugin names."""
    dataset = names.get("dataset")
    found: dict[str, dict[str, Any]] = {}
    for kind in LOOKUP_ORDER:
        name = names.get(kind)
        if not name or name == "none":
            continue
        for ref in published_numbers(kind, name, root):
            metric = normalise_metric(ref.get("metric", ""))
            if metric and metric not in found and ref.get("dataset") == dataset:
                found[metric] = {**ref, "plugin": name}
    return found


def paper_columns(board: pd.DataFrame, cells: list[dict[str, Any]], root: Path | None = None) -> pd.DataFrame:
    """Per board row: paper_miou, paper_miou_ratio, paper_acc, paper_acc_ratio, paper_source (NaN/'' if none)."""
    out = pd.DataFrame(index=board.index, columns=["paper_miou", "paper_miou_ratio", "paper_acc", "paper_acc_ratio",
                                                   "paper_source"], dtype=object)  # fmt: skip
    for i, cfg in board.iterrows():
        chosen = row_cells(cells, cfg)
        if not chosen:
            continue
        refs = paper_match(stage_names(chosen[0]), root)
        sources = []
        for metric, measured in (("miou", cfg["miou_mean"]), ("acc", cfg["acc_mean"])):
            ref = refs.get(metric)
            if ref is None:
                continue
            value = float(ref["value"])
            out.loc[i, f"paper_{metric}"] = value
            out.loc[i, f"paper_{metric}_ratio"] = measured / value if value else None
            sources.append(f"{ref['plugin']}: {ref.get('source', '?')} ({ref.get('backbone', '?')})")
        out.loc[i, "paper_source"] = "; ".join(dict.fromkeys(sources))
    return out
