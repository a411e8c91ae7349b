"""Build ``reports/<grid>/``: results CSV/Parquet, leaderboard Markdown/HTML/CSV, statistics, figures, panels."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import registry
from ..atomic import atomic_write, atomic_write_text
from ..cards import published_numbers
from ..errors import ConfigError
from ..evaluation.per_image import npz_problem
from ..evaluation.statistics import DEFAULT_RESAMPLES, DEFAULT_SEED
from ..paths import display_path
from ..provenance import read_run
from . import figures, header, learning_curves, page, profile
from .comparisons import (
    BoardStatistics,
    board_statistics,
    decided_summary,
    pairwise_matrix,
    row_cells,
    row_label,
)
from .failed import failures_html, failures_markdown
from .index import build_index
from .panels import draw_panels
from .paper import paper_columns
from .records import ALL_CELLS, RESTORED_KEY, class_pixels, load_report_cells, sync_per_image_counts
from .tables import (
    ABSENT,
    leaderboard_display,
    leaderboard_frame,
    markdown_table,
    per_class_frame,
    per_class_table,
    results_frame,
    times_note,
)

log = logging.getLogger(__name__)
PLUGIN_KINDS = {"dataset": "dataset", "backbone": "backbone", "feature_learner": "feature_learner",
                "image_clusterer": "image_clusterer", "dataset_clusterer": "dataset_clusterer"}  # fmt: skip


def build_report(
    output: Path,
    grid_name: str,
    stage_order: list[str] | None = None,
    n_panel_configs: int = 3,
    cell_ids: set[str] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    stats_seed: int = DEFAULT_SEED,
    scope: str | None = None,
) -> dict[str, Path]:
    """(Re)build every report file from the finished cells in ``output/cells``.

    ``cell_ids``: report only these cells (the current grid's), so cells left by an earlier version of the
    grid file in the same folder never leak into the leaderboard; None reports every cell found. ``scope``:
    which runs those cells come from, e.g. "the latest run of msrc_grid.yaml" (``ussbench report``), for the
    header and the warning about cells left out. Without
    ``cells/`` (a committed folder in a fresh clone) the report is rebuilt from ``results.parquet`` and
    ``per_image_counts.npz``, which are then left as they are. Every statistic is recomputed each time.
    """
    output = Path(output)
    cells, from_cells = load_report_cells(output, cell_ids, scope)
    if not cells:
        raise ConfigError(
            f"no readable finished cell in {output / 'cells'} (unreadable records are named above); nothing to report"
        )
    results = results_frame(cells)
    board = leaderboard_frame(results)
    # cells resumed from committed results (graph/committed.py) have no panel arrays
    restored = any(c.get(RESTORED_KEY) for c in cells)
    written: dict[str, Path] = {}
    if from_cells:
        written["csv"] = atomic_write(output / "results.csv", lambda tmp: results.to_csv(tmp, index=False))
        written["parquet"] = atomic_write(
            output / "results.parquet", lambda tmp: results.to_parquet(tmp, index=False)
        )
    run = read_run(output)
    counts = sync_per_image_counts(output, cells)
    stats = board_statistics(
        board, cells, counts, (run.get("grid") or {}).get("baseline"), n_resamples, stats_seed
    )
    written["heatmap"] = figures.heatmap(board, output / "heatmap_miou.png")
    written["runtime"] = figures.miou_vs_runtime(board, output / "miou_vs_runtime.png", stats.table)
    written["learners"] = figures.learner_bars(results, output / "miou_by_learner.png")
    written["significance"] = _significance(board, stats, output / "significance.png")
    for key, draw in (("panels", lambda: _panels(output, cells, board, n_panel_configs)),
                      ("level_panels", lambda: _level_panels(output, cells, board)),
                      ("omh_hierarchy", lambda: _omh_hierarchy(output, cells, board))):  # fmt: skip
        try:
            written[key] = draw()
        except Exception as exc:  # panels need the data; a report without them is still a report
            log.warning("qualitative %s skipped: %s", key.replace("_", " "), exc)
            written[key] = None
        kept = output / QUALITATIVE_FILES[key]
        if written[key] is None and kept.is_file() and (not from_cells or restored):
            written[key] = (
                kept  # a committed folder: the figure drawn from its cells still shows these results
            )
    written["leaderboard_csv"] = atomic_write(
        output / "leaderboard.csv", lambda tmp: _leaderboard_csv(board, stats).to_csv(tmp, index=False)
    )
    index_root = _is_reports_root(output.parent)
    written["index"] = output.parent / "index.html" if index_root else None  # the page links to it
    pixels = class_pixels(cells, counts)
    report = Report(grid_name, run, cells, board, stats, paper_columns(board, cells), _published(cells),
                    _per_class(cells, board, pixels), written, pixels, scope)  # fmt: skip
    md = _markdown(report) + failures_markdown(output, cell_ids)  # cells that raised: listed, not missing
    md += learning_curves.section(output, cells, _paired_lookup(board, stats))  # learners' curves (issue 13)
    md += profile.profile_footer(output, cells)  # per-stage seconds vs the machine's limits (perf)
    written["markdown"] = atomic_write_text(output / "leaderboard.md", md)
    html = page.render(report, FIGURES).replace(
        "</body></html>", failures_html(output, cell_ids) + "</body></html>"
    )
    written["html"] = atomic_write_text(output / "leaderboard.html", html)
    if index_root:
        build_index(output.parent)
    return {k: v for k, v in written.items() if v is not None}


# The qualitative figures' files: drawn from the cells' saved arrays, kept as they are when a committed folder
# (no cells/) is rebuilt from results.parquet
QUALITATIVE_FILES = {
    "panels": "panels.png",
    "level_panels": "panels_levels.png",
    "omh_hierarchy": "omh_hierarchy.png",
}

# Figures in the order the report shows them: (key in ``written``, title). A figure added elsewhere appends here.
FIGURES = [
    ("significance", "Pairwise significance of the top rows (paired Δ mIoU, row minus column)"),
    ("heatmap", "mIoU heatmap (image-level x dataset-level)"),
    ("runtime", "mIoU vs runtime"),
    ("learners", "mIoU by feature learner"),
    ("panels", "Qualitative panels (image, ground truth, best configurations)"),
    ("level_panels", "Hierarchy levels of the best configuration with levels (segments, arbitrary colours)"),
    (
        "omh_hierarchy",
        "OMH hierarchy of the best OMH configuration (paper Figure 3: centre affinity vs OT plan)",
    ),
]


@dataclass
class Report:
    """Everything the Markdown and HTML renderers show."""

    grid_name: str
    run: dict[str, Any]
    cells: list[dict[str, Any]]
    board: pd.DataFrame
    stats: BoardStatistics
    paper: pd.DataFrame
    refs: pd.DataFrame
    per_class: pd.DataFrame
    written: dict[str, Path | None]
    # cell id -> ground-truth pixels per class of its scored images (records.class_pixels)
    class_pixels: dict[str, dict[str, int]] = field(default_factory=dict)
    scope: str | None = None  # which runs' cells the report covers (``ussbench report``)
    flags: pd.Series = field(init=False)
    origin_lines: list[str] = field(init=False)

    def __post_init__(self) -> None:
        self.flags, self.origin_lines = header.origin_flags(self.board, self.cells)

    def display(self) -> pd.DataFrame:
        return leaderboard_display(self.board, self.stats.table if self.stats.available else None, self.paper,
                                   self.flags, self.stats.n_resamples)  # fmt: skip

    def header_lines(self) -> list[str]:
        lines = _header(self.grid_name, self.run, self.cells, self.board, self.stats, self.origin_lines,
                        self.class_pixels)  # fmt: skip
        if not self.scope:
            return lines
        if self.scope == ALL_CELLS:
            covers = f"Cells: {ALL_CELLS}."
        else:
            covers = f"Cells: those of {self.scope} (`ussbench report --all-cells` reports every cell in the folder)."
        return lines[:2] + [covers] + lines[2:]

    def absent_note(self) -> str | None:
        """The line under the best row's per-class table when it marks a class absent."""
        if (self.per_class["IoU (%)"] != ABSENT).all():
            return None
        return (f"'{ABSENT}': the class has no ground-truth pixel in the scored images, so its IoU measures nothing; "
                "mIoU counts it as 0 when some pixel is predicted as it (STEGO's rule), and not at all otherwise.")  # fmt: skip


def _leaderboard_csv(board: pd.DataFrame, stats: BoardStatistics) -> pd.DataFrame:
    """The leaderboard with its statistics as numbers (one row per configuration), for citing and plotting."""
    keep = [c for c in board.columns if not c.startswith("time_") and c not in ("peak_gpu_mb", "peak_rss_mb")]
    frame = board[keep].copy()
    one_seed = (
        frame["seeds"] < 2
    )  # a std over one seed is undefined: blank, not a 0.0 that reads as certainty
    for col in ("miou_std", "acc_std", "miou_no_crf_std"):
        if col in frame:
            frame.loc[one_seed, col] = np.nan
    for col in stats.table.columns:
        frame[col] = (
            pd.to_numeric(stats.table[col], errors="coerce") if col != "is_baseline" else stats.table[col]
        )
    frame["n_resamples"] = stats.n_resamples if stats.available else np.nan
    return frame


def _is_reports_root(folder: Path) -> bool:
    """Keep ``index.html`` only in a folder of reports (``reports/`` or one that already has an index)."""
    return folder.name == "reports" or (folder / "index.html").is_file()


def _significance(board: pd.DataFrame, stats: BoardStatistics, path: Path) -> Path | None:
    panels = []
    for group in stats.groups:
        order, delta, pvals, decided = pairwise_matrix(stats, group)
        panels.append((group.dataset, [row_label(board.loc[i]) for i in order], delta, pvals, decided))
    return figures.significance_matrix(panels, path, stats.level)


def _paired_lookup(board: pd.DataFrame, stats: BoardStatistics) -> Any:
    """(dataset, learner label A, learner label B) -> paired Δ of A - B from the report's bootstrap, or None.

    Only where each label names exactly one leaderboard row of that dataset and both rows have per-image counts.
    """
    if not stats.available:
        return None
    rows: dict[tuple[str, str], list[int]] = {}
    for i, cfg in board.iterrows():
        rows.setdefault((str(cfg["dataset"]), str(cfg["feature_learner"])), []).append(i)

    def lookup(dataset: str, label_a: str, label_b: str) -> Any:
        a, b = rows.get((dataset, label_a), []), rows.get((dataset, label_b), [])
        if len(a) != 1 or len(b) != 1:
            return None
        for group in stats.groups:
            if a[0] in group.boots and b[0] in group.boots:
                return group.delta(a[0], b[0])
        return None

    return lookup


def _published(cells: list[dict[str, Any]]) -> pd.DataFrame:
    used: set[tuple[str, str]] = set()
    for cell in cells:
        for stage in cell.get("identity", {}).get("stages", []):
            if stage["kind"] in PLUGIN_KINDS and stage["name"] != "none":
                used.add((stage["kind"], stage["name"]))
    rows = []
    for kind, name in sorted(used):
        for ref in published_numbers(kind, name):
            rows.append(
                {
                    "plugin": name,
                    **{
                        k: ref.get(k, "")
                        for k in ("dataset", "backbone", "metric", "value", "std", "setting", "source")
                    },
                }
            )
    return pd.DataFrame(rows)


def _per_class(
    cells: list[dict[str, Any]], board: pd.DataFrame, pixels: dict[str, dict[str, int]]
) -> pd.DataFrame:
    """Per-class IoU (mean over seeds) of the best configuration, 'absent' for classes no scored image has."""
    return per_class_table(per_class_frame(_row_cells(cells, board.iloc[0]), pixels))


_row_cells = row_cells  # the cells (one per seed) of one leaderboard row, sorted by seed


def _first_seed_arrays(output: Path, cells: list[dict[str, Any]], cfg: pd.Series) -> tuple[list[dict], Any]:
    """The cells of one leaderboard row sorted by seed, and the saved panel arrays of its first seed (or None)."""
    chosen = _row_cells(cells, cfg)
    npz = output / "cells" / f"{chosen[0]['row']['cell_id']}.npz"
    if not npz.is_file():
        return chosen, None
    problem = npz_problem(npz)
    if problem:
        log.warning("panel arrays %s are damaged (%s); the report draws no panel from them", npz, problem)
        return chosen, None
    return chosen, np.load(npz)


def _panels(output: Path, cells: list[dict[str, Any]], board: pd.DataFrame, n_configs: int) -> Path | None:
    top = board.head(n_configs)
    dataset_params = None
    predictions: dict[str, list[np.ndarray]] = {}
    indices: list[int] = []
    for _, cfg in top.iterrows():
        chosen, data = _first_seed_arrays(output, cells, cfg)
        if data is None:
            continue
        indices = sorted(int(k.split("_")[1]) for k in data.files if k.startswith("pred_"))
        mapping = np.asarray(chosen[0]["mapping"])
        name = f"{cfg['image_clusterer']} + {cfg['dataset_clusterer']}" + (
            f" ({cfg['feature_learner']})" if cfg["feature_learner"] != "none" else ""
        )
        predictions[f"{name}\nmIoU {cfg['miou_mean']:.1f}"] = [
            np.where(mapping[data[f"pred_{i}"]] >= 0, mapping[data[f"pred_{i}"]], -1) for i in indices
        ]
        dataset_params = chosen[0]["params"]["dataset"]
    if not predictions or dataset_params is None:
        return None
    dataset = _protocol_dataset(cells, dataset_params)
    images = [dataset.load_image(i) for i in indices]
    labels = [dataset.load_label(i) for i in indices]
    return draw_panels(images, labels, predictions, dataset.num_classes, output / "panels.png")


def _protocol_dataset(cells: list[dict[str, Any]], dataset_params: dict[str, Any]):
    """The dataset a cell was evaluated on, seen through the grid's protocol."""
    from ..pipeline import protocol_view

    spec = registry.get("dataset", dataset_params["name"])
    protocol = cells[0].get("identity", {}).get("protocol", {})
    return protocol_view(registry.instantiate(spec, dataset_params["params"]), protocol)


def _level_panels(output: Path, cells: list[dict[str, Any]], board: pd.DataFrame) -> Path | None:
    """Image | ground truth | each hierarchy level of the best configuration whose segments carry levels."""
    from ..pipeline import upsample_nearest

    for _, cfg in board.iterrows():
        chosen, data = _first_seed_arrays(output, cells, cfg)
        if data is None:
            continue
        level_keys = [k for k in data.files if k.startswith("level_")]
        if not level_keys:
            continue
        names = sorted({k.split("_")[1] for k in level_keys})
        indices = sorted({int(k.split("_")[2]) for k in level_keys})
        dataset = _protocol_dataset(cells, chosen[0]["params"]["dataset"])
        images = [dataset.load_image(i) for i in indices]
        labels = [dataset.load_label(i) for i in indices]
        nfcov = {n: cfg.get(f"nfcov_{n}_mean") for n in names}
        columns = {}
        for n in names:
            title = f"{cfg['image_clusterer']}: {n}" + (
                f"\nNFCov {nfcov[n]:.1f}" if nfcov[n] is not None and np.isfinite(nfcov[n]) else ""
            )
            columns[title] = [
                upsample_nearest(data[f"level_{n}_{i}"], lab.shape) for i, lab in zip(indices, labels)
            ]
        n_colours = max(int(m.max()) + 1 for col in columns.values() for m in col)
        return draw_panels(images, labels, columns, dataset.num_classes, output / "panels_levels.png",
                           n_pred_colours=n_colours)  # fmt: skip
    return None


def _omh_hierarchy(output: Path, cells: list[dict[str, Any]], board: pd.DataFrame) -> Path | None:
    """Figure 3 of the OMH paper (affinity sim+ beside the OT plan, finest level pair) for the best-ranked
    configuration whose learner kept an OMH hierarchy of two or more levels (first seed's saved artifacts)."""
    from ..feature_learners.omh import plot_hierarchy
    from ..graph.records import load_artifacts

    for _, cfg in board.iterrows():
        if cfg["feature_learner"] == "none":  # no learner, no hierarchy: skip loading its artifacts
            continue
        chosen = _row_cells(cells, cfg)
        first = chosen[0]
        path = output / "cells" / f"{first['row']['cell_id']}.artifacts.pt"
        if not path.is_file():
            continue
        info = ((load_artifacts(path) or {}).get("feature_learner") or {}).get("omh") or {}
        if not info.get("plans"):
            continue
        title = (f"{cfg['feature_learner']} on {cfg['dataset']}: plans of seed {first['row']['seed']} "
                 f"(row mIoU {cfg['miou_mean']:.1f}, mean over {len(chosen)} seed(s))")  # fmt: skip
        draw = functools.partial(plot_hierarchy, info, title=title, file_format="png")
        return atomic_write(output / "omh_hierarchy.png", lambda tmp, draw=draw: draw(str(tmp)))
    return None


def _header(grid_name: str, run: dict[str, Any], cells: list[dict[str, Any]], board: pd.DataFrame,
            stats: BoardStatistics, origin_lines: list[str], pixels: dict[str, dict[str, int]]) -> list[str]:  # fmt: skip
    env = run.get("environment", {})
    versions = ", ".join(f"{k} {v}" for k, v in sorted(env.get("versions", {}).items()))
    backbones = sorted({c.get("backbone_report_name", c["row"]["backbone"]) for c in cells})
    datasets = sorted({c.get("dataset_description") or c["row"]["dataset"] for c in cells})
    protocol = cells[0].get("identity", {}).get("protocol", {})
    lines = [
        f"Grid **{grid_name}** (`{display_path(run.get('grid_file'))}`), latest run started {run.get('started', '?')}.",
        header.history_line(run),
        f"Data: {'; '.join(datasets)}. Backbone(s): {', '.join(backbones)}.",
        header.images_line(cells),
        header.classes_line(cells, pixels),
        f"Protocol{_protocol_steps(protocol, cells)}; one cluster-to-class match over all valid pixels of the split "
        f"(matching `{protocol.get('matching')}`, objective `{protocol.get('objective')}`); "
        "mIoU over classes with a defined IoU.",
        *header.statistics_lines(stats),
        header.probe_line(board, cells),
        *origin_lines,
        f"Library versions (latest run): {versions}." if versions else None,
    ]
    return [line for line in lines if line]


def _protocol_steps(protocol: dict[str, Any], cells: list[dict[str, Any]]) -> str:
    """How the cells reached their pixel predictions, from the protocol and what each row records."""
    from ..pipeline import resolve_protocol

    spec = resolve_protocol(protocol)
    rows = [c["row"] for c in cells]
    steps = []
    if spec.resize == "short_side_center_crop":
        steps.append(f"{spec.res} short side ({spec.rgb_interpolation.upper()}), centre crop")
    if any(r.get("flip_tta") for r in rows):
        steps.append("flip TTA")
    bilinear = [c for c in cells if c["row"].get("upsample") == "bilinear_code"]
    if bilinear:
        probe = all(
            c.get("params", {}).get("dataset_clusterer", {}).get("name") == "cluster_probe" for c in bilinear
        )
        steps.append("codes bilinear, " + ("cluster probe" if probe else "dataset clusterer") + " per pixel")
        if len(bilinear) < len(cells):
            steps[-1] += " (segment-based rows: labels upsampled nearest)"
    else:
        steps.append("predictions upsampled (nearest) to label resolution")
    if any(r.get("protocol_crf", "none") != "none" for r in rows):
        steps += [f"dense CRF ({spec.crf_preset} preset)", "numbers with and without CRF"]
    return (f" `{spec.name}`" if spec.name != "default" else "") + ": " + ", ".join(steps)


def _markdown(report: Report) -> str:
    r = report
    lines = [f"# Leaderboard: {r.grid_name}", "", *[f"- {line}" for line in r.header_lines()], ""]
    lines += ["## Leaderboard", "", markdown_table(r.display()), ""]
    lines += [
        times_note(r.board),
        "",
    ]
    if r.stats.available:
        lines += [
            "## Which differences are decided",
            "",
            *[f"- {line}" for line in decided_summary(r.board, r.stats)],
            "",
        ]
    if r.refs is not None and not r.refs.empty:
        lines += ["## Published numbers for the plugins in this grid (from the registry cards)", "",
                  "These come from other datasets/backbones/protocols; compare only where the setting matches "
                  "(rows on a matching dataset show theirs in the leaderboard's paper column).", "",
                  markdown_table(r.refs.fillna("")), ""]  # fmt: skip
    best = r.board.iloc[0]
    lines += [f"## Per-class IoU of the best configuration ({row_label(best)} on {best['dataset']})", "",
              markdown_table(r.per_class), ""]  # fmt: skip
    if r.absent_note():
        lines += [r.absent_note(), ""]
    lines += ["## Figures", ""]
    for key, title in FIGURES:
        if r.written.get(key):
            lines += [f"### {title}", "", f"![{title}]({Path(r.written[key]).name})", ""]
    lines += [
        "All cells x seeds with every parameter, timing and peak memory: `results.csv` / `results.parquet`; "
        "per-image confusion counts of every cell: `per_image_counts.npz`; run history: `run.json`. "
        "`python -m ussbench compare` prints the paired comparison of any two rows.",
        "",
    ]
    return "\n".join(lines)
