"""The semester study's Tables 1-5 and claims beside our results: writes <report>/study_tables.md.

Reads a study report folder (``reports/study_msrc``, ``reports/study_camvid``: the grids
``benchmarks/study_*.yaml``) and puts, for every row of the study's Tables 1-5, the study's VOC mIoU beside
ours (mean over seeds, std, and a 95% t-interval over seeds) and, since VOC and our datasets differ in
scale, both as ratios to the table's reference row (DSM + KMeans L2; ours per seed, paired), then checks each
of the study's claims with a paired comparison: the same seed gives every dataset-level clusterer the same
DSM segments, so the per-seed differences between two rows are paired; their mean and 95% t-interval decide
the claim (reproduced: the interval lies on the study's side of 0; contradicted: on the other side;
undecided: it contains 0).

    python benchmarks/study_tables.py reports/study_msrc reports/study_camvid

The study-settings reports (``reports/study_*_full``: crop CLS, ACG 400 epochs, ABC 500 epochs) are read the
same way: their row labels map onto the same roles (``FULL_LABELS``); the rows they do not run read "not run".
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from ussbench.errors import DataError
from ussbench.paths import display_path
from ussbench.reports.compare import compare_where

# t quantiles (two-sided 95%) by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}

# the grids' row labels (benchmarks/study_*.yaml; the CPU cuts are in the labels)
DSM, ACG, RAW = (
    "DSM (mean tokens; crop CLS cut)",
    "ACG (mean tokens, 20 ep.; study 400)",
    "raw tokens (baseline)",
)
MASKED = "DSM masked-attention CLS"  # not in the cut grids: its rows read "not run"
ABC_STUDY, ABC_REF = "ABC study loss (100 ep.)", "ABC hard bounds, Attn+MLP, N/k^2..N/k^0.5 (100 ep.)"
KM = "KMeans L2"
# the same roles in the study-settings grids (benchmarks/study_*_full.yaml): a report holding these labels is
# read through them, so one script serves the cut and the full grids
FULL_LABELS = {
    DSM: "DSM (crop CLS)",
    ACG: "ACG (400 ep., crop CLS)",
    ABC_STUDY: "ABC study loss (500 ep.)",
    ABC_REF: "ABC hard bounds (500 ep.)",
    **{
        f"ABC {row} (100 ep.)": f"ABC {row} (500 ep.)"
        for row in ("2xAttn+MLP", "Identical", "MLP", "N/k^1.5..none", "N/k^2..none", "N/k^2..N/k^0.7")
    },
}
# (table, study row, study mIoU, our image clusterer, our dataset clusterer)
ROWS = [
    ("1", "DSM", 25.95, DSM, KM),
    ("1", "ACG (their implementation)", 21.7, ACG, KM),
    ("1", "DSM: masked attention for DINO CLS", 23.66, MASKED, KM),
    ("2", "Attn + MLP", 30.42, DSM, ABC_REF),
    ("2", "2xAttn + MLP", 25.64, DSM, "ABC 2xAttn+MLP (100 ep.)"),
    ("2", "Identical", 13.47, DSM, "ABC Identical (100 ep.)"),
    ("2", "MLP", 26.38, DSM, "ABC MLP (100 ep.)"),
    ("3", "N/k^1.5 .. none", 25.1895, DSM, "ABC N/k^1.5..none (100 ep.)"),
    ("3", "N/k^2 .. none", 26.72, DSM, "ABC N/k^2..none (100 ep.)"),
    ("3", "N/k^2 .. N/k^0.7", 27.11, DSM, "ABC N/k^2..N/k^0.7 (100 ep.)"),
    ("3", "N/k^2 .. N/k^0.5", 30.42, DSM, ABC_REF),
    ("4", "KMeans", 25.56, DSM, KM),
    ("4", "OTC", 25.25, DSM, "OTC"),
    ("4", "ABC (study loss as written)", 30.42, DSM, ABC_STUDY),
    ("4", "ABC (size bounds on argmax counts)", 30.42, DSM, ABC_REF),
    ("5", "KMeans with L2 distance", 25.56, DSM, KM),
    ("5", "KMeans with cos similarity", 25.48, DSM, "KMeans cos"),
    ("5", "KMeans norm/std input and L2 distance", 24.09, DSM, "KMeans norm/std L2"),
    ("5", "KMeans norm/std input and cos similarity", 24.22, DSM, "KMeans norm/std cos"),
    ("5", "OTC", 25.25, DSM, "OTC"),
    ("5", "OTC norm/std", 23.69, DSM, "OTC norm/std"),
    ("-", "raw backbone tokens + KMeans (our baseline)", None, RAW, KM),
]
TITLES = {
    "1": "Table 1: image-level clusterers (+ KMeans, k = #classes)",
    "2": "Table 2: ABC architecture (size bounds N/k^2 .. N/k^0.5)",
    "3": "Table 3: ABC cluster-size bounds (Attn + MLP)",
    "4": "Table 4: dataset-level clusterers on DSM segments",
    "5": "Table 5: KMeans / OTC variants on DSM segments",
    "-": "Baseline",
}
# claims: (text, list of (higher row, lower row) pairs as (ic, dc), study deltas)
CLAIMS = [
    ("Table 1: DSM > DSM masked-attention CLS (25.95 vs 23.66)", [((DSM, KM), (MASKED, KM), 25.95 - 23.66)]),
    ("Table 1: DSM masked-attention CLS > ACG (23.66 vs 21.7)", [((MASKED, KM), (ACG, KM), 23.66 - 21.7)]),
    ("Table 1: DSM > ACG (25.95 vs 21.7)", [((DSM, KM), (ACG, KM), 25.95 - 21.7)]),
    ("Table 4: KMeans ~ OTC (25.56 vs 25.25: delta within +-1)", [((DSM, KM), (DSM, "OTC"), 25.56 - 25.25)]),
    ("Table 4: ABC > KMeans by ~5 (study loss as written)", [((DSM, ABC_STUDY), (DSM, KM), 30.42 - 25.56)]),
    ("Table 4: ABC > KMeans by ~5 (bounds on argmax counts)", [((DSM, ABC_REF), (DSM, KM), 30.42 - 25.56)]),
    ("Table 2: Attn+MLP > MLP", [((DSM, ABC_REF), (DSM, "ABC MLP (100 ep.)"), 30.42 - 26.38)]),
    ("Table 2: MLP > 2xAttn+MLP", [((DSM, "ABC MLP (100 ep.)"), (DSM, "ABC 2xAttn+MLP (100 ep.)"), 26.38 - 25.64)]),
    ("Table 2: 2xAttn+MLP > Identical", [((DSM, "ABC 2xAttn+MLP (100 ep.)"), (DSM, "ABC Identical (100 ep.)"), 25.64 - 13.47)]),
    ("Table 3: (N/k^2, N/k^0.5) > (N/k^2, N/k^0.7)", [((DSM, ABC_REF), (DSM, "ABC N/k^2..N/k^0.7 (100 ep.)"), 30.42 - 27.11)]),
    ("Table 3: (N/k^2, N/k^0.7) > (N/k^2, none)", [((DSM, "ABC N/k^2..N/k^0.7 (100 ep.)"), (DSM, "ABC N/k^2..none (100 ep.)"), 27.11 - 26.72)]),
    ("Table 3: (N/k^2, none) > (N/k^1.5, none)", [((DSM, "ABC N/k^2..none (100 ep.)"), (DSM, "ABC N/k^1.5..none (100 ep.)"), 26.72 - 25.1895)]),
    ("Table 5: norm/std hurts KMeans L2", [((DSM, KM), (DSM, "KMeans norm/std L2"), 25.56 - 24.09)]),
    ("Table 5: norm/std hurts KMeans cos", [((DSM, "KMeans cos"), (DSM, "KMeans norm/std cos"), 25.48 - 24.22)]),
    ("Table 5: norm/std hurts OTC", [((DSM, "OTC"), (DSM, "OTC norm/std"), 25.25 - 23.69)]),
    ("Table 5: KMeans L2 ~ KMeans cos (25.56 vs 25.48: delta within +-1)", [((DSM, KM), (DSM, "KMeans cos"), 25.56 - 25.48)]),
]  # fmt: skip
# the reference row of each table's ratios: (study mIoU, our image clusterer, our dataset clusterer)
REFERENCE = {"1": (25.95, DSM, KM), "2": (25.56, DSM, KM), "3": (25.56, DSM, KM), "4": (25.56, DSM, KM),
             "5": (25.56, DSM, KM), "-": (25.56, DSM, KM)}  # fmt: skip
EQUIVALENCE = 1.0  # "~" claims: reproduced when the whole interval lies within +-1 mIoU


def t_interval(values: pd.Series) -> tuple[float, float, float, float]:
    """mean, std, and the 95% t-interval over the values (NaN interval for fewer than 2)."""
    n = int(values.count())
    mean = float(values.mean())
    if n < 2:
        return mean, float("nan"), float("nan"), float("nan")
    std = float(values.std(ddof=1))
    half = T95.get(n - 1, 1.96) * std / math.sqrt(n)
    return mean, std, mean - half, mean + half


def load(folder: Path) -> pd.DataFrame:
    frame = pd.read_parquet(folder / "results.parquet")
    return frame[["image_clusterer", "dataset_clusterer", "seed", "miou", "time_total_s"]].copy()


def resolve(frame: pd.DataFrame, column: str, label: str) -> str:
    """``label`` as this report names it: the cut grid's label, else its study-settings twin, if present."""
    present = set(frame[column])
    if label not in present and FULL_LABELS.get(label) in present:
        return FULL_LABELS[label]
    return label


