"""Where a grid's time goes: per stage, seconds beside the arithmetic the stage needs and the machine's limit.

Each stage of a cell has a work model: FLOPs for matmul-bound stages (compared with the machine's measured
matmul GFLOP/s at the stage's precision) or bytes for bandwidth-bound ones (compared with its measured copy
GB/s). The fraction of the limit reached is the stage's achieved rate over the limit. Models use what a cell
records: counts (images, tokens, segments, pixels), dimensions and the plugins' parameters. Where an
algorithm stops early, the model counts its configured maximum of iterations and is marked '<=': an upper
bound of the work, so its fraction is an upper bound too (a stage flagged below 20% is surely below).

| stage | model |
|---|---|
| features (ViT) | exact forward FLOPs per image (patch embedding, qkv/proj/MLP, attention), at the row's precision |
| image clusterer none | one pass: read the tokens (fp16), write the normalised vectors (fp32) |
| per-image k-means | per image and restart: k-means++ (k x 3nD) + max_iter Lloyd steps (4nkD each) (<=) |
| DSM | per image: affinity 2n^2D + eigendecomposition 4/3 n^3, + k-means on the eigenvectors (<=) |
| k-means (faiss) | restarts x iterations x 2NKD (faiss runs every iteration: exact) |
| k-means (torch, sklearn) | the same, iterations at their maximum (<=) |
| OTC | iterations x (2NKD cost matrix + Sinkhorn iterations x 4NK) (<= with a tolerance) |
| ABC | epochs x 3 (forward + backward) x N x the network's FLOPs per vector |
| evaluation (nearest) | one pass over the per-patch class histograms (int64; built once per split and grid) |
| NFCovering | one pass per segment map over the per-patch class histograms (int64) |

Stages without a model (learners, ACG, HSG groups, crop-CLS segment vectors) show seconds only.
:func:`profile_footer` renders the report footer from ``profile.json`` (written by
``benchmarks/perf/profile_grid.py`` with the measured limits) or, without it, seconds and work only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .machine_limits import MATMUL_FLAGS

PROFILE_FILE = "profile.json"
REUSED_FLAGS = {
    "features": "features_reused",
    "feature_learner": "learner_reused",
}  # row flags: loaded, not computed
STAGES = (
    ("features", "time_features_s"),
    ("feature_learner", "time_feature_learner_s"),
    ("image_clusterer", "time_image_clusterer_s"),
    ("dataset_clusterer", "time_dataset_clusterer_s"),
    ("evaluation", "time_eval_s"),
    ("crf", "time_crf_s"),
    ("nfcovering", "time_nfcov_s"),
)
FLAG_BELOW = 0.20  # stages below this fraction of their limit are flagged


# -- facts a cell records for the models --------------------------------------------------------------------
def work_facts(features: Any, vectors: torch.Tensor | None = None) -> dict[str, Any]:
    """What the models need from a cell beyond its counts: token statistics, dimensions, backbone FLOPs."""
    sizes = [int(im.tokens.shape[0]) * int(im.tokens.shape[1]) for im in features]
    facts: dict[str, Any] = {
        "precision": features.meta.get("precision", "fp32"),
        "backbone_gflops": features.meta.get("gflops"),
        "n_tokens": sum(sizes),
        "tokens_sq": float(sum(n * n for n in sizes)),
        "tokens_cube": float(sum(float(n) ** 3 for n in sizes)),
        "embed_dim": int(features.embed_dim),
    }
    if vectors is not None:
        facts["vector_dim"] = int(vectors.shape[1]) if vectors.ndim == 2 else None
    return facts


def vit_gflops(
    grid_tokens: list[int], dim: int, depth: int, mlp_dim: int, patch: int, channels: int = 3
) -> float:
    """Forward GFLOPs of a ViT (one CLS token) over images with the given patch counts (2 FLOPs per MAC)."""
    total = 0.0
    for n in grid_tokens:
        t = n + 1
        per_block = (
            2 * t * dim * 3 * dim + 2 * t * dim * dim + 2 * 2 * t * dim * mlp_dim + 2 * 2 * t * t * dim
        )
        total += depth * per_block + 2 * n * channels * patch * patch * dim
    return total / 1e9


def perf_row_facts(features: Any, segments: list, device: str = "cpu") -> dict[str, Any]:
    """A cell row's facts for the profile: :func:`work_facts` (segment vector width from ``segments``) and
    the sizes of ussbench's own pools (decode threads, CRF processes); the numeric libraries' thread counts
    are recorded beside them by :func:`ussbench.graph.machine.row_machine_facts`."""
    from ..threads import crf_workers, decode_workers

    vectors = segments[0].vectors if segments else None
    facts = work_facts(features, vectors)
    facts.update(threads_decode=decode_workers(device), threads_crf=crf_workers())
    return facts


# -- the models ---------------------------------------------------------------------------------------------
@dataclass
class Work:
    """A stage's work: amount in GFLOP (matmul-bound) or GB (bandwidth-bound), how exact, and the model."""

    amount: float
    unit: str  # "GFLOP" or "GB"
    bound: str  # "=" exact, "<=" upper bound (configured maxima), "~" approximate
    model: str
    bf16_capable: bool = False  # the stage's matmuls run in bf16 wherever the backbone's 'auto' chose bf16


