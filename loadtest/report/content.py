"""The report's building blocks: what a section shows (:class:`Content`) and the :class:`Section` base.

All text is plain; the Jinja2 templates escape it for HTML and Markdown.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from loadtest.report.data import GENERATOR_LIMITED, SATURATED, PointData, RunData, by_label
from loadtest.report.figures import Figure


def fmt(value: Any, digits: int = 1) -> str:
    """A table cell: floats with ``digits`` decimals, None/NaN as ``n/a``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


@dataclass
class Row:
    """A table row; ``flag`` (e.g. ``saturated``) marks it in the HTML."""

    cells: list[str]
    flag: str = ""


@dataclass
class Table:
    """A table: header and rows."""

    header: list[str]
    rows: list[Row]
    caption: str = ""  # a sentence shown just above the table


@dataclass
class Content:
    """What a section shows (all text is plain; the templates escape it)."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    bullets: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        """Whether the section has nothing to show."""
        return not (self.paragraphs or self.bullets or self.tables or self.figures)


class Section(ABC):
    """A report section: ``title``, an optional ``intro`` paragraph, and ``build``."""

    title: ClassVar[str]
    intro: ClassVar[str] = ""  # the section's first paragraph (white space folded): what it shows, how measured

    def start(self) -> Content:
        """The section's content so far: its title and its intro."""
        intro = " ".join(self.intro.split())
        return Content(self.title, paragraphs=[intro] if intro else [])

    def only(self, paragraph: str) -> Content:
        """The section's content when all it can say is one paragraph (data missing, step skipped)."""
        return Content(self.title, paragraphs=[paragraph])

    @abstractmethod
    def build(self, run: RunData) -> Content:
        """The section's content for ``run``."""


def state_cell(point: PointData) -> str:
    """``stable``, ``SATURATED (reason)``, ``UNSTABLE: load generator (reason)`` or ``unknown``."""
    if point.saturated:
        return f"SATURATED ({point.unstable_reason})"
    if point.stability == GENERATOR_LIMITED:
        return f"UNSTABLE: load generator ({point.unstable_reason})"
    return point.stability


def row_flag(point: PointData) -> str:
    """The HTML row class of a point: ``saturated``, ``flagged`` (generator-limited) or none."""
    return {SATURATED: "saturated", GENERATOR_LIMITED: "flagged"}.get(point.stability, "")


def heaviest(points: list[PointData]) -> dict[str, PointData]:
    """Per configuration, its stable point under the highest offered load (else its heaviest point)."""
    best: dict[str, PointData] = {}
    for label, repeats in by_label(points).items():
        stable = [p for p in repeats if not p.unstable] or repeats
        best[label] = max(stable, key=lambda p: (p.offered_rps, -p.repeat))
    return best
