"""The raw files of a characterization run: their names, row formats, readers and atomic writes.

A run directory holds:

* ``environment.json`` (:data:`ENVIRONMENT_FILE`): hardware, software versions, the plan, times;
* ``points.jsonl`` (:data:`POINTS_FILE`): one JSON line per complete point;
* ``requests.csv`` (:data:`REQUESTS_FILE`): one row per request of every point;
* ``capacity.json`` (:data:`CAPACITY_FILE`): the capacity search's result, when one ran;
* ``run.log`` (:data:`LOG_FILE`): everything logged during the run (exporter and onnxruntime chatter
  included);
* ``loadgen_crosscheck.json`` (:data:`LOADGEN_CROSSCHECK_FILE`).

Points are written atomically (:func:`append_point`): a point's request rows go to
``requests.csv`` first, then its JSON line to ``points.jsonl`` in one ``write``; a point is complete
exactly when its line is there. Rows of a point whose line is missing (a crash between the two
writes) are ignored by :func:`read_requests` and dropped by :func:`discard_incomplete` on resume.
The fields are documented in ``docs/characterization.md``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

from core.errors import ConfigValidationError

ENVIRONMENT_FILE = "environment.json"  # hardware, software versions, plan, times
POINTS_FILE = "points.jsonl"  # one JSON line per complete point
REQUESTS_FILE = "requests.csv"  # one row per request of every point
CAPACITY_FILE = "capacity.json"  # the capacity search (contract 5)
LOG_FILE = "run.log"  # the run's full log, including the exporter's and onnxruntime's chatter
LOADGEN_CROSSCHECK_FILE = "loadgen_crosscheck.json"  # one steady point replayed by perf_analyzer too
SIMULATION_FILE = "simulation.json"  # `stagebatch simulate --run`: every point simulated (docs/tuning.md)
REQUEST_COLUMNS = (
    "point",
    "t_send_us",
    "latency_us",
    "ok",
    "seq_len",
    "rows",
    "late_us",
    "error",
    "batch_sizes",
    "server",
)


# ---------------------------------------------------------------- JSON


def _json_default(value: Any) -> Any:
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_to_none(v) for v in value]
    if hasattr(value, "to_dict"):
        return _nan_to_none(value.to_dict())
    return value


def dumps(value: Any) -> str:
    """JSON for the raw data files (NaN written as null so any JSON reader accepts it)."""
    return json.dumps(_nan_to_none(value), default=_json_default)


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as JSON to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(dumps(value))
    os.replace(tmp, path)


# ---------------------------------------------------------------- requests.csv


def request_row(point_index: int, record: Any) -> list:
    """One ``requests.csv`` row from a driver RequestRecord."""
    server = getattr(record, "server", None) or None
    batch_sizes = (server or {}).get("batch_sizes") if isinstance(server, dict) else None
    return [
        point_index,
        int(record.t_send_us),
        int(record.latency_us),
        int(bool(record.ok)),
        "" if record.seq_len is None else int(record.seq_len),
        int(record.rows or 1),
        int(getattr(record, "late_us", 0) or 0),
        (record.error or "").replace("\n", " ")[:500],
        "" if not batch_sizes else " ".join(str(int(b)) for b in batch_sizes),
        "" if server is None else json.dumps(server, separators=(",", ":")),
    ]


def read_requests(path: Path, points: Iterable[int] | None = None) -> dict[int, list[dict]]:
    """``requests.csv`` grouped by point index (types restored).

    ``points``: keep only these point indices (the complete points); None keeps every row.
    """
    keep = None if points is None else set(points)
    grouped: dict[int, list[dict]] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = {"point", "t_send_us", "latency_us", "ok"} - set(reader.fieldnames or ())
        if missing:
            raise ConfigValidationError(f"{path}: columns {', '.join(sorted(missing))} are missing")
        for row in reader:
            if not row.get("point") or row.get("ok") is None:
                continue  # a row cut short by a crash
            index = int(row["point"])
            if keep is not None and index not in keep:
                continue
            grouped.setdefault(index, []).append(
                {
                    "t_send_us": int(row["t_send_us"]),
                    "latency_us": int(row["latency_us"]),
                    "ok": row["ok"] == "1",
                    "seq_len": int(row["seq_len"]) if row.get("seq_len") else None,
                    "rows": int(row.get("rows") or 1),
                    "late_us": int(row.get("late_us") or 0),
                    "error": row.get("error") or None,
                    "batch_sizes": [int(b) for b in row["batch_sizes"].split()]
                    if row.get("batch_sizes")
                    else [],
                    # the reorchestrator's per-request record (REORCH_RECORD), when it sent one
                    "server": json.loads(row["server"]) if row.get("server") else None,
                }
            )
    return grouped


# ---------------------------------------------------------------- points.jsonl


def read_points(run_dir: str | Path) -> list[dict]:
    """The complete points of a run, in the order written (a torn last line is ignored)."""
    path = Path(run_dir) / POINTS_FILE
    if not path.is_file():
        return []
    points = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            points.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line torn by a crash: that point is absent
    return points


def start_run_files(run_dir: str | Path) -> None:
    """Create empty ``points.jsonl`` and ``requests.csv`` (with its header) for a new run."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / POINTS_FILE).write_text("")
    with open(run_dir / REQUESTS_FILE, "w", newline="") as handle:
        csv.writer(handle).writerow(REQUEST_COLUMNS)


