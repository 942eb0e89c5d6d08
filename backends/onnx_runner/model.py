"""Triton Python-backend model that serves one ONNX graph with onnxruntime.

Glue only: the batching logic is in ``backends.onnx_runner.batch``. The repository builder
copies this file, with the ``backends`` package beside it, into the model's version directory.

Config parameters (all optional, string values):
  ``onnx_file``           graph file relative to the version directory (default ``model.onnx``)
  ``intra_op_threads``    onnxruntime intra-op threads (default 1; 0 = onnxruntime's default)
  ``execution_provider``  ``cpu`` (default) or ``cuda``
  ``tensor_meta``         JSON ``{name: {"sequence_axis": 1, "pad_value": 0, "value_range": [0, 30522]}}``
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

from backends.common.ort import make_session
from backends.onnx_runner.batch import BatchRunner, TensorInfo


def _parameters(config: dict) -> dict[str, str]:
    return {key: value.get("string_value", "") for key, value in config.get("parameters", {}).items()}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = _parameters(config)
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        onnx_path = os.path.join(version_dir, parameters.get("onnx_file", "model.onnx"))
        provider = parameters.get("execution_provider", "cpu")
        if args.get("model_instance_kind") == "GPU":
            provider = "cuda"
        session = make_session(onnx_path, int(parameters.get("intra_op_threads", "1")), provider)
        meta = json.loads(parameters.get("tensor_meta", "{}") or "{}")
        self.output_dtypes = {
            output["name"]: pb_utils.triton_string_to_numpy(output["data_type"]) for output in config["output"]
        }
        self.runner = BatchRunner(
            session=session,
            input_dtypes={
                item["name"]: np.dtype(pb_utils.triton_string_to_numpy(item["data_type"])) for item in config["input"]
            },
            output_names=list(self.output_dtypes),
            tensor_info={name: TensorInfo.from_dict(values) for name, values in meta.items()},
            batching=int(config.get("max_batch_size", 0)) > 0,
        )

    def execute(self, requests):
        inputs = []
        for request in requests:
            arrays = {}
            for name in self.runner.input_dtypes:
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    arrays[name] = tensor.as_numpy()
            inputs.append(arrays)
        responses = []
        for result in self.runner.run(inputs):
            if result.error is not None:
                code = pb_utils.TritonError.INVALID_ARG if result.invalid else pb_utils.TritonError.INTERNAL
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(result.error, code)))
                continue
            tensors = [
                pb_utils.Tensor(name, np.ascontiguousarray(array.astype(self.output_dtypes[name], copy=False)))
                for name, array in result.outputs.items()
            ]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
