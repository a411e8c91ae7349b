"""The README's example grid file is a valid grid (a new user copies it first)."""

from __future__ import annotations

import re
from pathlib import Path

from ussbench.config import load_grid

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_grid_example_validates(tmp_path: Path) -> None:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Grid files") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    # its data_root (/data) is an example path: validate against the shipped data instead
    block = "\n".join(line for line in block.splitlines() if not line.startswith("data_root:"))
    path = tmp_path / "example.yaml"
    path.write_text(block, encoding="utf-8")
    grid = load_grid(path)  # raises on an unknown plugin, a bad key or an exclude rule that matches nothing
    assert grid.name == "msrc"
    assert len(grid.exclude) == 1
