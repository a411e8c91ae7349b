"""Why a study row collapses: the cluster sizes each dataset-level clusterer produced, per row, from the cells.

For every (image clusterer, dataset clusterer) row of a study report folder it lists, over seeds: mIoU, the
number of clusters used (predicted labels with at least one pixel), the largest cluster's share of the
segments, empty clusters, and for ABC the fraction of argmax counts inside the size bounds before and after
the calibrated assignment. Writes <report>/study_diagnosis.md.

    python benchmarks/study_diagnosis.py reports/study_msrc reports/study_camvid
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np

from ussbench.graph.records import load_artifacts, read_record


def sizes_of(dc_artifacts: dict) -> list[int] | None:
    """Hard (argmax) cluster sizes the clusterer recorded, if any."""
    for key in ("argmax_sizes", "cluster_sizes"):
        if dc_artifacts.get(key) is not None:
            return [int(round(v)) for v in dc_artifacts[key]]
    return None


def diagnose(folder: Path) -> str:
    rows: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for path in sorted((folder / "cells").glob("*.json")):
        row = read_record(path)["row"]
        artifacts = load_artifacts(path.with_name(f"{path.stem}.artifacts.pt"))
        dc = (artifacts or {}).get("dataset_clusterer") or {}
        rows[(row["image_clusterer"], row["dataset_clusterer"])].append({"row": row, "dc": dc})
    lines = [f"# Cluster sizes behind each row of {folder.name}", "",
             "mean over seeds; 'largest' = the largest cluster's share of all segments (hard assignments); "
             "ABC: fraction of clusters whose argmax count lies in [N/k^a, N/k^b] before / after the calibrated "
             "assignment (artifacts argmax_within_bounds / within_bounds).", "",
             "| image clusterer | dataset clusterer | seeds | mIoU | clusters used | largest | empty | "
             "ABC in bounds before / after |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (ic, dc_label), items in sorted(rows.items()):
        miou = np.mean([it["row"]["miou"] for it in items])
        used = np.mean([it["row"].get("n_clusters", np.nan) for it in items])
        largest, empty, before, after = [], [], [], []
        for it in items:
            sizes = sizes_of(it["dc"])
            if sizes:
                total = max(sum(sizes), 1)
                largest.append(max(sizes) / total)
                empty.append(sum(s == 0 for s in sizes))
            if "argmax_within_bounds" in it["dc"]:
                before.append(it["dc"]["argmax_within_bounds"])
                after.append(it["dc"]["within_bounds"])
        fmt = lambda v, spec: format(np.mean(v), spec) if v else ""  # noqa: E731
        bounds = f"{fmt(before, '.2f')} / {fmt(after, '.2f')}" if before else ""
        lines.append(f"| {ic} | {dc_label} | {len(items)} | {miou:.2f} | {used:.1f} | {fmt(largest, '.2f')} | "
                     f"{fmt(empty, '.1f')} | {bounds} |")  # fmt: skip
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+")
    for folder in map(Path, ap.parse_args().reports):
        text = diagnose(folder)
        (folder / "study_diagnosis.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
