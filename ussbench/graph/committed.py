"""Cells a committed report already holds: with ``run --reuse-committed`` a fresh clone resumes them instead of
recomputing them (off by default: a plain run recomputes what it reports).

``cells/`` is not committed, so without this a fresh clone re-runs every cell of a committed grid even when
only one row changed (a plugin's version bump, a new row). A committed folder keeps ``results.parquet`` (every
cell's row, parameters and machine) and ``per_image_counts.npz`` (its per-image confusion counts). While
``cells/`` holds no record (so deleting one record still recomputes that cell), we write ``cells/<id>.json``
for every cell that both hold (also those this grid does not plan), and the executor resumes the planned ones. The cell id hashes the cell's whole
identity (plugin versions, parameters, data and weight digests), so a restored cell is the cell the grid asks
for. A restored cell lacks its panel arrays (the committed ``panels.png`` is kept) and its artifacts (learning
curves). Delete ``results.parquet`` to recompute everything.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from ..atomic import atomic_write_json
from ..evaluation.per_image import STORE_NAME, read_store
from ..provenance import read_run
from ..reports.records import RESTORED_KEY, cells_from_results
from .plan import Plan
from .records import CellStore

log = logging.getLogger(__name__)
RESULTS_NAME = "results.parquet"


def committed_cell_ids(output: Path) -> set[str]:
    """Ids of the cells a folder's committed results and per-image counts both hold (empty if unreadable)."""
    try:
        results = pd.read_parquet(Path(output) / RESULTS_NAME, columns=["cell_id"])
        counts = read_store(Path(output) / STORE_NAME)
    except (OSError, ValueError, KeyError):
        return set()
    return set(results.cell_id) & set(counts)


def restore_committed_cells(plan: Plan, store: CellStore) -> list[str]:
    """In a folder without cell records (a fresh clone), write one for every cell that the committed results
    and per-image counts both hold; returns the ids of those the plan has. Cells of the folder's report that
    this grid does not plan (say a sub-grid such as ``study_*_full_abc.yaml``) are restored too, so a later
    ``report`` or full-grid run still finds them. Unreadable committed files restore nothing (warning)."""
    output = store.output
    results_path = output / RESULTS_NAME
    if not results_path.is_file() or any(store.cells.glob("*.json")):
        return []  # a folder with its own cells: a deleted record means "recompute this cell"
    try:
        results = pd.read_parquet(results_path)
        counts = read_store(output / STORE_NAME)
        run = read_run(output)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("committed results in %s not restored (%s); their cells are recomputed", output, exc)
        return []
    if "cell_id" not in results.columns:
        log.warning("%s has no cell_id column; its cells are recomputed", results_path)
        return []
    planned = dict(zip(plan.cell_ids, plan.identities))
    store.cells.mkdir(parents=True, exist_ok=True)
    restored = []
    for record in cells_from_results(results[results.cell_id.isin(set(counts))], run):
        cid = record["row"]["cell_id"]
        identity = planned.get(cid, record["identity"])  # the plan's full identity where it has the cell
        atomic_write_json(
            store.record_path(cid), {**record, "identity": identity, RESTORED_KEY: RESULTS_NAME}
        )
        restored.append(cid)
    ours = [cid for cid in restored if cid in planned]
    if restored:
        log.info("%d of %d cells restored from %s (committed; %d more of its cells outside this grid); %d to "
                 "compute", len(ours), len(plan.cell_ids), results_path, len(restored) - len(ours),
                 len(plan.cell_ids) - len(ours))  # fmt: skip
    return ours
