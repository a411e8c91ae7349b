"""The report header: data actually scored, protocol, statistics method, provenance and mixed-origin flags.

Lines are Markdown (``code``, **bold**); the HTML page renders the same lines.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pandas as pd

from ..provenance import environment_signature
from .comparisons import BoardStatistics, row_cells

FLAG = "†"


def origin_flags(board: pd.DataFrame, cells: list[dict[str, Any]]) -> tuple[pd.Series, list[str]]:
    """A marker per board row whose cells come from a code version or machine other than the most common one,
    and header lines describing the origins (code versions, machines)."""
    signatures = {
        c["row"]["cell_id"]: environment_signature(c["row"].get("environment") or {}) for c in cells
    }
    codes = Counter(s[0] for s in signatures.values())
    machines = Counter(s[1] for s in signatures.values())
    main_code, main_machine = codes.most_common(1)[0][0], machines.most_common(1)[0][0]
    flags = []
    for _, cfg in board.iterrows():
        sigs = [signatures[c["row"]["cell_id"]] for c in row_cells(cells, cfg)]
        odd = any(code != main_code or machine != main_machine for code, machine in sigs)
        flags.append(FLAG if odd else "")
    lines = []
    if len(codes) == 1:
        lines.append(f"Code: {main_code} (every cell).")
    else:
        listed = "; ".join(f"{code} ({n} cells)" for code, n in codes.most_common())
        lines.append(f"**Cells come from {len(codes)} code versions**: {listed}. Rows marked {FLAG} have cells "
                     f"from a version or machine other than the most common.")  # fmt: skip
    if len(machines) == 1:
        lines.append(f"Machine: {main_machine} (every cell).")
    else:
        listed = "; ".join(f"{m} ({n} cells)" for m, n in machines.most_common())
        lines.append(f"**Cells come from {len(machines)} machines**: {listed}. Rows marked {FLAG} differ from the most "
                     "common (scores of the same seed can differ between machines).")  # fmt: skip
    return pd.Series(flags, index=board.index), lines


def images_line(cells: list[dict[str, Any]]) -> str:
    """How many images each dataset's cells really scored (not what the dataset card says)."""
    per_dataset: dict[str, set[int]] = {}
    limits: dict[str, set[Any]] = {}
    for c in cells:
        name = c["row"]["dataset"]
        per_dataset.setdefault(name, set()).add(int(c["row"].get("n_images", 0)))
        limit = ((c.get("params") or {}).get("dataset", {}).get("params") or {}).get("limit")
        limits.setdefault(name, set()).add(limit)
    parts = []
    for name, counts in per_dataset.items():
        n = "/".join(str(x) for x in sorted(counts))
        limit = sorted(str(x) for x in limits[name] if x)
        parts.append(f"**{n} images scored** on `{name}`" + (f" (`--limit {', '.join(limit)}`)" if limit else "")
                     + (" (cells differ in image count!)" if len(counts) > 1 else ""))  # fmt: skip
    return "Images: " + "; ".join(parts) + "."


MIOU_RULE = ("A class absent from them is marked 'absent' in the per-class tables; it still counts in mIoU with "
             "IoU 0 when some pixel is predicted as it (a cluster matched to it is not empty: STEGO's rule), and is "
             "left out of the mean only when none is.")  # fmt: skip
MAX_NAMED = 8  # absent classes named in the header; more are counted


def classes_line(cells: list[dict[str, Any]], pixels: dict[str, dict[str, int]]) -> str | None:
    """How many of each dataset's classes occur in the ground truth of the scored images, and how mIoU treats
    the others (a class absent there reads IoU 0 or nan, which is no measurement of it)."""
    present: dict[str, set[frozenset[str]]] = {}
    names: dict[str, list[str]] = {}
    for c in cells:
        counted = pixels.get(c["row"]["cell_id"])
        if counted is not None:
            dataset = c["row"]["dataset"]
            names.setdefault(dataset, list(counted))
            present.setdefault(dataset, set()).add(frozenset(n for n, v in counted.items() if v > 0))
    if not present:
        return None
    parts = [_dataset_classes(d, names[d], present[d]) for d in present]
    absent = any(len(s) < len(names[d]) for d in present for s in present[d])
    return "Classes: " + "; ".join(parts) + "." + (f" {MIOU_RULE}" if absent else "")


def _dataset_classes(dataset: str, names: list[str], present: set[frozenset[str]]) -> str:
    """'3 of 4 classes of `d` occur in the scored images (absent: car)' for one dataset."""
    sizes = sorted({len(s) for s in present})
    if sizes == [len(names)]:
        return f"all {len(names)} classes of `{dataset}` occur in the scored images"
    absent = [n for n in names if not any(n in s for s in present)]
    shown = ", ".join(absent[:MAX_NAMED]) + (
        f" and {len(absent) - MAX_NAMED} more" if len(absent) > MAX_NAMED else ""
    )
    differ = " (its cells differ)" if len(sizes) > 1 else ""
    return (f"{'/'.join(map(str, sizes))} of {len(names)} classes of `{dataset}` occur in the scored images{differ}"
            + (f" (absent: {shown})" if absent else ""))  # fmt: skip


def statistics_lines(stats: BoardStatistics | None) -> list[str]:
    if stats is None or not stats.available:
        why = "; ".join(stats.notes) if stats is not None and stats.notes else ""
        if not why or "without per-image counts" in why:
            why = "no cell of this report stored per-image counts; rerun the grid to get them"
        return [f"Intervals: unavailable ({why}); mean ± std over seeds only."]
    rule = ", ".join(f"{k} `{v}`" for k, v in stats.baseline_rule.items())
    lines = [
        f"Statistics: {stats.method()}. Mean ± std over seeds beside it.",
        f"Baseline row: {rule} (grid key `baseline:` names another); Δ = row − baseline on the same images, "
        "paired by seed (rows that ran different seeds: on the seeds both ran, as a note below says).",
        "Rank: a range `a–b` where rows cannot be told apart: a = 1 + rows whose paired interval vs this row lies "
        "above 0, b = rows − rows it beats that way (pairwise, no multiple-comparison correction).",
        "CI width and 'to halve it': width ∝ sqrt(V_images·N0/N + s²_seeds/S); the seeds (same images) or the "
        "factor of images (same seeds) that would halve the interval.",
    ]
    lines += stats.notes
    return lines


def probe_line(board: pd.DataFrame, cells: list[dict[str, Any]]) -> str | None:
    if "probe_miou" not in board or not board.probe_miou.notna().any():
        return None
    info = next((c["row"].get("probe") for c in cells if isinstance(c["row"].get("probe"), dict)), None) or {}
    folds = info.get("folds", "k")
    return (f"Linear probe (supervised reference): a linear classifier on each row's representation (raw tokens or "
            f"the learner's codes), patch labels = majority class per patch, {folds}-fold over the evaluated images "
            "(MSRC-v2 and CamVid test have no training split here: trained and scored on held-out folds of the same "
            "images), scored per pixel (nearest upsampling) with no cluster matching.")  # fmt: skip


def history_line(run: dict[str, Any]) -> str | None:
    history = run.get("history") or []
    if not history:
        return None
    last = history[-1]
    cmd = last.get("command")
    parts = [f"{len(history)} run(s) into this folder (history in `run.json`)"]
    if cmd:
        parts.append(f"latest `{cmd}`")
    if last.get("limit") and not cmd:  # the command line already shows them
        parts.append(f"--limit {last['limit']}")
    if last.get("set") and not cmd:
        parts.append("--set " + " ".join(last["set"]))
    if last.get("ended") is None and not last.get("legacy"):
        parts.append("(did not finish, or is running)")
    return "Runs: " + ", ".join(parts) + "."
