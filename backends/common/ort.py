"""onnxruntime sessions: the one place that sets them up, for serving and for slicing on the host.

Every session runs sequentially with explicit intra-op threads and no spinning: several sessions
(stages) share the cores in one process.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

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


def default_intra_op_threads() -> int:
    """onnxruntime's default intra-op thread count: the physical cores among the CPUs this process may
    run on (its affinity: a container's cpuset or taskset), from Linux's CPU topology; else the
    number of those CPUs."""
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in allowed:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            return max(1, len(allowed))
    return max(1, len(cores))


def make_session(model: Any, intra_op_threads: int = 1, execution_provider: str = "cpu", *, optimize: bool = True,
                 profile_prefix: str | None = None):
    """An onnxruntime session.

    Args:
        model: a file path (str or Path), serialized bytes, or an ``onnx.ModelProto``.
        intra_op_threads: onnxruntime's intra-op threads; 0: as many as onnxruntime's default (the
            physical cores this process may run on, :func:`default_intra_op_threads`), without its
            thread pinning.
        execution_provider: ``"cpu"`` or ``"cuda"`` (CPU is the fallback).
        optimize: graph optimization ALL (serving, timing) or none (checking a graph as written).
        profile_prefix: turn on onnxruntime's profiler, writing files with this prefix.

    Spinning is off: with several sessions in one process (stages) idle sessions' spinning
    threads otherwise steal the cores from the running one (measured 1.7-3x slower chains).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Always an explicit count: left at 0, onnxruntime sizes the pool to the physical cores *and pins*
    # its worker threads, the first to core 1 on a 2-core machine, in every process alike; the stage
    # models of an ensemble, a model's instances and the reorchestrator's stage sessions then run all
    # their parallel work on that one core while the other runs only the calling threads. Measured
    # in-process (bert_base small whole, batch 8, length 64, 3 rounds, quiet): 1 and 2 processes at
    # once read the same either way (544 / 546 and 584 / 589 rows/s), 3 processes 570 pinned against
    # 629 unpinned.
    options.intra_op_num_threads = intra_op_threads if intra_op_threads > 0 else default_intra_op_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    options.log_severity_level = 3
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    if isinstance(source, Path):
        source = str(source)
    return ort.InferenceSession(source, sess_options=options, providers=execution_providers(execution_provider))
