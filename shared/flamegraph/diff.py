"""Differential flame graphs: what changed between two profiles.

The same pipeline as ``difffolded.pl before after | flamegraph.pl``:

* :func:`diff_folded` pairs every stack with its count on each side (zero
  where absent), optionally scaling *before* to *after*'s total
  (``difffolded.pl -n``: ``int(before * total_after / total_before)``);
* :func:`render_diff_svg` draws it.  Widths come from one side
  (``widths="after"``, the default, shows what did happen;
  ``widths="before"`` shows the old profile coloured by what will happen,
  i.e. ``difffolded.pl after before | flamegraph.pl --negate``).  Either way
  red means slower (more count after), blue faster, white unchanged, and the
  intensity is relative to the largest change.  ``negate=True`` swaps hues.
  Like flamegraph.pl, a frame is coloured by the change in its *self* count
  by default; ``color_by="total"`` colours by the change of the whole
  subtree, which reads better for build trees where only leaves have self
  time.

The tooltip shows the width side's count and percentage, then the change as
a percentage of the width side's total (``+1.25%``), as flamegraph.pl does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from .build import BuildMarks
from .folded import SEP, FoldedParseError, FoldedStacks, _key
from .layout import layout_merged, reverse_key
from .svg import SVGFlameGraphGenerator

__all__ = ["DiffStacks", "diff_folded", "parse_diff_folded", "render_diff_svg"]


@dataclass(slots=True)
class DiffStacks:
    """Stack key (SEP-joined) -> ``(before, after)`` counts."""

    pairs: dict[str, tuple[int, int]] = field(default_factory=dict)
    unit: str = "us"

    @property
    def before_total(self) -> int:
        return sum(b for b, _ in self.pairs.values())

    @property
    def after_total(self) -> int:
        return sum(a for _, a in self.pairs.values())

    def side(self, which: Literal["before", "after"]) -> FoldedStacks:
        i = 0 if which == "before" else 1
        return FoldedStacks._from_keys({k: v[i] for k, v in self.pairs.items() if v[i]}, self.unit)

    def to_text(self) -> str:
        """difffolded.pl's output: ``stack before after`` per line, sorted."""
        out = "".join(f"{k} {self.pairs[k][0]} {self.pairs[k][1]}\n" for k in sorted(self.pairs))
        return out.replace(SEP, ";")


def _counts(side: FoldedStacks | Mapping[str, int]) -> tuple[dict[str, int], str | None]:
    if isinstance(side, FoldedStacks):
        return side.keys_counts, side.unit
    return FoldedStacks(side).keys_counts, None


def diff_folded(
    before: FoldedStacks | Mapping[str, int],
    after: FoldedStacks | Mapping[str, int],
    *,
    normalize: bool = False,
) -> DiffStacks:
    """Pair two profiles stack by stack (see the module docstring)."""
    b, bunit = _counts(before)
    a, aunit = _counts(after)
    if bunit and aunit and bunit != aunit:
        raise ValueError(f"unit mismatch: {bunit!r} vs {aunit!r}")
    tb, ta = sum(b.values()), sum(a.values())
    scale = normalize and tb and tb != ta
    pairs: dict[str, tuple[int, int]] = {}
    for k in b.keys() | a.keys():
        bv = b.get(k, 0)
        if scale:
            bv = bv * ta // tb  # integer scaling as difffolded.pl's int()
        pairs[k] = (bv, a.get(k, 0))
    return DiffStacks(pairs, aunit or bunit or "us")


def parse_diff_folded(text: str, *, unit: str = "us") -> DiffStacks:
    """Parse difffolded.pl's three-column output (``stack before after``)."""
    pairs: dict[str, tuple[int, int]] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 2)
        if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts[1:]):
            raise FoldedParseError(lineno, line, "expected '<stack> <before> <after>'")
        k = _key(parts[0])
        b0, a0 = pairs.get(k, (0, 0))
        pairs[k] = (b0 + int(parts[1]), a0 + int(parts[2]))
    return DiffStacks(pairs, unit)


def render_diff_svg(
    before: FoldedStacks | Mapping[str, int] | DiffStacks,
    after: FoldedStacks | Mapping[str, int] | None = None,
    *,
    widths: Literal["after", "before"] = "after",
    normalize: bool = False,
    color_by: Literal["self", "total"] = "self",
    marks: BuildMarks | None = None,
    **options: Any,
) -> str:
    """Differential flame graph SVG of ``before`` -> ``after`` (or of a DiffStacks).

    ``marks``: the two sides are builds (durations, the comparison named at the root and in
    the title, a legend); see :mod:`.build`."""
    if isinstance(before, DiffStacks):
        if after is not None:
            raise TypeError("pass either a DiffStacks or two profiles")
        diff = before
    else:
        if after is None:
            raise TypeError("render_diff_svg needs both profiles")
        diff = diff_folded(before, after, normalize=normalize)
    if widths not in ("after", "before"):
        raise ValueError("widths is 'after' or 'before'")
    if marks is None:
        options.setdefault("title", "Differential Flame Graph")
    gen = SVGFlameGraphGenerator(**options)
    if gen.options.flamechart:
        raise ValueError("a differential is a merged flame graph, not a flame chart")
    side = 1 if widths == "after" else 0
    counts: dict[str, int] = {}
    deltas: dict[str, int] = {}
    reverse = gen.options.reverse
    for k, pair in diff.pairs.items():
        if reverse:
            k = reverse_key(k)
        counts[k] = counts.get(k, 0) + pair[side]
        deltas[k] = deltas.get(k, 0) + pair[1] - pair[0]
    total = sum(counts.values())
    lay = layout_merged(
        counts,
        minwidth_count=gen._minwidth_count(total),
        root_name=gen.options.root_name,
        deltas=deltas,
        delta_mode=color_by,
    )
    return gen.render_layout(lay, unit=diff.unit, marks=marks)
