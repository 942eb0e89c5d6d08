"""Public slicing API: cut any ONNX model into a verified chain of stage models, and profile the stages.

```python
result = slice_model("model.onnx", 4)          # or slice_model(zoo_proto, cut_tensors=[...], input_specs=specs)
report = verify_chain(result, batch_sizes=(1, 4))
profiles = profile_stages(result, max_batch=16)  # latency per batch size and favoured batch size per stage
```

The steps: load and normalise the model (initializers out of the inputs; a fixed batch of 1 made
batchable when that is provably safe), probe tensor shapes at two batch/sequence sizes, rebuild
``Shape(activation)`` from input shapes, find the candidate cuts (:mod:`slicing.graph`), cost the
pieces between them (:mod:`slicing.cost`), choose the cuts (:mod:`slicing.partition`) and extract
the stages (:mod:`slicing.extract`).
"""

from __future__ import annotations

import functools
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from slicing.cost import make_session, median_ms
from slicing.extract import boundary_tensors, extract_stages, plan_stages
from slicing.graph import GraphAnalysis, ProbeShapes, probe_shapes, rebuild_activation_shapes
from slicing.inputs import InputSpec, infer_input_specs, make_inputs
from slicing.node_cost import node_flops, profiled_node_costs_us
from slicing.partition import partition_units
from stagebatch.errors import BadParameterError, SliceError

if TYPE_CHECKING:
    import onnx

BALANCES = ("measured", "profile", "flops")
MAX_MEASURED_UNITS = 48  # pieces timed one by one for balance="measured"
MEASURE_MIN_ROUNDS, MEASURE_MAX_ROUNDS, MEASURE_BUDGET_S = 5, 30, 3.0
BATCHABLE_RTOL = 1e-4
DEFAULT_VERIFY_SEQ_LENS = (7, 16)


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


@dataclass
class VerificationReport:
    max_rel_error: dict[str, float]  # per output, max |chain - whole| / max |whole| over all runs
    latency_ratio: float  # chain / whole, summed medians over the timed batch sizes
    latency_ms: dict[int, tuple[float, float]]  # batch -> (whole, chain) median ms
    batch_sizes: list[int]
    seq_lens: list[int | None]

    def ratio_at(self, batch: int) -> float:
        whole_ms, chain_ms = self.latency_ms[batch]
        return chain_ms / whole_ms


@dataclass
class StageProfile:
    index: int
    latency_ms: dict[int, float]  # batch size -> median latency
    favoured_batch_size: int


# ---------------------------------------------------------------------------------------------
# Loading and normalising
# ---------------------------------------------------------------------------------------------


def load_model(model: onnx.ModelProto | str | Path | bytes) -> onnx.ModelProto:
    """A ModelProto from a proto, bytes or a path; a clear SliceError for anything that is not ONNX."""
    import onnx
    from google.protobuf.message import DecodeError

    if isinstance(model, onnx.ModelProto):
        proto = model
        source = "the given model"
    else:
        source = str(model) if not isinstance(model, bytes) else "the given bytes"
        try:
            proto = (onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(str(model)))
        except FileNotFoundError:
            raise SliceError(f"model file {source!r} does not exist") from None
        except (DecodeError, ValueError, RuntimeError, OSError) as error:
            raise SliceError(f"{source!r} is not an ONNX model ({type(error).__name__}); "
                             "pass a .onnx file exported by torch.onnx or another ONNX exporter") from None
    if not proto.graph.node or not proto.graph.output or not proto.opset_import:
        raise SliceError(f"{source!r} is not an ONNX model: it has no nodes, outputs or opset; "
                         "pass a .onnx file exported by torch.onnx or another ONNX exporter")
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as error:
        raise SliceError(f"{source!r} is not a valid ONNX model: {str(error).splitlines()[0]}") from None
    return proto


