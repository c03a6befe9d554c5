"""What makes a flame graph of *builds* read well: durations, a named root, cache colours.

Folded files follow flamegraph.pl to the letter (counts in whatever unit they are, a blank
root, name-seeded colours).  Flame graphs of stored builds know more, and say it:

* counts are microseconds of target time, shown as durations (``12.3 s``, ``450 ms``);
* the root is the build (``session 3f9a2c1d (nightly)``, ``5 builds of main``);
* with the ``cache`` palette a frame's hue says what its targets did -- cache hit (green),
  built (orange), failed (red), uncacheable (blue), skipped or cancelled (grey); a package
  whose targets differ is ``mixed`` (sand) unless one failed (then red).  A legend lists the
  categories drawn.  The shade within a hue still varies by name (flamegraph.pl's seeded
  colour), so neighbours stay apart.

:class:`BuildMarks` carries that knowledge to the renderer; without it the SVG is
flamegraph.pl's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .colors import perl_name_rand

__all__ = ["CATEGORY_BITS", "BuildMarks", "category_color", "category_name", "fmt_duration",
           "fmt_signed_duration", "target_category"]

HIT, MISS, UNCACHEABLE, FAILED, OTHER = 1, 2, 4, 8, 16
CATEGORY_BITS = (HIT, MISS, UNCACHEABLE, FAILED, OTHER)

# name, legend text, (base rgb, spread rgb): shade = base + spread * name_rand
_CATEGORIES: dict[str, tuple[str, tuple[int, int, int], tuple[int, int, int]]] = {
    "hit": ("cache hit", (60, 175, 70), (40, 50, 40)),
    "miss": ("built (cache miss)", (235, 130, 30), (20, 60, 30)),
    "failed": ("failed", (200, 20, 30), (55, 30, 30)),
    "uncacheable": ("uncacheable", (90, 140, 215), (40, 40, 35)),
    "other": ("skipped / cancelled", (150, 150, 150), (40, 40, 40)),
    "mixed": ("mixed", (205, 190, 120), (40, 40, 40)),
}
LEGEND_ORDER = ("miss", "hit", "failed", "uncacheable", "other", "mixed")
_BY_BIT = {HIT: "hit", MISS: "miss", UNCACHEABLE: "uncacheable", FAILED: "failed", OTHER: "other"}


def target_category(target: Any) -> int:
    """The category bit of one target (``buildtel.shared.protocol.TargetMetrics``-shaped)."""
    status = getattr(target, "status", "success")
    if status == "failed":
        return FAILED
    if status in ("skipped", "cancelled"):
        return OTHER
    cache = getattr(target, "cache", "miss")
    if cache in ("local_hit", "remote_hit"):
        return HIT
    return UNCACHEABLE if cache == "uncacheable" else MISS


def category_name(bits: int) -> str:
    """The category of a frame whose targets have ``bits``: a failure shows through, one kind is
    that kind, several are ``mixed``; no target at all (a trace's own spans) is ``other``."""
    if bits & FAILED:
        return "failed"
    return _BY_BIT.get(bits, "mixed" if bits else "other")


def category_color(category: str, name: str) -> str:
    _, base, spread = _CATEGORIES[category]
    v = perl_name_rand(name)
    r, g, b = (c + int(s * v) for c, s in zip(base, spread, strict=True))
    return f"rgb({r},{g},{b})"


def legend_entries(categories: set[str]) -> list[tuple[str, str]]:
    """``(legend text, colour)`` for the categories drawn, in a fixed order."""
    return [(_CATEGORIES[c][0], category_color(c, "")) for c in LEGEND_ORDER if c in categories]


def fmt_duration(us: int | float) -> str:
    """Microseconds as a person reads them: ``850 µs``, ``4.5 ms``, ``450 ms``, ``1.25 s``, ``12.3 s``,
    ``125 s``, ``12 min 05 s``, ``1 h 02 min``."""
    us = abs(us)
    if us < 999.5:
        return f"{us:.0f} µs"
    if us < 9_995:
        return f"{us / 1e3:.1f} ms"
    if us < 999_500:
        return f"{us / 1e3:.0f} ms"
    s = us / 1e6
    if s < 9.995:
        return f"{s:.2f} s"
    if s < 99.95:
        return f"{s:.1f} s"
    if s < 599.5:
        return f"{s:.0f} s"
    total = round(s)
    if total < 3600:
        return f"{total // 60} min {total % 60:02d} s"
    minutes = round(s / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


def fmt_signed_duration(us: int) -> str:
    return ("+" if us > 0 else "-" if us < 0 else "±") + fmt_duration(us)


@dataclass(frozen=True, slots=True)
class BuildMarks:
    """What the renderer knows about a flame graph of builds.

    ``root``: the label of the root frame (the build); ``categories``: stack key (SEP-joined) ->
    category bits of the targets behind it (:func:`target_category`), for the ``cache`` palette.
    """

    root: str
    categories: Mapping[str, int] = field(default_factory=dict)


def legend_svg(entries: list[tuple[str, str]], *, y: float, fontsize: float, fontwidth: float, xpad: int) -> str:
    """One row of colour swatches with their meaning (outside the frames group, so tools that read
    frames do not see it)."""
    from .xmltext import escape_xml
    from .xmltext import perl_num as _num

    out = ['<g id="legend">\n']
    x = float(xpad)
    size = fontsize * 0.9
    for text, color in entries:
        out.append(f'<rect x="{x:.1f}" y="{_num(y - size + 1)}" width="{_num(size)}" height="{_num(size)}" '
                   f'fill="{color}" rx="2" ry="2"/>\n')
        out.append(f'<text x="{x + size + 4:.1f}" y="{_num(y)}">{escape_xml(text)}</text>\n')
        x += size + 4 + len(text) * fontsize * fontwidth + 16
    out.append("</g>\n")
    return "".join(out)
