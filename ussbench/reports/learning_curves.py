"""Learning curves and code health of the feature learners in a report.

For every learner plugin in the grid, one figure ``learning_curves_<learner>.png`` with three panels over the
training steps: the method's own (base) loss, the effective rank of the codes of the fixed health probe, and
the mIoU of the kept checkpoints (a cheap fixed evaluation, see
:func:`ussbench.feature_learners.records.checkpoint_scores`), with the row's grid mIoU marked at the last
step and the raw-token row of the same dataset as a dashed line. Lines are means over seeds. The Markdown
section adds a table of every learner row's steps, calibrated values, final code rank and collapsed seeds,
and says which rows collapsed. Checkpoint scores are evaluation only: no checkpoint is ever chosen by them.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from ..atomic import atomic_write  # noqa: E402
from .tables import STAGE_COLUMNS, markdown_table  # noqa: E402

OTHER_STAGES = [c for c in STAGE_COLUMNS if c not in ("dataset", "feature_learner")]


def learner_name(cell: dict[str, Any]) -> str | None:
    """The feature-learner plugin of a cell (None when the stage was skipped)."""
    for stage in cell.get("identity", {}).get("stages", []):
        if stage.get("kind") == "feature_learner":
            return None if stage.get("name") in (None, "none") else stage["name"]
    return None


def load_learner_artifacts(output: Path, cell: dict[str, Any]) -> dict[str, Any]:
    """The feature learner's saved artifacts of a cell, read by the pickle-free loader of the cell records."""
    from ..graph.records import load_artifacts

    saved = load_artifacts(Path(output) / "cells" / f"{cell['row']['cell_id']}.artifacts.pt")
    return (saved or {}).get("feature_learner") or {}


