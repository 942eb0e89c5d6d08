"""The characterization report: sections, findings and plots computed from a run directory's raw data.

``write_report(run_dir)`` reads the run files (:mod:`loadtest.rundir`), recomputes every client-side
number from the raw request latencies (so the report and the raw data cannot disagree), builds the
sections listed in :data:`loadtest.report.sections.SECTIONS` and renders them through the Jinja2
templates in ``templates/`` into ``report.html`` (self-contained) and ``report.md`` (+ ``plots/``).

Modules: ``data`` (reading a run, stability, the point label), ``findings`` (honest comparisons with
confidence intervals), ``attribution`` (where the mean latency went), ``figures`` (the shared plot
helper), ``content`` (what a section shows), ``sections`` and ``plots`` (one class per section; the order
in ``sections.SECTIONS``), ``render`` (templates and files).
"""

from loadtest.report.data import PointData, RunData, load_run, point_label
from loadtest.report.findings import compare_configs, findings
from loadtest.report.render import render, render_html, render_markdown, write_report
from loadtest.report.sections import SECTION_TITLES, SECTIONS, build_sections

__all__ = [
    "SECTIONS",
    "SECTION_TITLES",
    "PointData",
    "RunData",
    "build_sections",
    "compare_configs",
    "findings",
    "load_run",
    "point_label",
    "render",
    "render_html",
    "render_markdown",
    "write_report",
]
