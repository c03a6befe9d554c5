"""Flame graphs of stored sessions, rendered the same way for ``buildtel flamegraph`` and the
analyzer's ``flamegraph`` endpoint, so both give byte-identical SVGs for the same input.

Pure functions over sessions and :mod:`buildtel.shared.flamegraph`; the wire messages
(``FlameGraphRequest``/``FlameGraphReply``) are in ``api.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from buildtel.shared.protocol import BuildSession

if TYPE_CHECKING:
    from buildtel.services.analyzer.api import FlameGraphRequest

# api.py (and the bus clients it brings: nats, aiohttp, numpy) loads only where the wire messages
# are needed: `buildtel flamegraph --folded` draws with these functions and no bus.


def readable(sessions: list[Any]) -> tuple[list[Any], int]:
    """The sessions with values older versions stored as NaN/inf/negative read as missing (such a
    target or phase is left out: there is no width to draw it with), and how many were."""
    from buildtel.shared.validate import clean_session

    out, missing = [], 0
    for s in sessions:
        if isinstance(s, BuildSession):
            s, n = clean_session(s)
            missing += n
        out.append(s)
    return out, missing


def flame_options(req: Any) -> Any:
    """``FlameGraphOptions`` from anything with the :data:`FLAME_OPTIONS` attributes (raises ValueError)."""
    from buildtel.shared.flamegraph.svg import FLAME_OPTIONS, FlameGraphOptions

    return FlameGraphOptions(**{k: getattr(req, k) for k in FLAME_OPTIONS})


def flame_stacks(sessions: list[Any], *, sequence: bool = False, categories: dict[str, int] | None = None) -> Any:
    """The sessions' targets as stacks: merged ``FoldedStacks``, or for a flame chart the
    ``(key, us)`` lines in time order (sessions by start, then targets by start).  ``categories``
    (a dict to fill) receives each stack's cache/status bits, for :func:`build_marks`."""
    from types import SimpleNamespace

    from buildtel.shared.flamegraph import FlameGraphBuilder

    sessions, _ = readable(sessions)
    ordered = sorted(sessions, key=lambda s: (s.start, s.id))  # the same input order on every path
    if not sequence:
        builder = FlameGraphBuilder()
        for s in ordered:
            builder.add_session(s)
        if categories is not None:
            categories.update(builder.categories)
        return builder.stacks
    lines: list[tuple[str, int]] = []
    for s in ordered:
        for t in sorted(s.targets, key=lambda t: (t.start, t.name)):
            one = FlameGraphBuilder()
            one.add_session(SimpleNamespace(targets=[t]))  # add_session's phase/mnemonic rules, one target
            lines.extend(one.stacks.keys_counts.items())
            if categories is not None:
                for k, v in one.categories.items():
                    categories[k] = categories.get(k, 0) | v
    return lines


def sessions_label(sessions: list[Any]) -> str:
    """The build(s) a flame graph is of, as its root says: ``session 3f9a2c1d (nightly)``,
    ``5 builds of main``."""
    if len(sessions) == 1:
        s = sessions[0]
        return f"session {s.id[:8]}" + (f" ({s.name})" if s.name else "")
    branches = {getattr(getattr(getattr(s, "environment", None), "vcs", None), "branch", None) for s in sessions}
    [branch] = branches if len(branches) == 1 else [None]
    return f"{len(sessions)} builds" + (f" of {branch}" if branch else "")


def auto_normalize(normalize: bool | None, after_builds: int | None, base_builds: int | None) -> bool:
    """``normalize`` as asked; unset, on when both sides are builds and cover different numbers of
    them (5 builds against 20 would otherwise be all blue)."""
    if normalize is not None:
        return normalize
    return after_builds is not None and base_builds is not None and after_builds != base_builds


def build_marks(after: str, categories: dict[str, int] | None = None, *, base: str | None = None,
                normalized: bool = False) -> Any:
    """The renderer's :class:`~buildtel.shared.flamegraph.BuildMarks` for builds labelled ``after``
    (and, for a differential, ``base``)."""
    from buildtel.shared.flamegraph import BuildMarks

    root = after if base is None else f"{after} vs {base}" + (", base scaled to the same total" if normalized else "")
    return BuildMarks(root=root, categories=categories or {})


def folded_text(stacks: Any) -> str:
    """Folded text of merged stacks (sorted) or of a flame chart's lines (in order)."""
    from buildtel.shared.flamegraph import format_folded
    from buildtel.shared.flamegraph.folded import SEP

    if isinstance(stacks, list):
        return "".join(f"{k} {v}\n" for k, v in stacks).replace(SEP, ";")
    return format_folded(stacks)


def stacks_total(stacks: Any) -> int:
    return sum(v for _, v in stacks) if isinstance(stacks, list) else stacks.total


def render_flamegraph(stacks: Any, options: Any, *, base: Any = None, widths: str = "after",
                      color_by: str = "self", normalize: bool = False, marks: Any = None) -> str:
    """The SVG of ``stacks`` (from :func:`flame_stacks` or a folded file), or of ``base`` -> ``stacks``;
    ``marks`` (:func:`build_marks`) when they are builds."""
    from dataclasses import fields

    from buildtel.shared.flamegraph import SVGFlameGraphGenerator, render_diff_svg

    if base is not None:
        if isinstance(stacks, list) or isinstance(base, list) or options.flamechart:
            raise ValueError("a differential flame graph is merged: it cannot be a flame chart")
        kw = {f.name: getattr(options, f.name) for f in fields(options)}
        if kw["title"] is None:
            del kw["title"]  # render_diff_svg's own default title
        return render_diff_svg(base, stacks, widths=widths, normalize=normalize,  # type: ignore[arg-type]
                               color_by=color_by, marks=marks, **kw)  # type: ignore[arg-type]
    if options.colors == "cache" and (marks is None or not marks.categories):
        raise ValueError("colors 'cache' colours targets by their cache result: it needs stored builds "
                         "(a session or sessions), not a trace or a folded file")
    gen = SVGFlameGraphGenerator(options)
    if isinstance(stacks, list):
        return gen.render_layout(gen.layout_sequence(stacks, marks), unit="us", marks=marks)
    return gen.render(stacks, marks=marks)


CHART_IGNORES = ("subtitle", "countname", "hash", "reverse", "inverted", "flamechart", "negate")


def chart_conflicts(req: Any) -> list[str]:
    """Options set in ``req`` that a chart has no use for (the caller refuses them, rather than
    silently drawing something other than what was asked)."""
    return [k for k in CHART_IGNORES if getattr(req, k, None)] + (["diff"] if getattr(req, "diff", None) else [])


def render_chart(session: Any, options: Any) -> str:
    """One session's timeline (one lane per worker) with the options that apply to a chart."""
    from buildtel.shared.flamegraph import BuildChartGenerator

    value, pct = options.minwidth_spec()
    if pct:
        raise ValueError("a chart's minwidth is in pixels, not a percentage")
    [session], _ = readable([session])
    return BuildChartGenerator(title=options.title or "Build Timeline", width=options.width, height=options.height,
                               colors=options.colors, minwidth=value).render_session(session)


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
