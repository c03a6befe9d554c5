"""The flame graph model: stacks in, a call tree or folded text out.

:class:`FlameGraphBuilder` accumulates weighted stacks.  It stores them
folded (one entry per distinct stack) rather than as a tree: a million-line
profile merges into a dict of a million keys, while a tree of the same data
would hold several million Python objects.  :meth:`FlameGraphBuilder.tree`
builds :class:`FlameNode` trees on demand for code that wants to walk one;
the SVG renderer works from the folded form directly.

Build data comes in three shapes:

* :meth:`add_target` -- one target and its phases.  Targets are laid out by
  package hierarchy, so packages aggregate: ``//a/b:c`` -> ``a;b;c``, a
  ninja output ``obj/x/y.o`` -> ``obj;x;y.o``.
* :meth:`add_session` -- every target of a ``buildtel.shared.protocol.BuildSession``
  (call it for many sessions to aggregate them).
* :meth:`add_spans` -- a trace span tree; each span contributes its *self*
  time (duration minus the time covered by its children), so a parent is
  exactly as wide as its own time plus its children's.

All durations are integer microseconds.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from buildtel.shared.phases import breakdown

from .build import target_category
from .folded import (
    DEFAULT_UNIT,
    SEP,
    FoldedStacks,
    format_folded,
    parse_folded,
    read_folded,
)

if TYPE_CHECKING:
    from buildtel.shared.protocol import TargetMetrics

__all__ = ["FlameGraphBuilder", "FlameNode", "SessionLike", "Span", "target_frames"]


class SessionLike(Protocol):
    """What :meth:`FlameGraphBuilder.add_session` reads of a ``BuildSession``: its targets (a
    protocol, so a stand-in holding one target -- ``flame_stacks``' flame chart -- is typed too)."""

    @property
    def targets(self) -> Sequence[TargetMetrics]: ...


@dataclass(slots=True, eq=True)
class FlameNode:
    """One frame of the merged call tree (``self`` is the node's own count)."""

    name: str
    total: int = 0
    self: int = 0
    children: dict[str, FlameNode] = field(default_factory=dict)

    def child(self, name: str) -> FlameNode:
        node = self.children.get(name)
        if node is None:
            node = self.children[name] = FlameNode(name)
        return node

    def find(self, path: Sequence[str]) -> FlameNode | None:
        node: FlameNode | None = self
        for name in path:
            node = node.children.get(name) if node is not None else None
        return node

    def walk(self, depth: int = 0) -> Iterator[tuple[int, FlameNode]]:
        """Pre-order ``(depth, node)``, siblings by name (iterative: deep trees are fine)."""
        todo = [(depth, self)]
        while todo:
            d, node = todo.pop()
            yield d, node
            todo.extend((d + 1, node.children[k]) for k in sorted(node.children, reverse=True))


class Span(NamedTuple):
    """The part of a trace span the flame graph needs (times in microseconds)."""

    span_id: str | int
    parent_id: str | int | None
    name: str
    start_us: int
    end_us: int


def _clean(frame: str) -> str:
    # ';' and line breaks would corrupt folded output; they never occur in
    # real labels or paths, so a visible substitute is enough.
    return frame.replace(";", ":").replace("\n", " ").replace("\r", " ").replace(SEP, " ")


def target_frames(name: str) -> list[str]:
    """Frames for a build target, by package hierarchy.

    ``//a/b:c`` -> ``[a, b, c]``; ``//a/b`` (Bazel's ``//a/b:b``) ->
    ``[a, b, b]``; ``@repo//a:c`` -> ``[@repo, a, c]``; ``//:c`` -> ``[c]``;
    a path such as ninja's ``obj/x/y.o`` -> ``[obj, x, y.o]``; anything else
    is one frame.
    """
    name = _clean(name.strip())
    repo = ""
    if "//" in name and not name.startswith(("/", "./")) and name.index("//") > 0:
        repo, name = name.split("//", 1)
        name = "//" + name
    if name.startswith("//"):
        pkg, colon, target = name[2:].partition(":")
        parts = [p for p in pkg.split("/") if p]
        if not colon:
            target = parts[-1] if parts else ""
        frames = ([repo] if repo else []) + parts + ([target] if target else [])
    else:
        frames = [p for p in name.split("/") if p not in ("", ".")]
    return frames or [name or "?"]


def _us(seconds: float) -> int:
    return max(0, round(seconds * 1_000_000))


def _span_fields(span: Any, *, ns: bool = False) -> Span:
    """Accept our Span, a mapping, or an OpenTelemetry ReadableSpan (kept in
    nanoseconds when ``ns``, else truncated to microseconds)."""
    if isinstance(span, Span):
        return span
    if isinstance(span, Mapping):
        return Span(span["span_id"], span.get("parent_id"), span["name"],
                    int(span["start_us"]), int(span["end_us"]))
    ctx = getattr(span, "context", None)
    if ctx is not None and hasattr(span, "start_time"):  # OpenTelemetry: nanoseconds
        parent = getattr(span, "parent", None)
        div = 1 if ns else 1000
        return Span(ctx.span_id, parent.span_id if parent is not None else None, span.name,
                    int(span.start_time) // div, int(span.end_time or span.start_time) // div)
    return Span(*span)


class FlameGraphBuilder:
    """Accumulate weighted stacks; emit folded text, a tree or an SVG."""

    def __init__(self, *, unit: str = DEFAULT_UNIT) -> None:
        self.stacks = FoldedStacks(unit=unit)
        # Stack key -> category bits of the targets behind it (build.target_category), for
        # colouring by cache result; filled by add_session / add_target(category=...).
        self.categories: dict[str, int] = {}

    # ------------------------------------------------------------ generic input
    def add_stack(self, frames: Sequence[str] | str, count: int) -> None:
        """Add ``count`` to a stack given root first (or as ``'a;b;c'``)."""
        self.stacks.add(frames, count)

    @classmethod
    def from_folded(
        cls,
        source: FoldedStacks | str | bytes | os.PathLike[str] | Iterable[str],
        *,
        unit: str | None = None,
    ) -> FlameGraphBuilder:
        """From folded text (``str``/``bytes``), a path (``os.PathLike``),
        an iterable of lines, or parsed :class:`FoldedStacks`."""
        if isinstance(source, FoldedStacks):
            builder = cls(unit=unit or source.unit)
            builder.stacks = FoldedStacks._from_keys(dict(source.keys_counts), builder.stacks.unit)
            return builder
        unit = unit or DEFAULT_UNIT
        builder = cls(unit=unit)
        if isinstance(source, os.PathLike):
            builder.stacks = read_folded(source, unit=unit)
        else:
            builder.stacks = parse_folded(source, unit=unit)
        return builder

    def to_folded(self) -> str:
        """Folded text, sorted (byte-identical for equal content)."""
        return format_folded(self.stacks)

    @property
    def total(self) -> int:
        return self.stacks.total

    def tree(self) -> FlameNode:
        """The merged call tree; the root is ``all`` with the grand total."""
        root = FlameNode("all")
        for key, count in self.stacks.keys_counts.items():
            root.total += count
            node = root
            for name in key.split(SEP):
                node = node.child(name)
                node.total += count
            node.self += count
        return root

    def render_svg(self, **options: Any) -> str:
        """Shortcut for ``SVGFlameGraphGenerator(**options).render(self.stacks)``."""
        from .svg import SVGFlameGraphGenerator

        return SVGFlameGraphGenerator(**options).render(self.stacks)

    # ------------------------------------------------------------- build data
    def add_target(
        self,
        name: str,
        duration_us: int,
        phases: Sequence[tuple[str, int]] | None = None,
        *,
        category: int = 0,
    ) -> None:
        """One target: its time under its package path, split into phases.

        Phase time goes to ``target;phase``; whatever the phases do not cover
        stays as the target's self time.  Phases longer than the target (a
        reporting error) are kept as reported rather than silently scaled.
        ``category``: the target's bits (``build.target_category``), recorded
        for every stack it adds.
        """
        frames = target_frames(name)
        rest = int(duration_us)
        cats = self.categories
        for phase, us in phases or ():
            us = int(us)
            if us <= 0:
                continue
            stack = [*frames, _clean(phase) or "?"]
            self.stacks.add(stack, us)
            if category:
                key = SEP.join(stack)
                cats[key] = cats.get(key, 0) | category
            rest -= us
        if rest > 0 or not phases:
            self.stacks.add(frames, max(rest, 0))
            if category:
                key = SEP.join(frames)
                cats[key] = cats.get(key, 0) | category

    def add_session(self, session: SessionLike) -> None:
        """Every target of a session (phases when reported, else the action mnemonic).

        Works on anything shaped like ``buildtel.shared.protocol.BuildSession``:
        ``.targets`` of objects with ``name``, ``duration_s``, ``phases``
        (``name``, ``duration_s``) and optionally ``mnemonic``.
        """
        for t in session.targets:
            # header:/template: costs overlap the Frontend phase: stacking them would count time twice.
            phases = [(p.name, _us(p.duration_s)) for p in getattr(t, "phases", None) or () if not breakdown(p.name)]
            duration = _us(t.duration_s)
            mnemonic = getattr(t, "mnemonic", None)
            if not phases and mnemonic:
                phases = [(mnemonic, duration)]
            self.add_target(t.name, duration, phases or None, category=target_category(t))

    def add_spans(self, spans: Iterable[Any], *, ns: bool = False) -> None:
        """A trace span tree, each span weighted by its self time.

        Spans are :class:`Span`, mappings with the same keys, or OpenTelemetry
        ``ReadableSpan`` objects.  A span whose parent is missing is a root.
        Self time = duration minus the union of the children's intervals
        clipped to the parent, so overlapping (parallel) children are not
        subtracted twice.

        ``ns=True``: the spans' ``start_us``/``end_us`` hold nanoseconds (as
        traces store them).  Self time is then computed exactly in integer
        nanoseconds and rounded once to the nearest microsecond.  Truncating
        each end to microseconds first (``ns // 1000``) is not the same: a
        3 s span from ``x.9996`` to ``x+3.0001`` µs came out 2,999,999 µs.
        """
        items = [_span_fields(s, ns=ns) for s in spans]
        by_id = {s.span_id: s for s in items}
        children: dict[Any, list[Span]] = {}
        for s in items:
            if s.parent_id is not None and s.parent_id in by_id:
                children.setdefault(s.parent_id, []).append(s)
        roots = [s for s in items if s.parent_id is None or s.parent_id not in by_id]
        todo: list[tuple[Span, list[str]]] = [(r, [_clean(r.name) or "?"]) for r in roots]
        seen: set[Any] = set()
        while todo:
            span, path = todo.pop()
            if span.span_id in seen:  # a cycle in bad input must not loop forever
                continue
            seen.add(span.span_id)
            kids = children.get(span.span_id, [])
            own = max(0, span.end_us - span.start_us - _covered(span, kids))
            self.stacks.add(path, (own + 500) // 1000 if ns else own)
            todo.extend((k, [*path, _clean(k.name) or "?"]) for k in kids)


def _covered(parent: Span, kids: list[Span]) -> int:
    """Microseconds of ``parent`` covered by at least one child."""
    covered = 0
    cur_start = cur_end = None
    for k in sorted(kids, key=lambda s: s.start_us):
        s, e = max(k.start_us, parent.start_us), min(k.end_us, parent.end_us)
        if e <= s:
            continue
        if cur_end is None or s > cur_end:
            if cur_end is not None:
                covered += cur_end - cur_start  # type: ignore[operator]
            cur_start, cur_end = s, e
        elif e > cur_end:
            cur_end = e
    if cur_end is not None:
        covered += cur_end - cur_start  # type: ignore[operator]
    return covered
