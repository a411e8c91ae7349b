"""What a report is built from: the finished cell records, or the committed results when the cells are gone.

Per-cell records (``cells/``) are not committed, so a fresh clone rebuilds a committed report folder from
``results.parquet`` (one row per cell x seed, with parameters, protocol, plugin names and environment) and
recomputes every statistic from ``per_image_counts.npz``. Cells without per-image counts (older runs) still
report, with their intervals shown as unavailable.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..evaluation.per_image import STORE_NAME, StoredCell, read_cell_npz, read_store, write_store

log = logging.getLogger(__name__)
RESTORED_KEY = "restored_from"  # a cell record resumed from a committed results table (graph/committed.py)
# set on a cell read back from a results table that predates its class_names column: its class names are in
# alphabetical order (from the per-class IoU), not in the order of the count matrices' class axis
UNORDERED_KEY = "class_order_unknown"
DEFAULT_PROTOCOL = {"name": "default", "matching": "auto", "objective": "pixels", "panels": 4}


def load_report_cells(
    output: Path, cell_ids: set[str] | None = None, scope: str | None = None
) -> tuple[list[dict[str, Any]], bool]:
    """(cell records, whether they came from ``cells/``). Falls back to ``results.parquet`` without cells.

    ``cell_ids``: only these cells; ``scope`` says in the warning why the others are left out."""
    from ..graph.records import load_cells

    output = Path(output)
    cells = load_cells(output)
    if cells:
        if cell_ids is not None:
            stale = [c for c in cells if c["row"]["cell_id"] not in cell_ids]
            if stale:
                log.warning("report: %d cell(s) in %s are not in %s; left out", len(stale), output / "cells",
                            scope or "the current grid")  # fmt: skip
            cells = [c for c in cells if c["row"]["cell_id"] in cell_ids]
        return cells, True
    results = output / "results.parquet"
    if not results.is_file():
        return [], False
    run = json.loads((output / "run.json").read_text()) if (output / "run.json").is_file() else {}
    return cells_from_results(pd.read_parquet(results), run), False


ALL_CELLS = "every finished cell in the folder (`--all-cells`), whichever run made it"


def report_scope(output: Path, all_cells: bool = False) -> tuple[set[str] | None, str | None]:
    """(the cells ``ussbench report``/``compare`` cover in a folder, which runs they come from): the latest run
    of each grid file in ``run.json`` (:func:`ussbench.provenance.current_cell_ids`); (None, None), every cell,
    with ``all_cells`` or where the history does not record cell ids."""
    from ..provenance import current_cell_ids, read_run

    if all_cells:
        return None, ALL_CELLS
    cell_ids, grid_files = current_cell_ids(read_run(output))
    if cell_ids is None:
        return None, None
    return cell_ids, scope_phrase(grid_files)


def scope_phrase(grid_files: list[str]) -> str:
    """Which runs a report's cells come from, for its header: "the latest run of a.yaml" (or "of each of ...")."""
    return "the latest run of " + (
        grid_files[0] if len(grid_files) == 1 else "each of " + ", ".join(grid_files)
    )


def cells_from_results(results: pd.DataFrame, run: dict[str, Any]) -> list[dict[str, Any]]:
    """Cell-like records from a results table (what :func:`tables.results_frame` flattened)."""
    grid_protocol = {**DEFAULT_PROTOCOL, **((run.get("grid") or {}).get("protocol") or {})}
    cells = []
    built: dict[str, tuple[str, ...] | None] = {}  # dataset entry -> its plugin's class names
    for rec in results.to_dict("records"):
        rec = {k: v for k, v in rec.items() if not (isinstance(v, float) and np.isnan(v))}
        params = json.loads(rec.pop("params", "{}") or "{}")
        per_class = json.loads(rec.pop("per_class_iou", "{}") or "{}")
        class_names = json.loads(rec.pop("class_names", "") or "null") or dataset_class_names(
            params.get("dataset"), per_class, built
        )
        protocol = json.loads(rec.pop("protocol", "null") or "null") or grid_protocol
        names = json.loads(rec.pop("stage_names", "null") or "null") or {
            kind: (params.get(kind) or {}).get("name", rec.get(kind)) for kind in
            ("dataset", "backbone", "feature_learner", "image_clusterer", "dataset_clusterer", "postprocess")
        }  # fmt: skip
        env = json.loads(rec.pop("environment", "null") or "null") or {
            **(run.get("environment") or {}),  # older tables: the run's machine facts (cores)
            "versions": json.loads(rec.get("versions") or "{}"),
            "processor": rec.get("machine", ""),
        }
        for key in ("versions", "machine"):
            rec.pop(key, None)
        cells.append(
            {
                "row": {**rec, "environment": env},
                "params": params,
                "per_class_iou": per_class,
                "class_names": class_names or list(per_class),
                **({} if class_names else {UNORDERED_KEY: True}),
                "identity": {
                    "protocol": protocol,
                    "stages": [{"kind": k, "name": v} for k, v in names.items()],
                },
                "backbone_report_name": rec.get("backbone_name", rec.get("backbone")),
                "dataset_description": rec.pop("dataset_description", "") or "",
            }
        )
    return cells


