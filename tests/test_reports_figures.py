"""The runtime figure's log axis: readable tick labels that never overlap, whatever the range of seconds."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from ussbench.reports.figures import log_ticks  # noqa: E402


def _drawn_labels(seconds: list[float]) -> list[tuple[str, float, float]]:
    """(text, left, right) of every non-empty x tick label drawn inside the axis, left to right."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter(seconds, range(len(seconds)))
    ax.set_xscale("log")
    log_ticks(ax, pd.Series(seconds))
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    lo, hi = ax.get_xlim()
    out = []
    for label in ax.xaxis.get_majorticklabels() + ax.xaxis.get_minorticklabels():
        if label.get_visible() and label.get_text().strip() and lo <= label.get_position()[0] <= hi:
            box = label.get_window_extent(renderer)
            out.append((label.get_text(), box.x0, box.x1))
    plt.close(fig)
    return sorted(out, key=lambda t: t[1])


# a narrow range is where matplotlib's default labels its minor ticks (1.2x10^1, 1.4x10^1, ...) on top of each other
@pytest.mark.parametrize(
    "seconds", [[11, 14, 19, 25], [3.1, 5.0, 12.0, 38.0], [0.4, 3, 900, 20000], [0.02, 0.05]]
)
def test_runtime_axis_labels_are_plain_and_do_not_overlap(seconds):
    labels = _drawn_labels(seconds)
    assert len(labels) >= 1
    assert all(left_label[2] <= right_label[1] for left_label, right_label in zip(labels, labels[1:])), labels
    assert all("times" not in text and "^" not in text for text, _, _ in labels), labels  # plain numbers
    assert len(labels) <= 8
    if max(seconds) / min(seconds) >= 2:
        assert len(labels) >= 2, labels  # a range gets at least two reference points
