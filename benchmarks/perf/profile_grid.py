"""Where a grid's time goes: every stage's seconds beside the arithmetic it needs and the machine's limit.

Measures this machine's fp32 and bf16 matmul GFLOP/s and copy GB/s (the reference loops, in this run),
optionally runs the grid (``--run``: cold unless ``--cache-dir`` already holds its stages), times a rebuild
of its report, and prints per stage (shared stages once) the seconds, the share of the total, the work
model (FLOPs or bytes, see ``ussbench/reports/profile.py``), the achieved rate and the fraction of the
limit; ``--per-cell`` adds one line per computed stage. Writes ``profile.json`` into the report folder, so
the leaderboard's footer shows the same table.

    scripts/cpujob --both .venv/bin/python benchmarks/perf/profile_grid.py --grid benchmarks/msrc_grid.yaml \\
        --run --output .cache/profile/msrc --cache-dir .cache/profile/cache
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ussbench.reports import profile  # noqa: E402
from ussbench.reports.machine_limits import describe_machine, load_average, measure_limits  # noqa: E402


def run(
    grid_path: Path, output: Path | None, cache_dir: Path | None, limit: int | None, seeds
) -> tuple[Path, float]:
    """Run the grid (no report) and return its output folder and wall seconds."""
    from ussbench.config import limit_images, load_grid
    from ussbench.runner import run_grid

    overrides = {"output": str(output) if output else None, "cache_dir": str(cache_dir) if cache_dir else None,
                 "seeds": seeds}  # fmt: skip
    grid = load_grid(str(grid_path), overrides)
    if limit:
        grid = limit_images(grid, limit)
    start = time.perf_counter()
    summary = run_grid(grid, progress=False, report=False)
    return summary.output, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--grid", type=Path, default=ROOT / "benchmarks" / "msrc_grid.yaml")
    parser.add_argument("--output", type=Path, help="report folder (default: the grid's output)")
    parser.add_argument(
        "--run", action="store_true", help="run the grid first (else profile its finished cells)"
    )
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--limit", type=int)
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--per-cell", action="store_true")
    args = parser.parse_args()
    print(f"machine: {describe_machine()}")
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*load_average()))
    limits = measure_limits().as_dict()
    print(f"limits (reference loops, this run): fp32 matmul {limits['fp32_gflops']:.1f} GFLOP/s, bf16 matmul "
          f"{limits['bf16_gflops']:.1f} GFLOP/s, copy {limits['bandwidth_gbs']:.2f} GB/s")  # fmt: skip
    wall = None
    output = args.output
    if args.run:
        output, wall = run(args.grid, args.output, args.cache_dir, args.limit, args.seeds)
        print(f"grid run: {wall:.1f} s wall")
    if output is None:
        from ussbench.config import load_grid

        output = load_grid(str(args.grid), {}).output
    from ussbench.reports.build import build_report
    from ussbench.runner import load_cells

    cells = load_cells(output)
    if not cells:
        raise SystemExit(f"no finished cells in {output}/cells")
    profile.write_profile(output, limits, {"wall_s": wall})
    start = time.perf_counter()
    build_report(output, grid_name=Path(output).name)
    report_s = time.perf_counter() - start
    profile.write_profile(output, limits, {"wall_s": wall, "report_s": report_s})
    build_report(output, grid_name=Path(output).name)  # the footer now states the report's own time
    records = profile.profile_records(cells, limits)
    summary = profile.summarise(records)
    total = sum(r["seconds"] for r in records)
    print(f"\n{len(cells)} cells; stage seconds sum to {total:.1f} s; report rebuild {report_s:.1f} s\n")
    print("\n".join(profile.format_table(summary, total)))
    if args.per_cell:
        print(
            "\n| stage | plugin | seed | cell | seconds | work | rate | of limit |\n|---|---|---|---|---|---|---|---|"
        )
        for r in records:
            work = f"{r.get('bound', '')} {r['work']:.3g} {r['unit']}" if "work" in r else ""
            rate = f"{r['rate']:.3g}" if "rate" in r else ""
            frac = f"{100 * r['fraction']:.1f}%" if "fraction" in r else ""
            print(f"| {r['stage']} | {r['plugin']} | {r['seed']} | {r['cell_id']} | {r['seconds']:.2f} | {work} | "
                  f"{rate} | {frac} |")  # fmt: skip
    print("\nload average after: {:.2f} {:.2f} {:.2f}".format(*load_average()))


if __name__ == "__main__":
    main()
