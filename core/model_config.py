"""Triton model configurations: built as plain dicts, validated and rendered by Triton's own schema.

A configuration is a dict in the protobuf-JSON form of Triton's ``ModelConfig``
(``model_config.proto``; field names as in ``config.pbtxt``). We validate it with the
``model_config_pb2`` module shipped in tritonclient, so a typo in a field name or an enum value
is refused here, with the field named, rather than by the server at load time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from tritonclient.utils import np_to_triton_dtype

from core.errors import ConfigValidationError

def triton_wire_dtype(dtype: str) -> str:
    """``"float32"`` -> ``"FP32"``, ``"object"`` -> ``"BYTES"``: the datatype names of the inference protocol.

    The mapping is tritonclient's own (``tritonclient.utils.np_to_triton_dtype``), so it cannot drift
    from what the clients send.
    """
    try:
        wire = np_to_triton_dtype(np.dtype(dtype))
    except TypeError:
        wire = None
    if wire is None:
        raise ConfigValidationError(
            f"dtype {dtype!r} has no Triton equivalent; use a numpy bool, integer, float16/32/64 or object dtype"
        )
    return wire


def numpy_to_triton_dtype(dtype: str) -> str:
    """``"float32"`` -> ``"TYPE_FP32"``: the config form (Triton calls the wire's BYTES ``TYPE_STRING`` there)."""
    wire = triton_wire_dtype(dtype)
    return "TYPE_STRING" if wire == "BYTES" else f"TYPE_{wire}"


def parse_model_config(config: dict[str, Any]):  # -> model_config_pb2.ModelConfig
    """Validate ``config`` against Triton's ModelConfig schema and return the protobuf message."""
    from google.protobuf import json_format
    from tritonclient.grpc import model_config_pb2

    message = model_config_pb2.ModelConfig()
    try:
        json_format.ParseDict(config, message)
    except json_format.ParseError as error:
        name = config.get("name", "?")
        raise ConfigValidationError(f"model config for {name!r} is not valid for Triton: {error}") from None
    return message


def render_model_config(config: dict[str, Any]) -> str:
    """The ``config.pbtxt`` text of ``config`` (validated first)."""
    from google.protobuf import text_format

    return text_format.MessageToString(parse_model_config(config))


def read_model_config(path: Path) -> dict[str, Any]:
    """Parse a ``config.pbtxt`` back into the dict form."""
    from google.protobuf import json_format, text_format
    from tritonclient.grpc import model_config_pb2

    message = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(Path(path).read_text(), message)
    except text_format.ParseError as error:
        raise ConfigValidationError(f"{path}: not a valid Triton model config: {error}") from None
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def write_model_config(model_dir: Path, config: dict[str, Any]) -> Path:
    """Write ``<model_dir>/config.pbtxt``."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.pbtxt"
    path.write_text(render_model_config(config))
    return path


def string_parameters(values: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Config ``parameters`` from plain values (dicts and lists become JSON strings)."""
    rendered = {}
    for key, value in values.items():
        text = json.dumps(value) if isinstance(value, (dict, list, tuple, bool)) else str(value)
        rendered[key] = {"string_value": text}
    return rendered
