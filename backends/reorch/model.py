"""Triton Python-backend model of the stage reorchestrator (``NAME_reorch``). Glue only.

Decoupled (gRPC streaming only): ``execute`` hands each request's tensors and response sender to
the engine and returns at once, so one instance keeps many batches in flight; the engine's threads
answer each request exactly once through its sender. Scheduling is in ``backends.reorch.scheduler``,
the data path in ``backends.reorch.engine``. ``deploy.write_reorch_model`` copies this file, with the
``backends`` package and ``stages.json`` beside it, into the model's version directory.

Config parameters (string values): ``policy`` (pipeline | load | operator | input | dva), every
field of ``ReorchKnobs`` by name, ``stages_file`` (default ``stages.json``), ``repository_root``
(default: the directory above the model; stage ONNX paths are relative to it),
``execution_provider`` (cpu | cuda; GPU instances use cuda) and ``cancel_poll_ms`` (period of the
cancellation check of waiting requests; running ones are checked at each stage boundary; default 0 =
no checks, see ``initialize`` for why).
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from backends.reorch.engine import CANCELLED, INVALID, SHUTDOWN, Answer, ReorchEngine
from backends.reorch.executor import make_ort_runners
from backends.reorch.metrics import TritonMetrics
from backends.reorch.policies import ReorchKnobs
from backends.reorch.spec import StagesSpec

RECORD_OUTPUT = "REORCH_RECORD"


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}
        model_dir = args["model_repository"]
        version_dir = os.path.join(model_dir, args["model_version"])
        spec = StagesSpec.load(os.path.join(version_dir, parameters.get("stages_file", "stages.json")))
        root = parameters.get("repository_root") or os.path.dirname(os.path.abspath(model_dir))
        knobs = ReorchKnobs.from_parameters(parameters)
        provider = "cuda" if args.get("model_instance_kind") == "GPU" else parameters.get("execution_provider", "cpu")
        runners = make_ort_runners(spec, root, intra_op_threads=knobs.intra_op_threads, execution_provider=provider)
        self.output_dtypes = {
            output["name"]: pb_utils.triton_string_to_numpy(output["data_type"]) for output in config["output"]
        }
        self.input_names = [tensor.name for tensor in spec.inputs]
        # 0 (default): never ask Triton whether a request was cancelled. On tritonserver 2.51 asking
        # (sender.is_cancelled) while clients cancel streams crashed the server in about 1 of 8 runs
        # (segfault in TRITONBACKEND_ResponseFactoryIsCancelled); with 0 it never did (0 of 16).
        cancel_poll_ms = float(parameters.get("cancel_poll_ms", "0"))
        self.engine = ReorchEngine(
            spec,
            parameters.get("policy", "dva"),
            knobs,
            runners,
            self._respond,
            metrics=TritonMetrics(pb_utils, args["model_name"], len(spec.stages)),
            cancel_probe=self._cancelled if cancel_poll_ms > 0 else None,
            cancel_poll_s=cancel_poll_ms / 1000,
        )

    def execute(self, requests):
        items = []
        for request in requests:
            tensors = {}
            for name in self.input_names:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    # Copy: the request's buffers are released once execute returns.
                    tensors[name] = np.array(tensor.as_numpy(), copy=True)
            items.append((request.get_response_sender(), tensors))
        self.engine.submit(items)
        return None

    def finalize(self):
        self.engine.close("shutting down: the model is being unloaded")

    # ---- engine callbacks (engine threads) ----
    def _respond(self, sender, answer: Answer) -> None:
        record = json.dumps(answer.record)
        if answer.ok:
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(array.astype(self.output_dtypes[name], copy=False)))
                for name, array in answer.outputs.items()
            ]
            rows = next(iter(answer.outputs.values())).shape[0]
            tensors.append(pb_utils.Tensor(RECORD_OUTPUT, np.full((rows, 1), record.encode(), dtype=np.object_)))
            response = pb_utils.InferenceResponse(output_tensors=tensors)
        else:
            code = {
                INVALID: pb_utils.TritonError.INVALID_ARG,
                CANCELLED: pb_utils.TritonError.CANCELLED,
                SHUTDOWN: pb_utils.TritonError.UNAVAILABLE,
            }.get(answer.kind, pb_utils.TritonError.INTERNAL)
            message = f"{answer.message} ({RECORD_OUTPUT} {record})"
            response = pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    @staticmethod
    def _cancelled(senders):
        return [sender.is_cancelled() for sender in senders]
