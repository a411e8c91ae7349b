"""The leaderboard's "Failed cells" section: cells of the grid whose computation raised (see errors.log)."""

from __future__ import annotations

import html
from pathlib import Path

from ..graph.cells import STAGE_ORDER
from ..graph.records import load_failed


def failed_rows(output: Path, cell_ids: set[str] | None = None) -> list[dict]:
    """The failure rows (stage labels, seed, error) of the grid's cells that have no finished record."""
    rows = [f["row"] for f in load_failed(output)]
    return [r for r in rows if cell_ids is None or r.get("cell_id") in cell_ids]


def _table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    stages = [k for k in STAGE_ORDER if any(k in r for r in rows)]
    head = ["cell", *stages, "seed", "error"]
    body = [[r.get("cell_id", ""), *[str(r.get(k, "")) for k in stages], str(r.get("seed", "")),
             str(r.get("error", ""))] for r in rows]  # fmt: skip
    return head, body


def failures_markdown(output: Path, cell_ids: set[str] | None = None) -> str:
    """Markdown section listing failed cells ('' when none failed)."""
    rows = failed_rows(output, cell_ids)
    if not rows:
        return ""
    head, body = _table(rows)
    lines = ["", "## Failed cells", "",
             f"{len(rows)} cell(s) raised an error and are missing from the leaderboard above (their rows have "
             "fewer seeds or are absent); full tracebacks in `errors.log`. A new run retries them.", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]  # fmt: skip
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def failures_html(output: Path, cell_ids: set[str] | None = None) -> str:
    """HTML section listing failed cells ('' when none failed)."""
    rows = failed_rows(output, cell_ids)
    if not rows:
        return ""
    head, body = _table(rows)
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return (f"<h2>Failed cells</h2><p>{len(rows)} cell(s) raised an error (tracebacks in errors.log).</p>"
            f"<table><tr>{header}</tr>{cells}</table>")  # fmt: skip
