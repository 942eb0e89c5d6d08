"""Public slicing API: cut any ONNX model into a chain of standalone stage models.

```python
result = slice_model("model.onnx", 4)          # or slice_model(zoo_proto, cut_tensors=[...], input_specs=specs)
report = verify_chain(result, batch_sizes=(1, 4))  # slicing.chain
profiles = profile_stages(result, max_batch=16)  # slicing.chain: latency per batch size, favoured size
```

The steps: load and normalise the model (:mod:`slicing.normalize`: initializers out of the inputs; a
fixed batch of 1 made batchable when that is provably safe; tensor shapes probed at two batch/sequence
sizes; ``Shape(activation)`` rebuilt from input shapes), find the candidate cuts (:mod:`slicing.graph`), cost the
pieces between them (:mod:`slicing.cost`), choose the cuts (:mod:`slicing.partition`) and extract
the stages (:mod:`slicing.extract`).
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backends.common.ort import make_session
from slicing.extract import boundary_tensors, extract_stages, plan_stages
from slicing.graph import ProbeShapes
from slicing.inputs import InputSpec, make_inputs
from slicing.node_cost import node_flops, profiled_node_costs_us
from slicing.normalize import PreparedModel, prepare
from slicing.partition import partition_units
from core.errors import BadParameterError, SliceError

if TYPE_CHECKING:
    import onnx

BALANCES = ("measured", "profile", "flops")
MAX_MEASURED_UNITS = 48  # pieces timed one by one for balance="measured"
MEASURE_MIN_ROUNDS, MEASURE_MAX_ROUNDS, MEASURE_BUDGET_S = 5, 30, 3.0


@dataclass
class TensorMeta:
    dtype: str  # numpy dtype name
    shape: list[int]  # batch first, -1 = dynamic
    sequence_axis: int | None = None


@dataclass
class StageGraph:
    index: int
    model: onnx.ModelProto  # standalone, onnx.checker passes, only its initializers, dynamic axes kept
    inputs: list[str]  # graph-input names and/or "stage{i-1}_out{j}" boundary names
    outputs: list[str]  # "stage{i}_out{j}" or, for the last stage, the model's output names
    tensors: dict[str, TensorMeta]  # meta of every input and output of this stage
    cost_share: float  # share of the measured whole-model cost


@dataclass
class SliceResult:
    whole: onnx.ModelProto  # the (possibly normalised: batchable, initializers-not-inputs) whole model
    stages: list[StageGraph]
    input_specs: list[InputSpec]
    outputs: dict[str, TensorMeta]
    batchable: bool  # False: served without batching (max_batch_size 0); notes say why
    notes: list[str]
    cut_tensors: list[str]  # original names of the tensors cut at each boundary, boundary by boundary
    boundaries: list[list[str]] = field(default_factory=list)  # the same, grouped per boundary
    max_stages: int = 1

    @property
    def num_stages(self) -> int:
        return len(self.stages)




# ---------------------------------------------------------------------------------------------
# Cutting
# ---------------------------------------------------------------------------------------------


def _largest_k_error(prepared: PreparedModel, num_stages: int, model_name: str) -> SliceError:
    largest = len(prepared.analysis.candidate_cuts()) + 1
    reason = ""
    lstm_nodes = sum(1 for node in prepared.analysis.nodes if node.op_type in ("LSTM", "GRU", "RNN"))
    if lstm_nodes:
        reason = (f"; each of its {lstm_nodes} recurrent layers is a single ONNX node "
                  f"({'/'.join(sorted({n.op_type for n in prepared.analysis.nodes if n.op_type in ('LSTM', 'GRU', 'RNN')}))})"
                  " that cannot be split")
    return SliceError(f"cannot cut the model into {num_stages} stages: the largest valid K is {largest} "
                      f"({largest - 1} candidate cuts{reason}); ask for num_stages <= {largest}")


def max_stages(model, input_specs: list[InputSpec] | None = None) -> int:
    """The largest K this model can be cut into (candidate cuts + 1)."""
    return len(prepare(model, input_specs).analysis.candidate_cuts()) + 1


def slice_model(model: onnx.ModelProto | str | Path, num_stages: int | None = None, *,
                cut_tensors: list[str] | None = None, input_specs: list[InputSpec] | None = None,
                balance: str = "measured", profile_batch_size: int = 8, seq_len: int | None = None,
                intra_op_threads: int = 2) -> SliceResult:
    """Cut ``model`` into ``num_stages`` balanced stages, or at the given ``cut_tensors``.

    Tensors in ``cut_tensors`` that cross the same position form one boundary (e.g. both branches
    of a diamond); with ``cut_tensors``, ``num_stages`` may be left out, else it must match.
    """

    if balance not in BALANCES:
        raise BadParameterError(f"balance={balance!r} must be one of {', '.join(BALANCES)}")
    if num_stages is None and cut_tensors is None:
        raise BadParameterError("give num_stages or cut_tensors")
    if num_stages is not None and num_stages < 1:
        raise BadParameterError(f"num_stages={num_stages} must be >= 1")
    if profile_batch_size < 1:
        raise BadParameterError(f"profile_batch_size={profile_batch_size} must be >= 1")
    prepared = prepare(model, input_specs)
    analysis = prepared.analysis
    model_name = prepared.whole.graph.name or "model"
    notes = list(prepared.notes)
    candidates = analysis.candidate_cuts()
    notes.append(f"largest valid K is {len(candidates) + 1} ({len(candidates)} candidate cuts)")
    if not prepared.batchable:  # time the pieces at the model's own fixed batch
        profile_batch_size = next((s.shape[0] for s in prepared.specs if s.shape and s.shape[0] != -1), 1)

    if cut_tensors is not None:
        chosen = analysis.cut_for_tensors(list(cut_tensors))
        positions = [cut.position for cut in chosen]
        unit_positions = positions
        if num_stages is not None and num_stages != len(chosen) + 1:
            groups = " | ".join(" + ".join(cut.crossing) for cut in chosen)
            raise BadParameterError(
                f"cut tensors {list(cut_tensors)} make {len(chosen)} boundaries ({groups}), so "
                f"{len(chosen) + 1} stages, not num_stages={num_stages}; tensors crossing the same "
                "position form one boundary; leave num_stages out or make it match")
    else:
        if num_stages > len(candidates) + 1:
            raise _largest_k_error(prepared, num_stages, model_name)
        # One stage needs no costs beyond its total: skip timing the pieces.
        unit_positions = [cut.position for cut in candidates] if num_stages > 1 else []
        positions = []
    unit_costs, cost_note = _unit_costs(prepared, unit_positions, balance, profile_batch_size, seq_len,
                                        intra_op_threads)
    notes.append(cost_note)
    if cut_tensors is None:

        bytes_by_position = {cut.position: cut.bytes_per_sample for cut in candidates}
        part = partition_units(unit_costs, [bytes_by_position[p] for p in unit_positions], num_stages)
        positions = [unit_positions[c] for c in part.cuts]
        stage_costs = list(part.stage_costs)
    else:
        stage_costs = unit_costs
    total = sum(stage_costs) or 1.0

    plans = plan_stages(analysis, positions)
    dim_names = _dim_names(prepared)
    boundaries = boundary_tensors(plans, prepared.probe, dim_names)
    models = extract_stages(analysis, plans, boundaries, model_name)
    spec_meta = {s.name: TensorMeta(s.dtype, list(s.shape), s.sequence_axis) for s in prepared.specs}
    outputs = {name: _probe_meta(prepared.probe, name) for name in analysis.graph_outputs}
    stages = []
    for plan, stage_model in zip(plans, models):
        tensors: dict[str, TensorMeta] = {}
        inputs = [v.name for v in stage_model.graph.input]
        for name in plan.graph_inputs:
            if name in inputs:
                tensors[name] = spec_meta[name]
        if plan.index > 0:
            for original in plan.boundary_inputs:
                boundary = boundaries[(plan.index - 1, original)]
                tensors[boundary.name] = _boundary_meta(boundary)
        stage_outputs = []
        for original in plan.outputs:
            if plan.index == len(plans) - 1:
                tensors[original] = outputs[original]
                stage_outputs.append(original)
            else:
                boundary = boundaries[(plan.index, original)]
                tensors[boundary.name] = _boundary_meta(boundary)
                stage_outputs.append(boundary.name)
        stages.append(StageGraph(plan.index, stage_model, inputs, stage_outputs, tensors,
                                 stage_costs[plan.index] / total))
    grouped = [list(plan.boundary_inputs) for plan in plans[1:]]
    return SliceResult(whole=prepared.whole, stages=stages, input_specs=prepared.specs, outputs=outputs,
                       batchable=prepared.batchable, notes=notes,
                       cut_tensors=[name for group in grouped for name in group], boundaries=grouped,
                       max_stages=len(candidates) + 1)


def _dim_names(prepared: PreparedModel) -> dict[str, str]:
    names = {"batch": "batch", "seq": "seq"}
    for value in prepared.whole.graph.input:
        dims = value.type.tensor_type.shape.dim
        spec = next(s for s in prepared.specs if s.name == value.name)
        if dims and dims[0].dim_param:
            names["batch"] = dims[0].dim_param
        if spec.sequence_axis is not None and len(dims) > spec.sequence_axis and dims[spec.sequence_axis].dim_param:
            names["seq"] = dims[spec.sequence_axis].dim_param
    return names


def _probe_meta(probe: ProbeShapes, name: str) -> TensorMeta:
    first, second = probe.shapes[name]
    batch_axis = probe.batch_axis(name)
    shape = [-1 if (a != b or axis == batch_axis) else int(a) for axis, (a, b) in enumerate(zip(first, second))]
    return TensorMeta(probe.dtypes[name], shape, probe.sequence_axis(name))


def _boundary_meta(boundary) -> TensorMeta:
    return TensorMeta(boundary.dtype, [d if isinstance(d, int) else -1 for d in boundary.shape],
                      boundary.sequence_axis)


def _unit_costs(prepared: PreparedModel, positions: list[int], balance: str, batch: int, seq_len: int | None,
                intra_op_threads: int) -> tuple[list[float], str]:
    """Cost of each piece between consecutive ``positions`` (len(positions) + 1 pieces)."""

    analysis = prepared.analysis
    bounds = [0, *positions, len(analysis.nodes)]
    flops = node_flops(analysis, prepared.probe)
    flop_costs = [float(sum(flops[bounds[u]:bounds[u + 1]])) for u in range(len(bounds) - 1)]
    if len(bounds) == 2:
        return flop_costs, "a single stage: nothing to balance"
    if balance == "flops":
        return flop_costs, "stage costs from FLOPs at the probe shapes"
    feeds = make_inputs(prepared.specs, batch, seq_len, rng=np.random.default_rng(11))
    if balance == "profile":

        costs, mapped = profiled_node_costs_us(prepared.whole, feeds, analysis, intra_op_threads=intra_op_threads)
        if mapped < 0.5:
            return flop_costs, (f"stage costs from FLOPs: the profiler's events mapped to only {mapped:.0%} of "
                                "the graph nodes")
        unit = [float(sum(costs.get(i, 0.0) for i in range(bounds[u], bounds[u + 1])))
                for u in range(len(bounds) - 1)]
        return unit, f"stage costs from onnxruntime's profiler at batch {batch} ({mapped:.0%} of kernel time mapped)"
    return _measured_unit_costs(prepared, positions, flop_costs, feeds, intra_op_threads)


def _measured_unit_costs(prepared: PreparedModel, positions: list[int], flop_costs: list[float],
                         feeds: dict[str, np.ndarray], intra_op_threads: int) -> tuple[list[float], str]:
    """Time the pieces between cuts as their own sessions, on their real inputs.

    Pieces are merged (smallest neighbours by FLOPs first) down to MAX_MEASURED_UNITS before
    timing, since each ``Run`` has a fixed overhead; each merged piece's time is then spread over its
    units in proportion to their FLOPs so the partition keeps every candidate cut.
    """

    groups = [[u] for u in range(len(flop_costs))]
    while len(groups) > MAX_MEASURED_UNITS:
        sizes = [sum(flop_costs[u] for u in group) for group in groups]
        pair = min(range(len(groups) - 1), key=lambda g: sizes[g] + sizes[g + 1])
        groups[pair:pair + 2] = [groups[pair] + groups[pair + 1]]
    group_positions = [positions[group[0] - 1] for group in groups[1:]]
    analysis = prepared.analysis
    plans = plan_stages(analysis, group_positions)
    boundaries = boundary_tensors(plans, prepared.probe, _dim_names(prepared))
    models = extract_stages(analysis, plans, boundaries, "segment")
    namespace = dict(feeds)
    runs = []
    for model in models:
        session = make_session(model, intra_op_threads=intra_op_threads)
        names = [v.name for v in model.graph.input]
        stage_feeds = {name: namespace[name] for name in names}
        outputs = [v.name for v in model.graph.output]
        values = session.run(outputs, stage_feeds)  # also the warm-up run
        namespace.update(zip(outputs, values))
        runs.append(functools.partial(session.run, outputs, stage_feeds))
    # Rounds over all pieces, keeping each piece's fastest run: load from other processes only adds
    # time, and drifting load hits every piece alike.
    times = [math.inf] * len(runs)
    started = time.perf_counter()
    for round_index in range(MEASURE_MAX_ROUNDS):
        for index, run in enumerate(runs):
            start = time.perf_counter()
            run()
            times[index] = min(times[index], (time.perf_counter() - start) * 1e3)
        if round_index + 1 >= MEASURE_MIN_ROUNDS and time.perf_counter() - started > MEASURE_BUDGET_S:
            break
    unit_costs = [0.0] * len(flop_costs)
    for group, group_ms in zip(groups, times):
        group_flops = sum(flop_costs[u] for u in group)
        for u in group:
            share = flop_costs[u] / group_flops if group_flops > 0 else 1.0 / len(group)
            unit_costs[u] = group_ms * share
    batch = next(iter(feeds.values())).shape[0]
    return unit_costs, (f"stage costs measured: {len(groups)} pieces timed as their own sessions at batch {batch} "
                        f"(fastest of {round_index + 1} interleaved rounds)")
