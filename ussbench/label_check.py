"""Every label map of a dataset decoded once while a run is planned, before any work.

A bad label value (a VOC PNG re-saved as grey levels, a 16-bit map, a colour PNG) is a DataError naming the
file; found at planning, it stops the run before the features are extracted instead of failing every cell
after them. A check that passed is remembered under the data's content fingerprint (every image and label
file) and the dataset's plugin, parameters and version, so a warm run decodes nothing and an edited label file
(or a parameter that changes what is valid, such as ``other_values``) is checked again.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .atomic import atomic_write_json
from .cache import stable_hash

log = logging.getLogger(__name__)
_FORMAT = "ussbench-label-checks/1"
MEMO_NAME = "labels_checked.json"
MEMO_LIMIT = 1000  # keys kept (the newest): one per dataset content and parameters checked


def check_labels_once(dataset: Any, content: str, folder: Path | None, progress: bool = False) -> bool:
    """Decode every label of ``dataset`` (its ``load_label`` raises on a bad value) unless this content and
    identity passed before; True when the labels were decoded now. ``folder``: where the memo lives (None:
    check without remembering, as ``--dry-run`` does)."""
    # every parameter but data_root: parameters decide which values are valid (other_values, resize_labels)
    params = {k: v for k, v in dataset.get_params().items() if k != "data_root"}
    key = stable_hash({"content": content, "plugin": dataset.plugin_name, "params": params,
                       "version": dataset.version})  # fmt: skip
    memo = folder / MEMO_NAME if folder is not None else None
    checked = _read(memo)
    if key in checked:
        return False
    n = len(dataset)
    for index in tqdm(
        range(n), desc=f"checking {dataset.plugin_name} labels", unit="label", disable=not progress or n < 50
    ):
        dataset.load_label(index)
    if memo is not None:
        try:
            atomic_write_json(
                memo, {"format": _FORMAT, "checked": [*checked, key][-MEMO_LIMIT:]}, durable=False
            )
        except OSError as exc:  # a read-only cache still checks, it only forgets
            log.warning("cannot remember the label check in %s: %s", memo, exc)
    return True


def _read(memo: Path | None) -> list[str]:
    """The remembered keys; an unreadable or foreign memo is an empty one (the labels are checked again)."""
    if memo is None or not memo.is_file():
        return []
    try:
        blob = json.loads(memo.read_text())
        keys = blob["checked"] if blob.get("format") == _FORMAT else []
        return [k for k in keys if isinstance(k, str)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []
