"""Export zoo models to ONNX with a dynamic batch axis (and sequence axis), with an on-disk cache.

The dynamo exporter (torch >= 2.9's default) writes opset 20 with symbolic dims ``batch``/``seq``
and value_info for every intermediate tensor, which the slicer uses. Exports are cached under
``$STAGEBATCH_CACHE_DIR/exports`` (default ``~/.cache/stagebatch/exports``), keyed by model, size,
architecture, seed, weights hash, torch and onnxscript versions, so repeated builds are fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from core.errors import SliceError

if TYPE_CHECKING:
    import onnx

    from slicing.zoo import ZooModel

# A protobuf cannot exceed 2 GiB; above this the weights go to an external ``.onnx.data`` file.
_EXTERNAL_DATA_THRESHOLD_BYTES = 1_800_000_000
# Bump when the export recipe changes, so stale cache entries are not reused.
LOGGER = logging.getLogger(__name__)
_RECIPE_VERSION = 2  # bump when the export recipe changes: cached files are then redone


@dataclass
class ExportedModel:
    """An exported ONNX file and how it was made."""

    path: Path
    opset: int
    cached: bool  # True: taken from the cache, no export ran
    export_s: float  # time spent exporting (0 when cached)

    def load(self) -> onnx.ModelProto:
        import onnx

        return onnx.load(str(self.path))


def cache_dir() -> Path:
    base = os.environ.get("STAGEBATCH_CACHE_DIR")
    root = Path(base) if base else Path.home() / ".cache" / "stagebatch"
    return root / "exports"


def export_key(model: ZooModel) -> str:
    """A short hash of everything that determines the exported graph and its weights."""
    import onnxscript
    import torch

    facts = {
        "recipe": _RECIPE_VERSION, "name": model.name, "size": model.size,
        "architecture": model.architecture, "seed": model.seed, "weights": model.weights_sha256,
        "max_seq_len": model.sequence.max_length if model.sequence else None,
        "torch": torch.__version__, "onnxscript": onnxscript.__version__,
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]


def _opset_of(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def export_zoo_model(model: ZooModel, *, directory: Path | None = None, use_cache: bool = True) -> ExportedModel:
    """Export ``model`` to ONNX (or reuse the cached export) and return where it is."""
    directory = Path(directory) if directory is not None else cache_dir()
    path = directory / f"{model.name}-{model.size}-{export_key(model)}.onnx"
    if use_cache and path.is_file():
        return ExportedModel(path=path, opset=_opset_of(path), cached=True, export_s=0.0)
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    # Write under a temporary name and rename: a concurrent build never sees half a file.
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.onnx")
    try:
        _export(model, tmp)
        _repair_dynamic_dims(model, tmp)
        data = tmp.with_name(tmp.name + ".data")
        if data.exists():  # external data paths are file names: re-save under the final name
            _relink_external_data(tmp, path)
        else:
            os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp.with_name(tmp.name + ".data")):
            leftover.unlink(missing_ok=True)
    return ExportedModel(path=path, opset=_opset_of(path), cached=False, export_s=time.perf_counter() - start)


class _LogStream(io.TextIOBase):
    """A text stream whose lines become INFO records of ``logger`` (for redirected prints)."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger
        self._buffer = ""

    def writable(self) -> bool:  # noqa: D102 - io hook
        return True

    def write(self, text: str) -> int:  # noqa: D102 - io hook
        self._buffer += text
        *lines, self._buffer = self._buffer.split("\n")
        for line in lines:
            if line.strip():
                self.logger.info("%s", line.rstrip())
        return len(text)


