"""Tiny models and a manifest for the load generator's tests and benchmark (built in code, no builder needed).

* ``ident``: FP32 ``x`` [-1, 4] -> ``y = x + 1`` (no sequence axis), variant ``whole``.
* ``seq``: INT64 ``input_ids`` and ``attention_mask`` [-1, -1] -> FP32 ``y = ids * mask`` [-1, -1],
  variant ``whole`` (onnx_runner, ragged) and ``reorch``: a Python model that, like the
  reorchestrator (not decoupled), answers each request on its own response sender with ``y`` and a
  ``REORCH_RECORD``, so unary and streaming clients both reach it; it answers an error for requests
  of length :data:`ERROR_LENGTH`.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

from slicing.manifest import write_manifest
from core.model_config import DynamicBatching, TensorConfig, write_model_config
from core.repository import add_onnx_model

ERROR_LENGTH = 3

SENDER_MODEL_FRAME = '''
import json
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """{doc}"""

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
{body}
        return None
'''


def sender_model_source(doc: str, body: str) -> str:
    """The ``model.py`` of a test model that answers each request through its response sender.

    ``body`` runs once per request (it is re-indented), with ``request``, ``sender``, ``json``,
    ``time``, ``np`` and ``pb_utils`` in scope.
    """
    return SENDER_MODEL_FRAME.format(doc=doc, body=textwrap.indent(textwrap.dedent(body).strip("\n"), " " * 12))


def add_python_model(repository: Path, name: str, source: str, config: dict[str, Any]) -> None:
    """A Python-backend model folder: ``source`` as version 1's ``model.py`` and its config.pbtxt."""
    version = repository / name / "1"
    version.mkdir(parents=True, exist_ok=True)
    (version / "model.py").write_text(source)
    write_model_config(repository / name, {"name": name, "backend": "python", **config})


ECHO_SENDER_MODEL = sender_model_source(
    f"Answers y = ids * mask with a REORCH_RECORD, like the reorchestrator; refuses length {ERROR_LENGTH}.",
    f'''
    ids = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy()
    mask = pb_utils.get_input_tensor_by_name(request, "attention_mask").as_numpy()
    now_us = time.time_ns() // 1000
    if ids.shape[1] == {ERROR_LENGTH}:
        response = pb_utils.InferenceResponse(error=pb_utils.TritonError("length {ERROR_LENGTH} is refused"))
    else:
        record = {{"arrival_us": now_us, "stage0_entry_us": now_us, "exit_us": now_us,
                  "ops": [{{"op": "new", "stage": 0}}], "bucket": int(ids.shape[1]),
                  "batch_sizes": [int(ids.shape[0])]}}
        y = pb_utils.Tensor("y", (ids * mask).astype(np.float32))
        rec = pb_utils.Tensor("REORCH_RECORD", np.array([json.dumps(record).encode()], dtype=np.object_))
        response = pb_utils.InferenceResponse(output_tensors=[y, rec])
    sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    ''',
)


def build_repository(repository: Path, *, max_length: int = 32) -> dict:
    """Lay out the tiny models in ``repository``, write its manifest.json and return the manifest."""
    import onnx
    from onnx import TensorProto, helper

    repository.mkdir(parents=True, exist_ok=True)
    opset = [helper.make_opsetid("", 17)]

    ident = helper.make_model(
        helper.make_graph(
            [helper.make_node("Add", ["x", "one"], ["y"])],
            "ident",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
            [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])],
        ),
        opset_imports=opset,
    )
    ident.ir_version = 8
    onnx.checker.check_model(ident)
    add_onnx_model(
        repository, "ident", ident, max_batch_size=8,
        inputs=[TensorConfig("x", "float32", [4])], outputs=[TensorConfig("y", "float32", [4])],
        dynamic_batching=DynamicBatching(max_queue_delay_us=0),
    )  # fmt: skip

    seq = helper.make_model(
        helper.make_graph(
            [
                helper.make_node("Mul", ["input_ids", "attention_mask"], ["masked"]),
                helper.make_node("Cast", ["masked"], ["y"], to=TensorProto.FLOAT),
            ],
            "seq",
            [
                helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
            ],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])],
        ),
        opset_imports=opset,
    )
    seq.ir_version = 8
    onnx.checker.check_model(seq)
    add_onnx_model(
        repository, "seq", seq, max_batch_size=8,
        inputs=[TensorConfig("input_ids", "int64", [-1], sequence_axis=1, value_range=(0, 100)),
                TensorConfig("attention_mask", "int64", [-1], sequence_axis=1)],
        outputs=[TensorConfig("y", "float32", [-1], sequence_axis=1)],
        dynamic_batching=DynamicBatching(max_queue_delay_us=0),
    )  # fmt: skip

    add_python_model(repository, "seq_reorch", ECHO_SENDER_MODEL, {
        "max_batch_size": 8,
        "input": [{"name": "input_ids", "data_type": "TYPE_INT64", "dims": [-1]},
                  {"name": "attention_mask", "data_type": "TYPE_INT64", "dims": [-1]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [-1]},
                   {"name": "REORCH_RECORD", "data_type": "TYPE_STRING", "dims": [1]}],
        "model_transaction_policy": {"decoupled": False},  # answered through the response sender
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
    })  # fmt: skip

    manifest = {
        "schema_version": 1,
        "target": "embedded",
        "created_utc": "2026-11-29T04:00:00Z",
        "models": {
            "ident": {
                "family": "onnx", "size": None, "max_batch_size": 8,
                "variants": {"whole": "ident"},
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
                "sequence": None, "stages": [],
            },
            "seq": {
                "family": "onnx", "size": None, "max_batch_size": 8,
                "variants": {"whole": "seq", "reorch": "seq_reorch"},
                "inputs": [
                    {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1], "value_range": [0, 100],
                     "sequence_axis": 1, "pad_value": 0},
                    {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1], "value_range": [0, 2],
                     "sequence_axis": 1, "pad_value": 0, "role": "attention_mask"},
                ],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1], "sequence_axis": 1}],
                "sequence": {"max_length": max_length, "min_length": 1}, "stages": [],
            },
        },
    }  # fmt: skip
    write_manifest(repository, manifest)
    return manifest
