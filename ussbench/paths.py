"""Where the project's shipped grids (``benchmarks/``) and data (``data/``) are, wherever ussbench runs from.

A source checkout (a clone, editable install or ``PYTHONPATH``) uses the folders beside the ``ussbench``
package. A regular (non-editable) install finds the copies that ``pip install`` puts under
``<prefix>/share/ussbench/`` (``pyproject.toml`` ships them as data files). Nothing depends on the current
working directory.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

from .errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
SHARE_SUBDIR = Path("share") / "ussbench"


def _installed_share() -> Path:
    return Path(sysconfig.get_path("data")) / SHARE_SUBDIR


def project_dirs(name: str) -> list[Path]:
    """Existing ``name`` folders (``benchmarks`` or ``data``) of this ussbench: the checkout's, then the installed copy's."""
    candidates = [PACKAGE_DIR.parent / name, _installed_share() / name]
    return [p for p in candidates if p.is_dir()]


def default_data_root() -> Path | None:
    """The project's shipped data folder (``data/`` of the checkout or installed copy), or None if neither exists."""
    found = project_dirs("data")
    return found[0] if found else None


def grid_dir() -> Path | None:
    """The project's folder of shipped grid files, or None if neither the checkout nor the install has one."""
    found = project_dirs("benchmarks")
    return found[0] if found else None


def shipped_grids() -> list[str]:
    """File names of the shipped grids (``*.yaml`` in the project's ``benchmarks/``)."""
    folder = grid_dir()
    return sorted(p.name for p in folder.glob("*.yaml")) if folder is not None else []


def resolve_grid_path(name: str | Path, relative_to: Path | None = None, skip: Path | None = None) -> Path:
    """A grid file by path, else by bare name in the project's ``benchmarks/`` (``.yaml`` may be left out).

    A relative path is tried against ``relative_to`` (an including grid's folder) or the current folder
    first; ``skip`` (the including grid itself, so that ``my/msrc_grid.yaml`` may extend the shipped
    ``msrc_grid.yaml``) is passed over. A name found nowhere is a ConfigError listing where it looked.
    """
    raw = Path(name).expanduser()
    if raw.is_absolute():
        candidates = [raw]
    else:
        folder = grid_dir()
        candidates = [(relative_to or Path.cwd()) / raw] + ([folder / raw] if folder is not None else [])
    if raw.suffix == "":
        candidates = [c for path in candidates for c in (path, path.with_name(path.name + ".yaml"))]
    for candidate in candidates:
        if candidate.is_file() and (skip is None or candidate.resolve() != skip.resolve()):
            return candidate
    folders = [c for c in candidates if c.is_dir()]
    if folders:
        raise ConfigError(f"grid file {str(name)!r} is a folder ({folders[0]}), not a grid file (a .yaml)")
    looked = ", ".join(dict.fromkeys(str(c.parent) for c in candidates))
    shipped = ", ".join(shipped_grids()) or "none found"
    raise ConfigError(
        f"grid file {str(name)!r} does not exist (looked in {looked}); shipped grids: {shipped}"
    )


def display_path(path: str | Path | None) -> str:
    """``path`` as a report shows it: relative to the project (``benchmarks/msrc_grid.yaml``) when it lies inside
    the checkout, so a committed report does not carry the machine's folder names; else as given."""
    if path is None:
        return "?"
    root = PACKAGE_DIR.parent
    try:
        return Path(path).resolve().relative_to(root).as_posix()
    except (ValueError, OSError):
        pass
    # another checkout's project file (a committed run.json): shown as this project's
    parts = Path(path).parts
    for i in range(len(parts) - 1, 0, -1):
        tail = Path(*parts[i:])
        if parts[i] in ("benchmarks", "reports") and (root / tail).exists():
            return tail.as_posix()
    return str(path)
