"""The quiet console: warnings and one line per point on the console, everything in the run's log file."""

from __future__ import annotations

import logging

from loadtest import characterization as runner


def _record(name: str, level: int, message: str) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, message, None, None)


def test_console_shows_warnings_and_point_lines_but_not_info_chatter():
    handler = runner.console_handler()
    shown = lambda record: all(f.filter(record) for f in handler.filters)  # noqa: E731
    assert not shown(_record("onnxscript.optimizer", logging.INFO, "pass 17 applied"))
    assert not shown(_record("slicing.export", logging.INFO, "[torch.onnx] Obtain model graph"))
    assert shown(_record("loadtest.characterization", logging.WARNING, "point x failed"))
    line = _record(runner.PROGRESS.name, logging.INFO, "[1/3] a/b: 10.0 req/s offered")
    assert shown(line) and handler.format(line) == "[1/3] a/b: 10.0 req/s offered"
    assert handler.format(_record("x", logging.WARNING, "careful")) == "warning: careful"


def test_console_mutes_a_logger_only_inside_the_block(tmp_path):
    root = logging.getLogger()
    saved = root.handlers[:]
    handler = runner.console_handler()
    root.handlers = [handler]
    try:
        driver_warning = _record("loadtest.driver", logging.WARNING, "12 arrivals late")
        with runner._console_quiet("loadtest.driver"):
            assert not handler.filters[0].filter(driver_warning)
        assert handler.filters[0].filter(driver_warning)
    finally:
        root.handlers = saved


def test_log_file_receives_info_records(tmp_path):
    with runner._log_file(tmp_path / "run.log"):
        # (a logger no library configures: the exporter's own loggers are set to WARNING by slicing.export)
        logging.getLogger("stagebatch.tests.chatter").info("pass 17 applied")
    assert "pass 17 applied" in (tmp_path / "run.log").read_text()


def test_point_line_says_rate_multiple_and_verdict():
    record = {
        "status": "ok",
        "point": {"point_id": "e/m/whole/curve@rate_rps=0.85x"},
        "load": {"rate_rps": 85.0, "multiple": 0.85, "capacity_rps": 100.0},
        "offered_rps": 84.3,
        "achieved_rps": 83.9,
        "client": {"p99_ms": 41.25},
        "stable": False,
        "unstable_reason": "backlog_growing: 3 -> 40",
    }
    line = runner.point_line(2, 9, record)
    assert line == (
        "[2/9] e/m/whole/curve@rate_rps=0.85x: 84.3 req/s offered (0.85x), 83.9 achieved, p99 41.2 ms, "
        "UNSTABLE (backlog_growing)"
    )
    assert "FAILED: boom" in runner.point_line(1, 1, {"status": "failed", "point": {"point_id": "p"}, "error": "boom"})


def test_run_summary_counts_stable_points_and_whole_curve_coverage(tmp_path):
    from loadtest.rundir import CAPACITY_FILE, append_point, start_run_files, write_json

    start_run_files(tmp_path)
    write_json(tmp_path / CAPACITY_FILE, {"models": {"m": {"whole": {"sustained_rps": 100, "slo_rps": 90,
                                                                      "limited_by": "server"}}}})  # fmt: skip
    for index, (multiple, stable, attainment) in enumerate([(0.5, True, 1.0), (1.3, False, 0.2)]):
        append_point(tmp_path, {"index": index, "status": "ok", "stable": stable,
                                "point": {"model": "m", "variant": "whole"},
                                "load": {"multiple": multiple}, "client": {"slo_attainment": attainment}})  # fmt: skip
    lines = runner.run_summary(tmp_path)
    assert lines[0] == "2 points measured (0 failed): 1 stable (50%)"
    assert "limited by server" in lines[1]
    assert lines[2] == "m whole: stable point with SLO attainment >= 99%: yes; point at or past capacity: yes"