def _append(path: Path, text: str) -> None:
    """Append ``text`` with one write and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = text.encode()
        while data:
            written = os.write(fd, data)
            data = data[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def append_point(run_dir: str | Path, record: dict, request_records: Iterable[Any] = ()) -> None:
    """Write one point atomically: its request rows, then its ``points.jsonl`` line.

    ``record["index"]`` is the point's index; ``request_records`` are the driver's RequestRecords of
    its measured window. A crash before the JSON line is written leaves the point absent (its rows
    are ignored by :func:`read_requests` and removed by :func:`discard_incomplete`).
    """
    run_dir = Path(run_dir)
    requests_path = run_dir / REQUESTS_FILE
    if not requests_path.exists():
        with open(requests_path, "w", newline="") as handle:
            csv.writer(handle).writerow(REQUEST_COLUMNS)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    for request in request_records:
        writer.writerow(request_row(int(record["index"]), request))
    if buffer.getvalue():
        _append(requests_path, buffer.getvalue())
    _append(run_dir / POINTS_FILE, dumps(record) + "\n")


def discard_incomplete(run_dir: str | Path) -> list[dict]:
    """Make a run's files hold only its complete points (for resuming); return those points.

    Drops a torn last line of ``points.jsonl`` and every ``requests.csv`` row of a point without a
    line. Failed points are complete too (they are recorded); the caller decides whether to rerun them.
    """
    run_dir = Path(run_dir)
    points = read_points(run_dir)
    write_points(run_dir, points)
    complete = {int(p["index"]) for p in points}
    requests_path = run_dir / REQUESTS_FILE
    tmp = requests_path.with_name(requests_path.name + ".tmp")
    with open(tmp, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(REQUEST_COLUMNS)
        if requests_path.is_file():
            with open(requests_path, newline="") as handle:
                reader = csv.reader(handle)
                next(reader, None)
                for row in reader:
                    if len(row) == len(REQUEST_COLUMNS) and row[0].isdigit() and int(row[0]) in complete:
                        writer.writerow(row)
    os.replace(tmp, requests_path)
    return points


def write_points(run_dir: str | Path, points: list[dict]) -> None:
    """Replace ``points.jsonl`` with ``points`` (atomically)."""
    path = Path(run_dir) / POINTS_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(dumps(p) + "\n" for p in points))
    os.replace(tmp, path)


def drop_requests(run_dir: str | Path, indices: Iterable[int]) -> None:
    """Remove the ``requests.csv`` rows of the given point indices (points about to be rerun)."""
    drop = {int(i) for i in indices}
    if not drop:
        return
    requests_path = Path(run_dir) / REQUESTS_FILE
    tmp = requests_path.with_name(requests_path.name + ".tmp")
    with open(requests_path, newline="") as handle, open(tmp, "w", newline="") as out:
        reader, writer = csv.reader(handle), csv.writer(out)
        for number, row in enumerate(reader):
            if number == 0 or not (row and row[0].isdigit() and int(row[0]) in drop):
                writer.writerow(row)
    os.replace(tmp, requests_path)


# ---------------------------------------------------------------- environment.json, capacity.json


def read_environment(run_dir: str | Path) -> dict:
    """``environment.json`` of a run (a clear error when it is missing)."""
    path = Path(run_dir) / ENVIRONMENT_FILE
    if not path.is_file():
        raise ConfigValidationError(f"{path}: missing; is {run_dir} a run directory of 'stagebatch characterize'?")
    return json.loads(path.read_text())


def read_capacity(run_dir: str | Path) -> dict | None:
    """``capacity.json`` of a run, or None when no capacity search ran."""
    path = Path(run_dir) / CAPACITY_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())
