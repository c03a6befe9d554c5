"""The analyzer's ``flamegraph`` endpoint reply: flame graphs of stored sessions drawn by the
library :mod:`buildtel.shared.flamegraph.sessions` (the same functions ``buildtel flamegraph``
uses, so both give byte-identical SVGs), wrapped in the wire message of ``api.py``.

api.py (and the bus clients it brings: nats, aiohttp, numpy) loads only when a reply is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from buildtel.shared.flamegraph.sessions import (
    auto_normalize,
    build_marks,
    chart_conflicts,
    flame_stacks,
    folded_text,
    readable,
    render_chart,
    render_flamegraph,
    sessions_label,
    stacks_total,
)

if TYPE_CHECKING:
    from buildtel.services.analyzer.api import FlameGraphRequest


def flame_reply(r: FlameGraphRequest, options: Any, sessions: list[Any], base: list[Any] | None, budget: int, *,
                partial: bool = False, notes: list[str] | None = None) -> bytes:
    """The encoded :class:`FlameGraphReply` (CPU only: the service runs it in a thread).  When it
    exceeds ``budget`` bytes with search data, it is drawn again without; the caller refuses
    what still does not fit.  Raises ValueError for requests that cannot be drawn."""
    from dataclasses import replace

    import msgspec

    from buildtel.services.analyzer.api import FlameGraphReply
    from buildtel.services.analyzer.columns import gc_paused

    if r.chart and (len(sessions) != 1 or not r.session or chart_conflicts(r)):
        raise ValueError("chart draws one session: give session and none of "
                         f"{', '.join(chart_conflicts(r)) or 'the window fields'}")
    sessions, missing = readable(sessions)
    if base is not None:
        base, base_missing = readable(base)
        missing += base_missing
    if missing:
        notes = [*(notes or ()), f"{missing} non-finite or negative values in stored sessions read as missing "
                                 "(their targets or phases are left out)"]
    with gc_paused():
        categories: dict[str, int] = {}
        stacks = flame_stacks(sessions, sequence=r.flamechart, categories=categories)
        base_stacks = flame_stacks(base) if base is not None else None
        normalize = auto_normalize(r.normalize, len(sessions), len(base) if base is not None else None)
        marks = build_marks(sessions_label(sessions), categories, base=sessions_label(base) if base else None,
                            normalized=normalize)
        if base and normalize and r.normalize is None:
            notes = [*(notes or ()), f"base ({len(base)} sessions) scaled to the total of the {len(sessions)} "
                                     "drawn (normalize=false compares raw times)"]
        search = r.search_data
        while True:
            # The embedded search data grows with the input; without it the SVG is bounded by the
            # frames drawn (minwidth), so it is what goes first.
            opts = replace(options, search_data=search)
            svg = render_chart(sessions[0], opts) if r.chart else render_flamegraph(
                stacks, opts, base=base_stacks, widths=r.diff_widths, color_by=r.diff_color, normalize=normalize,
                marks=marks)
            dropped = ["search data dropped to fit one NATS message"] if search != r.search_data else []
            data = msgspec.msgpack.encode(FlameGraphReply(
                svg=svg.encode(), folded=folded_text(stacks) if r.folded else None, sessions=len(sessions),
                base_sessions=len(base or ()), total_us=stacks_total(stacks), search_data=search, partial=partial,
                notes=[*(notes or ()), *dropped]))
            if len(data) <= budget or not search or r.chart:
                return data
            search = False