def _mean_series(series: list[tuple[list[float], list[float]]]) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean over seeds of (steps, values) series that share their steps (the shortest common prefix)."""
    series = [(s, v) for s, v in series if s and v]
    if not series:
        return None
    n = min(len(s) for s, _ in series)
    steps = np.asarray(series[0][0][:n], dtype=float)
    with warnings.catch_warnings():  # a step where every seed is NaN (step 0 has no loss yet) stays NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        values = np.nanmean(np.asarray([v[:n] for _, v in series], dtype=float), axis=0)
    return steps, values


def _row_key(cell: dict[str, Any]) -> tuple[str, ...]:
    return tuple(str(cell["row"][c]) for c in STAGE_COLUMNS)


def collect(
    output: Path, cells: list[dict[str, Any]]
) -> dict[str, dict[tuple[str, ...], list[dict[str, Any]]]]:
    """learner plugin -> leaderboard row key -> the seeds' {row, curve, checkpoints, calibrated} (sorted by seed)."""
    out: dict[str, dict[tuple[str, ...], list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for cell in sorted(cells, key=lambda c: c["row"]["seed"]):
        name = learner_name(cell)
        if name is None:
            continue
        art = load_learner_artifacts(output, cell)
        calibrated = (cell.get("params", {}).get("feature_learner") or {}).get("calibrated") or art.get(
            "calibrated"
        )
        out[name][_row_key(cell)].append(
            {"row": cell["row"], "curve": art.get("curve") or {}, "checkpoints": art.get("checkpoints") or {},
             "calibrated": calibrated or {}}
        )  # fmt: skip
    return out


def _baselines(cells: list[dict[str, Any]]) -> dict[tuple[str, ...], float]:
    """Mean mIoU of the no-learner rows, keyed by (dataset, other stages)."""
    values: dict[tuple[str, ...], list[float]] = defaultdict(list)
    for cell in cells:
        if learner_name(cell) is None:
            key = (str(cell["row"]["dataset"]), *(str(cell["row"][c]) for c in OTHER_STAGES))
            values[key].append(float(cell["row"]["miou"]))
    return {k: float(np.mean(v)) for k, v in values.items()}


def draw(
    name: str, rows: dict[tuple[str, ...], list[dict[str, Any]]], baselines: dict, path: Path
) -> Path | None:
    """One learner's figure: base loss, code effective rank and checkpoint mIoU against training steps."""
    if not any(seed["curve"] for seeds in rows.values() for seed in seeds):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    datasets = sorted({key[0] for key in rows})
    styles = ["-", "--", ":", "-."]
    colours = plt.get_cmap("tab20")
    labels = sorted({key[STAGE_COLUMNS.index("feature_learner")] for key in rows})
    for key, seeds in rows.items():
        dataset, label = key[0], key[STAGE_COLUMNS.index("feature_learner")]
        style = styles[datasets.index(dataset) % len(styles)]
        colour = colours(labels.index(label) % 20)
        tag = f"{label} · {dataset}"
        for ax, field in ((axes[0], "base"), (axes[1], "effective_rank")):
            mean = _mean_series([(s["curve"].get("step", []), s["curve"].get(field, [])) for s in seeds])
            if mean is not None:
                ax.plot(*mean, style, color=colour, label=tag)
        mean = _mean_series(
            [(s["checkpoints"].get("step", []), s["checkpoints"].get("miou", [])) for s in seeds]
        )
        if mean is not None:
            axes[2].plot(*mean, style, marker="o", ms=3, color=colour, label=tag)
            grid_miou = float(np.mean([s["row"]["miou"] for s in seeds]))
            axes[2].plot([mean[0][-1]], [grid_miou], "*", ms=11, color=colour)
    for key in {(k[0], *(k[STAGE_COLUMNS.index(c)] for c in OTHER_STAGES)) for k in rows}:
        if key in baselines:
            axes[2].axhline(
                baselines[key], color="gray", lw=1, ls=styles[datasets.index(key[0]) % len(styles)]
            )
    axes[0].set_title("base loss (mean per curve interval)")
    axes[1].set_title("code effective rank (health probe)")
    axes[1].set_yscale("log")
    axes[2].set_title("checkpoint mIoU (k-means, 1 init); * grid mIoU; gray: raw tokens")
    for ax in axes:
        ax.set_xlabel("training step")
    axes[2].set_ylabel("mIoU (%)")
    axes[2].legend(fontsize=6, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.suptitle(f"{name}: learning curves (mean over seeds; line style = dataset)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _fmt(values: list[float]) -> str:
    values = [v for v in values if v is not None and np.isfinite(v)]
    if not values:
        return ""
    return f"{np.mean(values):.3g}" + (f" ± {np.std(values, ddof=1):.2g}" if len(values) > 1 else "")


def health_table(rows_by_learner: dict[str, dict[tuple[str, ...], list[dict[str, Any]]]]) -> pd.DataFrame:
    """One line per learner row: steps, calibrated values (mean over seeds), final code rank, collapsed seeds."""
    lines = []
    for seeds_by_row in rows_by_learner.values():
        for key, seeds in seeds_by_row.items():
            calibrated: dict[str, list[float]] = defaultdict(list)
            for s in seeds:
                for k, v in s["calibrated"].items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        calibrated[k].append(float(v))
            rows = [s["row"] for s in seeds]
            lines.append(
                {"dataset": key[0], "feature_learner": key[STAGE_COLUMNS.index("feature_learner")],
                 "steps": ", ".join(sorted({str(r.get("learner_steps", "")) for r in rows})),
                 "settings used (mean over seeds)": "; ".join(f"{k} {_fmt(v)}" for k, v in sorted(calibrated.items())),
                 "code eff. rank": _fmt([r.get("code_effective_rank") for r in rows]),
                 "input eff. rank": _fmt([r.get("input_effective_rank") for r in rows]),
                 "collapsed seeds": f"{sum(bool(r.get('code_collapsed')) for r in rows)}/{len(rows)}"}
            )  # fmt: skip
    return pd.DataFrame(lines)


# (dataset, feature-learner label of row A, that of row B) -> A - B as a paired delta, or None
PairedLookup = Callable[[str, str, str], Any]


def _seed_stats(cells: list[dict[str, Any]]) -> dict[tuple[str, str], tuple[float, float, int]]:
    """(dataset, feature-learner label) -> (mean mIoU, seed std (0 for one seed), seeds); other stages pooled."""
    values: dict[tuple[str, str], list[float]] = defaultdict(list)
    for cell in cells:
        values[(str(cell["row"]["dataset"]), str(cell["row"]["feature_learner"]))].append(
            float(cell["row"]["miou"])
        )
    return {
        k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
        for k, v in values.items()
    }


def comparison_table(cells: list[dict[str, Any]], paired: PairedLookup | None = None) -> pd.DataFrame:
    """Every learner row against its dataset's raw-token row, and every 'X+OMH' row against its row 'X'.

    diff: difference of the seed means; spread: sqrt(s1^2 + s2^2) of the two rows' seed standard deviations (the
    std of the difference of two independent runs); 'beyond 2 spreads': diff > 2 * spread (or < -2 * spread), only
    with at least 2 seeds on both sides. Cells of other image / dataset clusterers are pooled per label (the OMH
    grid has one of each). With ``paired`` (the report's image bootstrap, when the cells stored per-image counts)
    each line also gets the paired Δ interval, and 'decided' follows it, the report's one rule for a difference.
    """
    stats = _seed_stats(cells)
    raw_labels = {
        (str(c["row"]["dataset"]), str(c["row"]["feature_learner"])) for c in cells if learner_name(c) is None
    }
    raw = {ds: stats[(ds, label)] for ds, label in raw_labels}
    raw_label_of = dict(raw_labels)
    lines = []
    for (ds, label), (mean, std, n) in sorted(stats.items()):
        if (ds, label) in raw_labels:
            continue
        pairs = [("raw tokens", raw[ds])] if ds in raw else []
        base = label.removesuffix("+OMH")
        if base != label and (ds, base) in stats:
            pairs.append((base, stats[(ds, base)]))
        for against, (b_mean, b_std, b_n) in pairs:
            diff, spread = mean - b_mean, float(np.hypot(std, b_std))
            verdict = "one seed" if min(n, b_n) < 2 else ("yes" if abs(diff) > 2 * spread else "no")
            line = {"dataset": ds, "row": label, "against": against, "mIoU": f"{mean:.2f} ± {std:.2f} ({n})",
                    "baseline mIoU": f"{b_mean:.2f} ± {b_std:.2f} ({b_n})", "diff": f"{diff:+.2f}",
                    "spread": f"{spread:.2f}", "beyond 2 spreads": verdict}  # fmt: skip
            other = raw_label_of[ds] if against == "raw tokens" else against
            d = paired(ds, label, other) if paired is not None else None
            if paired is not None:
                line["paired Δ 95% CI"] = "" if d is None else f"{d.delta:+.2f} [{d.low:+.2f}, {d.high:+.2f}]"
                line["decided"] = "no per-image counts" if d is None else ("yes" if d.decided else "no")
            lines.append(line)
    return pd.DataFrame(lines)


def section(output: Path, cells: list[dict[str, Any]], paired: PairedLookup | None = None) -> str:
    """The report's learning-curve section (Markdown) and its figures; empty when the grid has no learner."""
    rows_by_learner = collect(Path(output), cells)
    if not rows_by_learner:
        return ""
    baselines = _baselines(cells)
    table = health_table(rows_by_learner)
    collapsed = table[~table["collapsed seeds"].str.startswith("0/")]
    lines = ["## Learning curves and code health", "",
             "Label-free health of each learner's final codes on a fixed probe of 4,096 patches: effective rank "
             "(exp of the entropy of the normalised singular values of the L2-normalised codes; 1 = every patch "
             "the same direction) beside the input tokens' rank on the same patches. A seed counts as collapsed "
             "when training took the rank below 30% of the untrained head's (or below 3). 'settings used' are "
             "the values the learner trained with: calibrated from the features where the row left them at "
             "'auto', else as given.", "",
             markdown_table(table), ""]  # fmt: skip
    if len(collapsed):
        lines += ["**Collapsed rows** (their mIoU measures a collapsed code): "
                  + "; ".join(f"{r['feature_learner']} on {r['dataset']} ({r['collapsed seeds']} seeds)"
                              for _, r in collapsed.iterrows()), ""]  # fmt: skip
    else:
        lines += ["No learner row collapsed.", ""]
    comparison = comparison_table(cells, paired)
    if len(comparison):
        lines += ["### Learners against raw tokens, and OMH's effect", "",
                  "mIoU as mean ± seed std (seeds); diff = difference of the means; spread = sqrt(s1² + s2²) of the two "
                  "rows' seed stds; 'beyond 2 spreads' says whether |diff| exceeds twice that (a seed-only screen). "
                  "Where the cells stored per-image counts, 'paired Δ 95% CI' is the report's paired image bootstrap "
                  "and 'decided' follows it: that is the rule the leaderboard uses.", "",
                  markdown_table(comparison), ""]  # fmt: skip
    for name, rows in sorted(rows_by_learner.items()):
        path = draw(name, rows, baselines, Path(output) / f"learning_curves_{name}.png")
        if path is not None:
            lines += [f"### Learning curves: {name}", "", f"![learning curves {name}]({path.name})", ""]
    lines += ["Checkpoint mIoU is evaluation only (k-means with one init on the codes of each kept snapshot); "
              "every row reports its last training step, never a chosen checkpoint.", ""]  # fmt: skip
    return "\n".join(lines)
