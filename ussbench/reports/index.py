"""``reports/index.html``: one static page listing every report folder with its data, rows and best row."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from ..atomic import atomic_write_text
from .page import STYLE


def _summary(folder: Path) -> dict[str, str] | None:
    if not (folder / "leaderboard.html").is_file():
        return None
    run = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    grid = run.get("grid") or {}
    info = {"name": folder.name, "description": str(grid.get("description", "")), "started": str(run.get("started", "")),
            "rows": "", "cells": "", "best": "", "data": ""}  # fmt: skip
    results = folder / "results.parquet"
    if results.is_file():
        try:
            frame = pd.read_parquet(results, columns=None)
        except Exception:  # an unreadable table still lists the report
            frame = None
        if frame is not None and not frame.empty:
            stages = [c for c in ("dataset", "backbone", "feature_learner", "image_clusterer", "dataset_clusterer",
                                  "postprocess") if c in frame]  # fmt: skip
            means = frame.groupby(stages, dropna=False).miou.mean().sort_values(ascending=False)
            info["rows"] = str(len(means))
            info["cells"] = str(len(frame))
            info["best"] = best_rows(means, stages)
            info["data"] = ", ".join(f"{d} ({int(n)} images)" for d, n in
                                     frame.groupby("dataset").n_images.max().items()) if "n_images" in frame else ""  # fmt: skip
    return info


def best_rows(means: pd.Series, stages: list[str]) -> str:
    """The best row of each dataset (rows of different data are never ranked against each other)."""
    shown = [i for i, s in enumerate(stages) if s not in ("dataset", "backbone")]
    best: dict[str, str] = {}
    for key, miou in means.items():  # sorted best first: the first row seen of a dataset is its best
        key = key if isinstance(key, tuple) else (key,)
        dataset = str(key[stages.index("dataset")]) if "dataset" in stages else ""
        label = " + ".join(str(key[i]) for i in shown if key[i] != "none") or "none"
        best.setdefault(dataset, f"{label} ({miou:.2f} mIoU)")
    if len(best) == 1:
        return next(iter(best.values()))
    return "; ".join(f"{d}: {text}" for d, text in best.items())


def build_index(reports_dir: Path) -> Path:
    """Write ``reports_dir/index.html`` listing every sub-folder that holds a ``leaderboard.html``."""
    reports_dir = Path(reports_dir)
    rows = [s for s in (_summary(f) for f in sorted(reports_dir.iterdir()) if f.is_dir()) if s]
    body = "".join(
        f"<tr><td><a href='{html.escape(r['name'], quote=True)}/leaderboard.html'>{html.escape(r['name'])}</a></td>"
        + "".join(
            f"<td>{html.escape(r[k])}</td>"
            for k in ("description", "data", "rows", "cells", "best", "started")
        )
        + "</tr>"
        for r in rows
    )
    page = (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'><title>ussbench reports</title>"
        f"<style>{STYLE}</style></head><body><h1>ussbench reports</h1>"
        "<p class='note'>Each report: a leaderboard with 95% bootstrap intervals, Δ vs the grid's baseline row and "
        "figures. Static files: open from disk or any web host.</p>"
        "<table id='reports'><thead><tr><th>report</th><th>what it compares</th><th>data (images scored)</th>"
        "<th>rows</th><th>cells</th><th>best row (mean mIoU)</th><th>latest run</th></tr></thead>"
        f"<tbody>{body}</tbody></table></body></html>"
    )
    return atomic_write_text(reports_dir / "index.html", page)
