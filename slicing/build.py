"""The repository builder: zoo model or user ONNX file -> a ready Triton model repository.

Per model ``NAME`` it writes the whole model (``NAME``, one dynamic batcher), the stages
(``NAME_stage0..K-1``, each with its own dynamic batcher) and their ensemble (``NAME_ensemble``),
the stage reorchestrator (``NAME_reorch``, :mod:`core.reorch_deploy`), and an
entry in the repository's ``manifest.json``. Everything is checked before it is written: the stage
chain must reproduce the whole model (``verify_chain``), and each config is validated against
Triton's schema when rendered. The builder decides what to write (tensors, batchers, stage names);
the config content comes from :mod:`core.model_config`, the folders from :mod:`core.repository`.
"""

from __future__ import annotations

import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slicing import manifest as manifest_lib
from slicing.chain import profile_stages, verify_chain
from slicing.export import export_zoo_model
from slicing.inputs import InputSpec, infer_input_specs
from slicing.slicer import BALANCES, max_stages, slice_model
from slicing.zoo import MODEL_NAMES, SIZES, ZOO, OutputSpec, build_zoo_model
from core.errors import BadParameterError, SliceError
from core.manifest import find_manifest
from core.model_config import TARGETS, DynamicBatching, EnsembleStep, TensorConfig, ensemble_config, write_model_config
from core.reorch_deploy import write_reorch_model
from core.repository import add_onnx_model

if TYPE_CHECKING:
    import onnx

DEFAULT_STAGES = 4
_NAME_RULE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


# The queue timeout (µs) that answers a crashed Python stub's queue within seconds: without one,
# tritonserver 2.51 fails the requests queued in front of a dead stub one batch per second (docs/gpu.md,
# "Supervision"). Opt-in (`stagebatch build --default-timeout-us`), not the default: on 2.51 any queue
# policy (a timeout or a max queue size) leaves requests in the dynamic batcher for up to its 500 ms idle
# wait. Measured with perf_analyzer, 8 calls outstanding: p99 503 ms against 6-8 ms (tiny lstm), 516
# against 24-30 ms (small bert_base), a tenth to a third of the throughput (bench/queue_policy.py,
# docs/gpu.md).
CRASH_QUEUE_TIMEOUT_US = 2_000_000
QUEUE_POLICY_WARNING = ("warning: a queue policy (--max-queue-size, --default-timeout-us) makes tritonserver 2.51's "
                        "dynamic batcher hold requests for up to 500 ms under concurrent calls (docs/gpu.md); "
                        "build without one unless a crashed model's queue must be answered within seconds")


@dataclass
class BuildOptions:
    """How to build: the values of ``stagebatch build``'s options."""

    size: str = "small"
    stages: int | None = None  # None: DEFAULT_STAGES, or the largest valid K when that is smaller
    target: str = "embedded"
    max_batch: int = 16
    queue_delay_us: int = 100
    balance: str = "measured"
    cut_tensors: list[str] = field(default_factory=list)
    weights: Path | None = None
    max_seq_len: int | None = None  # sequence models: bound of the dynamic sequence axis
    seed: int = 0
    instance_count: int = 1
    # onnxruntime intra-op threads of every session the build serves (whole, stages, reorch stages);
    # 0 = onnxruntime's default, all physical cores, so the one-entry baseline is not held to one core.
    intra_op_threads: int = 0
    # Triton's queue policy (0: off). The timeout applies to every batcher (whole, stages, reorch);
    # max_queue_size only to the whole model and reorch: on 24.10 a full stage queue behind an
    # ensemble leaves the ensemble's requests stuck (fixed upstream in core#466).
    max_queue_size: int = 0
    default_timeout_us: int = 0  # 0: Triton's stock batcher; CRASH_QUEUE_TIMEOUT_US trades 500 ms stalls for crash recovery

    def __post_init__(self) -> None:
        for name, option, choices in _CHOICES:
            if getattr(self, name) not in choices:
                raise BadParameterError(f"{option} {getattr(self, name)!r}: choose one of {', '.join(choices)}")
        for name, option, minimum, meaning in _MINIMUMS:
            value = getattr(self, name)
            if value is not None and value < minimum:
                raise BadParameterError(f"{option} {value}: must be >= {minimum}{meaning}")
        if self.cut_tensors and self.stages is not None and self.stages != len(self.cut_tensors) + 1:
            raise BadParameterError(
                f"--stages {self.stages} disagrees with {len(self.cut_tensors)} --cut tensors "
                f"(K cuts give K+1 stages); drop --stages or one of them")


