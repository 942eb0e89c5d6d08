"""Running pieces of a model to time them: onnxruntime sessions and wall-clock medians.

Three cost sources, best first:

- measured segments: time each piece between candidate cuts as its own session, exactly the way the
  stages will run (see :func:`slicing.slicer.slice_model`, ``balance="measured"``);
- the onnxruntime profiler, per node (:mod:`slicing.node_cost`);
- FLOPs from the concrete shapes of a probe run, as the fallback (:mod:`slicing.node_cost`).

Every session is CPU, graph optimization ALL, explicit intra-op threads and no spinning: several
sessions share the cores when a chain of stages runs in one process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx
    import onnxruntime as ort

DEFAULT_INTRA_OP_THREADS = 2


def make_session(model: onnx.ModelProto | bytes | str | Path, *, intra_op_threads: int = DEFAULT_INTRA_OP_THREADS,
                 optimize: bool = True, profile_prefix: str | None = None) -> ort.InferenceSession:
    """An onnxruntime CPU session set up for a chain of sessions in one process."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Idle sessions' spinning threads steal the cores from the running one (1.7-3x slower chains).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.log_severity_level = 3
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else model
    if isinstance(source, Path):
        source = str(source)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def median_ms(run: Callable[[], object], *, reps: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``run()`` in milliseconds."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
