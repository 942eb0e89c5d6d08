"""Triton Python-backend model of the stage reorchestrator (``NAME_reorch``). Glue only.

Not decoupled. Where the cost model says stage boundaries cannot pay (``fuse``, or ``whole``: steady
load and no length diversity, or no load), ``execute`` runs the batch's chain fused, on the whole
model's graph where the repository has it, and returns its responses, like the whole model (one
response message per batch). Otherwise it is answered later: ``execute`` hands
each request's tensors and response sender to the engine and returns ``None`` at once, so Triton gives the instance its next batch while earlier
requests are still inside (cross-request batching); the engine's threads answer each request
exactly once through its sender (one response + FINAL flag). Unary gRPC, HTTP and gRPC streaming
clients all work (measured on tritonserver 2.51: docs/reorch.md). Scheduling is in
``backends.reorch.scheduler``, the data path in ``backends.reorch.engine``.
``core.reorch_deploy`` copies this file, with the ``backends`` package and ``stages.json``
beside it, into the model's version directory.

Config parameters (string values): ``policy`` (pipeline | load | operator | input | dva), every
field of ``ReorchKnobs`` by name, ``stages_file`` (default ``stages.json``), ``repository_root``
(default: the directory above the model; stage ONNX paths are relative to it),
``execution_provider`` (cpu | cuda; GPU instances use cuda) and ``cancel_poll_ms`` (period of the
cancellation check of waiting requests; running ones are checked at each stage boundary; default 0 =
no checks, see ``initialize`` for why).

Request parameter ``reorch_record`` (bool true) asks for the ``REORCH_RECORD`` output (one JSON
string per row); without it the answer carries only the model outputs (no JSON is built).
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from backends.reorch.engine import CANCELLED, INVALID, OVERLOADED, SHUTDOWN, Answer, ReorchEngine
from backends.reorch.executor import make_ort_executors, make_whole_executor
from backends.reorch.metrics import TritonMetrics
from backends.reorch.policies import ReorchKnobs
from backends.reorch.spec import RECORD_OUTPUT, RECORD_PARAMETER, StagesSpec


def wants_record(parameters_json: str) -> bool:
    """Whether a request's parameters (the JSON string Triton gives) hold ``reorch_record: true``."""
    if RECORD_PARAMETER not in parameters_json:  # the common case: no JSON parsing at all
        return False
    try:
        return json.loads(parameters_json).get(RECORD_PARAMETER) is True
    except ValueError:
        return False


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        # pb_utils' error classes exist only once the stub runs (not at import time).
        self.error_codes = {
            INVALID: pb_utils.TritonError.INVALID_ARG,
            CANCELLED: pb_utils.TritonError.CANCELLED,
            SHUTDOWN: pb_utils.TritonError.UNAVAILABLE,
            OVERLOADED: pb_utils.TritonError.UNAVAILABLE,
        }
        self.final_flag = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        parameters = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        model_dir = args["model_repository"]
        version_dir = os.path.join(model_dir, args["model_version"])
        spec = StagesSpec.load(os.path.join(version_dir, parameters.get("stages_file", "stages.json")))
        root = parameters.get("repository_root") or os.path.dirname(os.path.abspath(model_dir))
        knobs = ReorchKnobs.from_parameters(parameters)
        provider = "cuda" if args.get("model_instance_kind") == "GPU" else parameters.get("execution_provider", "cpu")
        executors = make_ort_executors(spec, root, intra_op_threads=knobs.intra_op_threads, execution_provider=provider)
        whole = make_whole_executor(spec, root, intra_op_threads=knobs.intra_op_threads,
                                    execution_provider=provider) if knobs.fused_graph == "whole" else None
        self.output_dtypes = {
            output["name"]: pb_utils.triton_string_to_numpy(output["data_type"]) for output in config["output"]
        }
        self.input_names = [tensor.name for tensor in spec.inputs]
        # 0 (default): never ask Triton whether a request was cancelled. On tritonserver 2.51 asking
        # (is_cancelled) while clients cancel streams crashed the server (docs/reorch.md).
        cancel_poll_ms = float(parameters.get("cancel_poll_ms", "0"))
        self.engine = ReorchEngine(
            spec,
            parameters.get("policy", "dva"),
            knobs,
            executors,
            self._respond,
            metrics=TritonMetrics(pb_utils, args["model_name"], len(spec.stages)),
            cancel_probe=self._cancelled if cancel_poll_ms > 0 else None,
            cancel_poll_s=cancel_poll_ms / 1000,
            whole=whole,
        )

    def execute(self, requests):
        # Every batch passes here, with cold caches between batches (docs/reorch.md): short loops.
        get_input = pb_utils.get_input_tensor_by_name
        items = []
        records = []
        for request in requests:
            tensors = {}
            for name in self.input_names:
                tensor = get_input(request, name)
                if tensor is not None:
                    tensors[name] = tensor.as_numpy()
            record_wanted = wants_record(request.parameters())
            records.append(record_wanted)
            items.append(([request, record_wanted], tensors))
        answers = self.engine.run_inline(items, records)
        if answers is not None:  # the cost model ran the batch fused, here: one response message for all
            return [self._response(record_wanted, answer) for record_wanted, (_, answer) in zip(records, answers)]
        for handle, tensors in items:
            handle[0] = handle[0].get_response_sender()  # the request object itself is not kept
            for name, array in tensors.items():
                # Copy: the request's buffers are released once execute returns.
                tensors[name] = np.array(array, copy=True)
        self.engine.submit(items, arrivals_noted=True)  # run_inline has counted them
        return None

    def finalize(self):
        self.engine.close("shutting down: the model is being unloaded")

    # ---- engine callbacks (engine threads) ----
    def _respond(self, handle, answer: Answer) -> None:
        sender, record_wanted = handle
        sender.send(self._response(record_wanted, answer), flags=self.final_flag)

    def _response(self, record_wanted: bool, answer: Answer):
        if answer.ok:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(array, dtype=self.output_dtypes[name]))
                       for name, array in answer.outputs.items()]
            if record_wanted:
                rows = next(iter(answer.outputs.values())).shape[0]
                record = json.dumps(answer.record).encode()
                tensors.append(pb_utils.Tensor(RECORD_OUTPUT, np.full((rows, 1), record, dtype=np.object_)))
            return pb_utils.InferenceResponse(output_tensors=tensors)
        message = answer.message
        if record_wanted:
            message = f"{message} ({RECORD_OUTPUT} {json.dumps(answer.record)})"
        code = self.error_codes.get(answer.kind, pb_utils.TritonError.INTERNAL)
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

    @staticmethod
    def _cancelled(handles):
        return [sender.is_cancelled() for sender, _ in handles]