# BuildOptions fields checked against a vocabulary: (field, CLI option, the valid values)
_CHOICES = (("size", "--size", SIZES), ("target", "--target", TARGETS), ("balance", "--balance", BALANCES))
# BuildOptions fields with a lower bound (None: unset): (field, CLI option, smallest value, what it means)
_MINIMUMS = (
    ("stages", "--stages", 1, ""),
    ("max_batch", "--max-batch", 1, ""),
    ("queue_delay_us", "--queue-delay-us", 0, ""),
    ("max_seq_len", "--max-seq-len", 1, ""),
    ("instance_count", "--instances", 1, ""),
    ("intra_op_threads", "--intra-op-threads", 0, " (0: all cores)"),
    ("max_queue_size", "--max-queue-size", 0, " (0: unbounded)"),
    ("default_timeout_us", "--default-timeout-us", 0, " (0: no timeout)"),
)


@dataclass
class ModelBuild:
    """What building one model produced (for the summary table and the tests)."""

    name: str
    entry: dict[str, Any]  # its manifest entry
    notes: list[str]
    verified_max_rel_error: float
    build_s: float

    @property
    def stage_names(self) -> list[str]:
        return [stage["model_name"] for stage in self.entry["stages"]]


@dataclass
class _Source:
    """A model to build, whatever it came from."""

    name: str
    family: str
    size: str | None
    onnx_path: Path
    input_specs: list[InputSpec]
    outputs: list[OutputSpec] | None  # known for zoo models; from the slicer for user files
    sequence: dict[str, int] | None
    source: str  # "zoo" | "onnx"
    extra: dict[str, Any] = field(default_factory=dict)  # build facts for the manifest
    default_seq_len: int | None = None


Log = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def build_repository(out: Path, *, models: list[str] | None = None, onnx_file: Path | None = None,
                     options: BuildOptions | None = None, log: Log = _quiet) -> list[ModelBuild]:
    """Build zoo ``models`` (``["all"]`` for all three) or ``onnx_file`` into repository ``out``."""
    options = options or BuildOptions()
    if (models is None) == (onnx_file is None):
        raise BadParameterError("give either --model NAME or --onnx FILE (exactly one)")
    if onnx_file is not None and options.weights is not None:
        raise BadParameterError("--weights loads a zoo model's state dict; an --onnx file carries its own weights")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise BadParameterError(f"--out {out}: exists and is not a directory")
    found = find_manifest(out) if out.is_dir() else None
    existing = found.raw if found is not None else None
    if existing is not None and existing.get("target") != options.target:
        manifest_lib.merge_manifest(existing, options.target, {})  # raises the target mismatch error
    names: list[str] = []
    if models is not None:
        for name in models:
            if name == "all":
                names.extend(MODEL_NAMES)
            elif name not in MODEL_NAMES:
                raise BadParameterError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}, "
                                        f"'all', or pass --onnx FILE for your own model")
            else:
                names.append(name)
        names = list(dict.fromkeys(names))
        if options.weights is not None and len(names) != 1:
            raise BadParameterError("--weights loads one model's state dict; build one --model at a time")
    out.mkdir(parents=True, exist_ok=True)
    if options.max_queue_size or options.default_timeout_us:
        log(QUEUE_POLICY_WARNING)

    builds = []
    for name in names or [None]:
        source = _zoo_source(name, options, log) if name is not None else _onnx_source(Path(onnx_file), options)
        build = _build_one(out, source, options, existing, log)
        # Merge after each model, so a later failure keeps what was built.
        existing = manifest_lib.merge_manifest(existing, options.target, {build.name: build.entry})
        manifest_lib.write_manifest(out, existing)
        builds.append(build)
    return builds


