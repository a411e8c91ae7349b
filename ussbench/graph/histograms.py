"""The per-patch class histograms of a split's labels as a graph node, shared by evaluation and NFCovering.

Its value is a :class:`~ussbench.evaluation.upsample.HistogramMemo` over the labels: every cell evaluated on
those labels counts its confusion (nearest path) and its NFCovering from the same histograms, computed on
first use per grid of patch cells (see :mod:`ussbench.evaluation.upsample`). In memory only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from ..evaluation.upsample import HistogramMemo
from .nodes import Inputs, Resources, Stage
from .runtime import Runtime


@dataclass
class HistogramsStage(Stage):
    """The label maps' per-patch class histograms (lazily, per grid): a memo bound to the ``labels`` input."""

    resources: Resources = field(default_factory=Resources)
    kind: ClassVar[str] = "histograms"

    def compute(self, inputs: Inputs, rt: Runtime) -> HistogramMemo:
        return HistogramMemo(inputs["labels"])

    def describe(self) -> str:
        return "per-patch label histograms"
