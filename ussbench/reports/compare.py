"""``ussbench compare``: the paired comparison of two leaderboard rows, of one report or of two report folders.

Rows are picked by their position in the leaderboard table (``1`` = first line) or by case-insensitive
pieces of their label joined by ``+`` (e.g. ``"HSG + ABC"``; must match one row). Two folders are compared only when they scored the same images
(same image ids and the same labelled pixels per image and class); otherwise the command refuses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError, DataError
from ..evaluation.per_image import StoredCell
from ..evaluation.statistics import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    METHOD,
    RowBootstrap,
    bootstrap_rows,
    on_shared_seeds,
    paired_delta,
    score_interval,
    shared_seeds,
)
from .comparisons import p_clause, row_cells, seeds_text
from .records import collect_per_image_counts, load_report_cells, report_scope
from .tables import STAGE_COLUMNS, leaderboard_frame, results_frame


@dataclass
class PickedRow:
    """One leaderboard row with its cells' per-image counts."""

    folder: Path
    position: int
    label: str
    cfg: pd.Series
    cells: list[dict[str, Any]]
    counts: list[StoredCell]
    protocol: dict[str, Any]


def full_label(cfg: pd.Series) -> str:
    return " | ".join(str(cfg[c]) for c in STAGE_COLUMNS if c in cfg and str(cfg[c]) != "none")


def _load(folder: Path) -> tuple[pd.DataFrame, list[dict[str, Any]], dict[str, StoredCell]]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"report folder {str(folder)!r} does not exist")
    cells, _ = load_report_cells(folder, *report_scope(folder))  # the rows its `ussbench report` shows
    if not cells:
        raise DataError(f"{folder}: no finished cells and no results.parquet; not a report folder")
    board = leaderboard_frame(results_frame(cells))
    counts, _ = collect_per_image_counts(folder, cells)
    return board, cells, counts


def pick_row(folder: Path, board: pd.DataFrame, cells: list[dict[str, Any]], counts: dict[str, StoredCell],
             selector: str) -> PickedRow:  # fmt: skip
    """The row at table position ``selector`` (1-based) or the one row whose label contains it."""
    labels = [full_label(cfg) for _, cfg in board.iterrows()]
    if selector.strip().isdigit():
        pos = int(selector) - 1
        if not 0 <= pos < len(board):
            raise ConfigError(
                f"{folder}: row {selector} does not exist (the leaderboard has {len(board)} rows)"
            )
    else:
        # pieces split at '|' and at a spaced ' + ' ('HSG + ABC': both); 'STEGO+OMH' is one name
        terms = [t.strip().lower() for t in re.split(r"\||\s\+\s", selector) if t.strip()]
        pieces = [{p.lower() for p in lab.split(" | ")} for lab in labels]
        hits = [i for i, lab in enumerate(labels) if all(t in lab.lower() for t in terms)]
        wanted = selector.strip().lower()
        # the stages that differ between rows, 'none' included: what the no-match error lists ('none | flaky')
        varying = [c for c in STAGE_COLUMNS if c in board and board[c].astype(str).nunique() > 1]
        short = [" | ".join(str(cfg[c]) for c in varying).lower() for _, cfg in board.iterrows()]
        # prefer the whole label (or the listed one), then rows of which every term is a whole piece, then substrings
        exact = [
            i for i in range(len(labels)) if wanted == labels[i].lower() or " | ".join(terms) == short[i]
        ]
        whole = [i for i in hits if all(t in pieces[i] for t in terms)]
        hits = exact or whole or hits
        if not hits:
            rows = "; ".join(
                f"{i + 1}: " + " | ".join(str(cfg[c]) for c in varying)
                for i, (_, cfg) in enumerate(board.head(20).iterrows())
            )
            more = f" (first 20 of {len(board)})" if len(board) > 20 else ""
            raise ConfigError(f"{folder}: {selector!r} matches no row; the rows{more} are {rows}; give a row "
                              "number or a piece of its label")  # fmt: skip
        if len(hits) != 1:
            shown = "; ".join(labels[i] for i in hits[:5]) if hits else "none"
            more = f", first 5 of {len(hits)}" if len(hits) > 5 else ""
            raise ConfigError(f"{folder}: {selector!r} matches {len(hits)} rows (matches{more}: {shown}); give a row "
                              "number or a longer label")  # fmt: skip
        pos = hits[0]
    cfg = board.iloc[pos]
    chosen = row_cells(cells, cfg)
    stored = [counts.get(c["row"]["cell_id"]) for c in chosen]
    if any(s is None for s in stored):
        raise DataError(f"{folder}: row {pos + 1} ({labels[pos]}) has no per-image counts (cells from before they "
                        "were stored); rerun its cells to compare it")  # fmt: skip
    protocol = chosen[0].get("identity", {}).get("protocol", {})
    return PickedRow(Path(folder), pos + 1, labels[pos], cfg, chosen, stored, protocol)


def same_images(a: PickedRow, b: PickedRow) -> str | None:
    """Why two rows did not score the same images, or None when they did."""
    ca, cb = a.counts[0], b.counts[0]
    if ca.image_ids != cb.image_ids:
        return (f"different images ({len(ca.image_ids)} vs {len(cb.image_ids)} images, image-id fingerprints "
                f"{ca.fingerprint} vs {cb.fingerprint})")  # fmt: skip
    if ca.counts.n_classes != cb.counts.n_classes or not np.array_equal(
        ca.label_histograms(), cb.label_histograms()
    ):
        return "the same image ids but different labelled pixels per image and class (other data or protocol)"
    return None


