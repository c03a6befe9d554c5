"""Flame graphs of stored sessions, rendered the same way for ``buildtel flamegraph`` and the
analyzer's ``flamegraph`` endpoint, so both give byte-identical SVGs for the same input.

Pure functions over sessions and :mod:`services.flamegraph`; the wire messages
(``FlameGraphRequest``/``FlameGraphReply``) are in ``api.py``.
"""

from __future__ import annotations

from typing import Any

import msgspec

from services.analyzer.api import FLAME_OPTIONS, FlameGraphReply, FlameGraphRequest

_enc = msgspec.msgpack.Encoder()


def flame_options(req: Any) -> Any:
    """``FlameGraphOptions`` from anything with the :data:`FLAME_OPTIONS` attributes (raises ValueError)."""
    from services.flamegraph import FlameGraphOptions

    return FlameGraphOptions(**{k: getattr(req, k) for k in FLAME_OPTIONS})


def flame_stacks(sessions: list[Any], *, sequence: bool = False) -> Any:
    """The sessions' targets as stacks: merged ``FoldedStacks``, or for a flame chart the
    ``(key, us)`` lines in time order (sessions by start, then targets by start)."""
    from types import SimpleNamespace

    from services.flamegraph import FlameGraphBuilder

    ordered = sorted(sessions, key=lambda s: (s.start, s.id))  # the same input order on every path
    if not sequence:
        builder = FlameGraphBuilder()
        for s in ordered:
            builder.add_session(s)
        return builder.stacks
    lines: list[tuple[str, int]] = []
    for s in ordered:
        for t in sorted(s.targets, key=lambda t: (t.start, t.name)):
            one = FlameGraphBuilder()
            one.add_session(SimpleNamespace(targets=[t]))  # add_session's phase/mnemonic rules, one target
            lines.extend(one.stacks.keys_counts.items())
    return lines


def folded_text(stacks: Any) -> str:
    """Folded text of merged stacks (sorted) or of a flame chart's lines (in order)."""
    from services.flamegraph import format_folded
    from services.flamegraph.folded import SEP

    if isinstance(stacks, list):
        return "".join(f"{k} {v}\n" for k, v in stacks).replace(SEP, ";")
    return format_folded(stacks)


def stacks_total(stacks: Any) -> int:
    return sum(v for _, v in stacks) if isinstance(stacks, list) else stacks.total


def render_flamegraph(stacks: Any, options: Any, *, base: Any = None, widths: str = "after",
                      color_by: str = "self", normalize: bool = False) -> str:
    """The SVG of ``stacks`` (from :func:`flame_stacks` or a folded file), or of ``base`` -> ``stacks``."""
    from dataclasses import fields

    from services.flamegraph import SVGFlameGraphGenerator, render_diff_svg

    if base is not None:
        if isinstance(stacks, list) or isinstance(base, list) or options.flamechart:
            raise ValueError("a differential flame graph is merged: it cannot be a flame chart")
        kw = {f.name: getattr(options, f.name) for f in fields(options)}
        if kw["title"] is None:
            del kw["title"]  # render_diff_svg's own default title
        return render_diff_svg(base, stacks, widths=widths, normalize=normalize,  # type: ignore[arg-type]
                               color_by=color_by, **kw)  # type: ignore[arg-type]
    gen = SVGFlameGraphGenerator(options)
    if isinstance(stacks, list):
        return gen.render_layout(gen.layout_sequence(stacks), unit="us")
    return gen.render(stacks)


CHART_IGNORES = ("subtitle", "countname", "hash", "reverse", "inverted", "flamechart", "negate")


def chart_conflicts(req: Any) -> list[str]:
    """Options set in ``req`` that a chart has no use for (the caller refuses them, rather than
    silently drawing something other than what was asked)."""
    return [k for k in CHART_IGNORES if getattr(req, k, None)] + (["diff"] if getattr(req, "diff", None) else [])


def render_chart(session: Any, options: Any) -> str:
    """One session's timeline (one lane per worker) with the options that apply to a chart."""
    from services.flamegraph import BuildChartGenerator

    value, pct = options.minwidth_spec()
    if pct:
        raise ValueError("a chart's minwidth is in pixels, not a percentage")
    return BuildChartGenerator(title=options.title or "Build Timeline", width=options.width, height=options.height,
                               colors=options.colors, minwidth=value).render_session(session)


def flame_reply(r: FlameGraphRequest, options: Any, sessions: list[Any], base: list[Any] | None, budget: int, *,
                partial: bool = False, notes: list[str] | None = None) -> bytes:
    """The encoded :class:`FlameGraphReply` (CPU only: the service runs it in a thread).  When it
    exceeds ``budget`` bytes with search data, it is drawn again without; the caller refuses
    what still does not fit.  Raises ValueError for requests that cannot be drawn."""
    from dataclasses import replace

    from services.analyzer.columns import gc_paused

    if r.chart and (len(sessions) != 1 or not r.session or chart_conflicts(r)):
        raise ValueError("chart draws one session: give session and none of "
                         f"{', '.join(chart_conflicts(r)) or 'the window fields'}")
    with gc_paused():
        stacks = flame_stacks(sessions, sequence=r.flamechart)
        base_stacks = flame_stacks(base) if base is not None else None
        search = r.search_data
        while True:
            # The embedded search data grows with the input; without it the SVG is bounded by the
            # frames drawn (minwidth), so it is what goes first.
            opts = replace(options, search_data=search)
            svg = render_chart(sessions[0], opts) if r.chart else render_flamegraph(
                stacks, opts, base=base_stacks, widths=r.diff_widths, color_by=r.diff_color, normalize=r.normalize)
            dropped = ["search data dropped to fit one NATS message"] if search != r.search_data else []
            data = _enc.encode(FlameGraphReply(
                svg=svg.encode(), folded=folded_text(stacks) if r.folded else None, sessions=len(sessions),
                base_sessions=len(base or ()), total_us=stacks_total(stacks), search_data=search, partial=partial,
                notes=[*(notes or ()), *dropped]))
            if len(data) <= budget or not search or r.chart:
                return data
            search = False
