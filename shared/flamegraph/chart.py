"""A build's timeline: time on the x axis, one lane per worker.

Input is ``(name, worker, start_us, end_us)`` per target (or action).  Each
worker gets a lane; inside a lane, intervals that overlap (a worker running
several actions, or nested ones) go on separate rows, each interval on the
lowest row free at its start, so nothing is hidden behind anything else.
Lanes are ordered by worker name with numbers compared as numbers
(``w2`` before ``w10``).  Hovering a bar shows its name, worker, start
offset and duration.  Colours use the flame graph palettes, keyed by name,
so output is deterministic.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .build import category_color, category_name, target_category
from .colors import PALETTES, frame_color
from .svg import escape_xml

if TYPE_CHECKING:
    from buildtel.shared.protocol import BuildSession

__all__ = ["BuildChartGenerator", "ChartBar", "assign_rows", "chart_items_from_session"]


@dataclass(frozen=True, slots=True)
class ChartBar:
    """A placed bar: its lane (worker), row inside the lane and times (us)."""

    name: str
    worker: str
    start_us: int
    end_us: int
    row: int


def _natural(s: str) -> tuple[Any, ...]:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s))


def assign_rows(items: Iterable[tuple[str, str, int, int]]) -> dict[str, list[ChartBar]]:
    """Worker -> bars with rows assigned (lowest free row at each start)."""
    lanes: dict[str, list[tuple[int, int, str]]] = {}
    for name, worker, start, end in items:
        start, end = int(start), int(end)
        if end < start:
            raise ValueError(f"{name!r} ends before it starts ({start} > {end})")
        lanes.setdefault(worker or "?", []).append((start, -end, name))
    placed: dict[str, list[ChartBar]] = {}
    for worker in sorted(lanes, key=_natural):
        row_ends: list[int] = []
        bars = []
        for start, neg_end, name in sorted(lanes[worker]):
            end = -neg_end
            for row, busy_until in enumerate(row_ends):
                if busy_until <= start:
                    row_ends[row] = end
                    break
            else:
                row = len(row_ends)
                row_ends.append(end)
            bars.append(ChartBar(name, worker, start, end, row))
        placed[worker] = bars
    return placed


def chart_items_from_session(session: BuildSession) -> list[tuple[str, str, int, int]]:
    """``(name, worker, start_us, end_us)`` per target, relative to the build start."""
    targets = list(session.targets)
    t0 = getattr(session, "start", 0.0) or min((t.start for t in targets), default=0.0)
    return [
        (t.name, t.worker or getattr(t, "agent_id", "") or "?",
         round((t.start - t0) * 1e6), round((t.end - t0) * 1e6))
        for t in targets
    ]


def _fmt_us(us: float) -> str:
    if us >= 60_000_000:
        return f"{us / 60_000_000:.1f} min"
    if us >= 1_000_000:
        return f"{us / 1_000_000:.2f} s"
    if us >= 1000:
        return f"{us / 1000:.1f} ms"
    return f"{us:.0f} us"


def _tick_step(span_us: float, target_ticks: int = 10) -> float:
    raw = span_us / target_ticks
    mag = 10 ** (len(str(int(raw))) - 1) if raw >= 1 else 1
    for m in (1, 2, 5, 10):
        if raw <= m * mag:
            return float(m * mag)
    return float(10 * mag)


_SCRIPT = """\
function init(evt) {
	var details = document.getElementById("details").firstChild;
	var bars = document.getElementById("bars");
	bars.addEventListener("mouseover", function(e) {
		var g = e.target.closest ? e.target.closest("g") : null;
		if (g && g.parentNode === bars) details.nodeValue = g.getElementsByTagName("title")[0].textContent;
	});
	bars.addEventListener("mouseout", function() { details.nodeValue = " "; });
}
"""


class BuildChartGenerator:
    """Render a build timeline SVG (see the module docstring)."""

    def __init__(
        self,
        *,
        title: str = "Build Timeline",
        width: int = 1200,
        height: int = 16,
        lane_label_width: int = 140,
        colors: str = "hot",
        minwidth: float = 0.1,
        fonttype: str = "Verdana",
        fontsize: float = 12,
        fontwidth: float = 0.59,
    ) -> None:
        if colors not in PALETTES:
            raise ValueError(f"unknown colors {colors!r}")
        if width <= lane_label_width + 20:
            raise ValueError("width too small for the lane labels")
        self.title, self.width, self.height = title, width, height
        self.lane_label_width, self.colors, self.minwidth = lane_label_width, colors, minwidth
        self.fonttype, self.fontsize, self.fontwidth = fonttype, fontsize, fontwidth

    def render_session(self, session: BuildSession) -> str:
        # The "cache" palette colours a bar by what its target did (build.py); by name otherwise.
        cats = {t.name: target_category(t) for t in session.targets} if self.colors == "cache" else None
        return self.render(chart_items_from_session(session), categories=cats)

    def render(self, items: Iterable[tuple[str, str, int, int]], *,
               categories: dict[str, int] | None = None) -> str:
        lanes = assign_rows(items)
        bars_all = [b for bars in lanes.values() for b in bars]
        fs, fh = self.fontsize, self.height
        x0 = self.lane_label_width
        span_px = self.width - x0 - 10
        t0 = min((b.start_us for b in bars_all), default=0)
        t1 = max((b.end_us for b in bars_all), default=0)
        span = max(t1 - t0, 1)
        ppu = span_px / span
        top = fs * 3
        axis_h = fs * 2 + 4
        lane_rows = {w: max(b.row for b in bars) + 1 for w, bars in lanes.items()}
        height = top + axis_h + sum(r * fh + 4 for r in lane_rows.values()) + fs * 2 + 10
        glyph = fs * self.fontwidth
        out = [
            '<?xml version="1.0" standalone="no"?>\n'
            f'<svg version="1.1" width="{self.width}" height="{height:g}" onload="init(evt)" '
            f'viewBox="0 0 {self.width} {height:g}" xmlns="http://www.w3.org/2000/svg">\n'
            f"<style type=\"text/css\">text {{ font-family:{self.fonttype}; font-size:{fs:g}px; }}"
            " #title { text-anchor:middle; font-size:%gpx; } .lane { fill:rgb(240,240,240); }"
            " #bars > g:hover { stroke:black; stroke-width:0.5; }</style>\n" % (fs + 5)
            + f'<script type="text/ecmascript"><![CDATA[\n{_SCRIPT}]]></script>\n'
            f'<rect x="0" y="0" width="{self.width}" height="{height:g}" fill="rgb(250,250,250)"/>\n'
            f'<text id="title" x="{self.width // 2}" y="{fs * 2:g}">{escape_xml(self.title)}</text>\n'
        ]
        # time axis with "nice" tick spacing
        step = _tick_step(span)
        axis_y = top + fs
        tick = 0.0
        while tick <= span:
            x = x0 + tick * ppu
            out.append(f'<line x1="{x:.1f}" y1="{axis_y + 2:g}" x2="{x:.1f}" y2="{height - fs * 2 - 10:g}" '
                       'stroke="rgb(220,220,220)"/>\n'
                       f'<text x="{x:.1f}" y="{axis_y:g}" text-anchor="middle">{_fmt_us(tick)}</text>\n')
            tick += step
        y = top + axis_h
        out.append('<g id="lanes">\n')
        lane_y: dict[str, float] = {}
        for worker, rows in lane_rows.items():
            h = rows * fh
            lane_y[worker] = y
            out.append(f'<g class="lane-group"><rect class="lane" x="0" y="{y:g}" width="{self.width}" '
                       f'height="{h:g}"/><text x="4" y="{y + fh / 2 + 4:g}">{escape_xml(worker)}</text></g>\n')
            y += h + 4
        out.append('</g>\n<g id="bars">\n')
        colors: dict[str, str] = {}
        for b in bars_all:
            w = (b.end_us - b.start_us) * ppu
            if w < self.minwidth:
                continue
            x = x0 + (b.start_us - t0) * ppu
            by = lane_y[b.worker] + b.row * fh
            color = colors.get(b.name) or colors.setdefault(b.name, (
                category_color(category_name(categories.get(b.name, 0)), b.name) if categories is not None
                else frame_color("hot" if self.colors == "cache" else self.colors, b.name)))
            chars = int(w / glyph)
            label = b.name if chars >= len(b.name) else (b.name[: chars - 2] + ".." if chars >= 3 else "")
            info = (f"{b.name} (worker {b.worker}, start +{_fmt_us(b.start_us - t0)}, "
                    f"duration {_fmt_us(b.end_us - b.start_us)})")
            out.append(
                f'<g data-worker="{escape_xml(b.worker)}" data-row="{b.row}"><title>{escape_xml(info)}</title>'
                f'<rect x="{x:.1f}" y="{by:g}" width="{w:.1f}" height="{fh - 1:g}" fill="{color}" rx="2" ry="2"/>'
                f'<text x="{x + 3:.2f}" y="{by + fh / 2 + 4:g}">{escape_xml(label)}</text></g>\n'
            )
        out.append("</g>\n")
        out.append(f'<text id="details" x="10" y="{height - fs - 5:g}"> </text>\n</svg>\n')
        return "".join(out)