def _zoo_source(name: str, options: BuildOptions, log: Log) -> _Source:
    max_seq_len = options.max_seq_len
    if max_seq_len is not None and not ZOO[name].has_sequence(options.size):
        # `--model all --max-seq-len N` bounds the sequence models; the CNN has no sequence axis.
        log(f"{name}: no sequence axis; --max-seq-len {max_seq_len} does not apply")
        max_seq_len = None
    model = build_zoo_model(name, options.size, weights=options.weights, seed=options.seed,
                            max_seq_len=max_seq_len)
    exported = export_zoo_model(model)
    log(f"{name}: {'cached export' if exported.cached else f'exported in {exported.export_s:.1f} s'} "
        f"({model.parameter_count / 1e6:.2f} M parameters) -> {exported.path}")
    sequence = None
    if model.sequence is not None:
        sequence = {"max_length": model.sequence.max_length, "min_length": model.sequence.min_length}
    return _Source(
        name=name, family=model.family, size=model.size, onnx_path=exported.path,
        input_specs=model.input_specs, outputs=model.outputs, sequence=sequence, source="zoo",
        default_seq_len=model.sequence.default_length if model.sequence else None,
        extra={"seed": model.seed, "weights": str(model.weights_path) if model.weights_path else None,
               "weights_sha256": model.weights_sha256, "architecture": model.architecture})


def _onnx_source(path: Path, options: BuildOptions) -> _Source:
    import onnx

    if not path.is_file():
        raise BadParameterError(f"--onnx {path}: no such file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - DecodeError and friends: not an ONNX file
        raise BadParameterError(f"--onnx {path} is not an ONNX model ({type(error).__name__}); "
                                f"export one with torch.onnx.export") from None
    if not proto.graph.node:
        raise BadParameterError(f"--onnx {path} is not an ONNX model (it holds no graph nodes)")
    name = re.sub(r"[^A-Za-z0-9_]", "_", path.stem)
    if not name[:1].isalpha():
        name = f"m_{name}"
    specs = infer_input_specs(proto)
    sequence = None
    if any(spec.sequence_axis is not None for spec in specs):
        sequence = {"max_length": options.max_seq_len or 128, "min_length": 1}
    return _Source(name=name, family="onnx", size=None, onnx_path=path, input_specs=specs, outputs=None,
                   sequence=sequence, source="onnx", extra={"file": str(path.resolve())},
                   default_seq_len=min(16, sequence["max_length"]) if sequence else None)


def _choose_stages(proto: onnx.ModelProto, source: _Source, options: BuildOptions, log: Log) -> tuple[int, list[str]]:
    notes = []
    if options.cut_tensors:
        return len(options.cut_tensors) + 1, notes
    largest = max_stages(proto, source.input_specs)
    if options.stages is None:
        stages = min(DEFAULT_STAGES, largest)
        if stages < DEFAULT_STAGES:
            notes.append(f"{largest} stages at most for {source.name} (default {DEFAULT_STAGES}); building {stages}")
        return stages, notes
    if options.stages > largest:
        raise SliceError(f"--stages {options.stages} is too large for {source.name}: the largest valid K "
                         f"is {largest}; pass --stages {largest} or fewer")
    return options.stages, notes


def _build_one(out: Path, source: _Source, options: BuildOptions, existing: dict[str, Any] | None,
               log: Log) -> ModelBuild:
    import onnx

    started = time.perf_counter()
    proto = onnx.load(str(source.onnx_path))
    stages, notes = _choose_stages(proto, source, options, log)
    profile_batch = min(8, options.max_batch)
    result = slice_model(proto, stages, cut_tensors=options.cut_tensors or None, input_specs=source.input_specs,
                         balance=options.balance, profile_batch_size=profile_batch, seq_len=source.default_seq_len)
    notes.extend(result.notes)
    for note in notes:
        log(f"{source.name}: {note}")
    verify_batches = (1, min(4, options.max_batch)) if result.batchable else (1,)
    report = verify_chain(result, batch_sizes=verify_batches,
                          seq_lens=(source.default_seq_len,) if source.default_seq_len else None)
    max_rel_error = max(report.max_rel_error.values(), default=0.0)
    max_batch = options.max_batch if result.batchable else 0
    profiles = profile_stages(result, max(1, max_batch), seq_len=source.default_seq_len)

    _remove_previous(out, source.name, existing)
    if source.source == "onnx":  # the slicer may have normalised the file (e.g. made it batchable)
        source.input_specs = list(result.input_specs)
    specs = {spec.name: spec for spec in source.input_specs}
    outputs = _output_tensors(source, result)
    batching = _batching(options)
    stage_batching = _batching(options, stage=True)
    whole_inputs = [_tensor_config(spec.name, spec.dtype, spec.shape, spec.sequence_axis, spec, max_batch)
                    for spec in source.input_specs]
    whole_outputs = [_tensor_config(o["name"], o["dtype"], o["shape"], o["sequence_axis"], None, max_batch)
                     for o in outputs]
    _add_onnx(out, source.name, result.whole, options, max_batch, whole_inputs, whole_outputs, batching)

    stage_entries = []
    for stage, profile in zip(result.stages, profiles):
        model_name = _stage_name(source.name, stage.index)
        metas = {name: stage.tensors[name] for name in [*stage.inputs, *stage.outputs]}
        stage_inputs = [_tensor_config(n, metas[n].dtype, metas[n].shape, metas[n].sequence_axis, specs.get(n),
                                       max_batch) for n in stage.inputs]
        stage_outputs = [_tensor_config(n, metas[n].dtype, metas[n].shape, metas[n].sequence_axis, None,
                                        max_batch) for n in stage.outputs]
        _add_onnx(out, model_name, stage.model, options, max_batch, stage_inputs, stage_outputs, stage_batching)
        stage_entries.append({
            "index": stage.index, "model_name": model_name, "onnx": f"{model_name}/1/model.onnx",
            "inputs": list(stage.inputs), "outputs": list(stage.outputs),
            "tensors": {n: _stage_tensor_entry(n, m, specs.get(n)) for n, m in metas.items()},
            "cost_share": round(float(stage.cost_share), 4),
            "favoured_batch_size": int(profile.favoured_batch_size),
            "latency_ms": {str(b): round(float(ms), 4) for b, ms in sorted(profile.latency_ms.items())},
        })
    small = [s["index"] for s in stage_entries if s["cost_share"] < 0.05]
    if small and len(stage_entries) > 1:
        note = (f"stage(s) {', '.join(map(str, small))} hold under 5% of the cost each; fewer stages "
                f"(--stages {len(stage_entries) - len(small)}) or --cut may balance better")
        notes.append(note)
        log(f"{source.name}: {note}")
    ensemble_name = f"{source.name}_ensemble"
    _write_ensemble(out, ensemble_name, max_batch, whole_inputs, whole_outputs, result.stages, source.name)

    opset = next((o.version for o in result.whole.opset_import if o.domain in ("", "ai.onnx")), None)
    entry: dict[str, Any] = {
        "family": source.family, "size": source.size, "max_batch_size": max_batch,
        "variants": {"whole": source.name, "ensemble": ensemble_name},
        "inputs": [manifest_lib.input_entry(spec) for spec in source.input_specs],
        "outputs": [manifest_lib.tensor_entry(o["name"], o["dtype"], o["shape"], sequence_axis=o["sequence_axis"])
                    for o in outputs],
        "sequence": source.sequence,
        "stages": stage_entries,
        "build": {
            "stages": len(result.stages), "balance": options.balance, "profile_batch_size": profile_batch,
            "cut_tensors": list(result.cut_tensors), "opset": opset, "source": source.source,
            "verified_max_rel_error": max_rel_error, "max_queue_delay_us": options.queue_delay_us,
            "batchable": bool(result.batchable), "notes": list(notes), **source.extra,
        },
    }
    reorch_note = _write_reorch(out, source.name, entry, options, max_batch)
    if reorch_note:
        notes.append(reorch_note)
        log(f"{source.name}: {reorch_note}")
    else:
        entry["variants"]["reorch"] = f"{source.name}_reorch"
    manifest_lib.check_model_entry(source.name, entry)
    return ModelBuild(name=source.name, entry=entry, notes=notes, verified_max_rel_error=max_rel_error,
                      build_s=time.perf_counter() - started)


def _stage_name(model: str, index: int) -> str:
    return f"{model}_stage{index}"


def _stage_tensor_entry(name: str, meta, spec) -> dict[str, Any]:
    entry = manifest_lib.tensor_entry(name, meta.dtype, meta.shape, sequence_axis=meta.sequence_axis,
                                      pad_value=_pad_value(spec))
    del entry["name"]  # the key of the stage's "tensors" dict is the name
    return entry


def _pad_value(spec) -> float:
    return spec.pad_value if spec is not None else 0


def _output_tensors(source: _Source, result) -> list[dict[str, Any]]:
    """The model's outputs: the zoo's own metadata, or the slicer's for a user file."""
    if source.outputs is not None:
        return [{"name": o.name, "dtype": o.dtype, "shape": list(o.shape), "sequence_axis": o.sequence_axis}
                for o in source.outputs]
    return [{"name": name, "dtype": meta.dtype, "shape": list(meta.shape), "sequence_axis": meta.sequence_axis}
            for name, meta in result.outputs.items()]


def _tensor_config(name: str, dtype: str, shape: list[int], sequence_axis: int | None, spec, max_batch: int):
    dims = list(shape[1:]) if max_batch > 0 else list(shape)
    return TensorConfig(name=name, dtype=dtype, dims=[int(d) for d in dims], sequence_axis=sequence_axis,
                        pad_value=_pad_value(spec), value_range=spec.value_range if spec is not None else None)


def _batching(options: BuildOptions, *, stage: bool = False):
    """The dynamic batcher of the whole model and reorch, or (``stage``) of a stage behind the ensemble."""
    return DynamicBatching(max_queue_delay_us=options.queue_delay_us,
                           max_queue_size=0 if stage else options.max_queue_size,
                           default_timeout_us=options.default_timeout_us)


def _add_onnx(out: Path, name: str, model, options: BuildOptions, max_batch: int, inputs, outputs, batching) -> None:
    add_onnx_model(out, name, model, target=options.target, max_batch_size=max_batch, inputs=inputs,
                   outputs=outputs, dynamic_batching=batching, instance_count=options.instance_count,
                   intra_op_threads=options.intra_op_threads)


def _write_ensemble(out: Path, name: str, max_batch: int, inputs, outputs, stages, prefix: str) -> None:
    model_dir = out / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)  # Triton wants a version directory, even empty
    steps = [EnsembleStep(_stage_name(prefix, stage.index), stage.inputs, stage.outputs) for stage in stages]
    write_model_config(model_dir, ensemble_config(name, max_batch, inputs, outputs, steps))