def _without_initializer_inputs(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """Old exporters list initializers as graph inputs; they are weights (IR >= 4 allows leaving them out)."""
    import onnx

    initializers = {init.name for init in model.graph.initializer}
    kept = [v for v in model.graph.input if v.name not in initializers]
    removed = len(model.graph.input) - len(kept)
    if not removed and model.ir_version >= 4:
        return model, 0
    result = onnx.ModelProto()
    result.CopyFrom(model)
    del result.graph.input[:]
    result.graph.input.extend(kept)
    result.ir_version = max(result.ir_version, 4)
    return result, removed


@dataclass
class _Prepared:
    """A model ready to cut: normalised whole model, its specs, probe shapes and analysis."""

    whole: onnx.ModelProto
    specs: list[InputSpec]
    probe: ProbeShapes
    analysis: GraphAnalysis
    batchable: bool
    notes: list[str]


def _prepare(model, input_specs: list[InputSpec] | None) -> _Prepared:

    proto = load_model(model)
    notes: list[str] = []
    proto, removed = _without_initializer_inputs(proto)
    if removed:
        notes.append(f"removed {removed} initializers from the graph inputs (weights, not inputs)")
    specs = list(input_specs) if input_specs is not None else infer_input_specs(proto)
    graph_inputs = [v.name for v in proto.graph.input]
    spec_names = [spec.name for spec in specs]
    if sorted(spec_names) != sorted(graph_inputs):
        raise BadParameterError(
            f"input specs name {spec_names} but the model's inputs are {graph_inputs}; give one spec per input")
    batchable = True
    fixed = [spec for spec in specs if spec.shape and spec.shape[0] != -1]
    if fixed:
        proto, specs, batchable, note = _try_make_batchable(proto, specs)
        notes.append(note)
    probe, samples = probe_shapes(proto, specs, batchable=batchable)
    rebuilt, count = rebuild_activation_shapes(proto, probe)
    if count:
        _check_same_outputs(rebuilt, samples, "rebuilding Shape nodes from input shapes")
        proto = rebuilt
        probe, _ = probe_shapes(proto, specs, batchable=batchable)
        notes.append(f"rebuilt {count} Shape(activation) nodes from graph-input shapes, so those "
                     "activations need not cross a cut")
    return _Prepared(proto, specs, probe, GraphAnalysis(proto, probe), batchable, notes)


def _check_same_outputs(model: onnx.ModelProto, samples: dict, what: str, rtol: float = 1e-5) -> None:

    session = make_session(model, optimize=False)
    inputs = [v.name for v in model.graph.input]
    outputs = [v.name for v in model.graph.output]
    for sample in samples.values():
        values = session.run(outputs, {name: sample[name] for name in inputs})
        for name, value in zip(outputs, values):
            error = _relative_error(sample[name], value)
            if error > rtol:
                raise SliceError(f"internal: {what} changed output {name!r} (relative error {error:.2e})")


def _relative_error(reference: np.ndarray, value: np.ndarray) -> float:
    reference = np.asarray(reference)
    value = np.asarray(value)
    if reference.shape != value.shape:
        return float("inf")
    if reference.size == 0:
        return 0.0
    if reference.dtype == np.bool_ or np.issubdtype(reference.dtype, np.integer):
        return float(np.mean(reference != value))
    scale = float(np.max(np.abs(reference)))
    difference = float(np.max(np.abs(reference.astype(np.float64) - value.astype(np.float64))))
    if not np.isfinite(difference):
        same = np.array_equal(reference, value, equal_nan=True)
        return 0.0 if same else float("inf")
    return difference / max(scale, 1e-12)


def _try_make_batchable(model: onnx.ModelProto, specs: list[InputSpec]
                        ) -> tuple[onnx.ModelProto, list[InputSpec], bool, str]:
    """Give a fixed-batch-1 model a dynamic batch dim when that is provably safe.

    Safe means: (1) with dim 0 of every input and output made symbolic (and constant Reshape targets
    starting with the batch's 1 turned into "copy dim 0"), the model runs at batch 2 and 3; (2) in
    those runs every tensor either keeps its shape or changes in exactly one axis, from 2 to 3 (the
    batch is carried through, never folded into other dims), and every output's axis 0 is that
    axis; (3) each row of a batch-3 run equals a batch-1 run of the original model on that row.
    Otherwise the model is served as is, without batching.
    """
    import onnx
    from onnx import numpy_helper


    fixed = {spec.name: spec.shape[0] for spec in specs if spec.shape and spec.shape[0] != -1}
    if any(size != 1 for size in fixed.values()):
        return model, specs, False, (f"served without batching: inputs have a fixed batch dim {fixed} other "
                                     "than 1, so rows cannot be told apart")
    outputs = model.graph.output
    if any(not o.type.tensor_type.shape.dim or o.type.tensor_type.shape.dim[0].dim_value != 1 for o in outputs):
        return model, specs, False, ("served without batching: the model has a fixed batch of 1 but not "
                                     "every output has a leading dim of 1")
    candidate = onnx.ModelProto()
    candidate.CopyFrom(model)
    for value in [v for v in candidate.graph.input if v.name in fixed] + list(candidate.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = "batch"
    del candidate.graph.value_info[:]
    patched = 0
    constants = {init.name: init for init in candidate.graph.initializer}
    constant_nodes = {n.output[0]: n for n in candidate.graph.node if n.op_type == "Constant"}
    for node in candidate.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        target = node.input[1]
        tensor = constants.get(target)
        if tensor is None and target in constant_nodes:
            tensor = next((a.t for a in constant_nodes[target].attribute if a.name == "value"), None)
        if tensor is None:
            continue
        values = numpy_helper.to_array(tensor)
        if values.ndim == 1 and values.size > 1 and values[0] == 1:
            patched_values = values.copy()
            patched_values[0] = 0  # Reshape's 0 copies the input's dim 0: the batch
            new_name = f"{target}__batch_copy_{patched}"
            candidate.graph.initializer.append(numpy_helper.from_array(patched_values.astype(values.dtype), new_name))
            node.input[1] = new_name
            patched += 1
    new_specs = [InputSpec(s.name, s.dtype, [-1, *s.shape[1:]] if s.name in fixed else s.shape, s.value_range,
                           s.sequence_axis, s.pad_value, s.role) for s in specs]
    try:
        probe, _ = probe_shapes(candidate, new_specs, batchable=True)
    except SliceError as error:
        return model, specs, False, f"served without batching: with a dynamic batch dim the model fails: {error}"
    for name, (first, second) in probe.shapes.items():
        changed = [axis for axis, (a, b) in enumerate(zip(first, second)) if a != b]
        allowed = {probe.batch_sizes, probe.seq_lens} - {None}
        if len(first) != len(second) or any((first[a], second[a]) not in allowed for a in changed) or \
                sum((first[a], second[a]) == probe.batch_sizes for a in changed) > 1:
            return model, specs, False, (f"served without batching: tensor {name!r} folds the batch into other "
                                         f"dims ({list(first)} at batch 2, {list(second)} at batch 3)")
    for output in (o.name for o in candidate.graph.output):
        if probe.batch_axis(output) != 0:
            return model, specs, False, f"served without batching: output {output!r} does not carry the batch in dim 0"
    rows = 3
    batch = make_inputs(new_specs, rows, rng=np.random.default_rng(7))
    whole = make_session(candidate, optimize=False)
    original = make_session(model, optimize=False)
    output_names = [o.name for o in candidate.graph.output]
    batched = whole.run(output_names, batch)
    worst = 0.0
    for row in range(rows):
        single = original.run(output_names, {k: v[row:row + 1] for k, v in batch.items()})
        for name, full, one in zip(output_names, batched, single):
            worst = max(worst, _relative_error(one, full[row:row + 1]))
    if worst > BATCHABLE_RTOL:
        return model, specs, False, (f"served without batching: rows of a batch-3 run differ from batch-1 runs "
                                     f"(relative error {worst:.1e})")
    return candidate, new_specs, True, (
        f"made batchable: dim 0 of {', '.join(sorted(fixed))} and of every output is now 'batch' "
        f"({patched} constant Reshape targets copy dim 0); every tensor carries the batch through one axis, "
        f"never folded into other dims, and batch-3 rows equal batch-1 runs (max relative error {worst:.1e})")


# ---------------------------------------------------------------------------------------------
# Cutting
# ---------------------------------------------------------------------------------------------


def _largest_k_error(prepared: _Prepared, num_stages: int, model_name: str) -> SliceError:
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
    return len(_prepare(model, input_specs).analysis.candidate_cuts()) + 1


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
    prepared = _prepare(model, input_specs)
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


def _dim_names(prepared: _Prepared) -> dict[str, str]:
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


def _unit_costs(prepared: _Prepared, positions: list[int], balance: str, batch: int, seq_len: int | None,
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


def _measured_unit_costs(prepared: _Prepared, positions: list[int], flop_costs: list[float],
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


# ---------------------------------------------------------------------------------------------
# Running the chain: verification and stage profile
# ---------------------------------------------------------------------------------------------


class StageChain:
    """Sessions of the whole model and of every stage, sharing one tensor namespace per run."""

    def __init__(self, result: SliceResult, intra_op_threads: int = 2):

        self.result = result
        self.whole = make_session(result.whole, intra_op_threads=intra_op_threads)
        self.stages = [make_session(stage.model, intra_op_threads=intra_op_threads) for stage in result.stages]
        self.whole_inputs = [v.name for v in result.whole.graph.input]
        self.output_names = [v.name for v in result.whole.graph.output]

    def run_whole(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        try:
            values = self.whole.run(self.output_names, feeds)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises plain RuntimeErrors
            shapes = {name: value.shape for name, value in feeds.items()}
            raise SliceError(f"the whole model failed on inputs {shapes}: {str(error).splitlines()[0]}; "
                             "use batch sizes and sequence lengths the model supports") from None
        return dict(zip(self.output_names, values))

    def run_chain(self, feeds: dict[str, np.ndarray], *, check: bool = False) -> dict[str, np.ndarray]:
        namespace = dict(feeds)
        for stage, session in zip(self.result.stages, self.stages):
            stage_feeds = {name: namespace[name] for name in stage.inputs}
            try:
                values = session.run(stage.outputs, stage_feeds)
            except Exception as error:  # noqa: BLE001 - onnxruntime raises plain RuntimeErrors
                raise SliceError(f"stage {stage.index} failed on inputs "
                                 f"{ {k: v.shape for k, v in stage_feeds.items()} }: {str(error).splitlines()[0]}") from None
            if check and self.result.batchable:
                batch = next(iter(feeds.values())).shape[0]
                for name, value in zip(stage.outputs, values):
                    if value.shape[:1] != (batch,):
                        raise SliceError(f"stage {stage.index} output {name!r} has shape {value.shape}, "
                                         f"not batch-first with batch {batch}")
            namespace.update(zip(stage.outputs, values))
        return {name: namespace[name] for name in self.output_names}

    def inputs(self, batch: int, seq_len: int | None, seed: int) -> dict[str, np.ndarray]:
        return make_inputs(self.result.input_specs, batch, seq_len, rng=np.random.default_rng(seed))


def _fixed_batch(result: SliceResult) -> int | None:
    if result.batchable:
        return None
    return next((s.shape[0] for s in result.input_specs if s.shape and s.shape[0] != -1), 1)


def verify_chain(result: SliceResult, batch_sizes=(1, 4), seq_lens=None, rtol: float = 1e-4, *,
                 timing_reps: int = 5, intra_op_threads: int = 2) -> VerificationReport:
    """Run the stage chain against the whole model on random valid inputs; raise SliceError on a mismatch.

    Inputs are valid by construction (token ids below the vocabulary, masks of real lengths, random
    lengths per row). The error is relative to each output's scale (max |whole|). Timing: whole and
    chain runs interleaved, medians per batch size.
    """
    fixed = _fixed_batch(result)
    batch_sizes = [fixed] if fixed is not None else [int(b) for b in batch_sizes]
    if any(b < 1 for b in batch_sizes):
        raise BadParameterError(f"batch_sizes {batch_sizes} must be >= 1")
    has_sequence = any(s.sequence_axis is not None for s in result.input_specs)
    seq_list: list[int | None] = ([int(s) for s in (seq_lens or DEFAULT_VERIFY_SEQ_LENS)] if has_sequence else [None])
    chain = StageChain(result, intra_op_threads)
    errors = {name: 0.0 for name in chain.output_names}
    seed = 0
    for batch in batch_sizes:
        for seq_len in seq_list:
            seed += 1
            feeds = chain.inputs(batch, seq_len, seed)
            whole = chain.run_whole(feeds)
            chained = chain.run_chain(feeds, check=True)
            for name in chain.output_names:
                error = _relative_error(whole[name], chained[name])
                errors[name] = max(errors[name], error)
                if not error <= rtol:
                    raise SliceError(
                        f"stage chain differs from the whole model on output {name!r} at batch {batch}"
                        f"{f', seq {seq_len}' if seq_len else ''}: relative error {error:.2e} > rtol {rtol:g} "
                        f"(shapes {whole[name].shape} vs {chained[name].shape})")
    latency: dict[int, tuple[float, float]] = {}
    for batch in batch_sizes:
        feeds = chain.inputs(batch, seq_list[-1], 99)
        whole_ms, chain_ms = interleaved_ms(lambda: chain.run_whole(feeds), lambda: chain.run_chain(feeds),
                                            reps=timing_reps)
        latency[batch] = (whole_ms, chain_ms)
    ratio = sum(c for _, c in latency.values()) / max(sum(w for w, _ in latency.values()), 1e-9)
    return VerificationReport(errors, ratio, latency, batch_sizes, seq_list)


def interleaved_ms(first, second, *, reps: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Medians (ms) of two callables timed alternately, so drifting machine load hits both alike."""
    for _ in range(warmup):
        first()
        second()
    times_first, times_second = [], []
    for rep in range(reps):
        order = ((first, times_first), (second, times_second))
        for run, times in (order if rep % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            run()
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times_first), statistics.median(times_second)


def profile_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to ``max_batch`` (included even when it is not a power of two)."""
    if max_batch < 1:
        raise BadParameterError(f"max_batch={max_batch} must be >= 1")
    sizes, size = [], 1
    while size <= max_batch:
        sizes.append(size)
        size *= 2
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


def favoured_batch_size(latency_ms: dict[int, float], min_gain: float = 0.05) -> int:
    """The batch size after which per-sample time stops improving by more than ``min_gain``.

    Walks the batch sizes upwards; the first size whose successor improves the per-sample time by
    less than ``min_gain`` (relative) is favoured. The largest size if it keeps improving.
    """
    sizes = sorted(latency_ms)
    if not sizes:
        raise BadParameterError("latency_ms is empty")
    for size, following in zip(sizes, sizes[1:]):
        per_sample, next_per_sample = latency_ms[size] / size, latency_ms[following] / following
        if next_per_sample > per_sample * (1.0 - min_gain):
            return size
    return sizes[-1]


def profile_stages(result: SliceResult, max_batch: int, seq_len: int | None = None, *, reps: int = 5,
                   min_gain: float = 0.05, intra_op_threads: int = 2) -> list[StageProfile]:
    """Median latency of each stage at batch sizes 1, 2, 4, .. max_batch, and its favoured batch size."""

    fixed = _fixed_batch(result)
    sizes = [fixed] if fixed is not None else profile_batch_sizes(max_batch)
    has_sequence = any(s.sequence_axis is not None for s in result.input_specs)
    if has_sequence and seq_len is None:
        seq_len = DEFAULT_VERIFY_SEQ_LENS[-1]
    chain = StageChain(result, intra_op_threads)
    latency: list[dict[int, float]] = [{} for _ in result.stages]
    for batch in sizes:
        # Full-length rows: a stage's cost at a batch size is for padded batches of seq_len.
        lengths = [seq_len] * batch if has_sequence else None
        namespace = make_inputs(result.input_specs, batch, seq_len, rng=np.random.default_rng(batch),
                                lengths=lengths)
        for stage, session in zip(result.stages, chain.stages):
            feeds = {name: namespace[name] for name in stage.inputs}
            values = session.run(stage.outputs, feeds)
            namespace.update(zip(stage.outputs, values))
            latency[stage.index][batch] = median_ms(lambda: session.run(stage.outputs, feeds), reps=reps)
    return [StageProfile(stage.index, latency[stage.index], favoured_batch_size(latency[stage.index], min_gain))
            for stage in result.stages]