def dataset_class_names(
    dataset: dict[str, Any] | None, per_class: dict[str, Any], built: dict[str, tuple[str, ...] | None]
) -> list[str] | None:
    """The class order of a results row that predates the ``class_names`` column: the dataset plugin's own list,
    built from the row's recorded parameters (constructors read no files), when it names exactly the row's
    per-class IoU keys; None where the plugin is unknown, fails to build, or names other classes. ``built``
    holds the lists already built for one table (its rows repeat a few dataset entries)."""
    if not isinstance(dataset, dict) or not dataset.get("name"):
        return None
    key = json.dumps(dataset, sort_keys=True, default=str)
    if key not in built:
        built[key] = _plugin_class_names(dataset)
    names = built[key]
    return list(names) if names and len(names) == len(per_class) and set(names) == set(per_class) else None


def _plugin_class_names(dataset: dict[str, Any]) -> tuple[str, ...] | None:
    """The class names of the dataset plugin a recorded entry ({name, params, preset}) builds; None where it
    cannot be built."""
    from .. import registry

    try:
        spec = registry.get("dataset", dataset["name"])
        params = registry.resolve_params(spec, dataset.get("params") or {}, dataset.get("preset"))
        return tuple(registry.instantiate(spec, params).class_names)
    except Exception as exc:  # a user plugin no longer installed, or one whose constructor reads files
        log.debug("class order of %s unknown: %s", dataset.get("name"), exc)
        return None


def collect_per_image_counts(
    output: Path, cells: list[dict[str, Any]]
) -> tuple[dict[str, StoredCell], dict[str, StoredCell]]:
    """(per-image counts of the given cells, the committed store as read): each cell's counts come from its
    ``cells/<id>.npz``, else from the store; cells with neither are absent."""
    output = Path(output)
    store_path = output / STORE_NAME
    try:
        stored = read_store(store_path)
    except (ValueError, KeyError, OSError) as exc:
        log.warning("%s unreadable (%s); per-image counts come from the cells only", store_path, exc)
        stored = {}
    found: dict[str, StoredCell] = {}
    for cell in cells:
        row = cell["row"]
        cid = row["cell_id"]
        n_classes = len(cell.get("class_names") or []) or len(cell["per_class_iou"])
        try:
            fresh = read_cell_npz(
                output / "cells" / f"{cid}.npz", int(row["n_clusters"]), n_classes, int(row["n_images"])
            )
        except ValueError as exc:
            log.warning("%s; its per-image counts come from %s if it holds them", exc, STORE_NAME)
            fresh = None
        if fresh is not None:
            found[cid] = fresh
        elif cid in stored:
            found[cid] = stored[cid]
    return found, stored


def class_pixels(cells: list[dict[str, Any]], counts: dict[str, StoredCell]) -> dict[str, dict[str, int]]:
    """Ground-truth pixels per class name in each cell's scored images (cell id -> {class: pixels}): a class with
    none is absent from them, whatever its IoU reads. Cells whose class order is unknown are left out."""
    out: dict[str, dict[str, int]] = {}
    for cell in cells:
        names = cell.get("class_names")
        totals = _label_totals(cell, counts.get(cell["row"]["cell_id"]))
        if names and not cell.get(UNORDERED_KEY) and totals is not None and len(totals) == len(names):
            out[cell["row"]["cell_id"]] = dict(zip(names, totals.tolist()))
    return out


def _label_totals(cell: dict[str, Any], stored: StoredCell | None) -> np.ndarray | None:
    """Labelled pixels per class index of a cell, from its per-image counts, else its recorded confusion matrix."""
    if stored is not None:
        return stored.counts.total().sum(0)
    if cell.get("confusion") is not None:
        return np.asarray(cell["confusion"], dtype=np.int64).sum(0)
    return None


def sync_per_image_counts(output: Path, cells: list[dict[str, Any]]) -> dict[str, StoredCell]:
    """Per-image counts of the reported cells; rewrites the committed store with exactly these cells (when it
    differs) so the counts travel with the report."""
    found, stored = collect_per_image_counts(output, cells)
    changed = set(found) != set(stored) or any(
        not np.array_equal(found[c].counts.per_image, stored[c].counts.per_image) for c in found
    )
    if found and changed:
        write_store(Path(output) / STORE_NAME, found)
    return found
