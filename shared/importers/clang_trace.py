"""What a clang ``-ftime-trace`` file says about its compile: the source file and the costs of
headers and templates (used by ``trace_targets.py`` for the ``clang`` producer).

**The source file.**  clang names the main file in its own events, so the name is read from
them, in this order (the first that answers wins, and ``labels.source_file_from`` says which):

1. ``OptModule`` (and the other module-level optimiser events: their ``detail`` is the LLVM
   module's name, which clang sets to the main file as given on the command line);
2. ``ParseDeclarationOrFunctionDefinition`` (clang >= 17) details ``FILE:LINE:COL`` of the
   declarations parsed outside every ``Source`` slice (``Source`` slices are the included files,
   so a declaration outside all of them is in the main file; clang >= 19 writes ``Source`` as
   async ``b``/``e`` events, which the parser puts on a lane of their own);
3. the trace file's own name: clang writes ``<object>.json`` next to the object file
   (``deflate.c.o`` -> ``deflate.c.json``), so the name less ``.json``/``.o``/``.obj`` -- with a
   warning, since that is a file name rather than what the compiler said.

A detail that is a ``Source`` detail (an included file, e.g. a ``.cpp`` included by a unity
build) is never taken as the main file.  The most frequent source-like name in the trace is
*not* used: optimiser events name functions, and a C++ file's static initialiser
``_GLOBAL__sub_I_<file>.cpp`` appears once per optimisation pass, easily more often than the
module name.

**Header and template costs** (kept as phases so they can be added up across compiles):

* ``header:<path>`` -- each included file's *self* time: its ``Source`` slices' durations less
  the ``Source`` slices nested in them (the headers it includes), summed over its inclusions.
  Self times add up to exactly the time spent in included files; inclusive times would count a
  nested header once per includer.
* ``template:<name>`` -- ``InstantiateClass``/``InstantiateFunction`` self time (nested
  instantiations subtracted) by template name without its arguments (``std::vector<int>`` and
  ``std::vector<char>`` are both ``std::vector``).

Each compile keeps its ``TOP_N`` costliest of each kind; the rest is summed into
``header:(other)`` / ``template:(other)``, so the kind's phases still add up to its exact total.
These phases are a breakdown of the ``Frontend`` phase, not slices of the compile that follow
one another: flame graphs and traces leave them out (:func:`buildtel.shared.phases.breakdown`).
"""

from __future__ import annotations

import bisect
import math
import re
from pathlib import PurePath

from buildtel.shared.importers.common import ParseWarning
from buildtel.shared.importers.trace_spans import TraceSpan, async_lane
from buildtel.shared.phases import HEADER, OTHER, TEMPLATE
from buildtel.shared.protocol import Phase

TOP_N = 20  # per compile and kind; the rest is one "(other)" phase
# LLVM module passes whose detail is the module's name (= the main file): OptModule first.
_MODULE_EVENTS = ("OptModule", "ModuleToFunctionPassAdaptor", "ModuleInlinerWrapperPass",
                  "ModuleToPostOrderCGSCCPassAdaptor", "GlobalOptPass", "IPSCCPPass")
MAX_NAME = 1024  # a phase name is a string of a session (4,096 characters at most, docs/protocol.md)
_LOCATION = re.compile(r"(.+):(\d+):(\d+)")
_OBJECT_SUFFIXES = (".o", ".obj")


def _descendants_of(spans: list[TraceSpan], root: int) -> list[int]:
    """Indices of the spans under ``root`` (same thread: ``nest`` orders a thread's spans by start,
    so they follow the root directly, until the first span that is not inside it)."""
    out = []
    r = spans[root]
    for i in range(root + 1, len(spans)):
        s = spans[i]
        if (s.pid, s.tid) != (r.pid, r.tid) or s.start_us >= r.end_us:
            break
        out.append(i)
    return out


def _compile_spans(spans: list[TraceSpan], root: int) -> list[int]:
    """The compile's spans: those under ``root`` on its thread, and the included-file slices
    clang >= 19 writes as async events (a lane of their own, ``async_lane``) within its time."""
    r = spans[root]
    lane = async_lane(r.tid)
    return _descendants_of(spans, root) + [
        i for i, s in enumerate(spans) if s.pid == r.pid and s.tid == lane and r.start_us <= s.start_us < r.end_us]


def _in_any(intervals: list[tuple[float, float]], t: float) -> bool:
    """Whether ``t`` lies in one of the sorted, disjoint ``intervals``."""
    k = bisect.bisect_right(intervals, (t, math.inf)) - 1
    return k >= 0 and intervals[k][0] <= t < intervals[k][1]


def _detail(s: TraceSpan) -> str | None:
    d = s.args.get("detail")
    return d if isinstance(d, str) and d else None


