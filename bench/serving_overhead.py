"""Benchmark: what serving through the embedded Triton costs over raw onnxruntime.

For one ONNX model (a zoo model by default, or --onnx FILE), side by side in one run:
  raw     onnxruntime in this process, the same session options as the served model;
  served  the same graph in a Python-backend onnxruntime runner behind Triton's dynamic batcher,
          called over gRPC; latency at concurrency 1, throughput at saturation (several callers).
Printed per batch size (1/4/16): p50 latency, throughput, and served/raw ratios.
Targets (issue 2): served throughput >= 0.9 x raw at batch 16; p50 overhead at batch 1 < 1 ms.

    .venv/bin/python bench/serving_overhead.py [--model resnet50 --size small] [--seconds 5]
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from backends.common.ort import make_session
from loadtest.request_factory import infer_inputs
from slicing.export import export_zoo_model
from slicing.inputs import infer_input_specs, make_inputs
from slicing.zoo import build_zoo_model
from core.model_config import DynamicBatching, TensorConfig
from core.repository import add_onnx_model
from core.server import EmbeddedTriton


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def measure_raw(session, feeds: dict[str, np.ndarray], seconds: float) -> tuple[float, float]:
    """(p50 latency ms, samples/s) of back-to-back runs."""
    batch = next(iter(feeds.values())).shape[0]
    for _ in range(3):
        session.run(None, feeds)
    latencies = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        session.run(None, feeds)
        latencies.append((time.perf_counter() - t0) * 1e3)
    elapsed = time.perf_counter() - start
    return _percentile(latencies, 50), batch * len(latencies) / elapsed


def measure_served(url: str, model: str, feeds: dict[str, np.ndarray], seconds: float, callers: int) -> tuple[float, float]:
    """(p50 latency ms, samples/s) with ``callers`` concurrent synchronous gRPC callers."""
    import tritonclient.grpc as grpcclient


    batch = next(iter(feeds.values())).shape[0]
    latencies: list[float] = []
    lock = threading.Lock()
    stop_at = [0.0]

    def caller() -> None:
        client = grpcclient.InferenceServerClient(url)
        inputs = infer_inputs(grpcclient, feeds)
        for _ in range(2):
            client.infer(model, inputs)
        local = []
        while time.perf_counter() < stop_at[0]:
            t0 = time.perf_counter()
            client.infer(model, inputs)
            local.append((time.perf_counter() - t0) * 1e3)
        with lock:
            latencies.extend(local)

    start = time.perf_counter()
    stop_at[0] = start + seconds
    threads = [threading.Thread(target=caller) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    return _percentile(latencies, 50), batch * len(latencies) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50", help="zoo model (ignored with --onnx)")
    parser.add_argument("--size", default="small", choices=["tiny", "small", "full"])
    parser.add_argument("--onnx", type=Path, help="your own ONNX file instead of a zoo model")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--seconds", type=float, default=5.0, help="measurement time per point")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (both sides)")
    parser.add_argument("--callers", type=int, default=3, help="concurrent gRPC callers for the saturation run")
    args = parser.parse_args()


    import onnx

    if args.onnx:
        onnx_path, label = args.onnx, args.onnx.name
    else:
        onnx_path = export_zoo_model(build_zoo_model(args.model, args.size)).path
        label = f"{args.model} ({args.size})"
    model = onnx.load(str(onnx_path))
    specs = infer_input_specs(model)
    batches = [int(b) for b in args.batches.split(",")]
    max_batch = max(batches)
    session = make_session(str(onnx_path), args.threads)
    output_dtypes = {o.name: onnx.helper.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type).name
                     for o in model.graph.output}

    def dims(shape) -> list[int]:
        return [d if isinstance(d, int) else -1 for d in shape[1:]]

    with tempfile.TemporaryDirectory() as tmp:
        repository = Path(tmp)
        add_onnx_model(
            repository, "model", onnx_path, max_batch_size=max_batch,
            inputs=[TensorConfig(i.name, np.dtype(s.dtype).name, dims(i.shape)) for i, s in zip(session.get_inputs(), specs)],
            outputs=[TensorConfig(o.name, output_dtypes[o.name], dims(o.shape)) for o in session.get_outputs()],
            dynamic_batching=DynamicBatching(max_queue_delay_us=0), intra_op_threads=args.threads,
        )
        rows = []
        with EmbeddedTriton(repository) as server:
            for batch in batches:
                feeds = make_inputs(specs, batch, rng=np.random.default_rng(batch))
                raw_p50, raw_tput = measure_raw(session, feeds, args.seconds)
                served_p50, _ = measure_served(server.grpc_url, "model", feeds, args.seconds, callers=1)
                _, served_tput = measure_served(server.grpc_url, "model", feeds, args.seconds, callers=args.callers)
                rows.append((batch, raw_p50, served_p50, raw_tput, served_tput))

    print(f"\nserving overhead: {label}, onnxruntime {args.threads} threads, {args.seconds:.0f} s per point")
    print(f"{'batch':>5} | {'raw p50 ms':>10} {'served p50 ms':>13} {'overhead ms':>11} | "
          f"{'raw samples/s':>13} {'served samples/s':>16} {'served/raw':>10}")
    for batch, raw_p50, served_p50, raw_tput, served_tput in rows:
        print(f"{batch:>5} | {raw_p50:>10.2f} {served_p50:>13.2f} {served_p50 - raw_p50:>11.2f} | "
              f"{raw_tput:>13.1f} {served_tput:>16.1f} {served_tput / raw_tput:>10.2f}")
    by_batch = {row[0]: row for row in rows}
    if 16 in by_batch:
        _, _, _, raw_tput, served_tput = by_batch[16]
        verdict = "meets" if served_tput >= 0.9 * raw_tput else "misses"
        print(f"target: served throughput >= 0.9 x raw at batch 16: {served_tput / raw_tput:.2f} ({verdict})")
    if 1 in by_batch:
        _, raw_p50, served_p50, _, _ = by_batch[1]
        verdict = "meets" if served_p50 - raw_p50 < 1.0 else "misses"
        print(f"target: p50 overhead at batch 1 < 1 ms: {served_p50 - raw_p50:.2f} ms ({verdict})")
    print("note: client, server and onnxruntime share this machine's cores; the ratios compare runs made side by side.")


if __name__ == "__main__":
    main()
