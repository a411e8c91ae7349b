"""Helpers for datasets defined by image-list files (the STEGO-protocol sets: COCO-Stuff, Potsdam)."""

from __future__ import annotations

from pathlib import Path

from ..errors import DataError


def read_list(path: Path, dataset: str, what: str) -> list[str]:
    """Non-empty stripped lines of a list file; a missing file is a DataError naming it and ``what``."""
    if not path.is_file():
        raise DataError(f"dataset {dataset!r}: {what} {str(path)!r} does not exist")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def check_count(n: int, expected: int | None, dataset: str, what: str) -> None:
    """DataError when a curated split does not have its published number of images."""
    if expected is not None and n != expected:
        raise DataError(
            f"dataset {dataset!r}: {what} lists {n} images, the published split has {expected} "
            f"(pass strict_count: false to use a different list)"
        )


def first_missing(paths: list[Path]) -> Path | None:
    """The first path that is not a file, or None."""
    return next((p for p in paths if not p.is_file()), None)


def check_listed_files(paths: list[Path], dataset: str) -> None:
    """DataError naming the first file that an image list names but that does not exist."""
    missing = first_missing(paths)
    if missing is not None:
        raise DataError(f"dataset {dataset!r}: file {str(missing)!r} named by the image list does not exist")
