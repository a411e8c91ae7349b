"""Cluster counts against the vectors a cell has: refused before work where it is certain, else per cell.

A dataset clusterer asked for more clusters than it has vectors cannot run. The rule, in one place:

- before work (:func:`check_grid`): where an image clusterer bounds its segments per image (per-image
  k-means, DSM without ``adaptive``, ACG's prototypes, an HSG level), ``images x segments`` vectors at
  most are available; a cluster count above that is refused, one line naming the stages and numbers;
- per cell (:func:`fit_clusters_to_vectors`, called where the dataset clusterer is built): the exact count
  is known after the image-level stage. On a dataset cut with ``limit`` (``--limit N``: a quick look) the
  cluster count is clipped to the vectors and the cell's results record a note; otherwise the cell is
  refused with one line naming it and the numbers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from . import registry
from .config import Grid, StageEntry
from .errors import ConfigError, UssbenchError

if TYPE_CHECKING:  # the pipeline imports this module
    from .graph.cells import Cell

log = logging.getLogger(__name__)

# Most foreground segments per image, from an image clusterer's effective parameters (None: not bounded).
SEGMENT_BOUNDS: dict[str, Callable[[dict[str, Any]], int | None]] = {
    "kmeans_per_image": lambda p: p["n_segments"],
    "dsm": lambda p: None if p["adaptive"] else p["n_segments"],
    "acg": lambda p: p["n_prototypes"],
    "hsg_groups": lambda p: (p["n0"], p["n1"], p["n2"])[p["level"]],
}


def max_segments_per_image(entry: StageEntry) -> int | None:
    """Upper bound on an image clusterer's segments per image, where its parameters fix one."""
    rule = SEGMENT_BOUNDS.get(entry.name)
    if rule is None:
        return None
    params = {**registry.get(entry.kind, entry.name).defaults(), **entry.params}
    try:
        bound = rule(params)
    except (KeyError, IndexError, TypeError):
        return None
    return int(bound) if isinstance(bound, int) and not isinstance(bound, bool) else None


def is_limited(dataset_entry: StageEntry) -> bool:
    """True for a dataset cut to its first N images (``--limit``), where cluster counts may be clipped."""
    return dataset_entry.params.get("limit") is not None


def check_grid(grid: Grid) -> list[str]:
    """Refuse (ConfigError) cluster counts that exceed every possible number of vectors, before any work.

    Returns one line per stage combination with the same shortage on a limited dataset (its cells clip).
    """
    from .pipeline import build_plugin
    from .runner import expand_cells

    notes: list[str] = []
    datasets: dict[str, tuple[int, int] | None] = {}
    seen: set[tuple[str, str, str]] = set()
    for cell in expand_cells(grid):
        ds, ic, dc = cell.entry("dataset"), cell.entry("image_clusterer"), cell.entry("dataset_clusterer")
        if (ds.label, ic.label, dc.label) in seen:
            continue
        seen.add((ds.label, ic.label, dc.label))
        bound = max_segments_per_image(ic)
        if bound is None:
            continue
        if ds.label not in datasets:
            try:
                dataset = build_plugin(ds, {"data_root": grid.data_root})
                datasets[ds.label] = (len(dataset), dataset.num_classes)
            except UssbenchError:  # a missing folder: the grid's validation reports it with its key
                datasets[ds.label] = None
        if datasets[ds.label] is None:
            continue
        n_images, num_classes = datasets[ds.label]
        explicit = dc.params.get("n_clusters")
        requested = explicit or grid.protocol.get("n_clusters") or num_classes
        fewest = requested if explicit else requested - 1  # a background segment may take one cluster
        most = n_images * bound
        if fewest <= most:
            continue
        what = (f"{ds.label} x {ic.label} x {dc.label}: {fewest} clusters but at most {most} segment vectors "
                f"({n_images} images x {bound} segments)")  # fmt: skip
        if is_limited(ds):
            notes.append(what)
        else:
            raise ConfigError(f"{grid.path}: {what}; lower n_clusters or use more images")
    return notes


def clipping_summary(notes: list[str]) -> str:
    """One warning line for the combinations whose cells will clip their cluster count."""
    return (f"{len(notes)} stage combination(s) have fewer vectors than clusters on the limited images; their "
            f"cells clip the cluster count and note it in their results (first: {notes[0]})")  # fmt: skip


def fit_clusters_to_vectors(
    cell: Cell, dc_entry: StageEntry, n_clusters: int, n_vectors: int
) -> tuple[StageEntry, int, str | None]:
    """(entry to build, cluster count, note or None) for ``n_vectors`` vectors; refuses what cannot run.

    Called where the pipeline builds the dataset clusterer, once the image-level stage has run.
    """
    labels = " | ".join(e.label for e in cell.entries) + f" | seed {cell.seed}"
    if n_vectors < 1:
        raise ConfigError(f"cell {labels}: the image-level stage left no foreground segment to cluster")
    if n_clusters <= n_vectors:
        return dc_entry, n_clusters, None
    if not is_limited(cell.entry("dataset")):
        raise ConfigError(
            f"cell {labels}: {dc_entry.label} asks for {n_clusters} clusters but the image-level stage gave "
            f"{n_vectors} vectors; lower n_clusters or use more images"
        )
    note = f"n_clusters clipped from {n_clusters} to {n_vectors}: only {n_vectors} vectors (dataset limit)"
    log.info("cell %s: %s", labels, note)
    if "n_clusters" in dc_entry.params:
        dc_entry = replace(dc_entry, params={**dc_entry.params, "n_clusters": n_vectors})
    return dc_entry, n_vectors, note
