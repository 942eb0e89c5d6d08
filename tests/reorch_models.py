"""Tiny staged models for reorchestrator tests, built in code with onnx.helper.

``write_sequence_chain``: a 3-stage sequence model (token embedding -> masked per-token MLP ->
masked mean pooling + per-token output), padding-safe like BERT. ``write_mlp_chain``: a 2-stage MLP
without a sequence axis. Each writes the stage ONNX files under a repository and returns a manifest
entry (docs/architecture.md) and a numpy reference of the whole model for one request.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

VOCAB, HIDDEN = 50, 8


def _save(model_graph, path: Path) -> None:
    model = helper.make_model(model_graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))


def _weights(seed: int = 0):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    w1 = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) / 3
    w2 = rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) / 3
    return table, w1, w2


def write_sequence_chain(repository: Path, name: str = "seqm", *, max_batch_size: int = 8, max_length: int = 32,
                         favoured: tuple[int, int, int] = (4, 4, 4), value_range: bool = True):
    """Three stages; returns (manifest entry, reference(tokens, mask) -> {"hidden", "pooled"})."""
    table, w1, w2 = _weights()
    f, i64 = TensorProto.FLOAT, TensorProto.INT64
    seq3 = ["batch", "seq", HIDDEN]
    mask_float = [helper.make_node("Unsqueeze", ["attention_mask", "axis2"], ["mask3"]),
                  helper.make_node("Cast", ["mask3"], ["maskf"], to=f)]
    axis2 = numpy_helper.from_array(np.array([2], np.int64), "axis2")
    stage0 = helper.make_graph(
        [helper.make_node("Gather", ["table", "tokens"], ["stage0_out0"], axis=0)], f"{name}_stage0",
        [helper.make_tensor_value_info("tokens", i64, ["batch", "seq"])],
        [helper.make_tensor_value_info("stage0_out0", f, seq3)], [numpy_helper.from_array(table, "table")])
    stage1 = helper.make_graph(
        [*mask_float, helper.make_node("MatMul", ["stage0_out0", "w1"], ["mm"]),
         helper.make_node("Relu", ["mm"], ["relu"]), helper.make_node("Mul", ["relu", "maskf"], ["stage1_out0"])],
        f"{name}_stage1",
        [helper.make_tensor_value_info("stage0_out0", f, seq3),
         helper.make_tensor_value_info("attention_mask", i64, ["batch", "seq"])],
        [helper.make_tensor_value_info("stage1_out0", f, seq3)],
        [numpy_helper.from_array(w1, "w1"), axis2])
    stage2 = helper.make_graph(
        [*mask_float,
         helper.make_node("ReduceSum", ["stage1_out0", "axis1"], ["total"], keepdims=0),
         helper.make_node("ReduceSum", ["maskf", "axis1"], ["count"], keepdims=0),
         helper.make_node("Max", ["count", "one"], ["count1"]),
         helper.make_node("Div", ["total", "count1"], ["pooled"]),
         helper.make_node("MatMul", ["stage1_out0", "w2"], ["mm2"]),
         helper.make_node("Unsqueeze", ["pooled", "axis1"], ["pooled3"]),
         helper.make_node("Add", ["mm2", "pooled3"], ["pre"]),
         helper.make_node("Tanh", ["pre"], ["hidden"])],
        f"{name}_stage2",
        [helper.make_tensor_value_info("stage1_out0", f, seq3),
         helper.make_tensor_value_info("attention_mask", i64, ["batch", "seq"])],
        [helper.make_tensor_value_info("hidden", f, seq3),
         helper.make_tensor_value_info("pooled", f, ["batch", HIDDEN])],
        [numpy_helper.from_array(w2, "w2"), axis2, numpy_helper.from_array(np.array([1], np.int64), "axis1"),
         numpy_helper.from_array(np.array([1.0], np.float32), "one")])
    stages = []
    for index, (graph, inputs, outputs) in enumerate([
            (stage0, ["tokens"], ["stage0_out0"]),
            (stage1, ["stage0_out0", "attention_mask"], ["stage1_out0"]),
            (stage2, ["stage1_out0", "attention_mask"], ["hidden", "pooled"])]):
        relative = f"{name}_stage{index}/1/model.onnx"
        _save(graph, Path(repository) / relative)
        tensors = {o: {"datatype": "FP32", "shape": [-1, -1, HIDDEN], "sequence_axis": 1}
                   for o in outputs if o.startswith("stage")}
        stages.append({"index": index, "model_name": f"{name}_stage{index}", "onnx": relative,
                       "inputs": inputs, "outputs": outputs, "tensors": tensors,
                       "favoured_batch_size": favoured[index]})
    token_input = {"name": "tokens", "datatype": "INT64", "shape": [-1, -1], "sequence_axis": 1, "pad_value": 0}
    if value_range:
        token_input["value_range"] = [0, VOCAB]
    entry = {
        "family": "bert", "size": "tiny", "max_batch_size": max_batch_size,
        "variants": {"whole": name, "ensemble": f"{name}_ensemble", "reorch": f"{name}_reorch"},
        "inputs": [token_input,
                   {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1], "value_range": [0, 2],
                    "sequence_axis": 1, "pad_value": 0, "role": "attention_mask"}],
        "outputs": [{"name": "hidden", "datatype": "FP32", "shape": [-1, -1, HIDDEN], "sequence_axis": 1},
                    {"name": "pooled", "datatype": "FP32", "shape": [-1, HIDDEN]}],
        "sequence": {"max_length": max_length, "min_length": 1},
        "stages": stages,
    }

    def reference(tokens: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
        maskf = mask[..., None].astype(np.float32)
        h = np.maximum(table[tokens] @ w1, 0) * maskf
        pooled = (h * maskf).sum(1) / np.maximum(maskf.sum(1), 1)
        return {"hidden": np.tanh(h @ w2 + pooled[:, None, :]), "pooled": pooled}

    return entry, reference


def write_mlp_chain(repository: Path, name: str = "mlp", *, max_batch_size: int = 8, favoured=(8, 2)):
    """Two stages, no sequence axis: x[B,4] -> relu(x@A) -> y[B,3]."""
    rng = np.random.default_rng(1)
    a = rng.standard_normal((4, 6)).astype(np.float32)
    b = rng.standard_normal((6, 3)).astype(np.float32)
    f = TensorProto.FLOAT
    stage0 = helper.make_graph([helper.make_node("MatMul", ["x", "A"], ["mm"]),
                                helper.make_node("Relu", ["mm"], ["stage0_out0"])], f"{name}_stage0",
                               [helper.make_tensor_value_info("x", f, ["batch", 4])],
                               [helper.make_tensor_value_info("stage0_out0", f, ["batch", 6])],
                               [numpy_helper.from_array(a, "A")])
    stage1 = helper.make_graph([helper.make_node("MatMul", ["stage0_out0", "B"], ["y"])], f"{name}_stage1",
                               [helper.make_tensor_value_info("stage0_out0", f, ["batch", 6])],
                               [helper.make_tensor_value_info("y", f, ["batch", 3])],
                               [numpy_helper.from_array(b, "B")])
    stages = []
    for index, (graph, inputs, outputs) in enumerate([(stage0, ["x"], ["stage0_out0"]),
                                                       (stage1, ["stage0_out0"], ["y"])]):
        relative = f"{name}_stage{index}/1/model.onnx"
        _save(graph, Path(repository) / relative)
        stages.append({"index": index, "model_name": f"{name}_stage{index}", "onnx": relative, "inputs": inputs,
                       "outputs": outputs, "favoured_batch_size": favoured[index],
                       "tensors": {"stage0_out0": {"datatype": "FP32", "shape": [-1, 6]}} if index == 0 else {}})
    entry = {"family": "onnx", "size": None, "max_batch_size": max_batch_size,
             "variants": {"whole": name, "ensemble": f"{name}_ensemble", "reorch": f"{name}_reorch"},
             "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
             "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
             "sequence": None, "stages": stages}
    return entry, (lambda x: {"y": np.maximum(x @ a, 0) @ b})


def random_sequence_request(rng: np.random.Generator, rows: int, length: int) -> dict[str, np.ndarray]:
    return {"tokens": rng.integers(0, VOCAB, (rows, length), dtype=np.int64),
            "attention_mask": np.ones((rows, length), np.int64)}


def write_slow_chain(repository: Path, name: str = "slow", *, width: int = 256, depth: int = 30):
    """Two stages of ``depth`` chained width x width MatMuls each: milliseconds per batch on purpose."""
    rng = np.random.default_rng(2)
    weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    f = TensorProto.FLOAT
    stages = []
    for index in range(2):
        source = "x" if index == 0 else "stage0_out0"
        target = "stage0_out0" if index == 0 else "y"
        nodes, current = [], source
        for step in range(depth):  # Tanh between MatMuls: nothing for the optimizer to fold
            out = target if step == depth - 1 else f"h{step}"
            nodes.append(helper.make_node("MatMul", [current, "W"], [f"m{step}"]))
            nodes.append(helper.make_node("Tanh", [f"m{step}"], [out]))
            current = out
        graph = helper.make_graph(nodes, f"{name}_stage{index}", [helper.make_tensor_value_info(source, f, ["batch", width])],
                                  [helper.make_tensor_value_info(target, f, ["batch", width])],
                                  [numpy_helper.from_array(weight, "W")])
        relative = f"{name}_stage{index}/1/model.onnx"
        _save(graph, Path(repository) / relative)
        stages.append({"index": index, "model_name": f"{name}_stage{index}", "onnx": relative, "inputs": [source],
                       "outputs": [target], "favoured_batch_size": 8,
                       "tensors": {target: {"datatype": "FP32", "shape": [-1, width]}}})
    return {"family": "onnx", "size": None, "max_batch_size": 8,
            "variants": {"whole": name, "ensemble": f"{name}_ensemble", "reorch": f"{name}_reorch"},
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, width]}],
            "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, width]}], "sequence": None, "stages": stages}
