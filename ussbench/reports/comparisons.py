"""Leaderboard statistics: intervals, Δ vs the grid's baseline row, rank ranges, pairwise significance.

Rows are compared only with rows scored on the same images (same dataset, same image ids); see
:mod:`ussbench.evaluation.statistics` for the method.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..evaluation.per_image import StoredCell
from ..evaluation.statistics import (
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    METHOD,
    PairedDelta,
    RowBootstrap,
    bootstrap_rows,
    halving_plan,
    on_shared_seeds,
    paired_rows,
    rank_ranges,
    ranks_from_better,
    score_interval,
    seeds_to_decide,
)
from .tables import STAGE_COLUMNS

MIN_IMAGES = 2  # fewer: no interval at all (one image has no spread to resample)
FEW_IMAGES = 20  # fewer: intervals are shown but said to be rough
DEFAULT_BASELINE = {"feature_learner": "none", "image_clusterer": "none", "dataset_clusterer": "kmeans"}
STAT_COLUMNS = ["miou_lo", "miou_hi", "acc_lo", "acc_hi", "miou_no_crf_lo", "miou_no_crf_hi", "rank_lo", "rank_hi",
                "delta", "delta_lo", "delta_hi", "delta_p", "is_baseline", "ci_width", "image_share",
                "seeds_to_halve", "images_factor_to_halve"]  # fmt: skip


def row_cells(cells: list[dict[str, Any]], cfg: pd.Series) -> list[dict[str, Any]]:
    """The cells (one per seed) of one leaderboard row, sorted by seed."""
    return sorted((c for c in cells if all(c["row"][k] == cfg[k] for k in STAGE_COLUMNS)),
                  key=lambda c: c["row"]["seed"])  # fmt: skip


def stage_names(cell: dict[str, Any]) -> dict[str, str]:
    """Plugin name per stage kind of a cell (from its identity; else its recorded parameters)."""
    names = {s["kind"]: s["name"] for s in cell.get("identity", {}).get("stages", [])}
    for kind, rec in (cell.get("params") or {}).items():
        names.setdefault(kind, rec.get("name"))
    return names


def row_label(cfg: pd.Series, columns: list[str] | None = None) -> str:
    cols = columns or [c for c in ("feature_learner", "image_clusterer", "dataset_clusterer") if c in cfg]
    parts = [str(cfg[c]) for c in cols if not (c == "feature_learner" and cfg[c] == "none")]
    return " + ".join(parts)


@dataclass
class GroupStatistics:
    """The rows of one dataset (same images) with their bootstraps."""

    dataset: str
    n_images: int
    rows: list[int]  # board indices, board order
    boots: dict[int, RowBootstrap]
    baseline: int | None
    ranks: dict[int, tuple[int, int]] = field(default_factory=dict)
    seed: int = DEFAULT_SEED  # the bootstrap's seed: seed draws of rows restricted to their shared seeds

    def pair(self, a: int, b: int) -> tuple[RowBootstrap, RowBootstrap] | None:
        """Rows a and b paired by seed value (restricted to the seeds both ran); None when they share none."""
        return on_shared_seeds(self.boots[a], self.boots[b], self.seed)

    def delta(self, a: int, b: int, level: float = DEFAULT_LEVEL) -> PairedDelta | None:
        """Δ mIoU = a − b on the seeds both rows ran; None when they share no seed."""
        return paired_rows(self.boots[a], self.boots[b], self.seed, level)


@dataclass
class BoardStatistics:
    """Per-row statistics aligned with the leaderboard (``table``), and the per-dataset groups."""

    table: pd.DataFrame
    groups: list[GroupStatistics]
    n_resamples: int
    seed: int
    level: float
    baseline_rule: dict[str, str]
    notes: list[str]

    @property
    def available(self) -> bool:
        return bool(self.groups)

    def method(self) -> str:
        return METHOD.format(B=self.n_resamples, seed=self.seed, level=self.level)


def _matches(rule: dict[str, str], cfg: pd.Series, names: dict[str, str]) -> bool:
    return all(cfg.get(kind) == value or names.get(kind) == value for kind, value in rule.items())


def board_statistics(
    board: pd.DataFrame,
    cells: list[dict[str, Any]],
    counts: dict[str, StoredCell],
    baseline_rule: dict[str, str] | None = None,
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = DEFAULT_SEED,
    level: float = DEFAULT_LEVEL,
) -> BoardStatistics:
    """Intervals, baseline deltas, rank ranges and the halving plan for every row that has per-image counts."""
    rule = dict(baseline_rule or DEFAULT_BASELINE)
    table = pd.DataFrame(index=board.index, columns=STAT_COLUMNS, dtype=object)
    table["is_baseline"] = False
    notes: list[str] = []
    grouped: dict[tuple, dict[int, list]] = {}
    no_crf: dict[tuple, dict[int, list]] = {}
    names_of: dict[int, dict[str, str]] = {}
    missing = 0
    for i, cfg in board.iterrows():
        chosen = row_cells(cells, cfg)
        names_of[i] = stage_names(chosen[0]) if chosen else {}
        stored = [counts.get(c["row"]["cell_id"]) for c in chosen]
        if not chosen or any(s is None for s in stored):
            missing += 1
            continue
        fps = {s.fingerprint for s in stored}
        protocol = chosen[0].get("identity", {}).get("protocol", {})
        if len(fps) != 1:
            notes.append(f"row {i + 1}: its seeds scored different images; no interval")
            continue
        key = (
            cfg["dataset"],
            fps.pop(),
            protocol.get("matching", "auto"),
            protocol.get("objective", "pixels"),
        )
        grouped.setdefault(key, {})[i] = [(int(c["row"]["seed"]), s.counts) for c, s in zip(chosen, stored)]
        if all(s.counts_no_crf is not None for s in stored):
            no_crf.setdefault(key, {})[i] = [
                (int(c["row"]["seed"]), s.counts_no_crf) for c, s in zip(chosen, stored)
            ]
    if missing:
        notes.append(f"{missing} row(s) without per-image counts (cells from before they were stored): "
                     "intervals, Δ and rank ranges unavailable for them")  # fmt: skip
    groups = []
    for key, rows in grouped.items():
        dataset, _, matching, objective = key
        n_images = next(iter(rows.values()))[0][1].n_images
        if n_images < MIN_IMAGES:
            notes.append(f"{dataset}: {n_images} image(s) scored: too few to resample, no intervals")
            continue
        if n_images < FEW_IMAGES:
            notes.append(f"{dataset}: only {n_images} images scored: the bootstrap intervals are rough")
        boots = bootstrap_rows(rows, n_resamples, seed, matching, objective)
        order = [i for i in board.index if i in boots]
        for i in order:
            b = boots[i]
            table.loc[i, ["miou_lo", "miou_hi"]] = score_interval(b.miou, b.nested_miou, level)
            table.loc[i, ["acc_lo", "acc_hi"]] = score_interval(b.acc, b.nested_acc, level)
            plan = halving_plan(b, level)
            table.loc[i, ["ci_width", "image_share", "seeds_to_halve", "images_factor_to_halve"]] = (
                plan.width, plan.image_share, plan.seeds_to_halve, plan.images_factor_to_halve)  # fmt: skip
        if key in no_crf and set(no_crf[key]) == set(rows):
            for i, b in bootstrap_rows(no_crf[key], n_resamples, seed, matching, objective).items():
                table.loc[i, ["miou_no_crf_lo", "miou_no_crf_hi"]] = score_interval(
                    b.miou, b.nested_miou, level
                )
        group = GroupStatistics(dataset, next(iter(boots.values())).n_images, order, boots, None, seed=seed)
        group.ranks = dict(zip(order, _ranks(group, level)))
        notes += seed_notes(board, group)
        for i, (lo, hi) in group.ranks.items():
            table.loc[i, ["rank_lo", "rank_hi"]] = (lo, hi)
        candidates = [i for i in order if _matches(rule, board.loc[i], names_of[i])]
        if candidates:
            # rows matching the rule by label come before those matching by plugin name only, then best first
            by_label = {i: sum(board.loc[i].get(k) == v for k, v in rule.items()) for i in candidates}
            group.baseline = sorted(candidates, key=lambda i: -by_label[i])[0]
            if len(candidates) > 1:
                used = row_label(board.loc[group.baseline])
                notes.append(f"{dataset}: {len(candidates)} rows match the baseline rule; used: {used}")
            table.loc[group.baseline, "is_baseline"] = True
            for i in order:
                d = group.delta(i, group.baseline, level)
                if d is not None:  # None: no seed in common with the baseline (a note says so)
                    table.loc[i, ["delta", "delta_lo", "delta_hi", "delta_p"]] = (
                        d.delta,
                        d.low,
                        d.high,
                        d.p_value,
                    )
        else:
            rule_text = ", ".join(f"{k} {v}" for k, v in rule.items())
            notes.append(f"{dataset}: no baseline row ({rule_text}) in this grid: no Δ column for it; add the row or "
                         "name another with the grid key `baseline:`")  # fmt: skip
        groups.append(group)
    return BoardStatistics(table, groups, n_resamples, seed, level, rule, notes)


def _ranks(group: GroupStatistics, level: float) -> list[tuple[int, int]]:
    """Rank ranges of a group's rows (board order): from all rows' replicates at once when every row ran the same
    seeds, else from each pair's Δ on the seeds both ran (a pair without a common seed is not told apart)."""
    boots = [group.boots[i] for i in group.rows]
    if len({tuple(b.seeds) for b in boots}) == 1:
        return rank_ranges(np.array([b.miou for b in boots]), np.stack([b.nested_miou for b in boots]), level)
    better = np.zeros((len(boots), len(boots)), dtype=bool)
    for (x, a), (y, b) in itertools.permutations(enumerate(group.rows), 2):
        d = group.delta(a, b, level)
        better[x, y] = d is not None and d.low > 0
    return ranks_from_better(better)