def _inside(spans: list[TraceSpan], i: int, among: set[int]) -> bool:
    """Whether span ``i`` has an ancestor in ``among``."""
    p = spans[i].parent
    while p >= 0:
        if p in among:
            return True
        p = spans[p].parent
    return False


def source_file(spans: list[TraceSpan], root: int, trace_path: str,
                warnings: list[ParseWarning]) -> tuple[str, str]:
    """(the compiled file, which event told it) for the ``ExecuteCompiler`` span ``root``."""
    under = _compile_spans(spans, root)
    sources = [i for i in under if spans[i].name == "Source"]
    included = {d for i in sources if (d := _detail(spans[i]))}
    source_set = set(sources)
    top_level = sorted((spans[i].start_us, spans[i].end_us) for i in sources if not _inside(spans, i, source_set))
    for event in _MODULE_EVENTS:
        for i in under:
            d = _detail(spans[i])
            if spans[i].name == event and d and d not in included:
                return d, event
    counts: dict[str, int] = {}
    for i in under:
        if spans[i].name == "ParseDeclarationOrFunctionDefinition" and (d := _detail(spans[i])):
            m = _LOCATION.fullmatch(d)
            if m and m.group(1) not in included and not _in_any(top_level, spans[i].start_us):
                counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    if counts:
        return max(counts, key=lambda k: counts[k]), "ParseDeclarationOrFunctionDefinition"
    name = PurePath(trace_path).name.removesuffix(".gz").removesuffix(".json") if trace_path else ""
    for suffix in _OBJECT_SUFFIXES:
        name = name.removesuffix(suffix)
    warnings.append(ParseWarning(1, "the clang trace names no main file (no OptModule or top-level "
                                    "ParseDeclarationOrFunctionDefinition event): the compile is named after "
                                    + (f"the trace file ({name!r})" if name else "nothing ('clang compilation')")))
    return name or "clang compilation", "trace file name" if name else "none"


def template_name(detail: str) -> str:
    """``std::vector<int, std::allocator<int>>`` -> ``std::vector``; ``operator<<`` stays whole."""
    depth, out, i = 0, [], 0
    while i < len(detail):
        c = detail[i]
        if detail.startswith("operator", i) and depth == 0:
            m = re.match(r"operator\s*(<<=|<<|<=>|<=|<|>>=|>>|>=|>)?", detail[i:])
            assert m is not None  # "operator" itself always matches
            out.append(m.group(0))
            i += len(m.group(0))
            continue
        if c == "<":
            depth += 1
        elif c == ">" and depth:
            depth -= 1
        elif depth == 0:
            out.append(c)
        i += 1
    return "".join(out).strip() or detail


def _self_times(spans: list[TraceSpan], idx: list[int], key: dict[int, str]) -> dict[str, float]:
    """Self time (µs) per key of the spans ``key`` names: each span's duration less that of the
    nearest keyed spans nested in it."""
    totals: dict[str, float] = {}
    for i in idx:
        if i not in key:
            continue
        totals[key[i]] = totals.get(key[i], 0.0) + spans[i].dur_us
        p = spans[i].parent
        while p >= 0 and p not in key:
            p = spans[p].parent
        if p >= 0:
            totals[key[p]] = totals.get(key[p], 0.0) - spans[i].dur_us
    return totals


def _top(prefix: str, totals: dict[str, float], top_n: int) -> tuple[list[Phase], int]:
    ranked = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))
    # max(0, …): only improperly nested slices could make a self time negative; a phase never is.
    kept = [Phase(prefix + name[:MAX_NAME], max(0.0, us) / 1e6) for name, us in ranked[:top_n]]
    rest = ranked[top_n:]
    if rest:
        kept.append(Phase(prefix + OTHER, max(0.0, sum(us for _, us in rest)) / 1e6))
    return kept, len(rest)


def cost_phases(spans: list[TraceSpan], root: int, top_n: int = TOP_N) -> tuple[list[Phase], dict[str, str]]:
    """The ``header:`` and ``template:`` phases of the compile ``root``, and labels counting them."""
    under = _compile_spans(spans, root)
    headers = {i: d for i in under if spans[i].name == "Source" and (d := _detail(spans[i]))}
    templates = {i: template_name(d) for i in under
                 if spans[i].name in ("InstantiateClass", "InstantiateFunction") and (d := _detail(spans[i]))}
    phases: list[Phase] = []
    labels: dict[str, str] = {}
    for prefix, key, what in ((HEADER, headers, "headers"), (TEMPLATE, templates, "templates")):
        totals = _self_times(spans, under, key)
        kept, rest = _top(prefix, totals, top_n)
        phases += kept
        if totals:
            labels[what] = (f"{len(totals)} ({min(len(totals), top_n)} kept as {prefix} phases"
                            + (f", {rest} summed in {prefix}{OTHER})" if rest else ")"))
    return phases, labels
