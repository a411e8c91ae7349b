"""benchmarks/study_tables.py: study numbers beside ours, ratios to the reference row, claims by paired intervals."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "study_tables.py"


@pytest.fixture(scope="module")
def st():
    spec = importlib.util.spec_from_file_location("study_tables", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_report(folder: Path, st, miou: dict[tuple[str, str], list[float]]) -> None:
    rows = [
        {"image_clusterer": ic, "dataset_clusterer": dc, "seed": seed, "miou": v, "time_total_s": 1.0}
        for (ic, dc), values in miou.items()
        for seed, v in enumerate(values)
    ]
    pd.DataFrame(rows).to_parquet(folder / "results.parquet")


def claim_line(text: str, table: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(f"| {table}"))


def test_ratios_and_claims_follow_the_per_seed_values(tmp_path, st):
    km = [10.0, 11.0, 12.0]
    miou = {(ic, dc): km for _, _, _, ic, dc in st.ROWS}
    miou[(st.DSM, st.KM)] = km
    miou[(st.MASKED, st.KM)] = [k - 2.0 + 0.1 * i for i, k in enumerate(km)]  # clearly below DSM
    miou[(st.ACG, st.KM)] = [k + 1.0 + 0.1 * i for i, k in enumerate(km)]  # clearly above the masked row
    miou[(st.DSM, "OTC")] = [k + 0.05 * (-1) ** i for i, k in enumerate(km)]  # ~ KMeans
    miou[(st.DSM, st.ABC_STUDY)] = [5.0, 6.0, 7.0]  # 5 below KMeans
    miou[(st.DSM, "KMeans cos")] = [k + 3.0 + 0.2 * i for i, k in enumerate(km)]  # differs by > 1
    write_report(tmp_path, st, miou)
    text = st.tables(tmp_path)

    assert "reproduced" in claim_line(text, "Table 1: DSM > DSM masked-attention CLS")
    assert "contradicted" in claim_line(text, "Table 1: DSM masked-attention CLS > ACG")
    assert "reproduced (within +-1)" in claim_line(text, "Table 4: KMeans ~ OTC")
    assert "contradicted" in claim_line(text, "Table 4: ABC > KMeans by ~5 (study loss")
    assert "not reproduced (differ by > 1)" in claim_line(text, "Table 5: KMeans L2 ~ KMeans cos")
    # identical rows: the paired interval is [0, 0] and the claim of a strict ordering stays undecided
    assert "undecided" in claim_line(text, "Table 5: norm/std hurts OTC")

    # ratio to the same seed's DSM + KMeans: ABC (study loss) is 5/10, 6/11, 7/12
    abc = next(line for line in text.splitlines() if line.startswith("| ABC (study loss as written)"))
    cells = [c.strip() for c in abc.strip("|").split("|")]
    assert float(cells[2]) == pytest.approx(30.42 / 25.56, abs=1e-3)  # the study's ratio
    assert float(cells[7]) == pytest.approx((5 / 10 + 6 / 11 + 7 / 12) / 3, abs=1e-3)


def test_one_seed_leaves_every_claim_undecided(tmp_path, st):
    write_report(tmp_path, st, {(ic, dc): [10.0] for _, _, _, ic, dc in st.ROWS})
    text = st.tables(tmp_path)
    claims = text.split("claims")[1]
    assert claims.count("undecided (one seed)") == len(st.CLAIMS)


def test_rows_a_grid_cut_read_not_run(tmp_path, st):
    values = {(ic, dc): [10.0, 11.0, 12.0] for _, _, _, ic, dc in st.ROWS if ic != st.MASKED}
    write_report(tmp_path, st, values)
    text = st.tables(tmp_path)
    masked = next(line for line in text.splitlines() if line.startswith("| DSM: masked attention"))
    assert "not run (not in this grid)" in masked
    assert "not run (not in this grid)" in claim_line(text, "Table 1: DSM > DSM masked-attention CLS")
    assert "not run" not in claim_line(text, "Table 1: DSM > ACG")


def test_a_study_settings_report_is_read_through_its_own_labels(tmp_path, st):
    """reports/study_*_full name DSM, ACG and the two ABC rows differently; the same roles are found."""
    full = {(st.FULL_LABELS.get(ic, ic), st.FULL_LABELS.get(dc, dc)): [10.0, 11.0, 12.0]
            for _, _, _, ic, dc in st.ROWS if dc != "ABC MLP (100 ep.)"}  # fmt: skip
    full[(st.FULL_LABELS[st.ACG], st.KM)] = [7.0, 8.1, 9.0]
    full[(st.FULL_LABELS[st.DSM], "ABC Identical (500 ep.)")] = [5.0, 6.1, 7.0]
    write_report(tmp_path, st, full)
    text = st.tables(tmp_path)
    assert "reproduced" in claim_line(text, "Table 1: DSM > ACG")
    acg = next(line for line in text.splitlines() if line.startswith("| ACG (their implementation)"))
    assert "ACG (400 ep., crop CLS) + KMeans L2" in acg and "8.03" in acg
    assert "not run" in claim_line(text, "Table 2: MLP > 2xAttn+MLP")  # this report has no MLP row
    assert "reproduced" in claim_line(text, "Table 2: 2xAttn+MLP > Identical")  # read from the 500-epoch rows
    assert "not run" not in claim_line(text, "Table 4: ABC > KMeans by ~5 (bounds on argmax counts)")
    for line in text.split("claims")[1].splitlines():  # every claim row has the header's 7 columns
        if line.startswith("| Table"):
            assert line.count("|") == 8, line


def test_diagnosis_reads_the_abc_cluster_sizes_of_each_cell(tmp_path, toy_root):
    """benchmarks/study_diagnosis.py reports ABC's hard cluster sizes from the cells' pickle-free artifacts."""
    from conftest import tiny_grid

    from ussbench.config import load_grid
    from ussbench.runner import run_grid

    spec = importlib.util.spec_from_file_location("study_diagnosis", SCRIPT.with_name("study_diagnosis.py"))
    diag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(diag)
    path = tiny_grid(
        tmp_path, toy_root, seeds=[0], image_clusterers=[{"name": "kmeans_per_image", "params": {"n_segments": 4}}],
        dataset_clusterers=[{"name": "abc", "params": {"epochs": 2}, "label": "abc2"}],
    )  # fmt: skip
    grid = load_grid(path)
    run_grid(grid, progress=False, report=False)
    text = diag.diagnose(grid.output)
    line = next(line for line in text.splitlines() if "| abc2 |" in line)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells[2] == "1"  # one seed
    largest = float(cells[5])
    assert 0.0 < largest <= 1.0  # a share of the segments, read from the artifacts
    before, after = (float(v) for v in cells[7].split("/"))
    assert 0.0 <= before <= 1.0 and after == 1.0  # the calibrated assignment puts every count in bounds
