"""Check, on the embedded tritonserver 2.51, what the Python backend's response sender allows.

Questions (issue 12 part 1):

1. Does a NON-decoupled model answer through ``request.get_response_sender()`` after ``execute``
   returned ``None`` (one response + FINAL flag, sent later from another thread)?
2. While those answers are outstanding, does Triton dispatch the next batch to the same instance
   (the reorchestrator's cross-request batching needs this)?
3. Do unary gRPC, HTTP and gRPC streaming clients all work with it?
4. Crash conditions: (a) several threads calling ``sender.send`` at once; (b) polling
   ``is_cancelled`` (while clients cancel).

A tiny experiment model (``execute`` queues the senders; N responder threads answer after a delay)
is written to a temporary repository and served; each condition runs ``--runs`` times with a fresh
server; a run counts as a crash when the server died or a request got no answer.

Usage: ``python bench/reorch_sender_check.py [--runs 5] [--requests 2000]``
"""

from __future__ import annotations

import argparse
import json
import queue
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from core.model_config import DynamicBatching, TensorConfig, python_model_config, write_model_config
from core.server import EmbeddedTriton

MODEL_PY = '''
import json, queue, threading, time
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        p = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.delay_s = float(p["delay_ms"]) / 1000
        self.poll = p["poll"] == "1"
        self.lock = None if p["lock"] == "0" else threading.Lock()
        self.work = queue.Queue()
        self.outstanding = 0
        self.max_outstanding = 0
        self.count_lock = threading.Lock()
        self.pending = []
        self.threads = [threading.Thread(target=self.respond, daemon=True) for _ in range(int(p["threads"]))]
        for t in self.threads:
            t.start()
        if self.poll:
            threading.Thread(target=self.poller, daemon=True).start()

    def execute(self, requests):
        with self.count_lock:
            seen = self.outstanding
            self.outstanding += len(requests)
            self.max_outstanding = max(self.max_outstanding, self.outstanding)
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "X").as_numpy().copy()
            sender = r.get_response_sender()
            with self.count_lock:
                self.pending.append(sender)
            self.work.put((time.monotonic() + self.delay_s, sender, x, seen))
        return None

    def poller(self):
        while True:
            time.sleep(0.001)
            if self.lock is None:  # unguarded: a sender may be answered while (or before) it is probed
                with self.count_lock:
                    senders = list(self.pending)
                self.probe(senders)
            else:  # guarded: probes and sends never overlap; only unanswered senders are probed
                with self.lock:
                    with self.count_lock:
                        senders = list(self.pending)
                    self.probe(senders)

    @staticmethod
    def probe(senders):
        for s in senders:
            try:
                s.is_cancelled()
            except Exception:
                pass

    def respond(self):
        while True:
            due, sender, x, seen = self.work.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            out = pb_utils.Tensor("Y", (x * 2).astype(np.float32))
            seen_t = pb_utils.Tensor("SEEN", np.full((x.shape[0], 1), seen, np.int64))
            response = pb_utils.InferenceResponse(output_tensors=[out, seen_t])
            with self.count_lock:
                self.outstanding -= 1
                try:
                    self.pending.remove(sender)
                except ValueError:
                    pass
            try:
                if self.lock is not None:
                    with self.lock:
                        sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                else:
                    sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            except Exception as e:
                pb_utils.Logger.log_warn(f"send failed: {e}")
'''


def write_model(repository: Path, name: str, *, decoupled: bool, threads: int, lock: bool, poll: bool,
                delay_ms: float) -> None:
    version = repository / name / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(MODEL_PY)
    write_model_config(repository / name, python_model_config(
        name, max_batch_size=16, inputs=[TensorConfig("X", "float32", [4])],
        outputs=[TensorConfig("Y", "float32", [4]), TensorConfig("SEEN", "int64", [1])], decoupled=decoupled,
        dynamic_batching=DynamicBatching(max_queue_delay_us=0),
        parameters={"threads": threads, "lock": int(lock), "poll": int(poll), "delay_ms": delay_ms}))


def unary_grpc(url: str, model: str, n: int, workers: int = 32) -> tuple[int, int, int]:
    """n unary calls from `workers` threads; returns (ok, errors, max SEEN)."""
    client = grpcclient.InferenceServerClient(url)
    seen = []

    def one(i):
        x = np.full((1, 4), i, np.float32)
        inp = grpcclient.InferInput("X", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        try:
            r = client.infer(model, [inp], client_timeout=30)
        except Exception as e:  # noqa: BLE001
            return str(e)
        assert np.array_equal(r.as_numpy("Y"), x * 2)
        seen.append(int(r.as_numpy("SEEN")[0, 0]))
        return None

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(one, range(n)))
    errors = [r for r in results if r]
    return n - len(errors), len(errors), max(seen or [0])


