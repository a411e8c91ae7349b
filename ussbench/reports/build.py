"""Build ``reports/<grid>/``: results CSV/Parquet, leaderboard Markdown/HTML, figures and panels."""

from __future__ import annotations

import functools
import html
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import registry
from ..atomic import atomic_write, atomic_write_text
from ..cards import published_numbers
from . import figures
from .failed import failures_html, failures_markdown
from .panels import draw_panels
from .tables import STAGE_COLUMNS, leaderboard_display, leaderboard_frame, markdown_table, results_frame

log = logging.getLogger(__name__)
PLUGIN_KINDS = {"dataset": "dataset", "backbone": "backbone", "feature_learner": "feature_learner",
                "image_clusterer": "image_clusterer", "dataset_clusterer": "dataset_clusterer"}  # fmt: skip


def build_report(
    output: Path,
    grid_name: str,
    stage_order: list[str] | None = None,
    n_panel_configs: int = 3,
    cell_ids: set[str] | None = None,
) -> dict[str, Path]:
    """(Re)build every report file from the finished cells in ``output/cells``.

    ``cell_ids``: report only these cells (the current grid's), so cells left by an earlier version of the
    grid file in the same folder never leak into the leaderboard; None reports every cell found.
    """
    from ..runner import load_cells

    output = Path(output)
    cells = load_cells(output)
    if cell_ids is not None:
        stale = [c for c in cells if c["row"]["cell_id"] not in cell_ids]
        if stale:
            log.warning(
                "report: %d cell(s) in %s are not in the current grid; left out", len(stale), output / "cells"
            )
        cells = [c for c in cells if c["row"]["cell_id"] in cell_ids]
    if not cells:
        raise ValueError(f"no finished cells in {output / 'cells'}; nothing to report")
    results = results_frame(cells)
    board = leaderboard_frame(results)
    written: dict[str, Path] = {}
    written["csv"] = atomic_write(output / "results.csv", lambda tmp: results.to_csv(tmp, index=False))
    written["parquet"] = atomic_write(
        output / "results.parquet", lambda tmp: results.to_parquet(tmp, index=False)
    )
    written["heatmap"] = figures.heatmap(board, output / "heatmap_miou.png")
    written["runtime"] = figures.miou_vs_runtime(board, output / "miou_vs_runtime.png")
    written["learners"] = figures.learner_bars(results, output / "miou_by_learner.png")
    for key, draw in (("panels", lambda: _panels(output, cells, board, n_panel_configs)),
                      ("level_panels", lambda: _level_panels(output, cells, board)),
                      ("omh_hierarchy", lambda: _omh_hierarchy(output, cells, board))):  # fmt: skip
        try:
            written[key] = draw()
        except Exception as exc:  # panels need the data; a report without them is still a report
            log.warning("qualitative %s skipped: %s", key.replace("_", " "), exc)
            written[key] = None
    run = json.loads((output / "run.json").read_text()) if (output / "run.json").is_file() else {}
    refs = _published(cells)
    per_class = _per_class(cells, board)
    md = _markdown(grid_name, run, cells, board, refs, per_class, written)
    md += failures_markdown(output, cell_ids)  # cells that raised (issue 11): listed, not silently missing
    written["markdown"] = atomic_write_text(output / "leaderboard.md", md)
    page = _html(grid_name, run, cells, board, refs, per_class, written)
    page = page.replace("</body></html>", failures_html(output, cell_ids) + "</body></html>")
    written["html"] = atomic_write_text(output / "leaderboard.html", page)
    return {k: v for k, v in written.items() if v is not None}


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


def _per_class(cells: list[dict[str, Any]], board: pd.DataFrame) -> pd.DataFrame:
    """Per-class IoU (mean over seeds) of the best configuration."""
    chosen = _row_cells(cells, board.iloc[0])
    frame = pd.DataFrame(
        [{k: (np.nan if v is None else v * 100) for k, v in c["per_class_iou"].items()} for c in chosen]
    )
    return pd.DataFrame({"class": frame.columns, "IoU (%)": frame.mean().round(2).values})


def _row_cells(cells: list[dict[str, Any]], cfg: pd.Series) -> list[dict[str, Any]]:
    """The cells (one per seed) of one leaderboard row, sorted by seed."""
    return sorted((c for c in cells if all(c["row"][k] == cfg[k] for k in STAGE_COLUMNS)),
                  key=lambda c: c["row"]["seed"])  # fmt: skip