def seed_notes(board: pd.DataFrame, group: GroupStatistics) -> list[str]:
    """One line per two seed sets of a dataset's rows: which rows, and the seeds their comparisons use."""
    sets: dict[tuple[int, ...], list[int]] = {}
    for i in group.rows:
        sets.setdefault(tuple(group.boots[i].seeds), []).append(i)
    lines = []
    for (seeds_a, rows_a), (seeds_b, rows_b) in itertools.combinations(sets.items(), 2):
        common = sorted(set(seeds_a) & set(seeds_b))
        who = (f"{group.dataset}: {_rows_text(board, rows_a)} (seeds {seeds_text(seeds_a)}) vs "
               f"{_rows_text(board, rows_b)} (seeds {seeds_text(seeds_b)})")  # fmt: skip
        if common:
            lines.append(f"{who}: Δ, p and rank ranges between them use the seeds both ran ({seeds_text(common)}), "
                         "paired by seed; their mIoU columns average all their own seeds.")  # fmt: skip
        else:
            lines.append(f"{who}: no seed in common, so no Δ between them (a paired comparison needs the same "
                         "seeds; rerun the missing cells).")  # fmt: skip
    return lines


def _rows_text(board: pd.DataFrame, rows: list[int], shown: int = 4) -> str:
    """'row good' / 'rows a, b, c and 5 more' for a note."""
    names = [row_label(board.loc[i]) for i in rows]
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ("row " if len(names) == 1 else "rows ") + ", ".join(names[:shown]) + more


