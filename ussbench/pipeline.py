"""The flow of one grid cell, now a graph of stage nodes: see :mod:`ussbench.graph`.

features -> [learned codes] -> segments -> assignment -> evaluation -> cell record; this module keeps the
names other modules and plugins import from here.
"""

from __future__ import annotations

from .graph.cells import (
    STAGE_ORDER,
    Cell,
    build_params_for_record,
    build_plugin,
    plugin_identity,
    plugin_version,
)
from .graph.evaluation import (
    bilinear_pixel_predictions,
    nearest_pixel_predictions,
    panel_indices,
    peak_rss_mb,
    protocol_view,
    resolve_protocol,
    segment_covering,
    upsample_nearest,
)

__all__ = [
    "STAGE_ORDER", "Cell", "bilinear_pixel_predictions", "build_params_for_record", "build_plugin",
    "nearest_pixel_predictions", "panel_indices", "peak_rss_mb", "plugin_identity", "plugin_version",
    "protocol_view", "resolve_protocol", "segment_covering", "upsample_nearest",
]  # fmt: skip
