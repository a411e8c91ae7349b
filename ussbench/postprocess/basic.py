"""The identity post-process (no refinement)."""

from __future__ import annotations

import numpy as np

from ..base import PostProcess
from ..registry import register


@register("postprocess", "none")
class NoPostProcess(PostProcess):
    """Leaves predictions unchanged."""

    def __init__(self):
        pass

    def apply(
        self, image: np.ndarray, labels: np.ndarray, n_labels: int, probs: np.ndarray | None = None
    ) -> np.ndarray:
        return labels