def _params(cell: dict[str, Any], kind: str) -> dict[str, Any]:
    entry = cell.get("params", {}).get(kind) or {}
    return entry.get("params") or {}


def _name(cell: dict[str, Any], kind: str) -> str:
    return (cell.get("params", {}).get(kind) or {}).get("name", "")


def _features(row: dict[str, Any], cell: dict[str, Any]) -> Work | None:
    gflops = row.get("backbone_gflops")
    if not gflops:
        return None
    return Work(float(gflops), "GFLOP", "=", "ViT forward FLOPs of every image")


def _image_clusterer(row: dict[str, Any], cell: dict[str, Any]) -> Work | None:
    name, p = _name(cell, "image_clusterer"), _params(cell, "image_clusterer")
    n, sq, d = row.get("n_tokens"), row.get("tokens_sq"), row.get("embed_dim")
    if not n or not d:
        return None
    if name == "none":
        return Work(n * d * 6 / 1e9, "GB", "=", "read tokens fp16, write vectors fp32")
    if name == "kmeans_per_image":
        k, restarts, iters = p.get("n_segments", 8), p.get("n_init", 3), p.get("max_iter", 100)
        flops = restarts * (k * 3 * n * d + iters * 4 * n * k * d)
        return Work(flops / 1e9, "GFLOP", "<=", f"{restarts} restart(s) x (k-means++ + {iters} Lloyd steps)")
    if name == "dsm" and sq:
        e, s = p.get("n_eigenvectors", 20), p.get("n_segments", 15)
        restarts, iters = p.get("n_init", 10), p.get("max_iter", 300)
        flops = 2 * sq * d + 4 / 3 * row.get("tokens_cube", 0.0) + restarts * iters * 4 * n * s * e
        note = "affinity + eigendecomposition + k-means on eigenvectors"
        if p.get("segment_vector", "crop_cls") != "mean":
            note += "; crop-CLS forwards not counted"
        return Work(flops / 1e9, "GFLOP", "<=", note)
    if name == "acg" and row.get("n_images"):
        # per image and round: the prototype side (q/out folds, self-attention, FFN) on N prototypes and the two
        # pixel products (P x C x N); x3 for forward + backward over the epochs, plus one predict pass. One
        # head's self-attention is folded to 2 d^2 per prototype (ACG version 7), several heads' cost 4 d^2.
        N, rounds = p.get("n_prototypes", 6), p.get("n_rounds", 6)
        ffn, epochs = int(d * p.get("ffn_ratio", 4.0)), p.get("epochs", 10)
        mix = 2 if p.get("n_heads", 1) == 1 else 4
        per_pass = rounds * (row["n_images"] * N * ((2 + mix) * d * d + 2 * d * ffn) * 2 + 4 * N * d * n)
        low = p.get("precision", "auto") != "fp32"
        return Work((3 * epochs + 1) * per_pass / 1e9, "GFLOP", "~", f"{epochs} epochs (x3) + predict", low)
    if name == "hsg_groups":
        # the projection head (d -> hidden -> dim) over every token, x3 when training, plus the k-means
        # hierarchy's distance products; superpixels and the graph terms are not counted
        hidden, dim, epochs = p.get("hidden_dim", 384), p.get("dim", 128), p.get("epochs", 3)
        head = 2 * n * (d * hidden + hidden * dim)
        km = p.get("kmeans_iters", 15) * 4 * n * p.get("n0", 36) * dim
        return Work(((3 * epochs + 1) * head + (epochs + 1) * km) / 1e9, "GFLOP", "~",
                    f"{epochs} epoch(s) of the head (x3) + predict + k-means hierarchy")  # fmt: skip
    return None


