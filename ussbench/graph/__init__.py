"""A grid as a graph of stage nodes, run by an executor.

- :mod:`~ussbench.graph.cells`: a cell (one plugin choice per stage + a seed) and plugin helpers;
- :mod:`~ussbench.graph.nodes`: nodes (content key, inputs, compute, resources) and the graph;
- :mod:`~ussbench.graph.stages`: the stage computes (features, learned codes, segments, assignment, ...);
- :mod:`~ussbench.graph.plan`: grid cells -> graph (keys bound to the data's fingerprint);
- :mod:`~ussbench.graph.executor`: the executor interface and the in-process executor;
- :mod:`~ussbench.graph.records`: the cell files every executor writes;
- :mod:`~ussbench.graph.evaluation`: the evaluation path (pixels, CRF, scores, NFCovering).
"""

from .cells import STAGE_ORDER, Cell, build_plugin, plugin_identity, plugin_version
from .executor import ExecutionSummary, Executor, InProcessExecutor, RecordContext
from .nodes import Graph, Inputs, Node, Resources, Stage, compute_node
from .plan import Plan, plan_cells
from .records import CellStore, load_cells, load_failed
from .runtime import RunSettings, Runtime

__all__ = [
    "STAGE_ORDER", "Cell", "CellStore", "ExecutionSummary", "Executor", "Graph", "InProcessExecutor", "Inputs",
    "Node", "Plan", "RecordContext", "Resources", "RunSettings", "Runtime", "Stage", "build_plugin",
    "compute_node", "load_cells", "load_failed", "plan_cells", "plugin_identity", "plugin_version",
]  # fmt: skip
