"""What a benchmark row produces, and the few statistics the report needs.

A ``Row`` is one line of issue 7 (start latency, destroy, ...). It holds
``Measure``s: one figure of vmworker measured over repeated runs, the same
figure of a peer measured in the same run, and an optional ``Target`` from
the issue. The ratio is always vmworker / peer; a target says whether that
ratio (or, for absolute targets, vmworker's median) must be at most or at
least some value.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Sequence


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: p99 of 20 is the max)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal from issue 7.

    ``on`` is ``"ratio"`` (vmworker / peer) or ``"value"`` (vmworker's own
    median, in the measure's unit); ``op`` is ``"<="`` or ``">="``.
    """

    on: str
    op: str
    value: float
    text: str

    def met(self, measure: "Measure") -> bool | None:
        got = measure.ratio if self.on == "ratio" else measure.median
        if got is None or math.isnan(got):
            return None
        return got <= self.value if self.op == "<=" else got >= self.value


@dataclasses.dataclass
class Measure:
    """One figure: vmworker's samples and, when there is one, the peer's."""

    label: str
    unit: str
    ours: list[float]
    peer_label: str = ""
    peer: list[float] = dataclasses.field(default_factory=list)
    target: Target | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return median(self.ours)

    @property
    def peer_median(self) -> float:
        return median(self.peer)

    @property
    def ratio(self) -> float | None:
        if not self.ours or not self.peer or not self.peer_median:
            return None
        return self.median / self.peer_median

    @property
    def met(self) -> bool | None:
        return self.target.met(self) if self.target else None


@dataclasses.dataclass
class Row:
    """One row of issue 7, with its measures, notes and optional sub-table."""

    key: str
    title: str
    measures: list[Measure] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    #: Extra table (e.g. the worker's start phases): header, then rows.
    table: list[list[str]] = dataclasses.field(default_factory=list)
    table_title: str = ""
    error: str = ""
    #: Why the row cannot be measured on this machine (a peer that cannot
    #: run here): reported instead of figures, not a failure of the run.
    unavailable: str = ""
    seconds: float = 0.0

    @property
    def produced(self) -> bool:
        return not self.error and bool(self.measures)


def fmt(value: float | None, unit: str = "") -> str:
    """A figure with sensible precision for its size."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    mag = abs(value)
    if mag >= 1000:
        text = f"{value:,.0f}"
    elif mag >= 100:
        text = f"{value:.0f}"
    elif mag >= 10:
        text = f"{value:.1f}"
    elif mag >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".rstrip() if unit else text


def spread(values: Sequence[float], unit: str) -> str:
    """``median (min–max)``, or ``–`` without samples."""
    if not values:
        return "–"
    if len(values) == 1:
        return fmt(values[0], unit)
    return (f"{fmt(median(values), unit)} "
            f"({fmt(min(values))}–{fmt(max(values))})")
