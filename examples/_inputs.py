"""Shared by the examples: random valid inputs for a served model, from the repository's manifest.json."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

WIRE_TO_NUMPY = {"INT64": np.int64, "INT32": np.int32, "FP32": np.float32, "FP16": np.float16}


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--url", default="127.0.0.1:8001", help="HOST:PORT (gRPC, or HTTP for http_rest.py)")
    parser.add_argument("--model", default="lstm_reorch", help="Triton model name, e.g. bert_base or bert_base_reorch")
    parser.add_argument("-r", "--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--length", type=int, default=8, help="sequence length (sequence models)")
    return parser.parse_args()


def make_inputs(repository: Path, served_name: str, length: int) -> dict[str, np.ndarray]:
    """One row of random valid inputs for ``served_name`` (any variant of a manifest model)."""
    models = json.loads((repository / "manifest.json").read_text())["models"]
    entry = next(e for name, e in models.items() if served_name in (name, *e.get("variants", {}).values()))
    rng = np.random.default_rng(0)
    arrays = {}
    for spec in entry["inputs"]:
        shape = [1] + [length if axis == spec.get("sequence_axis") else max(d, 1)
                       for axis, d in enumerate(spec["shape"][1:], start=1)]
        dtype = WIRE_TO_NUMPY[spec["datatype"]]
        if spec.get("role") == "attention_mask":
            arrays[spec["name"]] = np.ones(shape, dtype)
        elif spec.get("value_range"):
            low, high = spec["value_range"]
            arrays[spec["name"]] = rng.integers(low, high, shape).astype(dtype)
        else:
            arrays[spec["name"]] = rng.standard_normal(shape).astype(dtype)
    return arrays


def infer_inputs(client_module, arrays: dict[str, np.ndarray]) -> list:
    """``client_module.InferInput`` objects (tritonclient.grpc or tritonclient.http) holding ``arrays``."""
    inputs = []
    for name, array in arrays.items():
        tensor = client_module.InferInput(name, list(array.shape), "INT64" if array.dtype.kind == "i" else "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs
