"""``buildtel flamegraph``: flame graphs of stored builds, traces and folded files; differentials; charts.

    buildtel flamegraph (--session ID | --last N | --trace ID | --folded FILE) -o out.svg
                        [--diff SPEC [--diff-widths after|before] [--diff-color self|total] [--normalize]]
                        [--folded-out FILE] [--chart] [flamegraph.pl options]

What is drawn, in integer microseconds:

* ``--session ID`` (full id, unique prefix of >= 6 hex digits, ``last``, ``last~N``: cli/ids.py): the
  session's targets by package hierarchy (``//a/b:c`` -> ``a;b;c``), phases under their target;
* ``--last N``: the same, summed over the N most recently finished stored sessions
  (``--branch`` keeps one branch);
* ``--trace ID``: a trace from the tracer service (session id or trace id), each span weighted
  by its self time, so a parent is as wide as its own time plus its children's;
* ``--folded FILE``: a folded-stacks file (flamegraph.pl / inferno / speedscope format).

``--diff SPEC`` draws a differential flame graph against a base given in the same language:
``session:ID``, ``last:N`` (or ``last:N:BRANCH``; otherwise ``--branch`` applies), ``trace:ID``,
``folded:FILE``.  Red is slower (more time after), blue faster.  ``--chart`` draws one session's
timeline instead (time on the x axis, one lane per worker).  ``-o -`` writes the SVG to
standard output; ``--folded-out FILE`` also writes the drawn stacks (not the base's).

Sessions are rendered with ``buildtel.shared.flamegraph.sessions.render_flamegraph``, the function behind the
analyzer's ``flamegraph`` endpoint, so both give the same SVG bytes for the same sessions.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
from dataclasses import dataclass
from typing import Any

from buildtel.cli.errors import CLIError
from buildtel.shared.settings import Settings

# The flame graph, storage and tracer modules load when the command runs, not when the parser is
# built: every buildtel invocation builds a parser.

SPEC_HELP = "session:ID, last:N[:BRANCH], trace:ID or folded:FILE"


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "flamegraph", help="flame graph SVG of a session, the last N sessions, a trace or a folded file",
        description="Draw an interactive flame graph SVG (flamegraph.pl's layout and options) of stored build "
                    "sessions (targets by package path), a trace (spans by self time) or a folded-stacks file; "
                    f"--diff SPEC ({SPEC_HELP}) draws a differential, --chart a session's timeline.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--session", metavar="ID", help="one stored session: full id, unique prefix of >= 6 hex "
                                                      "digits, last or last~N")
    src.add_argument("--last", type=int, metavar="N", help="the N most recently finished stored sessions, summed")
    src.add_argument("--trace", metavar="ID", help="a trace from the tracer service (session id or trace id)")
    src.add_argument("--folded", metavar="FILE", help="a folded-stacks file ('frame;frame;frame count' lines)")
    p.add_argument("--branch", help="with --last (and last:N specs without a branch): only builds of this branch")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the SVG ('-': stdout)")
    p.add_argument("--folded-out", metavar="FILE", help="also write the stacks drawn, folded (integer microseconds)")
    p.add_argument("--chart", action="store_true",
                   help="with --session: a timeline (time on the x axis, one lane per worker) instead")
    d = p.add_argument_group("differential")
    d.add_argument("--diff", metavar="SPEC", help=f"compare with a base: {SPEC_HELP}")
    d.add_argument("--diff-widths", choices=("after", "before"),
                   help="frame widths from the drawn profile (after, default) or the base (before)")
    d.add_argument("--diff-color", choices=("self", "total"),
                   help="colour a frame by the change of its self time (default, as flamegraph.pl) or of its subtree")
    d.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                   help="scale the base to the same total first (difffolded -n); default: on when both sides "
                        "are stored builds and cover different numbers of them")
    o = p.add_argument_group("flamegraph.pl options")
    o.add_argument("--title", help="title text (default Flame Graph / Icicle Graph / Flame Chart)")
    o.add_argument("--subtitle", default="", help="second-level title")
    o.add_argument("--width", type=int, default=1200, help="image width in pixels (default 1200)")
    o.add_argument("--height", type=int, default=16, help="frame height in pixels (default 16)")
    o.add_argument("--minwidth", default="0.1", help="omit frames narrower than this: pixels, or N%% of the total "
                                                     "(default 0.1)")
    o.add_argument("--countname", help="count type label (default: durations for builds and traces, us for a "
                                       "folded file); given, builds show raw microsecond counts under that name")
    o.add_argument("--colors", help="palette: cache (by the targets' cache result: the default for --session and "
                                    "--last), hot (the default otherwise), mem, io, wakeup, chain, java, js, perl, "
                                    "red, green, blue, aqua, yellow, purple, orange")
    o.add_argument("--hash", action="store_true", help="colours keyed by function name hash")
    o.add_argument("--reverse", action="store_true", help="generate a stack-reversed flame graph")
    o.add_argument("--inverted", action="store_true", help="icicle graph")
    o.add_argument("--flamechart", action="store_true", help="keep input (time) order instead of merging by name")
    o.add_argument("--negate", action="store_true", help="differentials: switch red and blue")
    o.add_argument("--no-search-data", dest="search_data", action="store_false",
                   help="do not embed every stack for search (smaller SVG; 'Matched' counts drawn frames only)")
    p.set_defaults(func=cmd_flamegraph, quiet_logs=True)


@dataclass(frozen=True, slots=True)
class Spec:
    """One source of stacks: ``kind`` is session, last, trace or folded."""

    kind: str
    value: str
    branch: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}" + (f":{self.branch}" if self.branch else "")


def parse_spec(text: str, *, branch: str | None = None) -> Spec:
    """``session:ID``, ``last:N[:BRANCH]``, ``trace:ID`` or ``folded:FILE``."""
    kind, sep, value = text.partition(":")
    if not sep or kind not in ("session", "last", "trace", "folded") or not value.strip():
        raise CLIError(f"--diff {text!r}: expected {SPEC_HELP}")
    if kind == "last":
        # Git refuses ':' in branch names, so the first ':' after N cannot be part of N or the branch.
        n, _, own = value.partition(":")
        if not n.isdigit() or int(n) < 1:
            raise CLIError(f"--diff {text!r}: last:N needs a whole number N >= 1")
        return Spec("last", n, own or branch)
    return Spec(kind, value if kind == "folded" else value.strip())


@dataclass
class Loaded:
    stacks: Any  # merged FoldedStacks, or (key, count) lines in time order for a flame chart
    what: str  # for messages: "session 1a2b..." / "3 sessions" / "trace ..." / a file name
    sessions: list[Any]
    label: str | None = None  # the root's label when these are builds (a trace too); None: a folded file
    categories: dict[str, int] | None = None  # stack key -> cache/status bits (stored sessions only)


class Sources:
    """Loads specs, opening the bus only when a spec needs it (a folded file does not)."""

    def __init__(self, settings: Settings, stack: contextlib.AsyncExitStack, *, sequence: bool) -> None:
        self.settings, self.exits, self.sequence = settings, stack, sequence
        self._bus: Any = None

    async def bus(self) -> Any:
        if self._bus is None:
            from buildtel.cli.common import open_bus

            self._bus = await self.exits.enter_async_context(open_bus(self.settings))
        return self._bus

    async def load(self, spec: Spec) -> Loaded:
        if spec.kind == "folded":
            return self._folded(spec.value)
        if spec.kind == "trace":
            return await self._trace(spec.value)
        from buildtel.cli.ids import parse_id, resolve_session
        from buildtel.services.storage.api import StorageClient, StorageError
        from buildtel.shared.flamegraph.sessions import flame_stacks, sessions_label

        ref = parse_id(spec.value) if spec.kind == "session" else None  # refused before the bus is reached
        client = StorageClient((await self.bus()).nc, (await self.bus()).subjects)
        if ref is not None:
            s = await resolve_session(client, ref)
            if not s.targets:
                raise CLIError(f"session {s.id} has no targets: nothing to draw")
            cats: dict[str, int] = {}
            return Loaded(flame_stacks([s], sequence=self.sequence, categories=cats), f"session {s.id}", [s],
                          sessions_label([s]), cats)
        n = int(spec.value)
        try:
            sessions = await (client.query(branch=spec.branch, limit=n) if spec.branch else client.recent(n))
        except StorageError as exc:
            raise CLIError(str(exc)) from None
        if not sessions:
            raise CLIError("no sessions stored" + (f" for branch {spec.branch!r}" if spec.branch else ""))
        cats = {}
        return Loaded(flame_stacks(sessions, sequence=self.sequence, categories=cats),
                      f"{len(sessions)} session{'s' * (len(sessions) != 1)}", sessions, sessions_label(sessions), cats)

    def _folded(self, path: str) -> Loaded:
        from buildtel.shared.flamegraph import Ignored, iter_folded, read_folded

        # flamegraph.pl's rules: a file it draws draws here too.  Bad lines are skipped and
        # counted (it says "Ignored N lines with invalid format"), decimal counts rounded.
        ignored = Ignored()
        try:
            if self.sequence:  # a flame chart keeps the file's line order
                with open(path, encoding="utf-8", newline="") as fh:
                    stacks: Any = list(iter_folded(fh, name=path, ignored=ignored))
            else:
                stacks = read_folded(path, ignored=ignored)
        except UnicodeDecodeError as exc:
            raise CLIError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except OSError as exc:
            raise CLIError(f"cannot read {path}: {exc.strerror or exc}") from None
        if not stacks:
            raise CLIError(f"{path}: no stacks in the file" + (f" ({ignored.message()})" if ignored else ""))
        if ignored:
            print(f"buildtel: {path}: {ignored.message()}", file=sys.stderr)
        return Loaded(stacks, path, [])

    async def _trace(self, ident: str) -> Loaded:
        from buildtel.cli.ids import parse_id, resolve_trace_id
        from buildtel.services.storage.api import StorageClient
        from buildtel.services.tracer.query import QueryError, TraceClient
        from buildtel.services.tracer.subjects import TracerSubjects

        ref = parse_id(ident)  # the CLI's one id grammar (cli/ids.py)
        bus = await self.bus()
        tracer = TraceClient(bus.nc, TracerSubjects(bus.subjects))
        full = await resolve_trace_id(StorageClient(bus.nc, bus.subjects), tracer, ref)
        try:
            trace = await tracer.find(full)
        except QueryError as exc:
            if exc.code == 404:
                raise CLIError(f"no trace stored for {full!r} (is it a session or trace id?)") from None
            raise CLIError(str(exc)) from None
        if not trace.spans:
            raise CLIError(f"trace {trace.trace_id} has no spans: nothing to draw")
        return Loaded(trace_stacks(trace.spans, sequence=self.sequence), f"trace {trace.trace_id}", [],
                      f"trace {trace.trace_id[:16]}")


def trace_stacks(spans: list[Any], *, sequence: bool = False) -> Any:
    """Tracer ``SpanRecord``s as stacks by self time (integer microseconds): merged, or for a flame chart
    one line per span in depth-first start order (a span's self time, then its children)."""
    from buildtel.shared.flamegraph import FlameGraphBuilder, Span
    from buildtel.shared.flamegraph.folded import SEP

    # Times stay in nanoseconds: add_spans(ns=True) computes each self time exactly and rounds it
    # once, where truncating both ends to microseconds first could lose 1 µs per span.
    items = [Span(s.span_id, s.parent_span_id or None, s.name or "?", s.start_ns, s.end_ns) for s in spans]
    if not sequence:
        builder = FlameGraphBuilder()
        builder.add_spans(items, ns=True)
        return builder.stacks
    ids = {s.span_id for s in items}
    kids: dict[Any, list[Any]] = {}
    for s in items:
        if s.parent_id in ids and s.parent_id != s.span_id:
            kids.setdefault(s.parent_id, []).append(s)

    def order(s: Any) -> tuple[int, str]:
        return s.start_us, s.name

    todo = [(r, "") for r in sorted((s for s in items if s.parent_id not in ids or s.parent_id == s.span_id),
                                    key=order, reverse=True)]
    lines: list[tuple[str, int]] = []
    seen: set[Any] = set()
    while todo:
        span, path = todo.pop()
        if span.span_id in seen:  # a cycle in bad input must not loop forever
            continue
        seen.add(span.span_id)
        children = sorted(kids.get(span.span_id, []), key=order)
        # The builder on the span and its direct children gives the span's self time (and its
        # cleaned frame name) by exactly add_spans' rule: the one key without a separator.
        one = FlameGraphBuilder()
        one.add_spans([span._replace(parent_id=None), *children], ns=True)
        [(frame, self_us)] = [(k, v) for k, v in one.stacks.keys_counts.items() if SEP not in k]
        key = f"{path}{SEP}{frame}" if path else frame
        lines.append((key, self_us))
        todo.extend((k, key) for k in reversed(children))
    return lines


def _minwidth(text: str) -> float | str:
    t = text.strip()
    if t.endswith("%"):
        return t
    try:
        return float(t)
    except ValueError:
        raise CLIError(f"--minwidth {text!r}: give pixels (0.5) or a percentage of the total (0.1%)") from None


def _check_args(args: argparse.Namespace) -> None:
    from buildtel.shared.flamegraph.sessions import chart_conflicts

    if args.last is not None and args.last < 1:
        raise CLIError("--last must be at least 1")
    if args.branch and args.last is None and not (args.diff or "").startswith("last:"):
        raise CLIError("--branch selects sessions for --last (or a last:N diff base)")
    for flag, value in (("--diff-widths", args.diff_widths), ("--diff-color", args.diff_color),
                        ("--normalize", args.normalize)):
        if value and not args.diff:
            raise CLIError(f"{flag} needs --diff")
    if args.chart:
        if not args.session:
            raise CLIError("--chart draws one session's timeline: use it with --session")
        bad = chart_conflicts(args)
        if bad:
            raise CLIError(f"--chart draws a timeline: {', '.join('--' + b for b in bad)} do not apply to it")
    if args.diff and args.flamechart:
        raise CLIError("--diff draws a merged flame graph: it cannot be combined with --flamechart")
    if args.output == "-" and args.folded_out == "-":
        raise CLIError("-o - and --folded-out - cannot both write to standard output")


def _write(dest: str, data: bytes) -> None:
    if dest == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        with open(dest, "wb") as fh:
            fh.write(data)
    except OSError as exc:
        raise CLIError(f"cannot write {dest}: {exc.strerror or exc}") from None


async def cmd_flamegraph(args: argparse.Namespace, settings: Settings) -> int:
    # Parsing and drawing allocate a few objects per input line and free nothing until the SVG is
    # written: the cyclic GC's passes over that growing heap find no garbage (~20% of a 100k-line
    # --folded run).  This process ends after one drawing, so it is off for the command.
    gc.disable()
    try:
        return await _flamegraph(args, settings)
    finally:
        gc.enable()


async def _flamegraph(args: argparse.Namespace, settings: Settings) -> int:
    from buildtel.shared.flamegraph.sessions import (
        auto_normalize,
        build_marks,
        flame_options,
        folded_text,
        render_chart,
        render_flamegraph,
        stacks_total,
    )

    _check_args(args)
    args.minwidth = _minwidth(args.minwidth)
    if args.colors is None:  # stored builds know each target's cache result: colour by it
        args.colors = "cache" if args.session or args.last is not None else "hot"
    try:
        options = flame_options(args)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    if args.session:
        spec = Spec("session", args.session.strip())
    elif args.last is not None:
        spec = Spec("last", str(args.last), args.branch)
    elif args.trace:
        spec = Spec("trace", args.trace.strip())
    else:
        spec = Spec("folded", args.folded)
    base_spec = parse_spec(args.diff, branch=args.branch) if args.diff else None
    async with contextlib.AsyncExitStack() as stack:
        sources = Sources(settings, stack, sequence=args.flamechart)
        main = await sources.load(spec)
        base = await sources.load(base_spec) if base_spec else None
    total = stacks_total(main.stacks)
    if total <= 0 and not args.chart:
        raise CLIError(f"{main.what}: every count is 0, nothing to draw")
    # Builds (and traces) are drawn as builds: durations, the build at the root; a folded file on
    # either side keeps flamegraph.pl's drawing, whose counts may be anything.
    builds = main.label is not None and (base is None or base.label is not None)
    count = {"session": len, "last": len}
    normalize = auto_normalize(args.normalize, count.get(spec.kind, lambda _: None)(main.sessions),
                               count.get(base_spec.kind, lambda _: None)(base.sessions) if base and base_spec else None)
    if base and normalize and args.normalize is None:
        print(f"buildtel: the base ({base.what}) is scaled to the total of the {main.what} drawn "
              "(--no-normalize compares raw times)", file=sys.stderr)
    # ``builds`` already implies a label; the second test says so to the type checker.
    marks = build_marks(main.label, main.categories, base=base.label if base else None,
                        normalized=normalize) if builds and main.label is not None else None
    try:
        if args.chart:
            svg = render_chart(main.sessions[0], options)
        else:
            svg = render_flamegraph(main.stacks, options, base=base.stacks if base else None,
                                    widths=args.diff_widths or "after", color_by=args.diff_color or "self",
                                    normalize=normalize, marks=marks)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    _write(args.output, svg.encode())
    if args.folded_out:
        _write(args.folded_out, folded_text(main.stacks).encode())
    if args.output != "-":
        if args.chart:
            done = f"chart of {main.what}, {len(main.sessions[0].targets)} targets"
        else:
            against = f" against {base.what}" if base else ""
            if marks is not None:
                from buildtel.shared.flamegraph import fmt_duration

                amount = fmt_duration(total)
            else:
                amount = f"{total:,} {options.countname or 'us'}"
            done = (f"{'differential ' if base else ''}flame graph of {main.what}{against}, "
                    f"{amount} in {len(main.stacks)} stacks")
        print(f"buildtel: wrote {args.output}: {done}", file=sys.stderr)
    return 0