def _dataset_clusterer(row: dict[str, Any], cell: dict[str, Any]) -> Work | None:
    name, p = _name(cell, "dataset_clusterer"), _params(cell, "dataset_clusterer")
    N, D = row.get("n_segments"), row.get("vector_dim") or row.get("embed_dim")
    K = p.get("n_clusters") or row.get("n_clusters")
    if not N or not D or not K:
        return None
    if p.get("pca_dim"):
        D = min(D, int(p["pca_dim"]))
    if name == "kmeans":
        restarts, iters = p.get("n_init", 5), p.get("max_iter", 100)
        exact = p.get("engine", "auto") == "faiss"  # faiss runs every iteration; Elkan skips work
        flops = restarts * (iters + 1) * 2 * N * K * D
        return Work(flops / 1e9, "GFLOP", "=" if exact else "<=", f"{restarts} x {iters} Lloyd iterations")
    if name == "otc":
        iters, inner = p.get("n_iter", 200), p.get("sinkhorn_iter", 10)
        flops = iters * (2 * N * K * D + inner * 4 * N * K)
        return Work(
            flops / 1e9, "GFLOP", "<=" if p.get("tol") else "=", f"{iters} iterations x {inner} Sinkhorn"
        )
    if name == "abc":
        layout = {
            "attn_mlp": ("attn", "ffn"),
            "2attn_mlp": ("attn", "attn", "ffn"),
            "identical": (),
            "mlp": ("ffn",),
        }
        blocks = layout.get(p.get("architecture", "attn_mlp"), ("attn", "ffn")) * int(p.get("n_steps", 1))
        hidden = D * float(p.get("mlp_ratio", 4.0))
        per = sum(4 * D * D + 4 * K * D if b == "attn" else 4 * D * hidden for b in blocks) + 2 * K * D
        flops = p.get("epochs", 100) * 3 * N * per
        low = p.get("precision", "auto") != "fp32"
        return Work(flops / 1e9, "GFLOP", "~", f"{p.get('epochs', 100)} epochs, forward + backward", low)
    return None


def _evaluation(row: dict[str, Any], cell: dict[str, Any]) -> Work | None:
    n, classes = row.get("n_tokens"), len(cell.get("class_names") or [])
    if row.get("upsample") != "nearest_labels" or not n or not classes:
        return None
    return Work(n * classes * 8 / 1e9, "GB", "=", "one pass over per-patch class histograms")


def _nfcovering(row: dict[str, Any], cell: dict[str, Any]) -> Work | None:
    n, classes = row.get("n_tokens"), len(cell.get("class_names") or [])
    if not n or not classes or not row.get("time_nfcov_s") or row.get("nfcov") is None:
        return None
    maps = 1 + sum(1 for key in row if key.startswith("nfcov_"))
    return Work(
        n * classes * maps * 8 / 1e9, "GB", "=", f"{maps} segment map(s) x per-patch class histograms"
    )


MODELS: dict[str, Callable[[dict[str, Any], dict[str, Any]], Work | None]] = {
    "features": _features,
    "image_clusterer": _image_clusterer,
    "dataset_clusterer": _dataset_clusterer,
    "evaluation": _evaluation,
    "nfcovering": _nfcovering,
}


def stage_work(cell: dict[str, Any], stage: str) -> Work | None:
    """The work model of one stage of a finished cell record (None where no model applies)."""
    model = MODELS.get(stage)
    return model(cell["row"], cell) if model else None


# -- profiles -------------------------------------------------------------------------------------------------
def limit_of(work: Work, row: dict[str, Any], limits: dict[str, Any], stage: str) -> float | None:
    """The machine's limit for a stage's work: copy GB/s, or matmul GFLOP/s (bf16 for a bf16 backbone)."""
    if work.unit == "GB":
        return limits.get("bandwidth_gbs")
    bf16 = row.get("precision") == "bf16" and (stage == "features" or work.bf16_capable)
    return limits.get("bf16_gflops" if bf16 else "fp32_gflops")


