"""The result of parsing a Chrome/Perfetto trace: its spans and the clock (:class:`TraceSpan`,
:class:`ChromeTraceImport`).

Apart from the parser (``chrome_trace.py``) and the per-producer target rules
(``trace_targets.py``) so that both import it and neither imports the other's caller:
``chrome_trace -> trace_targets -> trace_spans``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec

from buildtel.shared.importers.common import ImportResult


class TraceSpan(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One timed slice of a trace: an ``X`` event or a matched ``B``/``E`` pair.

    ``start_us``/``dur_us`` are in the file's own clock (microseconds); the import's
    ``time_base_s`` converts them to Unix time.  ``parent`` is the index (in the same
    list) of the innermost span enclosing this one on the same pid/tid, or -1.
    """

    name: str
    category: str = ""
    pid: int | str = 0
    tid: int | str = 0
    start_us: float
    dur_us: float
    parent: int = -1
    args: dict[str, Any] = {}

    @property
    def end_us(self) -> float:
        return self.start_us + self.dur_us


@dataclass
class ChromeTraceImport(ImportResult):
    """An import result that also carries the spans, thread names and the clock."""

    spans: list[TraceSpan] = field(default_factory=list)
    threads: dict[tuple[int | str, int | str], str] = field(default_factory=dict)
    processes: dict[int | str, str] = field(default_factory=dict)
    producer: str = "generic"
    time_base_s: float = 0.0  # Unix time of ts == 0
    time_source: str = "none"


def async_lane(tid: int | str) -> str:
    """The lane of clang's async ``Source`` slices on thread ``tid`` (they nest among themselves)."""
    return f"{tid}/Source"
