"""``ussbench run --dry-run``: the grid's expanded cells, which are finished, and what the cache holds.

Validates the grid like a run (data, plugins, weight files) but runs no cell and writes no result.
"""

from __future__ import annotations

import math
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

from .config import STAGE_KEYS, Grid


def finished_cell_ids(output: Path) -> tuple[set[str], set[str]]:
    """(ids of the cells whose record in ``<output>/cells`` reads whole, ids of those a run would find damaged
    and recompute), without moving anything."""
    from .graph.records import CellStore

    if not (output / "cells").is_dir():
        return set(), set()
    store = CellStore(output)
    ids = {p.stem for p in (output / "cells").glob("*.json")}
    damaged = {cid for cid in ids if store.problem(cid) is not None}
    return ids - damaged, damaged


def cache_entries(cache_dir: Path) -> dict[str, int]:
    """Number of stored entries per stage folder of the cache (features, learned, segments, ...)."""
    if not cache_dir.is_dir():
        return {}
    return {d.name: sum(1 for _ in d.glob("*.pt")) for d in sorted(cache_dir.iterdir()) if d.is_dir()}


def stage_cache_status(plan: Any, cache: Any) -> str:
    """Per stage kind, how many of the graph's cacheable nodes the cache already holds (e.g. features 1/1)."""
    held: Counter = Counter()
    total: Counter = Counter()
    for node in plan.graph:
        if node.cached:
            total[node.kind] += 1
            path = cache.path(node.stage.cache_stage, node.key)
            # a torch file is a zip archive: a truncated one lacks its directory and would be recomputed
            held[node.kind] += int(path is not None and path.is_file() and zipfile.is_zipfile(path))
    return ", ".join(f"{kind} {held[kind]}/{total[kind]}" for kind in total) or "no cacheable stage"


def describe(grid: Grid, reuse_committed: bool = False) -> list[str]:
    """Lines describing what ``run`` would do: one per cell (finished or to run) and a summary.

    Cell ids come from the stage graph (they depend on the data's and the backbone's fingerprints), so the
    dry run plans the graph exactly as ``run`` would, without computing any node.
    """
    from .pipeline import STAGE_ORDER
    from .runner import plan_grid

    plan, rt = plan_grid(grid, remember=False)
    cells = plan.cells
    done, damaged = finished_cell_ids(grid.output)
    committed: set[str] = set()
    if reuse_committed and not done:  # what run --reuse-committed restores first (graph/committed.py)
        from .graph.committed import committed_cell_ids

        committed = committed_cell_ids(grid.output)
    combos = len(grid.seeds) * math.prod(len(grid.stages[key]) for key in STAGE_KEYS)
    sizes = " x ".join(f"{len(grid.stages[key])} {key}" for key in STAGE_KEYS) + f" x {len(grid.seeds)} seeds"
    lines = [
        f"grid {grid.name} ({' <- '.join(str(p) for p in grid.sources) or grid.path}"
        + (f"; --set {' '.join(grid.sets)}" if grid.sets else "")
        + ")",
        f"  {len(cells)} cells: {sizes}"
        + (
            f" = {combos} combinations, less {combos - len(cells)} excluded by {len(grid.exclude)} rule(s)"
            if grid.exclude
            else ""
        ),
        f"  data root {grid.data_root}; output {grid.output}; cache {grid.cache_dir}",
    ]
    status = Counter()
    for cell, cid in zip(cells, plan.cell_ids):
        state = "finished" if cid in done else "committed" if cid in committed else "to run"
        if cid in damaged:
            status["damaged"] += 1  # counted among "to run": the run moves its files aside and recomputes it
        status[state] += 1
        labels = " | ".join(cell.entry(kind).label for kind in STAGE_ORDER)
        lines.append(f"  {state:9s} {cid}  {labels} | seed {cell.seed}")
    cached = cache_entries(grid.cache_dir)
    held = ", ".join(
        f"{stage} {n}"
        for stage, n in cached.items()
        if n and stage not in ("weights", "fingerprints") and not stage.startswith(".")
    )  # fingerprints are file hashes, not stage values
    held = f"cache holds {held} entries" if held else "cache is empty"
    restorable = f"{status['committed']} restored from the committed results, " if committed else ""
    redo = f" ({status['damaged']} with damaged files, recomputed)" if status["damaged"] else ""
    lines.append(f"{status['finished']} finished, {restorable}{status['to run']} to run{redo}; {held}")
    lines.append(f"  stage values already cached: {stage_cache_status(plan, rt.cache)}")
    lines.append(
        "dry run: no stage was computed and no result written (a backbone's weights may have been converted "
        "into the cache once, to fingerprint them)"
    )
    return lines
