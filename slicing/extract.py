"""Cut a model into standalone stage models along chosen cut positions.

Each stage is extracted with ``onnx.utils.Extractor`` from the exact set of tensors crossing its two
cuts plus the graph inputs its recomputed bookkeeping needs (Extractor silently walks past a
missing crossing tensor, so the set is computed and checked here first). Then:

- boundary tensors are renamed ``stage{i}_out{j}`` on both sides (the chain contract), declared with
  symbolic ``batch``/sequence dims found by probing, and made batch-first: a tensor whose batch axis
  is not 0 (the LSTM's time-major ``Y``) leaves its stage through a ``Transpose`` and is transposed
  back on entry to the next one;
- a tensor that only passes through a stage (or a graph output produced early) gets an ``Identity``;
- every stage passes ``onnx.checker``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from slicing.graph import GraphAnalysis, ProbeShapes, _sliced_pieces, dim_pieces, shape_rebuild_nodes
from core.errors import SliceError

if TYPE_CHECKING:
    import onnx

PRODUCER_NAME = "stagebatch.slicing"


@dataclass
class StagePlan:
    """What one stage reads and writes, by the whole model's tensor names."""

    index: int
    first_node: int
    stop_node: int  # nodes [first_node, stop_node) of the topological order
    boundary_inputs: list[str]  # heavy tensors crossing the cut before the stage
    graph_inputs: list[str]  # model inputs the stage reads (data, or bookkeeping it recomputes)
    outputs: list[str]  # heavy tensors crossing the cut after it; the model's outputs for the last stage


@dataclass
class BoundaryTensor:
    """A tensor crossing a cut: its stage-chain name and batch-first layout."""

    original: str
    name: str  # stage{i}_out{j}
    dtype: str
    shape: list[int | str]  # batch first; str = symbolic dim
    perm: list[int] | None  # Transpose perm from the original layout to batch-first; None if already
    sequence_axis: int | None  # in the batch-first layout


def plan_stages(analysis: GraphAnalysis, positions: list[int]) -> list[StagePlan]:
    """Stage plans for cuts at ``positions`` (strictly increasing, within 1..N-1)."""
    count = len(analysis.nodes)
    if sorted(set(positions)) != list(positions) or any(not 0 < p < count for p in positions):
        raise SliceError(f"internal: cut positions {positions} must be increasing within 1..{count - 1}")
    crossing = analysis.crossing_sets()
    bounds = [0, *positions, count]
    plans = []
    for index in range(len(bounds) - 1):
        first, stop = bounds[index], bounds[index + 1]
        boundary_inputs = list(crossing[first]) if index > 0 else []
        outputs = list(crossing[stop]) if stop < count else list(analysis.graph_outputs)
        graph_inputs = _reached_graph_inputs(analysis, outputs, boundary_inputs, first, stop, index)
        plans.append(StagePlan(index, first, stop, boundary_inputs, graph_inputs, outputs))
    return plans


def _reached_graph_inputs(analysis: GraphAnalysis, outputs: list[str], boundary_inputs: list[str],
                          first: int, stop: int, index: int) -> list[str]:
    """Graph inputs reached walking back from the outputs; fails if it walks into another stage's work."""
    stop_at = set(boundary_inputs) | analysis.initializers
    reached, seen = set(), set()
    frontier = list(outputs)
    while frontier:
        name = frontier.pop()
        if name in seen or name in stop_at or not name:
            continue
        seen.add(name)
        if name in analysis.graph_inputs:
            reached.add(name)
            continue
        producer = analysis.producer.get(name)
        if producer is None:
            continue
        if not first <= producer < stop and analysis.kinds.get(name) == "heavy":
            raise SliceError(
                f"internal: stage {index} needs heavy tensor {name!r} computed outside it; "
                "the crossing set is incomplete")
        frontier.extend(analysis.nodes[producer].input)
    return [name for name in analysis.graph_inputs if name in reached]