def row_values(frame: pd.DataFrame, ic: str, dc: str) -> pd.Series:
    ic, dc = resolve(frame, "image_clusterer", ic), resolve(frame, "dataset_clusterer", dc)
    sel = frame[(frame.image_clusterer == ic) & (frame.dataset_clusterer == dc)]
    return sel.set_index("seed").miou.sort_index()


def verdict(lo: float, hi: float, study_delta: float, equivalence: bool) -> str:
    if math.isnan(lo):
        return "undecided (one seed)"
    if equivalence:
        if -EQUIVALENCE <= lo and hi <= EQUIVALENCE:
            return "reproduced (within +-1)"
        if lo > EQUIVALENCE or hi < -EQUIVALENCE:
            return "not reproduced (differ by > 1)"
        return "undecided"
    if lo > 0:
        return "reproduced" if study_delta > 0 else "contradicted"
    if hi < 0:
        return "contradicted" if study_delta > 0 else "reproduced"
    return "undecided (interval contains 0)"


def tables(folder: Path) -> str:
    frame = load(folder)
    run = json.loads((folder / "run.json").read_text()) if (folder / "run.json").is_file() else {}
    seeds = sorted(int(s) for s in frame.seed.unique())
    lines = [
        f"# The semester study's tables on {folder.name}",
        "",
        f"Study: PASCAL VOC 2012, DINO ViT-S. Ours: `{display_path(run.get('grid_file')) if run.get('grid_file') else folder.name}`, seeds {seeds}; "
        "mIoU (%) mean over seeds, std, 95% t-interval over seeds. Generated by `benchmarks/study_tables.py`.",
        "",
    ]
    for table in ("1", "2", "3", "4", "5", "-"):
        ref_study, ref_ic, ref_dc = REFERENCE[table]
        ref_vals = row_values(frame, ref_ic, ref_dc)
        ref_ic, ref_dc = (
            resolve(frame, "image_clusterer", ref_ic),
            resolve(frame, "dataset_clusterer", ref_dc),
        )
        lines += [f"## {TITLES[table]}", "",
                  f"Ratios: to the study's {ref_study:.2f} (its DSM + KMeans) and to our {ref_ic} + {ref_dc} of the same seed.", "",
                  "| study row | study mIoU | study ratio | ours (grid row) | ours mIoU | std | 95% interval | our ratio | ratio 95% interval | seeds |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for tab, name, study, ic, dc in ROWS:
            if tab != table:
                continue
            ic, dc = resolve(frame, "image_clusterer", ic), resolve(frame, "dataset_clusterer", dc)
            vals = row_values(frame, ic, dc)
            if vals.empty:
                lines.append(
                    f"| {name} | {'' if study is None else f'{study:.2f}'} | | {ic} + {dc} | not run (not in this grid) | | | | | 0 |"
                )
                continue
            mean, std, lo, hi = t_interval(vals)
            r_mean, _, r_lo, r_hi = t_interval((vals / ref_vals).dropna())
            study_txt = "" if study is None else f"{study:.2f}"
            study_ratio = "" if study is None else f"{study / ref_study:.3f}"
            lines.append(
                f"| {name} | {study_txt} | {study_ratio} | {ic} + {dc} | {mean:.2f} | {std:.2f} | [{lo:.2f}, {hi:.2f}] "
                f"| {r_mean:.3f} | [{r_lo:.3f}, {r_hi:.3f}] | {len(vals)} |"
            )
        lines.append("")
    lines += ["## The study's claims",
              "",
              "Decided by the report's rule (the leaderboard's and `ussbench compare`'s): Δ mIoU of the two rows "
              "(pooled over seeds) with its paired image-bootstrap 95% interval (images resampled, the same draws "
              "for both rows, seeds nested). Beside it, the seed-paired t-interval (same seed, same DSM segments), "
              "which with 3 seeds is wide.", "",
              "| claim | study delta | our Δ (image bootstrap) | 95% interval | verdict | Δ mean over seeds | seed t-interval |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for text, pairs in CLAIMS:
        for (a_ic, a_dc), (b_ic, b_dc), study_delta in pairs:
            a, b = row_values(frame, a_ic, a_dc), row_values(frame, b_ic, b_dc)
            diff = (a - b).dropna()
            if diff.empty:
                lines.append(f"| {text} | {study_delta:+.2f} | | | not run (not in this grid) | | |")
                continue
            mean, _, lo, hi = t_interval(diff)
            eq = "delta within +-1" in text  # an equivalence claim ("A ~ B"), not "by ~5"
            d = None
            a_ic, b_ic = resolve(frame, "image_clusterer", a_ic), resolve(frame, "image_clusterer", b_ic)
            a_dc, b_dc = resolve(frame, "dataset_clusterer", a_dc), resolve(frame, "dataset_clusterer", b_dc)
            if (folder / "per_image_counts.npz").is_file() or (folder / "cells").is_dir():
                try:
                    d = compare_where(folder, {"image_clusterer": a_ic, "dataset_clusterer": a_dc},
                                      {"image_clusterer": b_ic, "dataset_clusterer": b_dc})  # fmt: skip
                except DataError:  # cells from before per-image counts were stored
                    d = None
            if d is not None:
                boot = f"{d.delta:+.2f} | [{d.low:+.2f}, {d.high:+.2f}] | {verdict(d.low, d.high, study_delta, eq)}"
            else:  # no per-image counts: the seed-paired interval decides, and the verdict says so
                boot = f"| | {verdict(lo, hi, study_delta, eq)} (seed t-interval; no per-image counts)"
            lines.append(f"| {text} | {study_delta:+.2f} | {boot} | {mean:+.2f} | [{lo:+.2f}, {hi:+.2f}] |")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="study report folders")
    args = ap.parse_args()
    for folder in map(Path, args.reports):
        text = tables(folder)
        (folder / "study_tables.md").write_text(text)
        print(text)


if __name__ == "__main__":
    main()
