"""Cells a committed report already holds: with ``run --reuse-committed`` a fresh clone resumes them instead of
recomputing them (off by default: a plain run recomputes what it reports).

``cells/`` is not committed, so without this a fresh clone re-runs every cell of a committed grid even when
only one row changed (a plugin's version bump, a new row). A committed folder keeps ``results.parquet`` (every
cell's row, parameters and machine) and ``per_image_counts.npz`` (its per-image confusion counts). While
``cells/`` holds no record (so deleting one record still recomputes that cell), we write ``cells/<id>.json``
for each planned cell that both hold, and the executor resumes it. The cell id hashes the cell's whole
identity (plugin versions, parameters, data and weight digests), so a restored cell is the cell the grid asks
for. A restored cell lacks its panel arrays (the committed ``panels.png`` is kept) and its artifacts (learning
curves). Delete ``results.parquet`` to recompute everything.
"""

from __future__ import annotations

import logging

import pandas as pd

from ..atomic import atomic_write_json
from ..evaluation.per_image import STORE_NAME, read_store
from ..provenance import read_run
from ..reports.records import RESTORED_KEY, cells_from_results
from .plan import Plan
from .records import CellStore

log = logging.getLogger(__name__)
RESULTS_NAME = "results.parquet"


def restore_committed_cells(plan: Plan, store: CellStore) -> list[str]:
    """In a folder without cell records (a fresh clone), write one for every planned cell that the committed
    results and per-image counts both hold; returns their ids. Unreadable committed files restore nothing."""
    output = store.output
    results_path = output / RESULTS_NAME
    if any(store.cells.glob("*.json")):
        return []  # a folder with its own cells: a deleted record means "recompute this cell"
    missing = {cid: ident for cid, ident in zip(plan.cell_ids, plan.identities)
               if not store.record_path(cid).is_file()}  # fmt: skip
    if not missing or not results_path.is_file():
        return []
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
    wanted = results[results.cell_id.isin(set(missing)) & results.cell_id.isin(set(counts))]
    restored = []
    for record in cells_from_results(wanted, run):
        cid = record["row"]["cell_id"]
        atomic_write_json(
            store.record_path(cid), {**record, "identity": missing[cid], RESTORED_KEY: RESULTS_NAME}
        )
        restored.append(cid)
    if restored:
        log.info("%d of %d cells restored from %s (committed); %d to compute", len(restored), len(plan.cell_ids),
                 results_path, len(missing) - len(restored))  # fmt: skip
    return restored
