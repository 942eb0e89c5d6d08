"""Rendering through Jinja2 templates (``templates/``): one self-contained HTML page and Markdown.

``write_report(run_dir)`` writes ``report.html`` (plots inline as base64 PNG), ``report.md`` and
``plots/*.png`` (the Markdown's images) into the run directory.
"""

from __future__ import annotations

import base64
from pathlib import Path

import jinja2

from loadtest.report.content import Content
from loadtest.report.data import load_run
from loadtest.report.sections import build_sections

PLOTS_DIR = "plots"
HTML_FILE = "report.html"
MARKDOWN_FILE = "report.md"


def markdown_cell(text: object) -> str:
    """Text safe inside a Markdown table cell (pipes escaped, one line)."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("loadtest.report", "templates"),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html.j2",), default_for_string=False),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["b64"] = lambda data: base64.b64encode(data).decode("ascii")
    env.filters["cell"] = markdown_cell
    return env


ENVIRONMENT = _environment()


def render(template: str, **context) -> str:
    """Render one of the package's templates (``report.html.j2``, ``compare.md.j2``, ...)."""
    return ENVIRONMENT.get_template(template).render(**context)


def render_html(sections: list[Content], title: str) -> str:
    """One self-contained HTML page (images inline as base64)."""
    return render("report.html.j2", title=title, sections=sections)


def render_markdown(sections: list[Content], title: str, plots_dir: str = PLOTS_DIR) -> str:
    """Markdown with the plots as files under ``plots_dir`` (written by :func:`write_report`)."""
    return render("report.md.j2", title=title, sections=sections, plots_dir=plots_dir)


def write_report(run_dir: str | Path) -> tuple[Path, Path]:
    """(Re)write ``report.html``, ``report.md`` and ``plots/*.png`` in ``run_dir``; returns the two paths."""
    run = load_run(run_dir)
    sections = build_sections(run)
    title = f"stagebatch characterization: {(run.environment.get('plan') or {}).get('name', 'run')}"
    run_dir = Path(run_dir)
    plots = run_dir / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    for old in plots.glob("*.png"):
        old.unlink()
    for section in sections:
        for figure in section.figures:
            (plots / f"{figure.name}.png").write_bytes(figure.png)
    html_path, md_path = run_dir / HTML_FILE, run_dir / MARKDOWN_FILE
    html_path.write_text(render_html(sections, title))
    md_path.write_text(render_markdown(sections, title))
    return html_path, md_path
