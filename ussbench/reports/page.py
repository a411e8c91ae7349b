"""The HTML leaderboard: one static page (inline CSS and JS, no server, no CDN) that opens from disk.

Sortable columns (click a header; again to reverse), intervals drawn as bars, per-class IoU of any row on
demand (its "classes" button), the provenance header rendered, the figures inline.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .comparisons import decided_summary, row_cells, row_label
from .tables import STAGE_COLUMNS, per_class_frame, times_note

if TYPE_CHECKING:
    from .build import Report

_NUMBER = re.compile(r"^[<>≤≥\[]?\s*([+\-−]?\d+(?:\.\d+)?(?:e[+\-]?\d+)?)")

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1500px;margin:1.5em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
ul.meta{font-size:13px;line-height:1.45}ul.meta li{margin:.15em 0}
code{background:#f3f3f3;padding:0 3px;border-radius:3px;font-size:92%}
.wrap{overflow-x:auto}
table{border-collapse:collapse;font-size:12.5px}
td,th{border:1px solid #d6d6d6;padding:3px 6px;white-space:nowrap}
th{background:#eef1f5;position:sticky;top:0}
table.sortable th{cursor:pointer;user-select:none}
table.sortable th:hover{background:#dde4ee}
th[aria-sort=ascending]::after{content:" \\25B2";font-size:9px}
th[aria-sort=descending]::after{content:" \\25BC";font-size:9px}
tr:nth-child(even) td{background:#fafafa}
tr.baseline td{background:#fff8e1}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.bar{position:relative;display:inline-block;width:110px;height:10px;background:#f0f0f0;margin-right:6px;vertical-align:middle;border-radius:2px}
.bar .ci{position:absolute;top:2px;height:6px;background:#5b8def;border-radius:2px}
.bar .ci.neg{background:#d9534f}.bar .ci.zero{background:#9e9e9e}
.bar .pt{position:absolute;top:0;width:2px;height:10px;background:#123}
.bar .z{position:absolute;top:-1px;width:1px;height:12px;background:#777}
button.cls{font-size:11px;padding:0 5px;cursor:pointer}
#classes{margin-top:1em;font-size:12.5px}
#classes .b{display:inline-block;height:9px;background:#5b8def;vertical-align:middle}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{font-size:13px;color:#555}
.note{font-size:12.5px;color:#555}
"""

SCRIPT = """
(function(){
  function key(td, numeric){
    var v = td.getAttribute('data-v');
    if (numeric){ var x = parseFloat(v); return isNaN(x) ? null : x; }
    return v === null ? '' : v.toLowerCase();
  }
  function sortBy(th){
    var table = th.closest('table'), tbody = table.tBodies[0];
    var idx = Array.prototype.indexOf.call(th.parentNode.children, th);
    var numeric = th.getAttribute('data-type') === 'num';
    var current = th.getAttribute('aria-sort');
    var dir = current ? (current === 'ascending' ? -1 : 1) : (numeric && th.getAttribute('data-best') === 'high' ? -1 : 1);
    var rows = Array.prototype.slice.call(tbody.rows);
    rows.forEach(function(r, i){ r._i = i; });
    rows.sort(function(a, b){
      var x = key(a.cells[idx], numeric), y = key(b.cells[idx], numeric);
      if (x === null && y === null) return a._i - b._i;
      if (x === null) return 1;
      if (y === null) return -1;
      if (x < y) return -dir;
      if (x > y) return dir;
      return a._i - b._i;
    });
    rows.forEach(function(r){ tbody.appendChild(r); });
    Array.prototype.forEach.call(th.parentNode.children, function(h){ h.removeAttribute('aria-sort'); });
    th.setAttribute('aria-sort', dir === 1 ? 'ascending' : 'descending');
  }
  document.querySelectorAll('table.sortable th').forEach(function(th){
    th.addEventListener('click', function(){ sortBy(th); });
  });
  var data = JSON.parse(document.getElementById('per-class-data').textContent);
  function show(id){
    var d = data[id], box = document.getElementById('classes');
    if (!d) return;
    var rows = d.classes.map(function(c, i){
      var v = d.iou[i];
      var cell = d.absent[i] ? 'absent' : v === null ? 'n/a' : '<span class="b" style="width:' + Math.max(0, v) * 2 + 'px"></span> ' + v.toFixed(2);
      return '<tr><td>' + c + '</td><td class="num">' + cell + '</td></tr>';
    }).join('');
    box.innerHTML = '<h3>Per-class IoU (%): ' + d.label + ' <span class="note">(mean over ' + d.seeds +
      ' seed(s))</span></h3><table><thead><tr><th>class</th><th>IoU (%)</th></tr></thead><tbody>' + rows + '</tbody></table>';
    box.scrollIntoView({block: 'nearest'});
  }
  document.querySelectorAll('button.cls').forEach(function(b){
    b.addEventListener('click', function(ev){ ev.stopPropagation(); show(b.getAttribute('data-row')); });
  });
})();
"""


