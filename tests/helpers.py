"""Small ONNX graphs and model layouts for tests, built in code (no files, no downloads)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import ModelProto, TensorProto, helper, numpy_helper

from loadtest.tiny_models import add_python_model, build_repository, sender_model_source
from core.model_config import DynamicBatching, TensorConfig
from core.repository import add_onnx_model


# Statistical checks allow Z standard errors (a seeded draw fails with probability ~6e-5 when right).
Z = 4.0


def within(value: float, expected: float, standard_error: float) -> bool:
    """Whether ``value`` lies within ``Z`` standard errors of ``expected``."""
    return abs(value - expected) <= Z * standard_error


def matmul_model(in_features: int = 4, out_features: int = 3, seed: int = 0) -> tuple[ModelProto, np.ndarray]:
    """``y[B, out] = x[B, in] @ W``."""
    weight = np.random.default_rng(seed).standard_normal((in_features, out_features)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", in_features])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", out_features])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, weight


def token_model(vocab: int = 50, hidden: int = 4, seed: int = 0) -> tuple[ModelProto, np.ndarray]:
    """A per-token embedding lookup: ``y[B, S, H] = table[ids[B, S]]`` (padding-safe along S)."""
    table = np.random.default_rng(seed).standard_normal((vocab, hidden)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["y"], axis=0)],
        "tokens",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", hidden])],
        [numpy_helper.from_array(table, "table")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, table


def add_matmul(repository: Path, name: str = "matmul", max_batch_size: int = 8, **kwargs) -> np.ndarray:
    model, weight = matmul_model()
    add_onnx_model(
        repository,
        name,
        model,
        max_batch_size=max_batch_size,
        inputs=[TensorConfig("x", "float32", [4])],
        outputs=[TensorConfig("y", "float32", [3])],
        dynamic_batching=kwargs.pop("dynamic_batching", DynamicBatching(max_queue_delay_us=2000)),
        **kwargs,
    )
    return weight


def add_tokens(repository: Path, name: str = "tokens", vocab: int = 50, max_batch_size: int = 8) -> np.ndarray:
    model, table = token_model(vocab)
    add_onnx_model(
        repository,
        name,
        model,
        max_batch_size=max_batch_size,
        inputs=[TensorConfig("ids", "int64", [-1], sequence_axis=1, value_range=(0, vocab))],
        outputs=[TensorConfig("y", "float32", [-1, 4], sequence_axis=1)],
        dynamic_batching=DynamicBatching(max_queue_delay_us=20000),
    )
    return table


DECOUPLED_ECHO = sender_model_source(
    "Answers each request with its input doubled, as `repeat` responses, then a final flag.",
    """
    x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
    repeat = int(json.loads(request.parameters() or "{}").get("repeat", 1))
    for _ in range(repeat):
        sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("y", x * 2)]))
    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    """,
)


def add_decoupled_echo(repository: Path, name: str = "echo") -> None:
    add_python_model(repository, name, DECOUPLED_ECHO, {
        "max_batch_size": 8,
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [4]}],
        "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [4]}],
        "model_transaction_policy": {"decoupled": True},
        "instance_group": [{"count": 1, "kind": "KIND_CPU"}],
    })  # fmt: skip


def tiny_plan_folder(root: Path, plan_text: str) -> Path:
    """``root/repo`` with the load generator's tiny models and manifest, and ``root/plan.yaml``; returns the plan."""
    build_repository(root / "repo")
    plan = root / "plan.yaml"
    plan.write_text(plan_text)
    return plan


def seq_manifest(max_length: int) -> dict:
    """A manifest holding the token model ``seq`` (whole and reorch variants) of the load generator's tests."""
    return {
        "target": "embedded",
        "models": {
            "seq": {
                "max_batch_size": 8, "variants": {"whole": "seq", "reorch": "seq_reorch"},
                "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1], "value_range": [0, 100],
                            "sequence_axis": 1}],
                "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, -1]}],
                "sequence": {"max_length": max_length, "min_length": 1},
            }
        },
    }  # fmt: skip