def _write_reorch(out: Path, name: str, entry: dict[str, Any], options: BuildOptions, max_batch: int) -> str | None:
    """Write ``NAME_reorch``; or return why the variant is left out (a model served without batching)."""
    if max_batch == 0:
        return "reorch variant left out: the model is served without batching, and the reorchestrator re-forms batches"
    write_reorch_model(out, name, entry, target=options.target, max_batch_size=max_batch,
                       queue_delay_us=options.queue_delay_us, policy="dva",
                       knobs={"intra_op_threads": options.intra_op_threads},
                       max_queue_size=options.max_queue_size, default_timeout_us=options.default_timeout_us)
    return None


def _remove_previous(out: Path, name: str, existing: dict[str, Any] | None) -> None:
    """Delete the model directories of an earlier build of ``name`` (its K may have been larger)."""
    if not _NAME_RULE.match(name):
        raise BadParameterError(f"model name {name!r} must start with a letter and hold only letters, "
                                f"digits and '_'")
    dirs = {name, f"{name}_ensemble", f"{name}_reorch"}
    dirs.update(p.name for p in out.glob(f"{name}_stage*") if re.fullmatch(rf"{re.escape(name)}_stage\d+", p.name))
    old = (existing or {}).get("models", {}).get(name)
    if old:
        dirs.update(old.get("variants", {}).values())
        dirs.update(stage["model_name"] for stage in old.get("stages", []))
    for directory in dirs:
        path = out / directory
        if path.is_dir() and (path / "config.pbtxt").exists():
            shutil.rmtree(path)
