"""Expand a grid's cells into the stage graph: content keys, inputs, fingerprints and one sink per cell.

Keys hash what a stage's value depends on: the data's content fingerprint (not its location or names), the
plugins' names, effective parameters, code versions and seeds, the upstream keys and the protocol. Cells
sharing a prefix of stages therefore share those nodes. Cell ids add the fingerprints of the data and of
the backbone, so other data under the same names never resumes a finished cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..cache import stable_hash
from ..config import StageEntry
from ..fingerprint import DigestStore, dataset_fingerprint, param_files_fingerprint
from ..label_check import check_labels_once
from .cells import Cell, build_plugin, plugin_identity, plugin_version
from .histograms import HistogramsStage
from .nodes import Graph, Node, Resources
from .runtime import Runtime
from .stages import (
    AssignmentStage,
    CellStage,
    CoveringStage,
    EvaluationStage,
    FeaturesStage,
    LabelsStage,
    LearnedStage,
    SegmentsStage,
)


@dataclass
class Plan:
    """A grid's stage graph, and for every cell its id, identity and sink node (in the grid's order)."""

    graph: Graph
    cells: list[Cell]
    cell_ids: list[str]
    identities: list[dict[str, Any]]
    sinks: list[Node] = field(default_factory=list)

    def sink_of(self, cell_id: str) -> Node:
        return self.sinks[self.cell_ids.index(cell_id)]


class Planner:
    """Builds the graph for one run; memoises fingerprints and plugin identities across cells."""

    def __init__(self, rt: Runtime, remember: bool = True):
        self.rt = rt
        root = rt.settings.cache_root if remember else None  # remember=False (dry run): write nothing
        self.digests = DigestStore(Path(root) / "fingerprints" if root else None)
        self._data: dict[str, dict[str, Any]] = {}
        self._backbone: dict[str, dict[str, Any]] = {}
        gpu = 1.0 if rt.device.type == "cuda" else 0.0
        self.heavy = Resources(cpus=1.0, gpus=gpu)  # backbone, learners, image clusterers
        self.light = Resources(cpus=1.0)

    # -- fingerprints -----------------------------------------------------------------------------------
    def data_fingerprint(self, entry: StageEntry) -> dict[str, Any]:
        """Content fingerprint of a dataset entry's files (computed once per run); the first time a content is
        seen, every label is decoded too (:mod:`ussbench.label_check`), so a bad one stops the run here."""
        key = stable_hash(entry.identity())
        if key not in self._data:
            dataset = self.rt.raw_dataset(entry)
            fingerprint = dataset_fingerprint(dataset, self.digests)
            # an arrays fingerprint has decoded (and so checked) every label already
            if "files" in fingerprint:
                check_labels_once(dataset, fingerprint["content"], self.digests.folder, self.rt.progress)
            self._data[key] = fingerprint
        return self._data[key]

    def backbone_identity(self, entry: StageEntry) -> dict[str, Any]:
        """The backbone's cache identity (weights checksum included) plus digests of any file parameters."""
        key = stable_hash(entry.identity())
        if key not in self._backbone:
            backbone = self.rt.backbone(entry)
            ident = dict(backbone.cache_identity())
            files = param_files_fingerprint(backbone.get_params(), self.digests)
            if files:
                ident["files"] = files
            self._backbone[key] = ident
        return self._backbone[key]

    def plugin_key(self, plugin: Any) -> dict[str, Any]:
        ident = plugin_identity(plugin)
        files = param_files_fingerprint(plugin.get_params(), self.digests)
        return {**ident, "files": files} if files else ident

    # -- the graph ----------------------------------------------------------------------------------------
    def plan(self, cells: list[Cell]) -> Plan:
        graph = Graph()
        plan = Plan(graph, [], [], [])
        for cell in cells:
            inputs = self.cell_inputs(cell)
            identity = cell.identity(self.rt.protocol, inputs)
            cid = stable_hash(identity, 16)
            sink = graph.add_sink(self.cell_node(graph, cell, cid))
            plan.cells.append(cell)
            plan.cell_ids.append(cid)
            plan.identities.append(identity)
            plan.sinks.append(sink)
        return plan

    def cell_inputs(self, cell: Cell) -> dict[str, Any]:
        """Fingerprints a cell's result depends on besides its stage choices: the data and the backbone."""
        return {"data": self.data_fingerprint(cell.entry("dataset"))["content"],
                "backbone": stable_hash(self.backbone_identity(cell.entry("backbone")))}  # fmt: skip

    def features_node(self, graph: Graph, cell: Cell, flip: bool) -> Node:
        ds, bb = cell.entry("dataset"), cell.entry("backbone")
        view = self.rt.dataset(ds, flip)
        key = stable_hash({"dataset": {**view.cache_identity(), "content": self.data_fingerprint(ds)},
                           "backbone": self.backbone_identity(bb), "ussbench": __version__})  # fmt: skip
        resources = Resources(
            self.heavy.cpus, self.heavy.gpus, features_memory_mb(view, self.rt.backbone(bb))
        )
        return graph.add(Node(key, FeaturesStage(ds, bb, flip, resources)))

    def cell_node(self, graph: Graph, cell: Cell, cid: str) -> Node:
        rt, spec = self.rt, self.rt.spec
        ds_entry, bb_entry = cell.entry("dataset"), cell.entry("backbone")
        learner_entry, ic_entry = cell.entry("feature_learner"), cell.entry("image_clusterer")
        dataset = rt.dataset(ds_entry)
        n_classes = dataset.num_classes
        dev = str(rt.device)
        features = self.features_node(graph, cell, flip=False)
        # codes upsampled bilinearly to the pixels (stego protocol) where every patch is a segment
        bilinear = spec.upsample == "bilinear_code" and ic_entry.name == "none"
        # flipped features serve flip TTA, and the learner's flipped codes (stored with the learned entry,
        # which image clusterers of every kind share, so they are computed whenever a learner runs)
        need_flip = spec.flip_tta and (bilinear or not learner_entry.skipped)
        flipped = self.features_node(graph, cell, flip=True) if need_flip else None
        labels = graph.add(Node(stable_hash({"labels": features.key}), LabelsStage(ds_entry, self.light)))
        upstream, learned = features.key, None
        if not learner_entry.skipped:
            learner = build_plugin(
                learner_entry, {"seed": cell.seed, "device": dev, "num_classes": n_classes}
            )
            key = stable_hash({"up": features.key, "learner": self.plugin_key(learner),
                               **({"flip_tta_up": flipped.key} if flipped is not None else {})})  # fmt: skip
            stage = LearnedStage(ds_entry, bb_entry, learner_entry, cell.seed, need_flip, self.heavy)
            learned = graph.add(Node(key, stage, {"features": features, "labels": labels,  # labels: curve scores
                                                  **({"flipped": flipped} if flipped is not None else {})}))  # fmt: skip
            upstream = key
        ic = build_plugin(ic_entry, {"seed": cell.seed, "device": dev})
        skey = stable_hash({"up": upstream, "ic": self.plugin_key(ic)})
        seg_inputs = {"features": features, **({"learned": learned} if learned is not None else {})}
        segments = graph.add(Node(skey, SegmentsStage(ds_entry, bb_entry, ic_entry, learner_entry.label
                                                      if learned is not None else None, cell.seed, self.heavy),
                                  seg_inputs))  # fmt: skip
        dc_entry = cell.entry("dataset_clusterer")
        k_total = int(rt.protocol.get("n_clusters") or n_classes)
        akey = stable_hash({"up": skey, "dc": {**dc_entry.identity(), "version": plugin_version(dc_entry)},
                            "seed": cell.seed, "k_total": k_total})  # fmt: skip
        assignment = graph.add(Node(akey, AssignmentStage(dc_entry, k_total, cell.seed, self.light, cell),
                                    {"segments": segments}))  # fmt: skip
        hist = graph.add(
            Node(stable_hash({"histograms": labels.key}), HistogramsStage(self.light), {"labels": labels})
        )
        covering = graph.add(Node(stable_hash({"covering": skey, "labels": labels.key}),
                                  CoveringStage(ds_entry, self.light), {"segments": segments, "labels": labels,
                                                                        "histograms": hist}))  # fmt: skip
        eval_inputs = {"features": features, "segments": segments, "assignment": assignment, "labels": labels,
                       "histograms": hist}  # fmt: skip
        if learned is not None:
            eval_inputs["learned"] = learned
        if bilinear and spec.flip_tta and flipped is not None:
            eval_inputs["flipped"] = flipped
        evaluation = graph.add(Node(stable_hash({"evaluate": cid}), EvaluationStage(cell, bilinear, self.light),
                                    eval_inputs))  # fmt: skip
        sink_inputs = {"features": features, "segments": segments, "assignment": assignment,
                       "evaluation": evaluation, "covering": covering}  # fmt: skip
        if learned is not None:
            sink_inputs["learned"] = learned
        if flipped is not None:
            sink_inputs["flipped"] = flipped
        from ..evaluation.probe import probe_node  # the representation's linear probe (issue 12), one per key

        probe = probe_node(
            graph, rt.protocol, ds_entry, features, learned, labels, learner_entry.label, self.light
        )
        if probe is not None:
            sink_inputs["probe"] = probe
        return Node(cid, CellStage(cell), sink_inputs, cell=cell)


def features_memory_mb(dataset: Any, backbone: Any) -> int:
    """A memory hint for a features node: fp16 tokens and keys of every image at the backbone's resolution
    (aspect ratio 3:2, embedding width 768 when the backbone does not say), plus the network, in MB."""
    patch = int(getattr(backbone, "patch_size", 16) or 16)
    side = int(getattr(backbone, "resolution", 224) or 224) / patch
    width = int(getattr(backbone, "embed_dim", 0) or 768)
    per_image = side * side * 1.5 * width * 2 * 2
    return int(len(dataset) * per_image / 2**20) + 512


def plan_cells(cells: list[Cell], rt: Runtime, remember: bool = True) -> Plan:
    """The stage graph of ``cells`` (shared stages merged) with each cell's id and identity.

    ``remember=False`` keeps the file digests in memory only (a dry run writes nothing to the cache).
    """
    return Planner(rt, remember).plan(cells)
