"""Shared readers for datasets stored as paired image / label-PNG files, and their common base class."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..base import Dataset
from ..errors import ConfigError, DataError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
FileTriple = tuple[str, Path, Path]  # (image id, image path, label path)


def resolve_root(root: str | None, data_root: str | None, default_subdir: str, dataset: str) -> Path:
    """The dataset folder: ``root`` if given (relative to data_root when relative), else data_root/default.

    A missing folder is one DataError line saying what was expected where, and the flag that points a grid
    at another copy (``--data-root DIR``, DIR holding ``default_subdir``).
    """
    hint = f"pass --data-root DIR, where DIR holds {default_subdir.rstrip('/.') or 'the dataset'}/"
    if root is not None:
        path = Path(root).expanduser()
        if not path.is_absolute() and data_root is not None:
            path = Path(data_root).expanduser() / path
        if not path.is_dir():
            raise DataError(f"dataset {dataset!r}: root folder {str(path)!r} does not exist")
        return path
    if data_root is None:
        raise DataError(f"dataset {dataset!r} needs a data root: {hint} (or give the dataset a 'root')")
    path = Path(data_root).expanduser() / default_subdir
    if not path.is_dir():
        nearby = nearby_data_root(Path(data_root).expanduser(), default_subdir)
        if nearby is not None:
            hint = f"{str(nearby)!r} holds {default_subdir}/: pass --data-root {nearby}"
        raise DataError(
            f"dataset {dataset!r}: {default_subdir}/ not found under the data root {str(data_root)!r} "
            f"({str(path)!r} does not exist); {hint}"
        )
    return path


def nearby_data_root(data_root: Path, subdir: str) -> Path | None:
    """The folder a data root one level off meant: a parent (it points inside ``subdir``) or a child (it points
    one level too high) that holds ``subdir``; None if there is none (or ``subdir`` is the root itself)."""
    if subdir.strip("/.") == "":
        return None
    absolute = data_root.absolute()
    for parent in list(absolute.parents)[: len(Path(subdir).parts)]:
        if (parent / subdir).is_dir():
            return parent
    children = sorted(absolute.iterdir()) if absolute.is_dir() else []
    return next((child for child in children if (child / subdir).is_dir()), None)


def paired_files(
    images_dir: Path, labels_dir: Path, label_suffix: str = ".png"
) -> list[tuple[str, Path, Path]]:
    """(id, image path, label path) for every image whose label exists, sorted by id; missing labels fail, and
    so do two images of one name (``a.jpg`` and ``a.png`` would share ``a.png``'s label and be scored twice)."""
    if not images_dir.is_dir():
        raise DataError(f"image folder {str(images_dir)!r} does not exist")
    if not labels_dir.is_dir():
        raise DataError(f"label folder {str(labels_dir)!r} does not exist")
    pairs = []
    seen: dict[str, Path] = {}
    labels = {path.name.lower(): path for path in labels_dir.iterdir()}
    for img in sorted(images_dir.iterdir()):
        if img.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if img.stem in seen:
            raise DataError(f"images {str(seen[img.stem])!r} and {str(img)!r} share the name {img.stem!r} (and its "
                            "label); keep one of them")  # fmt: skip
        seen[img.stem] = img
        pairs.append((img.stem, img, find_label(labels, labels_dir, img, label_suffix)))
    if not pairs:
        raise DataError(no_images_error(images_dir, "/".join(IMAGE_SUFFIXES)))
    return pairs


def find_label(labels: dict[str, Path], labels_dir: Path, image: Path, suffix: str) -> Path:
    """The label file of ``image`` from ``labels`` (lower-cased name -> path), its suffix in any case (``a.PNG``).

    A missing label is a DataError naming the file looked for; a JPEG label in its place is refused by name,
    since JPEG's lossy compression changes the label values along every edge.
    """
    wanted = labels_dir / (image.stem + suffix)
    if wanted.is_file():
        return wanted
    found = labels.get(wanted.name.lower())
    if found is not None and found.is_file():
        return found
    jpeg = labels.get(image.stem.lower() + ".jpg") or labels.get(image.stem.lower() + ".jpeg")
    if jpeg is not None:
        raise DataError(
            f"label file {str(jpeg)!r} is a JPEG, whose compression alters label values; save labels as {suffix}"
        )
    raise DataError(f"label file {str(wanted)!r} for image {image.name!r} does not exist")


def no_images_error(folder: Path, pattern: str) -> str:
    """One line saying that ``folder`` holds no image named like ``pattern``, with an entry it does hold."""
    entries = sorted(folder.iterdir())
    held = f"it holds {len(entries)} other entries, e.g. {entries[0].name!r}" if entries else "it is empty"
    return f"no {pattern} images in {str(folder)!r}: {held}"


GREY16_MODES = ("I", "I;16", "I;16B", "I;16L")  # how PIL opens a 16-bit grey PNG


def grey16_to_rgb(image: Image.Image) -> np.ndarray:
    """RGB uint8 of a 16-bit grey image, 0..65535 scaled to 0..255 (PIL's convert clips it: a white image)."""
    grey = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
    return np.repeat(np.rint(grey / 257).astype(np.uint8)[:, :, None], 3, axis=2)


def read_rgb(path: Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); unreadable files raise DataError naming the file."""
    try:
        with Image.open(path) as im:
            if im.mode in GREY16_MODES:
                return grey16_to_rgb(im)
            return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {str(path)!r}: {exc}") from exc


LABEL_MODES = ("1", "L", "P", *GREY16_MODES)  # single-channel: 1-bit masks, grey levels, palette indices


def read_label_png(path: Path) -> np.ndarray:
    """Raw label values (H, W) as int64 from a single-channel PNG (1-bit, 8-bit grey or palette, 16-bit)."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            raw = np.asarray(im, dtype=np.int64).copy() if mode in LABEL_MODES else None
    except OSError as exc:
        raise DataError(f"cannot read label {str(path)!r}: {exc}") from exc
    if raw is None:  # raised here, not in the try: DataError is an OSError and would be wrapped twice
        raise DataError(
            f"label file {str(path)!r} has mode {mode!r}; expected a single-channel PNG of class values "
            "(palette or grey levels), not colours"
        )
    return raw


def identity_table(n_classes: int, size: int = 256) -> np.ndarray:
    """Lookup table of ``size`` raw values: 0..n_classes-1 are the classes themselves, all others -1 (ignore)."""
    table = np.full(size, -1, dtype=np.int64)
    table[:n_classes] = np.arange(n_classes)
    return table


REFUSED = -2  # a lookup-table entry for a raw value the dataset never uses: reading it is an error


def remap(
    raw: np.ndarray, table: np.ndarray, path: Path, what: str = "label file", valid: str | None = None
) -> np.ndarray:
    """Map raw label values through a lookup table (-1 = ignore). Values outside the table, and values whose
    entry is REFUSED, are a DataError naming the file and the value (``valid`` says which values are valid)."""
    if raw.size and (raw.min() < 0 or raw.max() >= len(table)):
        raise DataError(f"{what} {str(path)!r} has value {int(raw.max())} outside 0..{len(table) - 1}")
    label = table[raw]
    refused = label == REFUSED
    if refused.any():
        bad = int(raw[refused][0])
        raise DataError(f"{what} {str(path)!r} has value {bad}; {valid or 'the dataset never uses it'}")
    return label


def image_file_size(path: Path, what: str = "image") -> tuple[int, int]:
    """(H, W) of an image file from its header only (no pixel decoding); unreadable files raise DataError."""
    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {what} {str(path)!r}: {exc}") from exc


def resize_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resize of a label map to (H, W): each output pixel centre takes the label under it."""
    h, w = label.shape
    H, W = size
    rows = np.minimum(((np.arange(H) + 0.5) * h / H).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(W) + 0.5) * w / W).astype(np.int64), w - 1)
    return label[rows[:, None], cols[None, :]]


class FileListDataset(Dataset):
    """A dataset listed once as (id, image, label) triples cut to ``limit``: RGB images, table-mapped PNG labels.

    Subclasses keep their own explicit ``__init__`` (the registry reads parameters from it) and implement
    ``_list_files``; they override ``load_image`` / ``load_label`` where their files are not RGB / label PNGs
    (passing the label through :meth:`_fit_label`). A label map whose size differs from its image is a
    DataError naming the file, found before any work by :meth:`check`, unless ``resize_labels`` is set (the
    label is then resized nearest to the image).
    """

    limit: int | None
    resize_labels: bool = False
    _table: np.ndarray
    _items: list[FileTriple] | None = None
    _uncut_count: int = 0  # images of the split before ``limit``

    @abc.abstractmethod
    def _list_files(self) -> list[FileTriple]:
        """Every (id, image path, label path) of the chosen split, in a fixed order, before ``limit``."""

    def _files(self) -> list[FileTriple]:
        if self._items is None:
            limit = self.limit
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
                raise ConfigError(
                    f"dataset {self.plugin_name!r}: 'limit' must be a positive number of images or null (all), "
                    f"got {limit!r}"
                )
            items = self._list_files()
            self._uncut_count = len(items)
            self._items = items[:limit] if limit else items
        return self._items

    def ids(self) -> list[str]:
        return [i for i, _, _ in self._files()]

    def data_files(self) -> list[Path]:
        return [p for _, image, label in self._files() for p in (image, label)]

    def load_image(self, index: int) -> np.ndarray:
        return read_rgb(self._files()[index][1])

    def load_label(self, index: int) -> np.ndarray:
        path = self._files()[index][2]
        return self._fit_label(remap(read_label_png(path), self._table, path), index)

    def check(self) -> None:
        super().check()
        self.check_label_sizes()

    def cache_identity(self) -> dict[str, Any]:
        """As the base class, without ``resize_labels`` (labels do not change the cached features), and with a
        ``limit`` that cuts nothing (at least the split's size) read as no limit: the same images, the same
        cached features."""
        identity = super().cache_identity()
        identity["params"].pop("resize_labels", None)
        if self.limit is not None and self.limit >= self._uncut_count:
            identity["params"]["limit"] = None
        return identity

    def header_sizes(self, index: int) -> tuple[tuple[int, int], tuple[int, int]] | None:
        """((H, W) of the image, (H, W) of the label) read from file headers, or None where that is not cheap."""
        _, image, label = self._files()[index]
        return image_file_size(image), image_file_size(label, "label")

    def check_label_sizes(self) -> None:
        """DataError naming the first label file whose size differs from its image (headers only)."""
        if self.resize_labels:
            return
        for index in range(len(self._files())):
            sizes = self.header_sizes(index)
            if sizes is not None and sizes[0] != sizes[1]:
                raise self._size_error(index, sizes[1], sizes[0])

    def _fit_label(
        self, label: np.ndarray, index: int, image_size: tuple[int, int] | None = None
    ) -> np.ndarray:
        """The label map checked against (or, with ``resize_labels``, resized nearest to) its image's size."""
        size = image_size or self.header_sizes(index)[0]
        if label.shape == tuple(size):
            return label
        if not self.resize_labels:
            raise self._size_error(index, label.shape, size)
        return resize_nearest(label, size)

    def _size_error(self, index: int, label_size: tuple[int, ...], image_size: tuple[int, ...]) -> DataError:
        _, image, label = self._files()[index]
        return DataError(
            f"label file {str(label)!r} is {label_size[1]}x{label_size[0]} but its image {image.name!r} is "
            f"{image_size[1]}x{image_size[0]} (W x H); fix the file or set the dataset's resize_labels: true"
        )