def boundary_tensors(plans: list[StagePlan], probe: ProbeShapes, dim_names: dict[str, str]
                     ) -> dict[tuple[int, str], BoundaryTensor]:
    """Boundary tensor of each (stage index, original name) written by a stage for the next one."""
    result = {}
    for plan in plans[:-1]:
        for j, original in enumerate(plan.outputs):
            batch_axis = probe.batch_axis(original)
            if batch_axis is None and probe.batch_sizes[0] != probe.batch_sizes[1]:
                raise SliceError(f"internal: boundary tensor {original!r} has no batch axis")
            first, second = probe.shapes[original]
            rank = len(first)
            perm = None if batch_axis in (0, None) else [batch_axis] + [a for a in range(rank) if a != batch_axis]
            order = perm or list(range(rank))
            sequence_axis = probe.sequence_axis(original)
            shape: list[int | str] = []
            for axis in order:
                if axis == batch_axis:
                    shape.append(dim_names["batch"])
                elif axis == sequence_axis:
                    shape.append(dim_names["seq"])
                elif first[axis] == second[axis]:
                    shape.append(int(first[axis]))
                else:
                    shape.append(f"stage{plan.index}_out{j}_d{len(shape)}")
            new_sequence_axis = order.index(sequence_axis) if sequence_axis is not None else None
            result[(plan.index, original)] = BoundaryTensor(
                original, f"stage{plan.index}_out{j}", probe.dtypes[original], shape, perm, new_sequence_axis)
    return result


def working_model(analysis: GraphAnalysis, boundaries: dict[tuple[int, str], BoundaryTensor]) -> onnx.ModelProto:
    """The model with nodes in topological order and value_info only for the boundary tensors."""
    import onnx
    from onnx import helper

    model = onnx.ModelProto()
    model.CopyFrom(analysis.model)
    del model.graph.node[:]
    model.graph.node.extend(analysis.nodes)
    del model.graph.value_info[:]
    declared = set()
    for boundary in boundaries.values():
        if boundary.original in declared:
            continue
        declared.add(boundary.original)
        original_shape = _unpermute(boundary.shape, boundary.perm)
        model.graph.value_info.append(helper.make_tensor_value_info(
            boundary.original, helper.np_dtype_to_tensor_dtype(_np_dtype(boundary.dtype)), original_shape))
    return model


def extract_stages(analysis: GraphAnalysis, plans: list[StagePlan],
                   boundaries: dict[tuple[int, str], BoundaryTensor], model_name: str) -> list[onnx.ModelProto]:
    """One standalone, checked stage model per plan.

    A later stage that reads a graph input only through ``Shape`` gets that shape from its own
    boundary inputs instead (when their probed dims cover it), so it does not need the input at all.
    """
    import onnx
    from onnx import helper
    from onnx.utils import Extractor

    extractor = Extractor(working_model(analysis, boundaries))
    stages = []
    for plan in plans:
        inputs = list(plan.graph_inputs) + [n for n in plan.boundary_inputs if n not in plan.graph_inputs]
        try:
            stage = extractor.extract_model(inputs, plan.outputs)
        except ValueError as error:
            raise SliceError(f"cannot extract stage {plan.index}: {error}") from None
        graph = stage.graph
        last = plan.index == len(plans) - 1
        # Outputs first: rename the produced tensor, or copy it when it only passes through.
        if not last:
            for original in plan.outputs:
                boundary = boundaries[(plan.index, original)]
                produced_here = any(original in node.output for node in graph.node)
                if boundary.perm is not None:
                    graph.node.append(helper.make_node("Transpose", [original], [boundary.name],
                                                       perm=boundary.perm, name=f"{boundary.name}_to_batch_first"))
                elif produced_here:
                    _rename(graph, original, boundary.name)
                else:
                    graph.node.append(helper.make_node("Identity", [original], [boundary.name],
                                                       name=f"{boundary.name}_pass"))
            del graph.output[:]
            graph.output.extend(_value_info(boundaries[(plan.index, o)]) for o in plan.outputs)
        # Then inputs: boundary tensors arrive batch-first under their chain name.
        if plan.index > 0:
            for original in plan.boundary_inputs:
                boundary = boundaries[(plan.index - 1, original)]
                position = [v.name for v in graph.input].index(original)
                graph.input[position].CopyFrom(_value_info(boundary))
                if boundary.perm is not None:
                    inverse = [boundary.perm.index(axis) for axis in range(len(boundary.perm))]
                    graph.node.insert(0, helper.make_node("Transpose", [boundary.name], [original], perm=inverse,
                                                          name=f"{boundary.name}_from_batch_first"))
                else:
                    _rename(graph, original, boundary.name, keep_graph_outputs=True)
                    if original in (v.name for v in graph.output):
                        graph.node.append(helper.make_node("Identity", [boundary.name], [original],
                                                           name=f"{original}_from_{boundary.name}"))
        if plan.index > 0:
            _shapes_from_boundaries(graph, plan, boundaries, analysis.probe)
        io_names = {v.name for v in graph.input} | {v.name for v in graph.output}
        kept_infos = [v for v in graph.value_info if v.name not in io_names]
        del graph.value_info[:]
        graph.value_info.extend(kept_infos)
        graph.name = f"{model_name}_stage{plan.index}"
        stage.producer_name = PRODUCER_NAME
        stage.doc_string = (f"stage {plan.index} of {len(plans)} of {model_name}: nodes "
                            f"{plan.first_node}..{plan.stop_node - 1} of the whole model")
        try:
            onnx.checker.check_model(stage)
        except onnx.checker.ValidationError as error:
            raise SliceError(f"stage {plan.index} is not a valid ONNX model: {str(error).splitlines()[0]}") from None
        stages.append(stage)
    return stages