def seeds_text(seeds: list[int] | tuple[int, ...]) -> str:
    """'0, 2' for a note."""
    return ", ".join(str(s) for s in seeds)


def decided_summary(board: pd.DataFrame, stats: BoardStatistics, top: int = 6) -> list[str]:
    """Plain sentences: which of the main comparisons (neighbouring top rows, best vs baseline) are decided."""
    lines = []
    for g in stats.groups:
        order = g.rows
        deltas = [g.delta(a, b, stats.level) for k, a in enumerate(order) for b in order[k + 1 :]]
        compared = [d for d in deltas if d is not None]
        unpaired = len(deltas) - len(compared)
        lines.append(f"**{g.dataset}** ({g.n_images} images, {len(order)} rows): {sum(d.decided for d in compared)} "
                     f"of {len(compared)} row pairs are decided (paired interval excludes 0)"
                     + (f"; {unpaired} pair(s) have no seed in common and no Δ." if unpaired else "."))  # fmt: skip
        pairs = [("", a, b) for a, b in zip(order[: top - 1], order[1:top])]
        if g.baseline is not None and order and g.baseline not in order[:2]:
            pairs.append(("best ", order[0], g.baseline))
        for prefix, a, b in pairs:
            lines.append(f"{prefix}{_who(board, order, a)} vs {'baseline ' if b == g.baseline else ''}"
                         f"{_who(board, order, b)}: {_comparison(g, a, b, stats)}")  # fmt: skip
    return lines


