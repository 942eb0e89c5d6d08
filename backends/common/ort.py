"""onnxruntime sessions as our Python-backend models create them."""

from __future__ import annotations

import logging

LOGGER = logging.getLogger(__name__)


def execution_providers(execution_provider: str) -> list[str]:
    """Providers for ``"cpu"`` or ``"cuda"``; CPU is always the fallback."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if execution_provider == "cuda":
        if "CUDAExecutionProvider" in available:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        LOGGER.warning("CUDA execution provider unavailable (have %s); running on CPU", available)
    elif execution_provider != "cpu":
        raise ValueError(f"execution_provider must be 'cpu' or 'cuda', got {execution_provider!r}")
    return ["CPUExecutionProvider"]


def make_session(path: str, intra_op_threads: int = 1, execution_provider: str = "cpu"):
    """An onnxruntime session for serving.

    Spinning is off: with several sessions in one process (stages) idle sessions' spinning
    threads otherwise steal the cores from the running one (measured 1.7-3x slower chains).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if intra_op_threads > 0:
        options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=options, providers=execution_providers(execution_provider))