def inline_markdown(text: str) -> str:
    """Escape, then render the header's Markdown: `code` and **bold**."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def sort_value(text: Any) -> str:
    """The number a displayed cell sorts by ('13.24 ± 1.00' -> 13.24, '2–4' -> 2, '[1.2, 3]' -> 1.2, a bounded
    p-value '≤ 1.0e-03' -> 1.0e-03, 'n/a' -> '')."""
    if isinstance(text, (int, float, np.integer, np.floating)):
        return "" if isinstance(text, float) and math.isnan(text) else repr(float(text))
    m = _NUMBER.match(str(text).strip())
    return m.group(1).replace("−", "-") if m else ""


def _bar(lo: float, mid: float, hi: float, scale: tuple[float, float], zero: bool = False) -> str:
    a, b = scale
    span = (b - a) or 1.0

    def pos(x: float) -> float:
        return 100.0 * (min(max(x, a), b) - a) / span

    cls = "ci"
    if zero:
        cls += " neg" if hi < 0 else (" zero" if lo <= 0 <= hi else "")
    parts = [f"<span class='{cls}' style='left:{pos(lo):.1f}%;width:{max(pos(hi) - pos(lo), 0.8):.1f}%'></span>",
             f"<span class='pt' style='left:{pos(mid):.1f}%'></span>"]  # fmt: skip
    if zero:
        parts.append(f"<span class='z' style='left:{pos(0.0):.1f}%'></span>")
    return f"<span class='bar' title='[{lo:.2f}, {hi:.2f}]'>{''.join(parts)}</span>"


def _scale(values: list[float], include_zero: bool = False) -> tuple[float, float]:
    finite = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if include_zero:
        finite.append(0.0)
    if not finite:
        return (0.0, 1.0)
    lo, hi = min(finite), max(finite)
    pad = 0.03 * ((hi - lo) or 1.0)
    return (lo - pad, hi + pad)


def _bars(report: Report) -> dict[str, list[str | None]]:
    """Interval bars for the mIoU, pixel-accuracy and Δ columns (None where a row has no interval)."""
    t = report.stats.table
    b = report.board
    out: dict[str, list[str | None]] = {}
    if not report.stats.available:
        return out
    for col, lo, hi, mid in (("mIoU 95% CI", "miou_lo", "miou_hi", "miou_mean"),
                             ("acc. 95% CI", "acc_lo", "acc_hi", "acc_mean")):  # fmt: skip
        scale = _scale(list(t[lo].astype(float)) + list(t[hi].astype(float)))
        out[col] = [None if pd.isna(r[lo]) else _bar(float(r[lo]), float(m), float(r[hi]), scale)
                    for (_, r), m in zip(t.iterrows(), b[mid])]  # fmt: skip
    if t["delta"].notna().any():
        scale = _scale(list(t.delta_lo.astype(float)) + list(t.delta_hi.astype(float)), include_zero=True)
        out["Δ mIoU vs baseline"] = [None if pd.isna(r.delta) or r.is_baseline else
                                     _bar(float(r.delta_lo), float(r.delta), float(r.delta_hi), scale, zero=True)
                                     for _, r in t.iterrows()]  # fmt: skip
    return out


_HIGH_IS_BEST = ("mIoU", "acc", "Δ", "probe", "NFCov", "paper")


def leaderboard_table(report: Report) -> str:
    shown = report.display()
    bars = _bars(report)
    text_cols = set(STAGE_COLUMNS)
    head = []
    for col in shown.columns:
        numeric = col not in text_cols
        best = "high" if any(col.startswith(p) for p in _HIGH_IS_BEST) else "low"
        slug = re.sub(r"[^a-z0-9]+", "-", str(col).lower()).strip("-")
        head.append(f"<th data-key='{slug}' data-type='{'num' if numeric else 'text'}' data-best='{best}'"
                    f" title='click to sort'>{html.escape(str(col))}</th>")  # fmt: skip
    head.append("<th data-key='classes' data-type='text'>per class</th>")
    body = []
    baseline = (
        report.stats.table["is_baseline"] if report.stats.available else pd.Series(False, index=shown.index)
    )
    for pos, (i, row) in enumerate(shown.iterrows()):
        tds = []
        for col, value in row.items():
            numeric = col not in text_cols
            v = sort_value(value) if numeric else str(value)
            content = html.escape(str(value))
            if col in bars and bars[col][pos]:
                content = bars[col][pos] + content
            tds.append(
                f"<td{' class=num' if numeric else ''} data-v='{html.escape(v, quote=True)}'>{content}</td>"
            )
        tds.append(f"<td data-v=''><button class='cls' data-row='r{i}'>classes</button></td>")
        cls = " class='baseline'" if bool(baseline.get(i, False)) else ""
        body.append(f"<tr{cls} data-row='r{i}'>{''.join(tds)}</tr>")
    return (f"<div class='wrap'><table id='leaderboard' class='sortable'><thead><tr>{''.join(head)}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table></div>")  # fmt: skip


def per_class_data(report: Report) -> dict[str, Any]:
    """Each row's per-class IoU for its "classes" button: null and absent: true where no scored image has it."""
    out = {}
    for i, cfg in report.board.iterrows():
        chosen = row_cells(report.cells, cfg)
        if not chosen:
            continue
        rows = per_class_frame(chosen, report.class_pixels)
        out[f"r{i}"] = {"label": html.escape(f"{row_label(cfg)} ({cfg['dataset']})"), "seeds": len(chosen),
                        "classes": [html.escape(str(c)) for c in rows["class"]],
                        "iou": [None if not p or pd.isna(v) else round(float(v), 2)
                                for v, p in zip(rows["iou"], rows["present"])],
                        "absent": [not p for p in rows["present"]]}  # fmt: skip
    return out