def shared_key(row: dict[str, Any], stage: str) -> tuple:
    """Cells that share a computation of the stage (timed once, at its first computation) share this key."""
    base = (row.get("dataset"), row.get("backbone"))
    if stage == "features":
        return ("features", *base)
    if stage == "feature_learner":
        return ("learner", *base, row.get("feature_learner"), row.get("seed"))
    if stage in ("image_clusterer", "nfcovering"):  # NFCovering: one graph node per segmentation
        return (stage, *base, row.get("feature_learner"), row.get("image_clusterer"), row.get("seed"))
    return ("cell", row.get("cell_id"), stage)


def profile_records(cells: list[dict[str, Any]], limits: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One record per computed (stage, shared computation): seconds, work, rate and fraction of the limit.

    Of the cells sharing a computation, the one that took longest stands for it (the others loaded it from
    the cache or memory); every sharing cell carries the stage's first-use seconds, so at a tie the cell that
    computed it (not flagged reused) stands for it. Features or learned codes every cell loaded from the cache (``features_reused``,
    ``learner_reused``) show seconds only: a load is no measure of the computation's throughput.
    """
    chosen: dict[tuple, tuple[dict[str, Any], str, float, bool]] = {}
    for cell in cells:
        row = cell["row"]
        for stage, column in STAGES:
            seconds = row.get(column)
            if seconds is None or (isinstance(seconds, float) and math.isnan(seconds)):
                continue
            if stage == "feature_learner" and row.get(stage) == "none":
                continue
            key = shared_key(row, stage)
            computed = row.get(REUSED_FLAGS.get(stage, "")) is not True
            # every cell sharing a stage carries its first-use seconds: at a tie, the cell that computed it
            if key not in chosen or (float(seconds), computed) > (chosen[key][2], chosen[key][3]):
                chosen[key] = (cell, stage, float(seconds), computed)
    out: list[dict[str, Any]] = []
    for cell, stage, seconds, _ in chosen.values():
        row = cell["row"]
        record: dict[str, Any] = {
            "stage": stage,
            "plugin": _stage_label(row, stage),
            "seconds": seconds,
            "cell_id": row.get("cell_id"),
            "seed": row.get("seed"),
        }
        cached = row.get(REUSED_FLAGS.get(stage, "")) is True
        if cached:
            record["cached"] = True
        work = None if cached else stage_work(cell, stage)
        if work is not None and work.amount > 0:
            record.update(work=work.amount, unit=work.unit, bound=work.bound, model=work.model)
            if seconds > 0:
                record["rate"] = work.amount / seconds
                limit = limit_of(work, row, limits or {}, stage)
                if limit:
                    record["limit"] = limit
                    record["fraction"] = record["rate"] / limit
        out.append(record)
    return out


def _stage_label(row: dict[str, Any], stage: str) -> str:
    if stage == "features":
        return f"{row.get('backbone')} ({row.get('precision', '?')})"
    if stage in ("feature_learner", "image_clusterer", "dataset_clusterer"):
        return str(row.get(stage))
    return stage


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records grouped by (stage, plugin): computations, total seconds and work, the fraction of the limit."""
    groups: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        g = groups.setdefault((r["stage"], r["plugin"]), {"stage": r["stage"], "plugin": r["plugin"], "count": 0,
                                                           "seconds": 0.0, "work": 0.0, "modelled_s": 0.0})  # fmt: skip
        g["count"] += 1
        g["seconds"] += r["seconds"]
        g["cached"] = g.get("cached", True) and bool(r.get("cached"))
        if "work" in r:
            g["work"] += r["work"]
            g["modelled_s"] += r["seconds"]
            g.update(unit=r["unit"], bound=r["bound"], model=r["model"])
            if "limit" in r:
                g["limit"] = r["limit"]
    for g in groups.values():
        if g["work"] and g["modelled_s"] > 0:
            g["rate"] = g["work"] / g["modelled_s"]
            if g.get("limit"):
                g["fraction"] = g["rate"] / g["limit"]
    return sorted(groups.values(), key=lambda g: -g["seconds"])


def format_table(summary: list[dict[str, Any]], total_seconds: float | None = None) -> list[str]:
    """Markdown table lines of a summary (seconds, share, work, rate, fraction of the limit)."""
    lines = [
        "| stage | plugin | runs | seconds | share | work | rate | limit | of limit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    total = total_seconds or sum(g["seconds"] for g in summary) or 1.0
    for g in summary:
        unit = g.get("unit", "")
        rate_unit = "GFLOP/s" if unit == "GFLOP" else "GB/s"
        work = f"{g.get('bound', '')} {g['work']:.3g} {unit}".strip() if g.get("work") else "not modelled"
        if g.get("cached") and not g.get("work"):
            work = "loaded from the cache"
        rate = f"{g['rate']:.3g} {rate_unit}" if "rate" in g else ""
        limit = f"{g['limit']:.3g} {rate_unit}" if g.get("limit") else ""
        frac = ""
        if "fraction" in g:
            frac = f"{'<=' if g.get('bound') == '<=' else ''}{100 * g['fraction']:.1f}%"
            if g["fraction"] < FLAG_BELOW:
                frac += " (below 20%)"
        lines.append(f"| {g['stage']} | {g['plugin']} | {g['count']} | {g['seconds']:.1f} | "
                     f"{100 * g['seconds'] / total:.0f}% | {work} | {rate} | {limit} | {frac} |")  # fmt: skip
    return lines


def write_profile(output: Path, limits: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write ``profile.json`` (measured limits and anything else to show) into a report folder."""
    from ..atomic import atomic_write_json

    path = Path(output) / PROFILE_FILE
    atomic_write_json(path, {"limits": limits, **(extra or {})})
    return path


# a profile's machine string lists these flags; a cell's cpu_isa holds more, compared on these
_MATMUL_FLAGS = frozenset(MATMUL_FLAGS)


def _measured_elsewhere(saved: dict[str, Any], cells: list[dict[str, Any]]) -> str | None:
    """The CPU a saved profile was measured on, when the cells ran on another one (None when they match or
    either is unknown). Model names alone do not tell two CPUs apart (an AVX2-only and an AVX512-BF16 EPYC
    both say "AMD EPYC"), so the matmul ISA flags are compared too."""
    machine = (saved.get("limits") or {}).get("machine")
    rows = [c["row"] for c in cells if c.get("row", {}).get("cpu_model")]
    if not machine or not rows:
        return None
    flags = re.search(r"\(([^)]*)\)", machine)
    profiled = frozenset(flags.group(1).split()) & _MATMUL_FLAGS if flags else None
    for row in rows:
        same_model = machine.startswith(row["cpu_model"])
        isa = row.get("cpu_isa")
        same_isa = profiled is None or isa is None or frozenset(isa.split()) & _MATMUL_FLAGS == profiled
        if same_model and same_isa:
            return None
    return machine.split(",")[0] + (f" with {' '.join(sorted(profiled))}" if profiled else "")


def profile_footer(output: Path, cells: list[dict[str, Any]]) -> str:
    """The report footer: where the cells' time went, per stage, against the machine's measured limits."""
    path = Path(output) / PROFILE_FILE
    saved = json.loads(path.read_text()) if path.is_file() else {}
    other_machine = _measured_elsewhere(saved, cells)
    if other_machine:  # the limits and wall clock describe another CPU: no fractions against them
        saved = {}
    limits = saved.get("limits")
    summary = summarise(profile_records(cells, limits))
    if not summary:
        return ""
    lines = ["", "## Where the time goes", ""]
    if limits:
        lines.append(
            f"Measured on {limits.get('machine', '?')}: fp32 matmul {limits['fp32_gflops']:.0f} GFLOP/s, bf16 "
            f"{limits['bf16_gflops']:.0f} GFLOP/s, copy {limits['bandwidth_gbs']:.1f} GB/s "
            f"(`benchmarks/perf/profile_grid.py`)."
        )
    elif other_machine:
        lines.append(
            f"The folder's `{PROFILE_FILE}` was measured on another CPU ({other_machine}); its limits are not "
            "applied to these cells: run `benchmarks/perf/profile_grid.py` here for fractions."
        )
    else:
        lines.append(
            "Limits not measured for this folder: run `benchmarks/perf/profile_grid.py` for fractions."
        )
    lines += ["Shared stages count once; '<=' marks work counted at configured maximum iterations.", ""]
    lines += format_table(summary)
    for key, label in (("report_s", "report build"), ("wall_s", "whole run (wall clock)")):
        if saved.get(key) is not None:  # from the profiled run, which a later plain run does not rewrite
            lines.append(
                f"\n{label} of the profiled run (`benchmarks/perf/profile_grid.py`): {saved[key]:.1f} s"
            )
    return "\n".join(lines) + "\n"
