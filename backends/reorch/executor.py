"""Stage executors and the per-launch data path (numpy; no Triton).

A stage executor maps ``{input name: batched array}`` to ``{output name: batched array}``. The
default runs the stage's ONNX graph with onnxruntime in-process (one session per stage; ORT
releases the GIL while it computes, so stage threads overlap). ``build_feeds`` and ``split_outputs``
turn per-request tensors into a launch's batch and back (padding and cutting sequence tensors).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from backends.common.ort import make_session
from backends.common.tensors import concat_rows, split_rows

from .errors import StageContractError
from .spec import StageSpec, StagesSpec

LOGGER = logging.getLogger(__name__)
# The index a whole-model executor carries (it is no stage of the chain).
WHOLE_GRAPH = -1


class StageExecutor(Protocol):
    stage: StageSpec  # the graph's contract: input and output names

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class OrtStageExecutor:
    """One stage's ONNX graph on onnxruntime (CPU, or CUDA when asked and available).

    ``run_bound`` is the device data path (onnxruntime I/O binding): inputs may be OrtValues
    already on the device, and outputs stay there as OrtValues (``keep_on_device``), so the stages
    of a fused chain hand boundary tensors on without a host copy. With the CUDA provider the device
    is the GPU (``device == "cuda"``); on CPU the same path runs with OrtValues in host memory.
    """

    def __init__(self, onnx_path: Path | str, stage: StageSpec, *, intra_op_threads: int = 1,
                 execution_provider: str = "cpu") -> None:
        self.stage = stage
        self.session = make_session(str(onnx_path), intra_op_threads, execution_provider)
        self.device = "cuda" if "CUDAExecutionProvider" in self.session.get_providers() else "cpu"
        self.output_names = list(stage.outputs)
        graph_inputs = {i.name for i in self.session.get_inputs()}
        missing = set(stage.inputs) - graph_inputs
        if missing:
            raise StageContractError(f"stage {stage.index} ({onnx_path}) has no graph inputs named "
                                     f"{sorted(missing)}; it has {sorted(graph_inputs)}")
        self.input_names = [name for name in stage.inputs]
        missing = set(stage.outputs) - {o.name for o in self.session.get_outputs()}
        if missing:
            raise StageContractError(f"graph {onnx_path} has no outputs named {sorted(missing)}")

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = self.session.run(self.output_names, {name: feeds[name] for name in self.input_names})
        return dict(zip(self.output_names, results))

    def run_bound(self, feeds: Mapping[str, object], *, keep_on_device: bool) -> dict[str, object]:
        """Run with I/O binding: numpy feeds are bound from host memory, OrtValues as they are (on the
        device); outputs are OrtValues on ``self.device`` if ``keep_on_device``, else numpy arrays."""
        binding = self.session.io_binding()
        for name in self.input_names:
            value = feeds[name]
            if isinstance(value, np.ndarray):
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
            else:
                binding.bind_ortvalue_input(name, value)
        for name in self.output_names:
            binding.bind_output(name, self.device if keep_on_device else "cpu")
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return {name: value if keep_on_device else value.numpy() for name, value in zip(self.output_names, values)}


def make_ort_executors(spec: StagesSpec, repository_root: Path | str, *, intra_op_threads: int = 1,
                       execution_provider: str = "cpu") -> list[OrtStageExecutor]:
    root = Path(repository_root)
    return [OrtStageExecutor(root / stage.onnx, stage, intra_op_threads=intra_op_threads,
                             execution_provider=execution_provider) for stage in spec.stages]


def make_whole_executor(spec: StagesSpec, repository_root: Path | str, *, intra_op_threads: int = 1,
                        execution_provider: str = "cpu") -> OrtStageExecutor | None:
    """The whole model's graph (``spec.whole_onnx``) as one executor for fused runs, or None where the
    repository has no such graph or it does not take the model's inputs and give its outputs (fused
    runs then chain the stage graphs)."""
    if not spec.whole_onnx:
        LOGGER.warning("stages.json names no whole-model graph (whole_onnx): fused runs chain the %d stage graphs, "
                       "which costs more than the whole model", len(spec.stages))
        return None
    path = Path(repository_root) / spec.whole_onnx
    if not path.is_file():
        LOGGER.warning("no whole-model graph at %s: fused runs chain the %d stage graphs", path, len(spec.stages))
        return None
    whole = StageSpec(WHOLE_GRAPH, spec.whole_onnx, tuple(t.name for t in spec.inputs),
                      tuple(t.name for t in spec.outputs), spec.max_batch_size)
    try:
        return OrtStageExecutor(path, whole, intra_op_threads=intra_op_threads, execution_provider=execution_provider)
    except StageContractError as error:
        LOGGER.warning("the whole-model graph does not fit the chain (%s): fused runs chain the stage graphs", error)
        return None


def build_feeds(spec: StagesSpec, stage: StageSpec, members: Sequence[Mapping[str, np.ndarray]],
                pad_to: int | None, batched: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Concatenate the members' tensors for ``stage``, padding sequence tensors to ``pad_to``.

    ``batched``: tensors already whole for this batch (earlier stages of a fused launch), used as they are.
    """
    feeds = {}
    for name in stage.inputs:
        if batched and name in batched:
            feeds[name] = batched[name]
            continue
        tensor = spec.tensor(name)
        feeds[name] = concat_rows([m[name] for m in members], tensor.sequence_axis, tensor.pad_value,
                                  length=pad_to if tensor.sequence_axis is not None else None)
    return feeds