def compare(first: str, second: str, third: str | None = None, row_a: str = "1", row_b: str = "1",
            n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL) -> str:  # fmt: skip
    """The comparison as text. ``compare(REPORT, A, B)``: two rows of one report; ``compare(DIR_A, DIR_B)``:
    row ``row_a`` of one folder against row ``row_b`` of the other."""
    if third is not None:
        board, cells, counts = _load(Path(first))
        a = pick_row(Path(first), board, cells, counts, second)
        b = pick_row(Path(first), board, cells, counts, third)
    else:
        if not Path(second).is_dir():
            raise ConfigError(f"compare takes REPORT ROW_A ROW_B or REPORT_A REPORT_B; {second!r} is not a folder "
                              "and no third argument was given")  # fmt: skip
        a = pick_row(Path(first), *_load(Path(first)), row_a)
        b = pick_row(Path(second), *_load(Path(second)), row_b)
    boots, d = paired(a, b, n_resamples, seed, level)
    lines = []
    for name, picked in (("A", a), ("B", b)):
        boot = boots[name.lower()]
        lo, hi = score_interval(boot.miou, boot.nested_miou, level)
        alo, ahi = score_interval(boot.acc, boot.nested_acc, level)
        lines.append(f"{name}: {picked.folder} row {picked.position}: {picked.label} ({len(boot.seeds)} seed(s)): "
                     f"mIoU {boot.miou:.2f} [{lo:.2f}, {hi:.2f}], pixel acc. {boot.acc:.2f} [{alo:.2f}, {ahi:.2f}]")  # fmt: skip
    lines.append(f"Δ mIoU (A − B) = {d.delta:+.2f} [{d.low:+.2f}, {d.high:+.2f}], {p_clause(d.p_value, n_resamples)}: "
                 f"{verdict(d.decided, d.p_value, level, identical=d.delta == d.low == d.high == 0.0)}")  # fmt: skip
    if boots["a"].seeds != boots["b"].seeds:
        lines.append(seeds_line(boots["a"], boots["b"]))
    lines.append(f"{boots['a'].n_images} images; {METHOD.format(B=n_resamples, seed=seed, level=level)}.")
    return "\n".join(lines)


def verdict(decided: bool, p_value: float, level: float = DEFAULT_LEVEL, identical: bool = False) -> str:
    """The comparison's verdict; the interval decides. At its edge the p-value (from the centred replicates)
    can fall below 1 - level while the basic interval still touches 0: then the line says which one decides.
    ``identical``: every replicate ties (the same scores), which no number of images or seeds would change."""
    if decided:
        return "decided"
    if identical:
        return "identical scores (no difference to decide)"
    text = "not decided (the interval contains 0)"
    if p_value < 1 - level:
        text += "; the interval decides: the p-value comes from the centred replicates, not from the interval"
    return text


def paired(a: PickedRow, b: PickedRow, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
           level: float = DEFAULT_LEVEL) -> tuple[dict[str, Any], Any]:  # fmt: skip
    """The two rows' bootstraps and their paired Δ mIoU (A − B), after checking they are comparable."""
    if a.folder == b.folder and a.position == b.position:
        raise ConfigError(f"both selectors pick row {a.position} ({a.label}); choose two different rows")
    why = same_images(a, b)
    if why:
        raise DataError(f"cannot compare {a.folder}:{a.position} with {b.folder}:{b.position}: {why}")
    match_a = (a.protocol.get("matching", "auto"), a.protocol.get("objective", "pixels"))
    match_b = (b.protocol.get("matching", "auto"), b.protocol.get("objective", "pixels"))
    if match_a != match_b:
        raise DataError(f"cannot compare: the rows were matched differently ({match_a} vs {match_b})")
    rows = {"a": [(int(c["row"]["seed"]), s.counts) for c, s in zip(a.cells, a.counts)],
            "b": [(int(c["row"]["seed"]), s.counts) for c, s in zip(b.cells, b.counts)]}  # fmt: skip
    boots = bootstrap_rows(rows, n_resamples, seed, *match_a)
    pair = on_shared_seeds(boots["a"], boots["b"], seed)
    if pair is None:
        raise DataError(f"cannot compare {a.folder}:{a.position} with {b.folder}:{b.position}: no seed in common "
                        f"(A ran seeds {seeds_text(boots['a'].seeds)}, B ran {seeds_text(boots['b'].seeds)}); a paired "
                        "comparison needs the same seeds")  # fmt: skip
    ra, rb = pair
    return boots, paired_delta(ra.miou, rb.miou, ra.nested_miou, rb.nested_miou, level)


def seeds_line(a: RowBootstrap, b: RowBootstrap) -> str:
    """The line that says a Δ was taken on the seeds both rows ran (their rows' own lines use all of theirs)."""
    return (f"The rows ran different seeds (A: {seeds_text(a.seeds)}; B: {seeds_text(b.seeds)}): Δ is taken on the seeds "
            f"both rows ran: {seeds_text(shared_seeds(a, b))}, paired by seed; the A and B lines average all their own "
            "seeds.")  # fmt: skip


def compare_where(folder: Path | str, where_a: dict[str, str], where_b: dict[str, str],
                  n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL) -> Any:  # fmt: skip
    """The paired Δ mIoU (A − B) of the two rows of one report whose stage labels equal ``where_a`` /
    ``where_b`` (e.g. ``{"image_clusterer": "DSM", "dataset_clusterer": "OTC"}``); None if either is missing."""
    folder = Path(folder)
    board, cells, counts = _load(folder)
    picked = []
    for where in (where_a, where_b):
        hits = [
            i
            for i, (_, cfg) in enumerate(board.iterrows())
            if all(str(cfg.get(k)) == v for k, v in where.items())
        ]
        if len(hits) != 1:
            return None
        picked.append(pick_row(folder, board, cells, counts, str(hits[0] + 1)))
    return paired(picked[0], picked[1], n_resamples, seed, level)[1]
