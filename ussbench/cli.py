"""Command line: ``run`` a grid, ``list`` plugins, rebuild a ``report``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__, registry
from .errors import UssbenchError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ussbench", description="Benchmark USS clustering strategies on frozen ViT features."
    )
    p.add_argument("--version", action="version", version=f"ussbench {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a grid file and write its leaderboard")
    run.add_argument("--grid", required=True, help="grid YAML file, e.g. benchmarks/msrc_grid.yaml")
    run.add_argument("--data-root", help="folder holding the datasets (overrides the grid's data_root)")
    run.add_argument("--output", help="report folder (default: the grid's output, else reports/<name>)")
    run.add_argument(
        "--cache-dir", help="feature/stage cache folder (default: the grid's, else .cache/ussbench)"
    )
    run.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the grid)")
    run.add_argument("--seeds", type=int, nargs="+", help="seeds (override the grid)")
    run.add_argument("--limit", type=int, help="use only the first N images of each dataset (quick runs)")
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--no-report", action="store_true", help="run cells only; build the report later")
    lst = sub.add_parser("list", help="show every registered plugin by kind with its parameters and defaults")
    lst.add_argument("--kind", choices=registry.KINDS)
    lst.add_argument(
        "--plugins", nargs="*", default=[], help="extra plugin modules (dotted names or .py files) to import"
    )
    rep = sub.add_parser("report", help="rebuild the report of a grid output folder from its finished cells")
    rep.add_argument("output", help="the grid's output folder, e.g. reports/msrc")
    rep.add_argument("--name", help="grid name shown in the report (default: folder name)")
    return p


def cmd_list(kind: str | None, plugins: list[str]) -> int:
    for module in plugins:
        registry.import_plugin_module(module, base_dir=Path.cwd())
    for k, specs in registry.available(kind).items():
        print(f"{k}:")
        for name, spec in specs.items():
            print(f"  {name}  - {spec.summary}")
            for p in spec.params.values():
                default = "(required)" if p.required else f"= {p.default!r}"
                print(f"      {p.name}: {p.type_name()} {default}")
            if spec.presets:
                print(f"      presets: {', '.join(spec.presets)}")
        print()
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .config import limit_images, load_grid
    from .runner import run_grid

    overrides = {"data_root": args.data_root, "output": args.output, "cache_dir": args.cache_dir,
                 "device": args.device, "seeds": args.seeds}  # fmt: skip
    grid = load_grid(args.grid, overrides)
    if args.limit:
        grid = limit_images(grid, args.limit)
    summary = run_grid(grid, progress=not args.no_progress, report=not args.no_report)
    print(f"grid {grid.name}: {summary.n_cells} cells ({summary.n_run} run, {summary.n_resumed} resumed) "
          f"in {summary.seconds:.1f} s -> {summary.output}/leaderboard.md")  # fmt: skip
    if summary.n_failed:  # failed cells were recorded and the grid went on; the exit code says so
        log_file = summary.output / "errors.log"
        print(f"ussbench: {summary.n_failed} cell(s) failed; see {log_file}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "list":
            return cmd_list(args.kind, args.plugins)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "report":
            from .reports.build import build_report

            out = Path(args.output)
            paths = build_report(out, grid_name=args.name or out.name)
            print(f"report written: {paths['markdown']}")
            return 0
    except UssbenchError as exc:
        print(f"ussbench: error: {exc}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