def _export(model: ZooModel, path: Path) -> None:
    import torch

    external = model.parameter_bytes > _EXTERNAL_DATA_THRESHOLD_BYTES
    # "torchvision is not installed. Skipping torchvision::nms" x4 on every export: noise here.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    # Batch 2 examples: a batch-1 example can make torch.export specialise the batch dim.
    examples = model.example_inputs(batch=2)
    # the exporter prints its progress ("[torch.onnx] Obtain model graph ...") on stdout and onnxscript
    # logs every optimizer pass at INFO: both go to the log (a run's log file), not the console
    logging.getLogger("onnxscript").setLevel(logging.WARNING)
    with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(_LogStream(LOGGER)):
        warnings.simplefilter("ignore")  # FutureWarnings from torch.export/transformers internals
        try:
            torch.onnx.export(
                model.module, examples, str(path), input_names=model.input_names,
                output_names=model.output_names, dynamic_shapes=model.dynamic_shapes(),
                dynamo=True, external_data=external, optimize=True, verbose=False)
            specialized = _specialized_input_axes(model, path)
            if specialized and not external:
                # torch.export sometimes specialises nn.LSTM's sequence axis to the example's length
                # (seen for some Dim bounds); the TorchScript exporter keeps it dynamic.
                LOGGER.info("%s: dynamo export fixed %s; exporting with the TorchScript exporter",
                            model.name, ", ".join(specialized))
                torch.onnx.export(
                    model.module, examples, str(path), input_names=model.input_names,
                    output_names=model.output_names, dynamic_axes=_dynamic_axes(model),
                    dynamo=False, opset_version=17)
                specialized = _specialized_input_axes(model, path)
            if specialized:
                raise SliceError(f"the exporter fixed the dynamic axes {', '.join(specialized)}")
        except Exception as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise SliceError(f"ONNX export of {model.name} ({model.size}) failed with torch "
                             f"{torch.__version__}: {first}") from error


def _dynamic_axes(model: ZooModel) -> dict[str, dict[int, str]]:
    """TorchScript-exporter form of the model's dynamic axes (inputs and outputs)."""
    axes: dict[str, dict[int, str]] = {}
    for spec in model.input_specs:
        axes[spec.name] = {0: "batch"}
        if spec.sequence_axis is not None:
            axes[spec.name][spec.sequence_axis] = "seq"
    for output in model.outputs:
        axes[output.name] = {0: "batch"}
        if output.sequence_axis is not None:
            axes[output.name][output.sequence_axis] = "seq"
    return axes


def _specialized_input_axes(model: ZooModel, path: Path) -> list[str]:
    """Input axes that should be dynamic but came out as fixed numbers, as 'name[axis]'."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    fixed = []
    for tensor in graph.input:
        for axis in _dynamic_axes(model).get(tensor.name, {}):
            dims = tensor.type.tensor_type.shape.dim
            if axis < len(dims) and dims[axis].HasField("dim_value"):
                fixed.append(f"{tensor.name}[{axis}]")
    return fixed


def _relink_external_data(tmp: Path, final: Path) -> None:
    """Re-save a model with external data under its final name (external data paths are names)."""
    import onnx

    proto = onnx.load(str(tmp))
    onnx.save_model(proto, str(final), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=final.name + ".data")


def _repair_dynamic_dims(model: ZooModel, path: Path) -> None:
    """Make the declared shapes of every tensor agree with what the model really does.

    The dynamo exporter sometimes records the example's sequence length as a static dim (the LSTM's
    ``logits`` came out ``['batch', 11, 4]`` although the graph runs at any length). The slicer and
    the Triton configs trust these shapes, so probe the model at two batch sizes and two sequence
    lengths with every tensor exposed, and rewrite each dim that varies as ``batch``, ``seq`` or an
    unnamed dynamic dim. Skipped for models with external data (too large to probe cheaply).
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        return
    infos = {v.name: v for v in list(proto.graph.value_info) + list(proto.graph.output)
             if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.value_info[:]  # declared shapes would only produce warnings while probing
    del probe.graph.output[:]
    for name, info in infos.items():
        out = probe.graph.output.add()
        out.name = name
        out.type.tensor_type.elem_type = info.type.tensor_type.elem_type
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    probes = [(2, 7), (3, 11)] if model.sequence is not None else [(2, None), (3, None)]
    if model.sequence is not None and model.sequence.max_length < 11:
        probes = [(2, max(1, model.sequence.max_length - 1)), (3, model.sequence.max_length)]
    observed = []
    for batch, seq in probes:
        feeds = {n: t.numpy() for n, t in zip(model.input_names, model.example_inputs(batch, seq))}
        observed.append(dict(zip(names, (np.shape(a) for a in session.run(names, feeds)))))
    for name, info in infos.items():
        shapes = [obs.get(name) for obs in observed]
        dims = info.type.tensor_type.shape.dim
        if any(s is None or len(s) != len(dims) for s in shapes):
            continue
        for axis, dim in enumerate(dims):
            values = [s[axis] for s in shapes]
            if values[0] == values[1]:
                if not dim.HasField("dim_param") and dim.dim_value != values[0]:
                    dim.dim_value = values[0]  # unknown or wrong, but constant whatever batch and seq
                continue
            symbol = ("batch" if values == [p[0] for p in probes]
                      else "seq" if values == [p[1] for p in probes] else None)
            dim.Clear()
            if symbol:
                dim.dim_param = symbol
    onnx.save(proto, str(path))
