"""Classes absent from the scored images: marked 'absent' (not 0.0, not nan) in every per-class table, and
counted in the header, from the ground-truth pixels of the per-image counts."""

from __future__ import annotations

import json
import re
import shutil

import pytest

from tests._report_fakes import CLASSES, read_json, write_fake_cells
from ussbench.reports.build import build_report

ABSENT = 3  # 'car' occurs in no scored image


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """'perfect' predicts no pixel as car (IoU undefined); 'good' does (IoU 0.0, counted in its mIoU)."""
    out = tmp_path_factory.mktemp("absent") / "reports" / "toy"
    write_fake_cells(out, {"raw tokens": 0.35, "perfect": 1.0, "good": 0.8}, absent=(ABSENT,))
    build_report(out, "toy", n_resamples=50)
    return out


def _markdown_classes(md: str) -> dict[str, str]:
    """class -> shown IoU of the markdown per-class table."""
    section = md.split("## Per-class IoU", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")][1:]
    return {name.strip(): value.strip() for name, value in rows}


def _html_classes(html: str) -> dict[str, str]:
    """class -> shown IoU of the static per-class table of the HTML page."""
    section = html.split("<h2>Per-class IoU", 1)[1].split("<h2>", 1)[0]
    cells = re.findall(r"<td>([^<]*)</td>", section)
    return dict(zip(cells[::2], cells[1::2]))


def _per_class_json(html: str) -> dict:
    return json.loads(html.split("id='per-class-data'>", 1)[1].split("</script>", 1)[0])


def test_the_fake_rows_score_the_absent_class_both_ways(report):
    """The data the other tests rely on: the recorded IoU of car is nan for one row and 0.0 for the other."""
    good = read_json(report / "cells" / "toyset-good-0.json")["per_class_iou"]
    perfect = read_json(report / "cells" / "toyset-perfect-0.json")["per_class_iou"]
    assert good["car"] == 0.0 and perfect["car"] is None


def test_markdown_and_html_mark_absent_classes_alike(report):
    md = (report / "leaderboard.md").read_text()
    html = (report / "leaderboard.html").read_text()
    assert "Per-class IoU of the best configuration (perfect + k-means on toyset)" in md
    for shown in (_markdown_classes(md), _html_classes(html)):
        assert shown["car"] == "absent"
        assert all(float(shown[name]) > 0 for name in CLASSES if name != "car")
    for row in _per_class_json(html).values():  # every row's on-demand table, 0.0 and nan alike
        marks = dict(zip(row["classes"], zip(row["iou"], row["absent"])))
        assert marks["car"] == (None, True)
        assert all(marks[name][0] > 0 and not marks[name][1] for name in CLASSES if name != "car")


def test_header_counts_the_classes_that_occur_and_states_the_miou_rule(report):
    md = (report / "leaderboard.md").read_text()
    assert "3 of 4 classes of `toyset` occur in the scored images (absent: car)" in md
    assert "counts in mIoU with IoU 0" in md
    html = (report / "leaderboard.html").read_text()
    assert "3 of 4 classes of <code>toyset</code> occur in the scored images" in html


def test_a_committed_folder_marks_them_from_the_per_image_store(report, tmp_path):
    folder = shutil.copytree(report, tmp_path / "toy")
    shutil.rmtree(folder / "cells")  # a fresh clone: results.parquet and per_image_counts.npz only
    build_report(folder, "toy", n_resamples=50)
    md = (folder / "leaderboard.md").read_text()
    assert _markdown_classes(md)["car"] == "absent" and "3 of 4 classes" in md


def test_every_class_occurring_is_said_too(tmp_path):
    out = tmp_path / "all"
    write_fake_cells(out, {"raw tokens": 0.35, "good": 0.8}, seeds=(0,), n_images=5)
    build_report(out, "all", n_resamples=20)
    md = (out / "leaderboard.md").read_text()
    assert "all 4 classes of `toyset` occur in the scored images" in md
    assert "absent" not in "".join(_markdown_classes(md).values())


def test_a_results_table_without_class_order_names_no_wrong_class(report, tmp_path):
    """Older results tables keep the per-class IoU sorted by name only: the counts' class axis cannot be named,
    so no class is called absent from the counts (index 3 is 'car' in the data, 'tree' alphabetically)."""
    import pandas as pd

    folder = shutil.copytree(report, tmp_path / "old")
    shutil.rmtree(folder / "cells")
    results = pd.read_parquet(folder / "results.parquet")
    results.drop(columns="class_names").to_parquet(folder / "results.parquet", index=False)
    build_report(folder, "old", n_resamples=50)
    md = (folder / "leaderboard.md").read_text()
    shown = _markdown_classes(md)
    assert shown["car"] == "absent"  # its IoU is undefined in every seed: no scored pixel, none predicted
    assert float(shown["tree"]) > 0 and "- Classes:" not in md


@pytest.mark.parametrize("plugin_classes", [CLASSES, ["sky", "road", "tree", "bus"]])
def test_an_older_results_table_takes_its_class_order_from_the_dataset_plugin(
    report, tmp_path, plugin_classes
):
    """A results table without class_names, of a registered dataset: the plugin's class list (built from the
    row's recorded parameters) names the counts' class axis when it names exactly the row's classes."""
    import pandas as pd

    from ussbench import registry
    from ussbench.base import Dataset

    class ToySet(Dataset):
        def __init__(self):
            self.class_names = list(plugin_classes)
            self.num_classes = len(plugin_classes)

        def ids(self):
            return []

        def load_image(self, index):
            raise IndexError(index)

        def load_label(self, index):
            raise IndexError(index)

    registry.register("dataset", "toyset")(ToySet)
    try:
        folder = shutil.copytree(report, tmp_path / "old")
        shutil.rmtree(folder / "cells")
        results = pd.read_parquet(folder / "results.parquet")
        results.drop(columns="class_names").to_parquet(folder / "results.parquet", index=False)
        build_report(folder, "old", n_resamples=50)
    finally:
        registry.unregister("dataset", "toyset")
    md = (folder / "leaderboard.md").read_text()
    if plugin_classes == CLASSES:
        assert "3 of 4 classes of `toyset` occur in the scored images (absent: car)" in md
    else:  # the plugin names another class list: the order stays unknown, no class is named from the counts
        assert "- Classes:" not in md
