"""Does ``precision: auto`` (bf16 autocast) change results? Feature cosines and raw-token k-means mIoU vs fp32.

Runs ``benchmarks/perf/precision_grid.yaml`` (MSRC-v2 and CamVid test, fp32 and auto features, every patch
a segment, k-means over all patches, 3 seeds), then reads the stored features of both precisions from the
grid's cache and prints, per dataset: the per-patch cosine of auto to fp32 tokens and keys (mean, 1st
percentile, minimum), the CLS cosine and the CLS-attention L1 distance; the extraction seconds of each
precision; and the mIoU of each precision (mean +- std over seeds) with the per-seed paired difference,
against the seed spread.

    scripts/cpujob --both .venv/bin/python benchmarks/perf/precision_evidence.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ussbench.base import FeatureSet  # noqa: E402
from ussbench.reports.machine_limits import describe_machine, load_average  # noqa: E402
from ussbench.serialization import safe_load  # noqa: E402


def stored_features(cache: Path) -> list[FeatureSet]:
    """Every FeatureSet stored in a cache folder (whatever the key layout)."""
    out = []
    for path in sorted((cache / "features").glob("*.pt")):
        obj = safe_load(path)  # pickle-free (ussbench.serialization)
        if isinstance(obj, dict):
            obj = next((v for v in obj.values() if isinstance(v, FeatureSet)), None)
        if isinstance(obj, FeatureSet):
            out.append(obj)
    return out


def cosine_stats(a: FeatureSet, b: FeatureSet, name: str) -> tuple[float, float, float]:
    """Mean, 1st percentile and minimum of the per-patch cosine between two feature sets' dense maps."""
    cos = []
    for x, y in zip(a, b):
        u = getattr(x, name).float().reshape(-1, getattr(x, name).shape[-1])
        v = getattr(y, name).float().reshape(-1, getattr(y, name).shape[-1])
        cos.append(torch.nn.functional.cosine_similarity(u, v, dim=1))
    c = torch.cat(cos)
    return float(c.mean()), float(torch.quantile(c, 0.01)), float(c.min())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", type=Path, default=ROOT / "benchmarks" / "perf" / "precision_grid.yaml")
    parser.add_argument(
        "--skip-run", action="store_true", help="use the finished cells and cache as they are"
    )
    args = parser.parse_args()
    from ussbench.config import load_grid
    from ussbench.runner import load_cells, run_grid

    print(f"machine: {describe_machine()}")
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*load_average()))
    grid = load_grid(str(args.grid), {"data_root": str(ROOT / "data")})
    if not args.skip_run:
        start = time.perf_counter()
        run_grid(grid, progress=False)
        print(f"grid run: {time.perf_counter() - start:.1f} s")
    rows = [c["row"] for c in load_cells(grid.output)]
    feats = stored_features(Path(grid.cache_dir))
    by_key = {(len(f), f.images[0].image_id, f.meta.get("precision")): f for f in feats}
    for dataset in sorted({r["dataset"] for r in rows}):
        sub = [r for r in rows if r["dataset"] == dataset]
        print(f"\n## {dataset}: {sub[0]['n_images']} images, {sub[0].get('n_tokens', '?')} patches")
        pairs = [(k, f) for k, f in by_key.items() if k[0] == sub[0]["n_images"]]
        fp32 = next((f for k, f in pairs if k[2] == "fp32"), None)
        bf16 = next((f for k, f in pairs if k[2] == "bf16"), None)
        if fp32 is not None and bf16 is not None and fp32.images[0].image_id == bf16.images[0].image_id:
            for name in ("tokens", "keys"):
                mean, p1, low = cosine_stats(bf16, fp32, name)
                print(
                    f"- {name}: per-patch cosine auto vs fp32 mean {mean:.5f}, 1st percentile {p1:.5f}, min {low:.5f}"
                )
            cls = torch.nn.functional.cosine_similarity(
                torch.stack([x.cls.float() for x in bf16]), torch.stack([x.cls.float() for x in fp32]), dim=1
            )
            attn = [
                float((x.attn.float() - y.attn.float()).abs().sum() / x.attn.shape[0])
                for x, y in zip(bf16, fp32)
            ]
            print(f"- CLS cosine mean {float(cls.mean()):.5f}, min {float(cls.min()):.5f}; CLS attention "
                  f"L1 distance per head mean {np.mean(attn):.4f} (each head's map sums to < 1)")  # fmt: skip
        for label in ("fp32", "auto"):
            got = [r for r in sub if r["backbone"] == label]
            if got:
                miou = np.array([r["miou"] for r in sorted(got, key=lambda r: r["seed"])])
                print(f"- {label} (resolved {got[0].get('precision', '?')}): mIoU {miou.mean():.2f} +- "
                      f"{miou.std(ddof=1) if len(miou) > 1 else 0:.2f} over seeds {[round(float(m), 2) for m in miou]}, "
                      f"features {got[0]['time_features_s']:.1f} s")  # fmt: skip
        a = {r["seed"]: r["miou"] for r in sub if r["backbone"] == "auto"}
        f = {r["seed"]: r["miou"] for r in sub if r["backbone"] == "fp32"}
        seeds = sorted(set(a) & set(f))
        if len(seeds) > 1:
            diff = np.array([a[s] - f[s] for s in seeds])
            spread = max(np.std(list(a.values()), ddof=1), np.std(list(f.values()), ddof=1))
            verdict = "within" if abs(diff.mean()) <= spread else "OUTSIDE"
            print(f"- paired auto - fp32 per seed: {[round(float(d), 2) for d in diff]}, mean {diff.mean():+.2f}; "
                  f"seed spread (largest std) {spread:.2f}: {verdict} the seed spread")  # fmt: skip
    print("\nload average after: {:.2f} {:.2f} {:.2f}".format(*load_average()))


if __name__ == "__main__":
    main()