def _comparison(g: GroupStatistics, a: int, b: int, stats: BoardStatistics) -> str:
    """'Δ +1.20 [+0.3, +2.1], p = 0.01: decided' for one pair of a group, or why it has no Δ."""
    pair = g.pair(a, b)
    if pair is None:
        return "no Δ (no seed in common)"
    d = g.delta(a, b, stats.level)
    shared = "" if g.boots[a].seeds == g.boots[b].seeds else f" (on seeds {seeds_text(pair[0].seeds)})"
    return (f"Δ {d.delta:+.2f} [{d.low:+.2f}, {d.high:+.2f}]{shared}, {p_clause(d.p_value, stats.n_resamples)}: "
            f"{_verdict(d, pair[0], pair[1], stats.level)}")  # fmt: skip


def _verdict(d: PairedDelta, a: RowBootstrap, b: RowBootstrap, level: float) -> str:
    if d.decided:
        return "decided"
    if d.delta == d.low == d.high == 0.0:  # every replicate ties: no images or seeds would help
        return "identical scores (no difference to decide)"
    need = seeds_to_decide(a, b, level)
    if need is None:
        return "not decided" + (
            ""
            if len(a.seeds) < 2 or len(b.seeds) < 2
            else " (more images needed: the image part alone covers Δ)"
        )
    return f"not decided (about {need} seeds per row would decide it if Δ held)"


def _who(board: pd.DataFrame, order: list[int], i: int) -> str:
    return f"#{order.index(i) + 1} {row_label(board.loc[i])}"


def fmt_p(p: float, n_resamples: int) -> str:
    """A p-value as text; with B replicates the bootstrap cannot resolve below 1/(B+1) ('≤ 0.001')."""
    if p is None or not math.isfinite(float(p)):
        return "n/a"
    floor = 1.0 / (n_resamples + 1)
    if p <= floor + 1e-12:
        return f"≤ {floor:.3f}" if floor >= 0.001 else f"≤ {floor:.1e}"
    return f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def p_clause(p: float, n_resamples: int) -> str:
    """'p = 0.081' or 'p ≤ 0.001' (never 'p = ≤ ...') for running text."""
    text = fmt_p(p, n_resamples)
    return f"p {text}" if text.startswith("≤") else f"p = {text}"


def pairwise_matrix(
    stats: BoardStatistics, group: GroupStatistics, top: int = 10
) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """(board indices of the top rows, Δ matrix row minus column, p-values, decided: interval excludes 0)."""
    order = group.rows[:top]
    n = len(order)
    delta = np.zeros((n, n))
    pvals = np.ones((n, n))
    decided = np.zeros((n, n), dtype=bool)
    for a in range(n):
        for b in range(n):
            if a != b:
                d = group.delta(order[a], order[b], stats.level)
                if d is None:  # no seed in common: no Δ to show
                    delta[a, b], pvals[a, b] = math.nan, math.nan
                else:
                    delta[a, b], pvals[a, b], decided[a, b] = d.delta, d.p_value, d.decided
    return order, delta, pvals, decided


def halving_text(row: pd.Series) -> str:
    """'9 seeds or x4.2 images' etc. from a stats table row."""
    if row.get("ci_width") is None or pd.isna(row.get("ci_width")):
        return ""
    parts = []
    seeds, factor = row.get("seeds_to_halve"), row.get("images_factor_to_halve")
    if seeds is not None and not pd.isna(seeds):
        parts.append(f"{int(seeds)} seeds")
    if factor is not None and not pd.isna(factor):
        parts.append(f"×{float(factor):.1f} images")
    if pd.isna(row.get("image_share")):  # one seed: the seed spread is unknown
        parts.append("seed spread unknown (1 seed)")
        return "; ".join(parts)
    return " or ".join(parts) if parts else "both more seeds and more images"
