"""Flame graphs of stored sessions, rendered the same way for ``buildtel flamegraph`` and the
analyzer's ``flamegraph`` endpoint, so both give byte-identical SVGs for the same input.

A library (moved from ``services/analyzer/flamerender.py``): pure functions over sessions and
:mod:`buildtel.shared.flamegraph`, used by the CLI and the analyzer.  The analyzer's wire reply
(``FlameGraphReply``) is built in ``services/analyzer/flamerender.py`` (``flame_reply``).
"""

from __future__ import annotations

from typing import Any

from buildtel.shared.protocol import BuildSession

# Heavy modules load inside the functions that need them: `buildtel flamegraph --folded` draws
# with a few of these and no bus client (tests/flamegraph/test_fg_cli_imports.py).


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
