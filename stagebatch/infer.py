"""``stagebatch infer``: send one inference request built from the manifest, as a user would.

The request is drawn from the model's manifest entry (``loadtest.request_factory``: valid values,
the given sequence length) and sent by unary gRPC (default), gRPC streaming (``--stream``) or HTTP
(``--http``). Prints each output's shape and dtype, a checksum, the latency and, for reorch, the
``REORCH_RECORD`` (the request asks for it with the parameter ``reorch_record``).
"""

from __future__ import annotations

import hashlib
import queue
import time
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

from backends.reorch.spec import RECORD_OUTPUT, RECORD_PARAMETER
from loadtest.request_factory import VARIANTS, RequestFactory, infer_inputs, model_entry
from core.errors import BadParameterError
from core.manifest import read_manifest, read_manifest_path

INFER_TIMEOUT_S = 60.0


def checksum(array: np.ndarray) -> str:
    """A short content hash of an output (sha256 of its bytes, dtype and shape), for comparing runs."""
    digest = hashlib.sha256(np.ascontiguousarray(array).tobytes())
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    return digest.hexdigest()[:16]


def _load_manifest(repository: Optional[Path], manifest: Optional[Path]) -> dict:
    if manifest is not None:
        if not manifest.is_file():
            raise BadParameterError(f"--manifest {manifest} does not exist; give the manifest.json of a built "
                                    "repository (or --repository DIR)")
        return read_manifest_path(manifest).raw
    return read_manifest(repository or Path("model_repository")).raw


def _send(url: str, model_name: str, arrays: dict[str, np.ndarray], parameters: dict | None, *, stream: bool,
          http: bool):
    """The request twice on one connection (the first opens it); returns the second's (result, latency_ms).

    Raises the client's error on failure.
    """
    if http:
        import tritonclient.http as client_module

        client = client_module.InferenceServerClient(url.removeprefix("http://"), network_timeout=INFER_TIMEOUT_S)
    else:
        import tritonclient.grpc as client_module

        client = client_module.InferenceServerClient(url)
    inputs = infer_inputs(client_module, arrays)
    if not stream:
        for _ in range(2):
            started = time.perf_counter()
            result = client.infer(model_name, inputs, parameters=parameters)
            finished = time.perf_counter()
        return result, (finished - started) * 1e3
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error, time.perf_counter())))
    try:
        for _ in range(2):
            started = time.perf_counter()
            client.async_stream_infer(model_name, inputs, parameters=parameters)
            result, error, finished = answers.get(timeout=INFER_TIMEOUT_S)
            if error is not None:
                raise error
    finally:
        client.stop_stream()
    return result, (finished - started) * 1e3


def infer(
    url: Annotated[str, typer.Option("--url", help="Server address HOST:PORT (gRPC; with --http the HTTP port).")],
    model: Annotated[str, typer.Option("--model", "-m", help="Model name as in the manifest (e.g. bert_base).")],
    variant: Annotated[str, typer.Option(help=f"Which served variant: {', '.join(VARIANTS)}.")] = "whole",
    length: Annotated[Optional[int], typer.Option(help="Sequence length (sequence models; default: half the max).")] = None,
    rows: Annotated[int, typer.Option(help="Rows (batch dimension) of the request.")] = 1,
    stream: Annotated[bool, typer.Option("--stream", help="Send over a gRPC stream instead of a unary call.")] = False,
    http: Annotated[bool, typer.Option("--http", help="Send over HTTP/REST instead of gRPC.")] = False,
    repository: Annotated[Optional[Path], typer.Option("--repository", "-r", help="Built repository (its manifest.json).")] = None,
    manifest: Annotated[Optional[Path], typer.Option(help="A manifest.json (instead of --repository).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random input values.")] = 0,
) -> None:
    """Send one request built from the manifest; print output shapes, checksums, latency and the reorch record."""
    if stream and http:
        raise BadParameterError("--stream and --http exclude each other: streaming is gRPC only; drop one")
    if variant not in VARIANTS:
        raise BadParameterError(f"--variant {variant!r} is not one of {', '.join(VARIANTS)}")
    entry = model_entry(_load_manifest(repository, manifest), model)
    factory = RequestFactory(entry, variant, rows=rows, seed=seed)
    if entry.has_sequence and length is None:
        length = max(entry.min_length or 1, (entry.max_length or 2) // 2)
    arrays = factory.arrays(length if entry.has_sequence else None)
    parameters = {RECORD_PARAMETER: True} if variant == "reorch" else None
    result, latency_ms = _send(url, factory.model_name, arrays, parameters, stream=stream, http=http)
    protocol = "http" if http else "grpc-stream" if stream else "grpc"
    typer.echo(f"{factory.model_name} ({protocol}): {latency_ms:.2f} ms (second call on the connection)"
               + (f", length {length}" if entry.has_sequence else "") + f", rows {rows}")
    for name in entry.output_names:
        array = result.as_numpy(name)
        if array is None:
            typer.echo(f"  {name}: missing from the answer")
            continue
        typer.echo(f"  {name}: shape {list(array.shape)} {array.dtype.name} checksum {checksum(array)}")
    if variant == "reorch":
        records = result.as_numpy(RECORD_OUTPUT)
        record = records.ravel()[0] if records is not None else None
        typer.echo(f"  {RECORD_OUTPUT}: {record.decode() if isinstance(record, bytes) else record}")