def http_calls(url: str, model: str, n: int) -> tuple[int, int]:
    client = httpclient.InferenceServerClient(url.removeprefix("http://"), concurrency=8)
    ok = 0
    for i in range(n):
        x = np.full((1, 4), i, np.float32)
        inp = httpclient.InferInput("X", [1, 4], "FP32")
        inp.set_data_from_numpy(x)
        r = client.infer(model, [inp])
        ok += int(np.array_equal(r.as_numpy("Y"), x * 2))
    return ok, n - ok


def stream_calls(url: str, model: str, n: int, cancel_fraction: float = 0.0) -> tuple[int, int]:
    """n requests on one stream (or, with cancel_fraction, many short streams some of which are cancelled)."""
    client = grpcclient.InferenceServerClient(url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for i in range(n):
        inp = grpcclient.InferInput("X", [1, 4], "FP32")
        inp.set_data_from_numpy(np.full((1, 4), i, np.float32))
        client.async_stream_infer(model, [inp], request_id=str(i))
    ok = errors = 0
    try:
        for _ in range(n):
            result, error = answers.get(timeout=30)
            ok += error is None
            errors += error is not None
    except queue.Empty:
        pass
    client.stop_stream()
    return ok, errors


def cancelling_streams(url: str, model: str, streams: int) -> None:
    """Open streams, send, and close half of them at once (the client cancels)."""
    def one(i):
        client = grpcclient.InferenceServerClient(url)
        client.start_stream(callback=lambda result, error: None)
        inp = grpcclient.InferInput("X", [1, 4], "FP32")
        inp.set_data_from_numpy(np.full((1, 4), i, np.float32))
        client.async_stream_infer(model, [inp])
        if i % 2:
            client.stop_stream(cancel_requests=True)
        else:
            time.sleep(0.05)
            client.stop_stream()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(streams)))


def run_condition(label: str, *, decoupled: bool, threads: int, lock: bool, poll: bool, runs: int, requests: int,
                  clients: str, delay_ms: float = 2.0) -> dict:
    crashes = 0
    lost = 0
    details = []
    for run in range(runs):
        with tempfile.TemporaryDirectory() as tmp:
            repository = Path(tmp)
            write_model(repository, "exp", decoupled=decoupled, threads=threads, lock=lock, poll=poll,
                        delay_ms=delay_ms)
            with EmbeddedTriton(repository, models=["exp"]) as server:
                info: dict = {}
                try:
                    if "unary" in clients:
                        ok, err, max_seen = unary_grpc(server.grpc_url, "exp", requests)
                        info["unary"] = (ok, err, max_seen)
                        lost += err
                    if "http" in clients:
                        ok, err = http_calls(server.http_url, "exp", max(50, requests // 20))
                        info["http"] = (ok, err)
                        lost += err
                    if "stream" in clients:
                        ok, err = stream_calls(server.grpc_url, "exp", requests)
                        info["stream"] = (ok, err)
                        lost += requests - ok
                    if "cancel" in clients:
                        cancelling_streams(server.grpc_url, "exp", requests // 10)
                        ok, err = stream_calls(server.grpc_url, "exp", 200)
                        info["after_cancel"] = (ok, err)
                        lost += 200 - ok
                except Exception as exc:  # noqa: BLE001
                    info["exception"] = repr(exc)[:200]
                alive = server.is_alive()
                if not alive or "exception" in info:
                    crashes += 1
                    info["log_tail"] = server.logs()[-300:]
                details.append(info)
    result = {"condition": label, "runs": runs, "crashes": crashes, "lost": lost, "details": details}
    print(json.dumps({k: v for k, v in result.items() if k != "details"}), flush=True)
    for d in details:
        print("   ", json.dumps(d)[:400], flush=True)
    return result


CONDITIONS = {
    "nondecoupled_1thread": dict(decoupled=False, threads=1, lock=False, poll=False, clients="unary,http,stream"),
    "nondecoupled_4threads_nolock": dict(decoupled=False, threads=4, lock=False, poll=False, clients="unary,stream"),
    "nondecoupled_4threads_lock": dict(decoupled=False, threads=4, lock=True, poll=False, clients="unary,stream"),
    "decoupled_4threads_nolock": dict(decoupled=True, threads=4, lock=False, poll=False, clients="stream"),
    "decoupled_poll_cancel": dict(decoupled=True, threads=1, lock=False, poll=True, clients="stream,cancel"),
    "nondecoupled_poll_cancel": dict(decoupled=False, threads=1, lock=False, poll=True, clients="stream,cancel"),
    "decoupled_poll_locked_cancel": dict(decoupled=True, threads=1, lock=True, poll=True, clients="stream,cancel"),
    "nondecoupled_poll_locked_cancel": dict(decoupled=False, threads=1, lock=True, poll=True,
                                            clients="stream,cancel"),
    "decoupled_nopoll_cancel": dict(decoupled=True, threads=1, lock=False, poll=False, clients="stream,cancel"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--only", nargs="*", default=list(CONDITIONS))
    args = parser.parse_args()
    for label in args.only:
        run_condition(label, runs=args.runs, requests=args.requests, **CONDITIONS[label])


if __name__ == "__main__":
    main()