def _first_seed_arrays(output: Path, cells: list[dict[str, Any]], cfg: pd.Series) -> tuple[list[dict], Any]:
    """The cells of one leaderboard row sorted by seed, and the saved panel arrays of its first seed (or None)."""
    chosen = _row_cells(cells, cfg)
    npz = output / "cells" / f"{chosen[0]['row']['cell_id']}.npz"
    return chosen, (np.load(npz) if npz.is_file() else None)


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


def _header(grid_name: str, run: dict[str, Any], cells: list[dict[str, Any]]) -> list[str]:
    env = run.get("environment", {})
    first = cells[0]
    machine = env.get("gpu") or f"{env.get('processor', '?')} ({env.get('cpu_count', '?')} cores)"
    versions = ", ".join(f"{k} {v}" for k, v in sorted(env.get("versions", {}).items()))
    backbones = sorted({c.get("backbone_report_name", c["row"]["backbone"]) for c in cells})
    datasets = sorted({c.get("dataset_description") or c["row"]["dataset"] for c in cells})
    protocol = first.get("identity", {}).get("protocol", {})
    return [
        f"Grid **{grid_name}** (`{run.get('grid_file', '?')}`), started {run.get('started', '?')}.",
        f"Data: {'; '.join(datasets)}. Backbone(s): {', '.join(backbones)}.",
        f"Protocol{_protocol_steps(protocol, cells)}; one cluster-to-class match over all valid pixels of the split "
        f"(matching `{protocol.get('matching')}`, objective `{protocol.get('objective')}`); "
        "mIoU over classes with a defined IoU; mean ± std over seeds.",
        f"Machine: {machine}, device `{env.get('device', '?')}`. Versions: {versions}.",
    ]


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


def _markdown(grid_name, run, cells, board, refs, per_class, written) -> str:
    lines = [f"# Leaderboard: {grid_name}", "", *[f"- {line}" for line in _header(grid_name, run, cells)], ""]
    lines += ["## Leaderboard", "", markdown_table(leaderboard_display(board)), ""]
    lines += [
        "Times are seconds per cell (mean over seeds); a stage shared by several cells is timed at its first computation.",
        "",
    ]
    if refs is not None and not refs.empty:
        lines += ["## Published numbers for the plugins in this grid (from the registry cards)", "",
                  "These come from other datasets/backbones/protocols; compare only where the setting matches.", "",
                  markdown_table(refs.fillna("")), ""]  # fmt: skip
    lines += ["## Per-class IoU of the best configuration (rank 1)", "", markdown_table(per_class), ""]
    figs = [("heatmap", "mIoU heatmap (image-level x dataset-level)"), ("runtime", "mIoU vs runtime"),
            ("learners", "mIoU by feature learner"), ("panels", "Qualitative panels (image, ground truth, best configurations)"),
            ("level_panels", "Hierarchy levels of the best configuration with levels (segments, arbitrary colours)"),
            ("omh_hierarchy", "OMH hierarchy of the best OMH configuration (paper Figure 3: centre affinity vs OT plan)")]  # fmt: skip
    lines += ["## Figures", ""]
    for key, title in figs:
        if written.get(key):
            lines += [f"### {title}", "", f"![{title}]({Path(written[key]).name})", ""]
    lines += [
        "All cells x seeds with every parameter, timing and peak memory: `results.csv` / `results.parquet`.",
        "",
    ]
    return "\n".join(lines)


def _html(grid_name, run, cells, board, refs, per_class, written) -> str:
    style = ("body{font-family:sans-serif;max-width:1400px;margin:2em auto}table{border-collapse:collapse;font-size:13px}"
             "td,th{border:1px solid #ccc;padding:3px 6px}th{background:#eee}img{max-width:100%}")  # fmt: skip
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(grid_name)}</title><style>{style}</style></head><body>",
             f"<h1>Leaderboard: {html.escape(grid_name)}</h1><ul>"]  # fmt: skip
    parts += [f"<li>{html.escape(line).replace('**', '')}</li>" for line in _header(grid_name, run, cells)]
    parts += ["</ul><h2>Leaderboard</h2>", leaderboard_display(board).to_html(index=False)]
    if refs is not None and not refs.empty:
        parts += ["<h2>Published numbers (registry cards)</h2>", refs.fillna("").to_html(index=False)]
    parts += ["<h2>Per-class IoU of the best configuration</h2>", per_class.to_html(index=False)]
    for key in ("heatmap", "runtime", "learners", "panels", "level_panels", "omh_hierarchy"):
        if written.get(key):
            parts.append(f"<h2>{key}</h2><img src='{Path(written[key]).name}'>")
    parts.append("</body></html>")
    return "\n".join(parts)
