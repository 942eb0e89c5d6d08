"""``stagebatch build``: write a Triton model repository (whole model, stages + ensemble, reorch)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from slicing.build import CRASH_QUEUE_TIMEOUT_US, BuildOptions, build_repository
from slicing.zoo import MODEL_NAMES, SIZES


def build(
    model: Annotated[Optional[list[str]], typer.Option(
        "--model", "-m", help=f"Zoo model: {', '.join(MODEL_NAMES)}, or all (repeatable).")] = None,
    onnx: Annotated[Optional[Path], typer.Option("--onnx", help="Your own ONNX file instead of a zoo model.")] = None,
    size: Annotated[str, typer.Option(help=f"Zoo model size: {', '.join(SIZES)} (tiny for tests, small for a 2-core CPU).")] = "small",
    stages: Annotated[Optional[int], typer.Option(
        "--stages", "-k", help="Number of stages K (default 4, or the largest valid K if smaller).")] = None,
    target: Annotated[str, typer.Option(
        help="embedded (Python backend + onnxruntime CPU) or gpu (onnxruntime backend, KIND_GPU).")] = "embedded",
    max_batch: Annotated[int, typer.Option(help="max_batch_size of every batcher.")] = 16,
    queue_delay_us: Annotated[int, typer.Option(help="Dynamic batcher max queue delay (µs), every batcher.")] = 100,
    out: Annotated[Path, typer.Option("--out", "-o", help="Repository directory (merged if it exists).")] = Path(
        "model_repository"),
    weights: Annotated[Optional[Path], typer.Option(help="Local state dict for the zoo model (torch.save).")] = None,
    balance: Annotated[str, typer.Option(help="Stage balancing: measured, profile or flops.")] = "measured",
    cut: Annotated[Optional[list[str]], typer.Option(
        "--cut", help="Explicit cut tensor (repeatable; K-1 of them give K stages).")] = None,
    max_seq_len: Annotated[Optional[int], typer.Option(
        help="Longest sequence of the sequence models (default: the size's default length).")] = None,
    instances: Annotated[int, typer.Option(help="Instances of the whole and stage models.")] = 1,
    intra_op_threads: Annotated[int, typer.Option(
        help="onnxruntime intra-op threads of every served session (0: all physical cores).")] = 0,
    max_queue_size: Annotated[int, typer.Option(
        help="Triton queue policy: requests beyond this many queued are refused at once (0: unbounded). "
             "Whole model and reorch only (a full stage queue hangs its ensemble on 24.10).")] = 0,
    default_timeout_us: Annotated[int, typer.Option(
        help="Triton queue policy: a request queued longer than this (µs) is refused (0: never), every "
             "batcher. Answers the requests queued in front of a crashed Python stub within seconds; "
             f"turns off the batcher's prefetch. On tritonserver 2.51 any queue policy stalls requests for up "
             f"to 500 ms under concurrent calls (docs/gpu.md); {CRASH_QUEUE_TIMEOUT_US} answers a crashed "
             f"stub's queue within seconds.")] = 0,
) -> None:
    """Build a ready Triton model repository with the whole model, its stages and their ensemble."""
    from rich.console import Console
    from rich.table import Table


    console = Console(stderr=True)
    options = BuildOptions(size=size, stages=stages, target=target, max_batch=max_batch,
                           queue_delay_us=queue_delay_us, balance=balance, cut_tensors=list(cut or []),
                           weights=weights, max_seq_len=max_seq_len, instance_count=instances,
                           intra_op_threads=intra_op_threads, max_queue_size=max_queue_size,
                           default_timeout_us=default_timeout_us)
    with console.status("building ..."):
        builds = build_repository(out, models=model, onnx_file=onnx, options=options,
                                  log=lambda line: console.print(line, highlight=False, soft_wrap=True))
    table = Table(title=f"{out} ({target})")
    for column in ("model", "K", "cut tensors", "cost shares", "favoured batch", "max rel. error", "build s",
                   "variants"):
        table.add_column(column, overflow="fold")
    for item in builds:
        entry = item.entry
        table.add_row(
            item.name, str(len(entry["stages"])), "\n".join(entry["build"]["cut_tensors"]) or "-",
            " / ".join(f"{s['cost_share']:.2f}" for s in entry["stages"]),
            " / ".join(str(s["favoured_batch_size"]) for s in entry["stages"]),
            f"{item.verified_max_rel_error:.1e}", f"{item.build_s:.1f}", ", ".join(entry["variants"]))
    terminal = Console()
    # piped output: rich would squeeze the table into 80 columns
    Console(width=max(terminal.width, 120) if not terminal.is_terminal else None).print(table)