def _shapes_from_boundaries(graph, plan: StagePlan, boundaries: dict[tuple[int, str], BoundaryTensor],
                            probe: ProbeShapes) -> None:
    """Replace ``Shape(graph input)`` by the same vector built from the stage's boundary inputs."""
    sources: dict[tuple[int, int], tuple[str, int]] = {}
    for original in plan.boundary_inputs:
        boundary = boundaries[(plan.index - 1, original)]
        in_graph = original if boundary.perm is not None else boundary.name
        first, second = probe.shapes[original]
        for axis, (a, b) in enumerate(zip(first, second)):
            if a != b:
                sources.setdefault((a, b), (in_graph, axis))
    for name in plan.graph_inputs:
        users = [node for node in graph.node if name in node.input]
        if not users or any(node.op_type != "Shape" for node in users):
            continue
        pieces = dim_pieces(probe, name, sources)
        if pieces is None:
            continue
        rebuilt = []
        for node in graph.node:
            if node.op_type == "Shape" and node.input[0] == name:
                nodes, inits = shape_rebuild_nodes(node.output[0], _sliced_pieces(node, pieces))
                rebuilt.extend(nodes)
                graph.initializer.extend(inits)
            else:
                rebuilt.append(node)
        del graph.node[:]
        graph.node.extend(rebuilt)
        kept = [value for value in graph.input if value.name != name]
        del graph.input[:]
        graph.input.extend(kept)


def _rename(graph, old: str, new: str, *, keep_graph_outputs: bool = False) -> None:
    """Rename tensor ``old`` to ``new`` in nodes, graph inputs, value_info (and graph outputs unless kept)."""
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name == old:
                node.input[i] = new
        for i, name in enumerate(node.output):
            if name == old:
                node.output[i] = new
    for value in graph.input:
        if value.name == old:
            value.name = new
    for value in graph.value_info:
        if value.name == old:
            value.name = new
    if not keep_graph_outputs:
        for value in graph.output:
            if value.name == old:
                value.name = new


def _value_info(boundary: BoundaryTensor):
    from onnx import helper

    return helper.make_tensor_value_info(
        boundary.name, helper.np_dtype_to_tensor_dtype(_np_dtype(boundary.dtype)), boundary.shape)


def _unpermute(shape: list, perm: list[int] | None) -> list:
    if perm is None:
        return list(shape)
    original = [None] * len(shape)
    for position, axis in enumerate(perm):
        original[axis] = shape[position]
    return original


def _np_dtype(name: str):
    import numpy as np

    return np.dtype(name)
