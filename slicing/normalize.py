"""Load any ONNX model and normalise it so it can be cut: the first steps of :func:`slicing.slicer.slice_model`.

:func:`load_model` reads a proto, bytes or a path and checks it; :func:`prepare` drops initializers
listed as graph inputs, makes a fixed-batch-1 model batchable when that is provably safe, probes
tensor shapes at two batch/sequence sizes, rebuilds ``Shape(activation)`` from input shapes, and
returns the normalised model with its analysis (:class:`PreparedModel`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from backends.common.ort import make_session
from slicing.cost import DEFAULT_INTRA_OP_THREADS
from slicing.graph import GraphAnalysis, ProbeShapes, probe_shapes, rebuild_activation_shapes
from slicing.inputs import InputSpec, infer_input_specs, make_inputs
from core.errors import BadParameterError, SliceError

if TYPE_CHECKING:
    import onnx

BATCHABLE_RTOL = 1e-4


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
class PreparedModel:
    """A model ready to cut: normalised whole model, its specs, probe shapes and analysis."""

    whole: onnx.ModelProto
    specs: list[InputSpec]
    probe: ProbeShapes
    analysis: GraphAnalysis
    batchable: bool
    notes: list[str]


def prepare(model, input_specs: list[InputSpec] | None) -> PreparedModel:

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
    return PreparedModel(proto, specs, probe, GraphAnalysis(proto, probe), batchable, notes)


def _check_same_outputs(model: onnx.ModelProto, samples: dict, what: str, rtol: float = 1e-5) -> None:

    session = make_session(model, DEFAULT_INTRA_OP_THREADS, optimize=False)
    inputs = [v.name for v in model.graph.input]
    outputs = [v.name for v in model.graph.output]
    for sample in samples.values():
        values = session.run(outputs, {name: sample[name] for name in inputs})
        for name, value in zip(outputs, values):
            error = relative_error(sample[name], value)
            if error > rtol:
                raise SliceError(f"internal: {what} changed output {name!r} (relative error {error:.2e})")


def relative_error(reference: np.ndarray, value: np.ndarray) -> float:
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
    whole = make_session(candidate, DEFAULT_INTRA_OP_THREADS, optimize=False)
    original = make_session(model, DEFAULT_INTRA_OP_THREADS, optimize=False)
    output_names = [o.name for o in candidate.graph.output]
    batched = whole.run(output_names, batch)
    worst = 0.0
    for row in range(rows):
        single = original.run(output_names, {k: v[row:row + 1] for k, v in batch.items()})
        for name, full, one in zip(output_names, batched, single):
            worst = max(worst, relative_error(one, full[row:row + 1]))
    if worst > BATCHABLE_RTOL:
        return model, specs, False, (f"served without batching: rows of a batch-3 run differ from batch-1 runs "
                                     f"(relative error {worst:.1e})")
    return candidate, new_specs, True, (
        f"made batchable: dim 0 of {', '.join(sorted(fixed))} and of every output is now 'batch' "
        f"({patched} constant Reshape targets copy dim 0); every tensor carries the batch through one axis, "
        f"never folded into other dims, and batch-3 rows equal batch-1 runs (max relative error {worst:.1e})")