def split_outputs(spec: StagesSpec, stage: StageSpec, outputs: Mapping[str, np.ndarray], rows: Sequence[int],
                  lengths: Sequence[int | None], *, batched: Mapping[str, np.ndarray] | None = None,
                  keep: set[str] | None = None) -> list[dict[str, np.ndarray]]:
    """Per-member outputs of a launch; sequence tensors are cut back to each member's own length.

    A fused launch passes the tensors its earlier stages made (``batched``) and the names still
    needed after it (``keep``): only those are cut, nothing else is copied.
    """
    per_member: list[dict[str, np.ndarray]] = [{} for _ in rows]
    total = sum(rows)
    for name in stage.outputs:
        if name not in outputs:
            raise StageContractError(f"stage {stage.index} did not return its output '{name}'")
    sources = {**(batched or {}), **outputs}
    names = list(stage.outputs) if keep is None else [n for n in sources if n in keep]
    for name in names:
        array = sources[name]
        if not isinstance(array, np.ndarray):  # an OrtValue left on the device by a fused chain
            array = array.numpy()
        if array.ndim == 0 or array.shape[0] != total:
            raise StageContractError(f"stage {stage.index} returned '{name}' with shape {array.shape} "
                                     f"for a batch of {total} rows; stage outputs must be batch-first")
        pieces = split_rows(array, rows, spec.tensor(name).sequence_axis, lengths)
        for member, piece in zip(per_member, pieces):
            member[name] = piece
    return per_member


def split_even(stage: StageSpec, outputs: Mapping[str, np.ndarray], rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """``split_outputs`` for a batch whose members all have the batch's sequence length (or none): each
    member's rows of each output, as views of the batch's arrays (rows of a C-ordered array are
    contiguous); nothing to cut, so none of the per-piece work of ``split_rows``."""
    total = sum(rows)
    arrays = []
    for name in stage.outputs:
        array = outputs.get(name)
        if array is None:
            raise StageContractError(f"stage {stage.index} did not return its output '{name}'")
        if array.ndim == 0 or array.shape[0] != total:
            raise StageContractError(f"stage {stage.index} returned '{name}' with shape {array.shape} "
                                     f"for a batch of {total} rows; stage outputs must be batch-first")
        arrays.append((name, array))
    per_member = []
    start = 0
    for count in rows:
        end = start + count
        per_member.append({name: array[start:end] for name, array in arrays})
        start = end
    return per_member
