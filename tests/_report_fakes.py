"""Finished-cell records written directly (no grid run): reports with known per-image quality in milliseconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ussbench.atomic import atomic_write_json
from ussbench.evaluation.metrics import ConfusionMatrix, evaluate_counts
from ussbench.evaluation.per_image import cell_arrays

CLASSES = ["sky", "road", "tree", "car"]
ENV = {"versions": {"ussbench": "0.1.0", "torch": "2.14.1"}, "processor": "x86_64", "cpu_count": 2,
       "git_commit": "a" * 40, "git_dirty": False, "machine": {"cpu_model": "Test CPU", "cores": 2,
                                                                "threads": {"torch": 2}}}  # fmt: skip


def fake_cell(accuracy, n_images: int, seed: int, image_seed: int = 0, salt: int = 0, k: int = 4, pixels: int = 300,
              absent: tuple[int, ...] = ()):  # fmt: skip
    """A confusion matrix over ``n_images`` images (the same images for the same ``image_seed``): each pixel
    keeps its class's cluster with probability ``accuracy`` (scalar or per image), else a random cluster;
    the classes in ``absent`` never occur in the ground truth."""
    images = np.random.default_rng(image_seed)
    noise = np.random.default_rng([image_seed, seed, salt])
    accuracy = np.broadcast_to(np.asarray(accuracy, dtype=np.float64), (n_images,))
    cm = ConfusionMatrix(k, k)
    for i in range(n_images):
        mix = images.dirichlet(np.ones(k))
        if absent:
            mix[list(absent)] = 0.0
            mix /= mix.sum()
        gt = images.choice(k, size=pixels, p=mix)
        keep = noise.random(pixels) < accuracy[i]
        cm.update(np.where(keep, (gt + 1) % k, noise.integers(0, k, size=pixels)), gt)
    return cm


def write_fake_cells(out: Path, rows: dict[str, object], seeds=(0, 1, 2), n_images: int = 40, image_seed: int = 0,
                     dataset: str = "toyset", env: dict | None = None, per_image: bool = True,
                     image_prefix: str = "img", crf: bool = False, absent: tuple[int, ...] = ()) -> list[str]:  # fmt: skip
    """One cell per row x seed in ``out/cells``; ``rows``: image-clusterer label -> accuracy; ``absent``: classes
    that no scored image contains. Returns cell ids."""
    (out / "cells").mkdir(parents=True, exist_ok=True)
    ids = []
    for salt, (label, accuracy) in enumerate(rows.items()):
        for seed in seeds:
            cm = fake_cell(accuracy, n_images, seed, image_seed, salt, absent=absent)
            scores = evaluate_counts(cm.counts)
            before = (
                fake_cell(accuracy * 0.8, n_images, seed, image_seed, salt + 100, absent=absent)
                if crf
                else None
            )
            cid = f"{dataset}-{label}-{seed}".replace(" ", "_").replace("(", "").replace(")", "")
            row = {"cell_id": cid, "dataset": dataset, "backbone": "toy-vit", "feature_learner": "none",
                   "image_clusterer": label, "dataset_clusterer": "k-means", "postprocess": "none", "seed": seed,
                   "miou": scores.miou * 100, "pixel_accuracy": scores.pixel_accuracy * 100, "n_clusters": 4,
                   "n_segments": 100, "n_images": n_images, "n_pixels": scores.n_pixels, "time_total_s": 1.0 + seed,
                   "peak_gpu_mb": 0.0, "peak_rss_mb": 100.0, "environment": env or ENV}  # fmt: skip
            if before is not None:
                row["miou_no_crf"] = evaluate_counts(before.counts).miou * 100
            ic_name = "none" if label == "raw tokens" else label
            record = {
                "row": row,
                "per_class_iou": scores.as_dict(CLASSES)["per_class_iou"],
                "mapping": scores.mapping.tolist(),
                "class_names": CLASSES,
                "confusion": cm.counts.tolist(),
                "params": {"dataset": {"name": dataset, "params": {}}},
                "identity": {
                    "protocol": {"name": "default", "matching": "auto", "objective": "pixels"},
                    "stages": [
                        {"kind": "dataset", "name": dataset},
                        {"kind": "feature_learner", "name": "none"},
                        {"kind": "image_clusterer", "name": ic_name},
                        {"kind": "dataset_clusterer", "name": "kmeans"},
                    ],
                },  # fmt: skip
                "dataset_description": f"{dataset} ({n_images} images)",
            }
            atomic_write_json(out / "cells" / f"{cid}.json", record)
            if per_image:
                arrays = cell_arrays(cm, before, [f"{image_prefix}{i:03d}" for i in range(n_images)])
                with open(out / "cells" / f"{cid}.npz", "wb") as f:
                    np.savez_compressed(f, **arrays)
            ids.append(cid)
    return ids


def leaderboard_rows(md: str) -> list[str]:
    """The table lines of the Leaderboard section of a leaderboard.md."""
    section = md.split("## Leaderboard\n", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| ")]


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
