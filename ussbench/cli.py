"""Command line: ``run`` a grid, ``list`` plugins, rebuild a ``report``, ``compare`` two rows.

Each sub-command has one ``_add_<command>`` function (its flags) and one ``cmd_<command>`` function (what
it does). Errors a user can fix are one line, ``ussbench: error: ...``, and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import __version__, registry
from .errors import ConfigError, UssbenchError

log = logging.getLogger("ussbench")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``ussbench: error: ...``, exit 2) like every other ussbench error, and no
    abbreviated flags: ``--seed 0`` would otherwise be taken as ``--seeds 0`` and run silently."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # the sub-commands' parsers are of this class too
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"ussbench: error: {message} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (number of images), got {value}")
    return value


def _logging_options(parser: argparse.ArgumentParser, suppress: bool) -> None:
    """-v/--log-level on the main parser and on every sub-command (``ussbench -v run`` and ``ussbench run -v``)."""
    default = {"default": argparse.SUPPRESS} if suppress else {}
    parser.add_argument("-v", "--verbose", action="count", help="show progress messages (-v: info, -vv: debug)",
                        **({"default": 0} if not suppress else default))  # fmt: skip
    parser.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, help="logging level (overrides -v)",
                        **default)  # fmt: skip


def _add_run(sub) -> None:
    run = sub.add_parser("run", help="run a grid file and write its leaderboard")
    _logging_options(run, suppress=True)
    run.add_argument("--grid", required=True,
                     help="grid file, or the name of a shipped grid in the project's benchmarks/ (e.g. msrc_grid.yaml)")  # fmt: skip
    run.add_argument("--data-root", help="folder holding the datasets (overrides the grid's data_root; default: the project's data/)")  # fmt: skip
    run.add_argument("--output", help="report folder (default: the grid's output, else reports/<name>)")
    run.add_argument(
        "--cache-dir", help="feature/stage cache folder (default: the grid's, else .cache/ussbench)"
    )
    run.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the grid)")
    run.add_argument("--seeds", type=int, nargs="+", help="seeds (override the grid)")
    run.add_argument(
        "--limit", type=_positive_int, help="use only the first N >= 1 images of each dataset (quick runs)"
    )
    run.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                     help="override a grid key or plugin parameter, value in YAML (repeatable): seeds=[0], "
                          "protocol.crf=false, image_clusterers.acg.epochs=5 (STAGE.LABEL-or-NAME-or-INDEX.PARAM)")  # fmt: skip
    run.add_argument("--dry-run", action="store_true",
                     help="validate, print the expanded cells and which are finished or cached, run nothing")  # fmt: skip
    run.add_argument("--no-progress", action="store_true", help="hide progress bars")
    run.add_argument("--no-report", action="store_true", help="run cells only; build the report later")
    run.add_argument("--reuse-committed", action="store_true",
                     help="in an output folder without cells/ (a fresh clone), resume the cells its committed "
                          "results.parquet and per_image_counts.npz hold; compute only the rest")  # fmt: skip
    run.add_argument("--executor", choices=("local", "ray"), default="local",
                     help="local: this process (default); ray: stages as Ray tasks (pip install 'ussbench[ray]')")  # fmt: skip
    run.add_argument("--address", help="with --executor ray: an existing Ray cluster (auto or HOST:PORT); "
                                       "default: a local Ray instance on this machine's cores and GPUs")  # fmt: skip
    run.add_argument("--max-retries", type=int, default=2, metavar="N",
                     help="with --executor ray: retries of a task whose worker died (default 2)")  # fmt: skip


def _add_list(sub) -> None:
    lst = sub.add_parser("list", help="show every registered plugin by kind with its parameters and defaults")
    _logging_options(lst, suppress=True)
    lst.add_argument("--kind", choices=registry.KINDS)
    lst.add_argument(
        "--plugins", nargs="*", default=[], help="extra plugin modules (dotted names or .py files) to import"
    )


def _add_report(sub) -> None:
    rep = sub.add_parser("report", help="rebuild the report of a grid output folder from its finished cells")
    _logging_options(rep, suppress=True)
    rep.add_argument("output", help="the grid's output folder, e.g. reports/msrc")
    rep.add_argument("--name", help="grid name shown in the report (default: the latest run's grid name)")
    rep.add_argument("--all-cells", action="store_true",
                     help="report every finished cell in the folder, not only those of each grid file's latest run")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ussbench", description="Benchmark USS clustering strategies on frozen ViT features.")
    p.add_argument("--version", action="version", version=f"ussbench {__version__}")
    _logging_options(p, suppress=False)
    sub = p.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_list(sub)
    _add_report(sub)
    _add_compare(sub)
    return p


# -- compare (statistics): the paired comparison of two rows -----------------------------------------------------
def _add_compare(sub) -> None:
    cmp = sub.add_parser("compare", help="paired bootstrap comparison of two rows (of one report, or two reports "
                         "on the same data)",
                         description="ussbench compare REPORT ROW_A ROW_B  |  ussbench compare REPORT_A REPORT_B "
                         "[--row-a N] [--row-b N]. A row is its line number in the leaderboard or a piece of its label.")  # fmt: skip
    cmp.add_argument("first", help="a report folder")
    cmp.add_argument("second", help="a row of the first report, or a second report folder")
    cmp.add_argument("third", nargs="?", help="the other row of the first report")
    cmp.add_argument(
        "--row-a", default="1", help="row of the first folder when comparing two folders (default 1)"
    )
    cmp.add_argument(
        "--row-b", default="1", help="row of the second folder when comparing two folders (default 1)"
    )
    _logging_options(cmp, suppress=True)
    cmp.add_argument(
        "--resamples", type=_replicates, default=1000, help="bootstrap replicates (default 1000)"
    )
    cmp.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")


def _replicates(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of bootstrap replicates, got {text!r}")
    return int(text)


def cmd_compare(args: argparse.Namespace) -> int:
    from .reports.compare import compare

    print(compare(args.first, args.second, args.third, args.row_a, args.row_b, args.resamples, args.seed))
    return 0


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

    overrides = {"data_root": args.data_root, "output": args.output, "cache_dir": args.cache_dir,
                 "device": args.device, "seeds": args.seeds}  # fmt: skip
    grid = load_grid(args.grid, overrides, sets=args.sets)
    if args.limit is not None:
        grid = limit_images(grid, args.limit)
    if args.dry_run:
        from .dryrun import describe

        print("\n".join(describe(grid, reuse_committed=args.reuse_committed)))
        return 0
    from .graph.ray_executor import make_executor
    from .runner import run_grid

    executor = make_executor(args.executor, args.address, args.max_retries)
    log.info("grid %s from %s; data root %s", grid.name, grid.path, grid.data_root)
    summary = run_grid(grid, progress=not args.no_progress, report=not args.no_report, executor=executor,
                       reuse_committed=args.reuse_committed)  # fmt: skip
    failed = f", {summary.n_failed} failed" if summary.n_failed else ""
    reported = not args.no_report and summary.n_failed < summary.n_cells  # as run_grid decides
    target = f"{summary.output}/leaderboard.md" if reported else f"{summary.output} (no report written)"
    print(f"grid {grid.name}: {summary.n_cells} cells ({summary.n_run} run, {summary.n_resumed} resumed{failed}) "
          f"in {summary.total_seconds:.1f} s ({summary.seconds:.1f} s computing cells) -> {target}")  # fmt: skip
    if summary.n_failed:  # failed cells were recorded and the grid went on; the exit code says so
        log_file = summary.output / "errors.log"
        print(f"ussbench: {summary.n_failed} cell(s) failed; see {log_file}", file=sys.stderr)
        return 1
    return 0


def cmd_report(output: str, name: str | None, all_cells: bool = False) -> int:
    from .reports.build import build_report
    from .reports.records import report_scope

    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"report folder {output!r} is a file; name a grid's output folder (reports/<grid>)")
    if not out.is_dir():
        raise ConfigError(f"report folder {output!r} does not exist")
    if (
        not any((out / "cells").glob("*.json")) and not (out / "results.parquet").is_file()
    ):  # committed: parquet
        raise ConfigError(
            f"{output!r} holds no finished cells ({out / 'cells'}/*.json) and no results.parquet: not a grid output "
            "folder, or no cell has finished yet (run the grid first)"
        )
    cell_ids, scope = report_scope(out, all_cells)
    paths = build_report(out, grid_name=name or _latest_grid_name(out), cell_ids=cell_ids, scope=scope)
    print(f"report written: {paths['markdown']}")
    return 0


def _latest_grid_name(folder: Path) -> str:
    """The grid name of the folder's latest run (run.json), else the folder's name."""
    from .provenance import read_run

    run = read_run(folder)
    history = run.get("history") or [{}]
    return str(history[-1].get("grid_name") or (run.get("grid") or {}).get("name") or folder.resolve().name)


def _setup_logging(args: argparse.Namespace) -> None:
    """Send ussbench's log records to stderr through tqdm (bars stay intact) at the level asked for."""
    from tqdm.auto import tqdm

    class TqdmHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                tqdm.write(self.format(record), file=sys.stderr)
            except Exception:  # noqa: BLE001 - logging must never raise
                self.handleError(record)

    level = args.log_level or ("DEBUG" if args.verbose >= 2 else "INFO" if args.verbose == 1 else "WARNING")
    for handler in [h for h in log.handlers if getattr(h, "_ussbench_cli", False)]:
        log.removeHandler(handler)
    handler = TqdmHandler()
    handler._ussbench_cli = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _setup_logging(args)
    try:
        if args.command == "list":
            return cmd_list(args.kind, args.plugins)
        if args.command == "run":
            return cmd_run(args)
        if args.command == "compare":
            return cmd_compare(args)
        if args.command == "report":
            return cmd_report(args.output, args.name, args.all_cells)
    except UssbenchError as exc:
        print("ussbench: error: " + " ".join(str(exc).splitlines()), file=sys.stderr)
        return 2
    except OSError as exc:  # the file system refused (disk full, permissions changed mid-run): one line
        log.debug("file system error", exc_info=True)
        print(f"ussbench: error: {exc} (finished cells are kept; run again to resume)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ussbench: interrupted (finished cells are kept; run again to resume)", file=sys.stderr)
        return 130
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
