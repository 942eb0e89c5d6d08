"""Running pieces of a model to time them: onnxruntime sessions and wall-clock medians.

Three cost sources, best first:

- measured segments: time each piece between candidate cuts as its own session, exactly the way the
  stages will run (see :func:`slicing.slicer.slice_model`, ``balance="measured"``);
- the onnxruntime profiler, per node (:mod:`slicing.node_cost`);
- FLOPs from the concrete shapes of a probe run, as the fallback (:mod:`slicing.node_cost`).

Sessions come from :func:`backends.common.ort.make_session` (the one place that sets them up): CPU,
graph optimization ALL, explicit intra-op threads and no spinning.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
DEFAULT_INTRA_OP_THREADS = 2


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
