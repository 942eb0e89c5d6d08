"""What each graph node costs: onnxruntime's profiler per node, or FLOPs from probed shapes.

- :func:`profiled_node_costs_us`: per-node kernel times at a given batch size, mapped back to graph
  nodes (level ALL renames Convs to ``<output>_nchwc`` and fuses nodes, so events are mapped through
  the tensors they produce);
- :func:`node_flops`: approximate FLOPs of each node from the concrete shapes of a probe run.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backends.common.ort import make_session
from slicing.cost import DEFAULT_INTRA_OP_THREADS
from slicing.graph import GraphAnalysis, ProbeShapes

if TYPE_CHECKING:
    import onnx


# ---------------------------------------------------------------------------------------------
# onnxruntime profiler
# ---------------------------------------------------------------------------------------------


def profiled_node_costs_us(model: onnx.ModelProto, feeds: dict[str, np.ndarray], analysis: GraphAnalysis, *,
                           reps: int = 3, intra_op_threads: int = DEFAULT_INTRA_OP_THREADS
                           ) -> tuple[dict[int, float], float]:
    """Mean kernel time per graph node (by topological index) from ORT's profiler, level ALL.

    Events are mapped by node name first, then through the tensors they produce (NCHWc renames a
    Conv to ``<output>_nchwc``; a fused node keeps one of its originals' outputs). Returns the costs
    and the share of the profiled time that could be mapped.
    """
    with tempfile.TemporaryDirectory(prefix="stagebatch-profile-") as directory:
        session = make_session(model, intra_op_threads=intra_op_threads,
                               profile_prefix=os.path.join(directory, "profile"))
        session.run(None, feeds)  # warm-up, profiled too: skipped below by counting runs
        for _ in range(reps):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_name = {node.name: i for i, node in enumerate(analysis.nodes) if node.name}
    costs: dict[int, float] = {}
    total = mapped = 0.0
    runs_seen = -1
    for event in events:
        if event.get("cat") == "Session" and event.get("name") == "model_run":
            runs_seen += 1
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        duration = float(event.get("dur", 0))
        total += duration
        name = event["name"][: -len("_kernel_time")]
        index = by_name.get(name)
        if index is None:
            index = _map_through_outputs(name, event.get("args", {}), analysis)
        if index is not None:
            costs[index] = costs.get(index, 0.0) + duration
            mapped += duration
    runs = reps + 1
    costs = {index: value / runs for index, value in costs.items()}
    return costs, (mapped / total if total else 0.0)


def _map_through_outputs(name: str, args: dict, analysis: GraphAnalysis) -> int | None:
    candidates = [name]
    for suffix in ("_nchwc", "_token"):
        if suffix in name:
            candidates.append(name.split(suffix)[0])
    for candidate in candidates:
        if candidate in analysis.producer:
            return analysis.producer[candidate]
    return None


# ---------------------------------------------------------------------------------------------
# FLOPs (fallback)
# ---------------------------------------------------------------------------------------------


def node_flops(analysis: GraphAnalysis, probe: ProbeShapes) -> list[float]:
    """Approximate FLOPs of each node (topological order) at the probe's first batch size."""
    initializer_dims = {init.name: tuple(init.dims) for init in analysis.model.graph.initializer}

    def shape(name: str) -> tuple[int, ...]:
        if name in initializer_dims:
            return initializer_dims[name]
        return probe.shapes.get(name, ((),))[0]

    flops = []
    for node in analysis.nodes:
        outputs = [shape(name) for name in node.output if name]
        out_numel = float(sum(np.prod(s, dtype=np.float64) for s in outputs))
        op = node.op_type
        value = out_numel
        try:
            if op in ("Conv", "ConvTranspose"):
                weight = shape(node.input[1])
                value = 2.0 * out_numel * float(np.prod(weight[1:], dtype=np.float64))
            elif op in ("MatMul", "Gemm"):
                a = shape(node.input[0])
                transposed = any(attr.name == "transA" and attr.i for attr in node.attribute)
                k = a[0] if (op == "Gemm" and transposed) else a[-1]
                value = 2.0 * out_numel * float(k)
            elif op in ("LSTM", "GRU", "RNN"):
                x = shape(node.input[0])
                w, r = shape(node.input[1]), shape(node.input[2])
                seq, batch = x[0], x[1]
                layout = next((attr.i for attr in node.attribute if attr.name == "layout"), 0)
                if layout == 1:
                    batch, seq = x[0], x[1]
                value = 2.0 * seq * batch * float(np.prod(w, dtype=np.float64) + np.prod(r, dtype=np.float64))
        except (IndexError, KeyError):
            value = out_numel
        kind = analysis.kinds.get(node.output[0]) if node.output else None
        flops.append(value if kind == "heavy" else 0.0)
    return flops
