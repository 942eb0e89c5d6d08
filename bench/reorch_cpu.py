"""Server CPU per request, by process and by thread, for the whole model against its reorchestrator.

Serves a built repository with the embedded server (the whole model and ``NAME_reorch_dva``, deployed
from this checkout's ``backends``; with ``--baseline-backends DIR`` also ``NAME_reorch_base`` from
another copy of the package, e.g. main's). Drives each variant in turn with perf_analyzer at one
fixed open-loop rate (Poisson, one row per request, unary gRPC, no record asked; or closed loop with
``--concurrency`` calls outstanding, where the achieved rate is the capacity), variants interleaved
with the order alternating per round, and reads the CPU time of tritonserver and of each Python stub
process (``/proc/PID/stat``, the stub's model from its command line) and of each stub thread
(``/proc/PID/task/*/stat``, by thread name) before and after each run. Prints, per round and as
means with 95% confidence intervals over the rounds, the p50 and the CPU ms per request.

    python bench/reorch_cpu.py --repository results/quick-a/repository --models resnet50 --rate 27 --rounds 4

``--in-process BATCH`` leaves the server out: per model, the calling thread's CPU per batch of
``BATCH`` one-row requests through ``ReorchEngine.run_inline`` (the path a served steady-load batch
takes: fused on the whole graph, no record asked) and through ``backends.onnx_runner``'s
``BatchRunner.run`` (the whole model's), on the same onnxruntime session and batch, interleaved.
``--no-compute`` gives both a session that returns stored outputs: only their Python is left.
Run it from two checkouts for a before/after. Served, each batch comes after an idle wait with
cold caches, and the same Python costs several times more (docs/reorch.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from reorchestration import T95, overlay_repository  # noqa: E402

from backends.onnx_runner.batch import BatchRunner, TensorInfo  # noqa: E402
from backends.reorch.engine import ReorchEngine  # noqa: E402
from backends.reorch.executor import make_ort_executors, make_whole_executor  # noqa: E402
from backends.reorch.policies import ReorchKnobs  # noqa: E402
from backends.reorch.spec import StagesSpec  # noqa: E402
from core.manifest import read_manifest  # noqa: E402
from core.model_config import read_model_config  # noqa: E402
from core.server import EmbeddedTriton  # noqa: E402
from loadtest.perf_analyzer import ensure_perf_analyzer, measure_point, retry_once  # noqa: E402
from loadtest.request_factory import RequestFactory, model_entry  # noqa: E402

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def read_cpu_s(stat_path: str) -> tuple[str, float]:
    """(name, user + system CPU seconds) of a /proc/.../stat file."""
    with open(stat_path) as handle:
        text = handle.read()
    name = text[text.index("(") + 1:text.rindex(")")]
    fields = text[text.rindex(")") + 2:].split()
    return name, (int(fields[11]) + int(fields[12])) * TICK_S


def children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/children") as handle:
                found += [int(c) for c in handle.read().split()]
        except OSError:
            continue
    return found


def stub_model(pid: int) -> str | None:
    """The model a ``triton_python_backend_stub`` process serves, from its command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if not argv or "triton_python_backend_stub" not in argv[0]:
        return None
    for arg in argv[1:]:
        match = re.search(r"/([^/]+)/\d+/model\.py$", arg)
        if match:
            return match.group(1)
    return None


def snapshot(server_pid: int, stubs: dict[str, int]) -> dict[str, dict[str, float]]:
    """{process label: {"total": s, "thread:NAME": s summed over threads of that name}}."""
    result: dict[str, dict[str, float]] = {}
    for label, pid in [("tritonserver", server_pid), *stubs.items()]:
        _, total = read_cpu_s(f"/proc/{pid}/stat")
        threads: dict[str, float] = defaultdict(float)
        # Python 3.10 does not name native threads: a stub's threads are told apart by creation order
        # (thread ids ascending; #0 is the stub's main thread, which runs execute).
        for order, task in enumerate(sorted(os.listdir(f"/proc/{pid}/task"), key=int)):
            try:
                name, seconds = read_cpu_s(f"/proc/{pid}/task/{task}/stat")
            except (OSError, ValueError):
                continue  # a thread that ended meanwhile
            threads[f"thread:{order:02d} {re.sub(r'[0-9]+$', '#', name)}"] += seconds
        result[label] = {"total": total, **threads}
    return result


def mean_ci(values: list[float]) -> str:
    clean = [v for v in values if math.isfinite(v)]
    if not clean:
        return "n/a"
    mean = statistics.fmean(clean)
    if len(clean) < 2:
        return f"{mean:.3f}"
    half = T95.get(len(clean) - 1, 1.96) * statistics.stdev(clean) / math.sqrt(len(clean))
    return f"{mean:.3f} ({mean - half:.3f}..{mean + half:.3f})"