def _frame_table(frame: pd.DataFrame) -> str:
    return frame.to_html(
        index=False, escape=True, border=0, classes="plain", na_rep="", float_format=lambda v: f"{v:g}"
    )


def render(report: Report, figures: list[tuple[str, str]]) -> str:
    """The whole page."""
    title = html.escape(report.grid_name)
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        f"<title>Leaderboard: {title}</title><style>{STYLE}</style></head><body>",
        "<p class='note'><a href='../index.html'>all reports</a></p>" if report.written.get("index") else "",
        f"<h1>Leaderboard: {title}</h1><ul class='meta'>",
        *[f"<li>{inline_markdown(line)}</li>" for line in report.header_lines()],
        "</ul><h2>Leaderboard</h2>",
        "<p class='note'>Click a column header to sort (again to reverse). Bars: the 95% interval (box) and the "
        "point estimate (tick); in the Δ column the grey line is 0 and a grey box means the interval contains it. "
        "“classes” shows a row's per-class IoU below the table.</p>",
        leaderboard_table(report),
        "<div id='classes'></div>",
        f"<p class='note'>{html.escape(times_note(report.board))}</p>",
    ]
    if report.stats.available:
        parts += ["<h2>Which differences are decided</h2><ul class='meta'>",
                  *[f"<li>{inline_markdown(line)}</li>" for line in decided_summary(report.board, report.stats)],
                  "</ul>"]  # fmt: skip
    if report.refs is not None and not report.refs.empty:
        parts += ["<h2>Published numbers (registry cards)</h2>",
                  "<p class='note'>From other datasets/backbones/protocols; compare only where the setting matches.</p>",
                  f"<div class='wrap'>{_frame_table(report.refs.fillna(''))}</div>"]  # fmt: skip
    best = report.board.iloc[0]
    parts += [f"<h2>Per-class IoU of the best configuration ({html.escape(row_label(best))})</h2>",
              _frame_table(report.per_class)]  # fmt: skip
    if report.absent_note():
        parts.append(f"<p class='note'>{html.escape(report.absent_note())}</p>")
    parts.append("<h2>Figures</h2>")
    for key, caption in figures:
        path = report.written.get(key)
        if path:
            name = html.escape(Path(path).name, quote=True)
            parts.append(f"<figure><img src='{name}' alt='{html.escape(caption, quote=True)}' loading='lazy'>"
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")  # fmt: skip
    parts += [
        "<p class='note'>Every cell x seed: <a href='results.csv'>results.csv</a>; per-image counts: "
        "<code>per_image_counts.npz</code>; run history: <a href='run.json'>run.json</a>.</p>",
        f"<script type='application/json' id='per-class-data'>{_json_for_script(per_class_data(report))}</script>",
        f"<script>{SCRIPT}</script></body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _json_for_script(obj: Any) -> str:
    return json.dumps(obj).replace("</", "<\\/")