def deploy_baseline(overlay: Path, name: str, backends: Path, entry: dict) -> str:
    """A copy of ``NAME_reorch_dva`` named ``NAME_reorch_base`` whose glue, package and ``stages.json``
    come from ``backends`` (its ``StagesSpec`` writes stages.json from the entry as the overlay passes it)."""
    source, target = overlay / f"{name}_reorch_dva", overlay / f"{name}_reorch_base"
    shutil.copytree(source, target)
    config = target / "config.pbtxt"
    config.write_text(config.read_text().replace(f'name: "{name}_reorch_dva"', f'name: "{name}_reorch_base"'))
    version = target / "1"
    shutil.rmtree(version / "backends")
    shutil.copytree(backends, version / "backends", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy2(backends / "reorch" / "model.py", version / "model.py")
    script = ("import json, sys; from backends.reorch.spec import StagesSpec; "
              "spec = StagesSpec.from_manifest_entry(sys.argv[1], json.loads(sys.argv[2])); "
              "spec.max_batch_size = int(sys.argv[3]); print(spec.to_json())")
    entry = {**entry, "variants": {"reorch": f"{name}_reorch_dva"}}  # as overlay_repository passes it
    done = subprocess.run([sys.executable, "-c", script, name, json.dumps(entry), str(entry["max_batch_size"])],
                          env={**os.environ, "PYTHONPATH": str(backends.parent)}, cwd=backends.parent, capture_output=True, text=True,
                          check=True)
    (version / "stages.json").write_text(done.stdout)
    return target.name


def in_process(args: argparse.Namespace, manifest: dict) -> None:
    """``--in-process``: calling-thread CPU per batch, reorch's inline path against the whole model's runner."""
    for name in args.models:
        raw = manifest["models"][name]
        whole_name = raw.get("variants", {}).get("whole", name)
        threads = read_model_config(args.repository / whole_name / "config.pbtxt").get("parameters", {}).get(
            "intra_op_threads", {}).get("string_value", "1")  # the whole model's, as the benches deploy reorch
        spec = StagesSpec.from_manifest_entry(name, raw)
        knobs = ReorchKnobs.from_parameters({"max_batch_rows": str(spec.max_batch_size), "intra_op_threads": threads,
                                             **dict(item.split("=", 1) for item in args.knob)})
        whole = make_whole_executor(spec, args.repository, intra_op_threads=knobs.intra_op_threads)
        if whole is None:
            raise SystemExit(f"{name}: no whole-model graph in {args.repository}")
        engine = ReorchEngine(spec, "dva", knobs, make_ort_executors(spec, args.repository,
                                                                     intra_op_threads=knobs.intra_op_threads),
                              lambda handle, answer: None, whole=whole)
        meta = {t.name: TensorInfo(t.sequence_axis, t.pad_value, tuple(t.value_range) if t.value_range else None)
                for t in (*spec.inputs, *spec.outputs)}
        runner = BatchRunner(session=whole.session, input_dtypes={t.name: t.dtype for t in spec.inputs},
                             output_names=[t.name for t in spec.outputs], tensor_info=meta)
        entry = model_entry(manifest, name)
        seq_len = (args.seq_len or min(64, entry.max_length)) if entry.has_sequence else None
        factory = RequestFactory(entry, "whole", seed=0)
        batch = [factory.arrays(seq_len) for _ in range(args.in_process)]
        if args.no_compute:
            stored = whole.session.run(runner.output_names, {t.name: np.concatenate([b[t.name] for b in batch])
                                                             for t in spec.inputs})

            class Stored:  # a session that costs nothing: what is left is the callers' Python
                def run(self, names, feeds):
                    return [array.copy() for array in stored]
            whole.session = runner.session = Stored()
        items = list(enumerate(batch))
        flags = [False] * len(batch)

        def run_reorch():
            answers = engine.run_inline(items, flags)
            assert answers is not None and len(answers) == len(items), "the batch was not run inline"

        variants = {"reorch run_inline": run_reorch, "whole BatchRunner.run": lambda: runner.run(batch)}
        calls = args.requests
        per: dict[str, list[float]] = defaultdict(list)
        try:
            for round_index in range(args.rounds):
                for label in (list(variants) if round_index % 2 == 0 else list(variants)[::-1]):
                    for _ in range(max(1, calls // 10)):  # warm
                        variants[label]()
                    started = time.thread_time_ns()
                    for _ in range(calls):
                        variants[label]()
                    per[label].append((time.thread_time_ns() - started) / calls / 1000)
        finally:
            engine.close()
        what = "no compute (stored outputs)" if args.no_compute else f"onnxruntime, {threads} intra-op threads"
        print(f"## {name}: batch of {args.in_process} one-row requests" + (f", length {seq_len}" if seq_len else "")
              + f"; {what}; calling-thread CPU µs per batch, {args.rounds} interleaved rounds of {calls} (95% CI)")
        for label, values in per.items():
            print(f"{label:>24}: {mean_ci(values)}")
        print(f"{'reorch - whole':>24}: {mean_ci([a - b for a, b in zip(*per.values())])}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["resnet50"])
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, nargs="+", help="requests/s per model (one value, or one per model)")
    load.add_argument("--concurrency", type=int, default=None,
                      help="closed loop: this many calls outstanding (the achieved rate is the capacity)")
    load.add_argument("--in-process", type=int, default=None, metavar="BATCH",
                      help="no server: CPU per batch of BATCH requests, reorch's inline path vs the whole model's "
                           "runner (--requests: calls per round)")
    parser.add_argument("--no-compute", action="store_true", help="--in-process: a session that returns stored outputs")
    parser.add_argument("--requests", type=int, default=400, help="requests per run")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length (sequence models)")
    parser.add_argument("--baseline-backends", type=Path, default=None,
                        help="another backends/ package to deploy as NAME_reorch_base")
    parser.add_argument("--knob", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--threads", action="store_true", help="print the per-thread CPU too")
    args = parser.parse_args()
    if args.in_process is not None:
        in_process(args, read_manifest(args.repository).raw)
        return
    if args.concurrency is not None:
        rates = [None] * len(args.models)
    else:
        rates = args.rate if len(args.rate) == len(args.models) else args.rate[:1] * len(args.models)
    if args.concurrency is None and args.requests < max(rates):
        parser.error(f"--requests {args.requests} is below the rate {max(rates):g}/s: perf_analyzer refuses "
                     "a request count under one second of requests")
    manifest = read_manifest(args.repository).raw
    knobs = dict(item.split("=", 1) for item in args.knob)
    overlay = overlay_repository(args.repository, manifest, args.models, ["dva"], 100, knobs)
    variants = {}
    for name in args.models:
        models = [name, f"{name}_reorch_dva"]
        if args.baseline_backends:
            models.append(deploy_baseline(overlay, name, args.baseline_backends.resolve(), manifest["models"][name]))
        variants[name] = models
    analyzer = ensure_perf_analyzer()
    served = [m for models in variants.values() for m in models]
    try:
        with EmbeddedTriton(overlay, models=served) as server:
            server_pid = server._process.pid  # noqa: SLF001 (diagnostic)
            stubs = {}
            for pid in children(server_pid):
                model = stub_model(pid)
                if model:
                    stubs[model] = pid
            print(f"# stubs: {stubs}; {args.requests} requests per run, "
                  f"{'Poisson' if args.concurrency is None else 'closed loop'}, {args.rounds} rounds, order alternating", flush=True)
            for name, rate in zip(args.models, rates):
                entry = model_entry(manifest, name)
                seq_len = (args.seq_len or min(64, entry.max_length)) if entry.has_sequence else None
                models = variants[name]
                per: dict[str, dict[str, list[float]]] = {m: defaultdict(list) for m in models}
                load = {"concurrency": args.concurrency} if rate is None else {"rate_rps": rate}
                for model in models:  # warm-up (perf_analyzer wants at least a second of requests)
                    measure_point(analyzer, server.grpc_url, model, entry, "reorch" if "reorch" in model else "whole",
                                  requests=max(50, args.requests // 4, math.ceil(rate or 0)), seq_len=seq_len, **load)
                for round_index in range(args.rounds):
                    order = models if round_index % 2 == 0 else models[::-1]
                    for model in order:
                        def measured(model=model):
                            # a hung perf_analyzer is tried once more (retry_once), with fresh CPU counts
                            start = snapshot(server_pid, stubs)
                            return start, measure_point(analyzer, server.grpc_url, model, entry,
                                                        "reorch" if "reorch" in model else "whole",
                                                        requests=args.requests, seq_len=seq_len, **load)

                        before, point = retry_once(measured, f"{model} round {round_index}")
                        after = snapshot(server_pid, stubs)
                        figures = per[model]
                        figures["p50_ms"].append(point.p50_ms)
                        figures["achieved_rps"].append(point.throughput_rps)
                        for label in ("tritonserver", model):
                            for key, value in after[label].items():
                                spent = value - before[label].get(key, 0.0)
                                tag = "server" if label == "tritonserver" else "stub"
                                figures[f"{tag} {key}"].append(spent * 1000 / args.requests)
                        print(f"{name} round {round_index} {model:>20}: p50 {point.p50_ms:.2f} ms, "
                              f"{point.throughput_rps:.1f} req/s; CPU ms/request server "
                              f"{figures['server total'][-1]:.3f}, stub {figures['stub total'][-1]:.3f}", flush=True)
                at = f"{rate:g} req/s" if rate is not None else f"concurrency {args.concurrency}"
                print(f"\n## {name} at {at}: means over {args.rounds} rounds (95% CI)")
                keys = sorted({k for m in models for k in per[m]},
                              key=lambda k: (k.startswith("stub thread") or k.startswith("server thread"), k))
                for key in keys:
                    if "thread:" in key and not args.threads:
                        continue
                    row = [mean_ci(per[m].get(key, [])) for m in models]
                    if "thread:" in key and all(v.startswith("0.000") or v == "n/a" for v in row):
                        continue
                    print(f"{key:>40}: " + " | ".join(f"{m} {v}" for m, v in zip(models, row)))
                print(flush=True)
    finally:
        shutil.rmtree(overlay, ignore_errors=True)


if __name__ == "__main__":
    main()
