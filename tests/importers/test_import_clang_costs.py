"""clang ``-ftime-trace`` imports keep what the compiler wrote: the compile is named after the file
clang says it compiled, and per-header / per-template costs are phases whose totals stay exact.

Against real traces (``tests/data/trace``, IMPORTER_SAMPLES.md); the expected figures are read from
the JSON here with a reader that shares no code with the importer."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from buildtel.services.tracer.sessions import session_spans
from buildtel.shared.flamegraph.model import FlameGraphBuilder
from buildtel.shared.importers.chrome_trace import TraceSpan, nest, parse_chrome_trace
from buildtel.shared.importers.clang_trace import TOP_N, cost_phases, template_name
from buildtel.shared.phases import HEADER, OTHER, TEMPLATE, breakdown, rank
from tests.importers.importer_samples import TRACE

REGISTRY = TRACE / "clang-registry.cpp.json.gz"  # clang++ 14 -O2, a C++ file with static initialisers
CLANG19 = TRACE / "clang19-registry.cpp.json.gz"  # clang++ 19 -O0: Source slices as async b/e events
SYNTAX_ONLY = TRACE / "clang19-syntax-only-registry.cpp.json.gz"  # clang++ 19 -fsyntax-only: no optimiser
ZLIB = [TRACE / "clang-zlib-adler32.c.json", TRACE / "clang-zlib-deflate.c.json"]


def _events(path: Path) -> list[dict[str, Any]]:
    raw = path.read_bytes()
    doc = json.loads(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)
    out = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["tid"] == e["pid"]]
    open_: list[dict[str, Any]] = []
    for e in doc["traceEvents"]:  # clang >= 19: Source as nestable async b/e pairs
        if e["ph"] == "b" and e["name"] == "Source":
            open_.append(e)
        elif e["ph"] == "e" and e["name"] == "Source":
            b = open_.pop()
            out.append({**b, "ph": "X", "dur": e["ts"] - b["ts"]})
    assert not open_
    return out


def _self_us(events: list[dict[str, Any]], names: set[str], key: Any) -> dict[str, float]:
    """Self time per key of the events named ``names``, from scratch: an event's duration less that
    of the events of ``names`` directly nested in it (the innermost enclosing one owns a child)."""
    evs = sorted((e for e in events if e["name"] in names), key=lambda e: (e["ts"], -e["dur"]))
    out: Counter[str] = Counter()
    stack: list[dict[str, Any]] = []
    for e in evs:
        while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
            stack.pop()
        out[key(e)] += e["dur"]
        if stack:
            out[key(stack[-1])] -= e["dur"]
        stack.append(e)
    return dict(out)


def test_a_cpp_file_is_named_after_itself_not_its_static_initialiser() -> None:
    events = _events(REGISTRY)
    details = Counter(e.get("args", {}).get("detail") for e in events)
    (module,) = [e["args"]["detail"] for e in events if e["name"] == "OptModule"]
    # The trap, as clang wrote it: the static initialiser is named more often than the file itself.
    assert details["_GLOBAL__sub_I_registry.cpp"] > details["registry.cpp"] > 0
    result = parse_chrome_trace(REGISTRY.read_bytes(), source=str(REGISTRY))
    (session,) = result.sessions
    (target,) = session.targets
    assert target.name == module == "registry.cpp"
    assert session.name == "clang registry.cpp"
    assert session.labels["source_file_from"] == "OptModule"
    assert result.warnings == []


@pytest.mark.parametrize("path", ZLIB)
def test_c_files_keep_their_full_path(path: Path) -> None:
    (session,) = parse_chrome_trace(path.read_bytes(), source=str(path)).sessions
    src = path.name.removeprefix("clang-zlib-").removesuffix(".json")
    assert session.targets[0].name == f"/home/builder/src/src/zlib/{src}"


def test_a_syntax_only_compile_is_named_from_its_top_level_declarations() -> None:
    """clang 19 ``-fsyntax-only``: no optimiser events; the declarations parsed outside every included
    file (its async Source slices) name the main file."""
    events = _events(SYNTAX_ONLY)
    assert not any(e["name"] == "OptModule" for e in events)
    result = parse_chrome_trace(SYNTAX_ONLY.read_bytes(), source="build/anything.json")
    (target,) = result.sessions[0].targets
    assert target.name == "registry.cpp"
    assert result.sessions[0].labels["source_file_from"] == "ParseDeclarationOrFunctionDefinition"


def test_without_the_compilers_word_the_trace_file_name_is_used_and_said() -> None:
    doc = json.loads(gzip.decompress(REGISTRY.read_bytes()))
    drop = {"OptModule", "ModuleToFunctionPassAdaptor", "ModuleInlinerWrapperPass", "ModuleToPostOrderCGSCCPassAdaptor",
            "GlobalOptPass", "IPSCCPPass", "ParseDeclarationOrFunctionDefinition"}
    doc["traceEvents"] = [e for e in doc["traceEvents"] if e.get("name") not in drop]
    result = parse_chrome_trace(json.dumps(doc).encode(), source="out/CMakeFiles/x.dir/registry.cpp.o.json")
    (target,) = result.sessions[0].targets
    assert target.name == "registry.cpp"  # <object>.json less .json and .o: never the initialiser
    assert result.sessions[0].labels["source_file_from"] == "trace file name"
    assert "names no main file" in result.warnings[0].message


@pytest.mark.parametrize("path", [REGISTRY, CLANG19, SYNTAX_ONLY, *ZLIB])
def test_header_and_template_costs_are_phases_with_exact_totals(path: Path) -> None:
    events = _events(path)
    headers = _self_us(events, {"Source"}, lambda e: e["args"]["detail"])
    templates = _self_us(events, {"InstantiateClass", "InstantiateFunction"},
                         lambda e: template_name(e["args"]["detail"]))
    (session,) = parse_chrome_trace(path.read_bytes(), source=str(path)).sessions
    (target,) = session.targets
    got_h = {p.name.removeprefix(HEADER): p.duration_s for p in target.phases if p.name.startswith(HEADER)}
    got_t = {p.name.removeprefix(TEMPLATE): p.duration_s for p in target.phases if p.name.startswith(TEMPLATE)}
    for got, want, label in ((got_h, headers, "headers"), (got_t, templates, "templates")):
        # Exact: the kept ones plus "(other)" add up to all of them.
        assert sum(got.values()) == pytest.approx(sum(want.values()) / 1e6, abs=1e-9)
        top = sorted(want.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_N]
        assert {k: got[k] for k, _ in top} == {k: pytest.approx(v / 1e6) for k, v in top}
        assert (OTHER in got) == (len(want) > TOP_N)
        if want:
            assert session.labels[label].startswith(f"{len(want)} ")
    # deflate.c's costliest header (self time) as its Source events say
    if path.name.endswith("deflate.c.json"):
        assert max(got_h, key=lambda k: got_h[k]) == "/usr/include/stdlib.h"
    if path.name.endswith("registry.cpp.json.gz"):
        assert len(headers) > TOP_N and len(templates) > TOP_N  # both kinds really are bounded here


def test_breakdown_phases_stay_out_of_flame_graphs() -> None:
    (session,) = parse_chrome_trace(REGISTRY.read_bytes()).sessions
    (target,) = session.targets
    assert any(breakdown(p.name) for p in target.phases)
    fg = FlameGraphBuilder()
    fg.add_session(session)
    assert fg.stacks.total == pytest.approx(target.duration_s * 1e6, abs=2)  # time counted once


def test_breakdown_phases_stay_out_of_the_build_trace() -> None:
    (session,) = parse_chrome_trace(REGISTRY.read_bytes()).sessions
    (target,) = session.targets
    spans = session_spans(session)
    phases = [sp for sp in spans if sp.parent_span_id and sp.name in ("Frontend", "Backend")]
    assert [sp.name for sp in phases] == ["Frontend", "Backend"]  # back to back, as before
    assert not any(breakdown(sp.name) for sp in spans)
    assert phases[-1].end_ns <= int(target.end * 1e9) + 1_000


def test_rank_adds_costs_up_across_compiles() -> None:
    sessions = [parse_chrome_trace(p.read_bytes()).sessions[0] for p in ZLIB]
    targets = [t for s in sessions for t in s.targets]
    costs, total = rank(targets, HEADER)
    by = {c.name: c for c in costs}
    zlib_h = "/home/builder/src/src/zlib/zlib.h"
    assert by[zlib_h].targets == 2
    assert by[zlib_h].total_s == pytest.approx(sum(p.duration_s for t in targets for p in t.phases
                                                   if p.name == HEADER + zlib_h))
    assert total == pytest.approx(sum(p.duration_s for t in targets for p in t.phases if p.name.startswith(HEADER)))


_IDENT = st.text(alphabet="abcdefghij_:", min_size=1, max_size=8).filter(lambda s: not s.startswith(":"))


@st.composite
def _templates(draw: Any, depth: int = 0) -> str:
    name = draw(_IDENT)
    if depth < 3 and draw(st.booleans()):
        args = draw(st.lists(_templates(depth + 1), min_size=1, max_size=3))  # type: ignore[call-arg]
        return f"{name}<{', '.join(args)}>"
    return name


@given(_templates(), st.sampled_from(["", "::size", "::operator<<", "::operator<"]))
def test_template_name_drops_arguments_only(text: str, member: str) -> None:
    base = text.split("<", 1)[0]
    assert template_name(text + member) == base + member
    assert template_name(template_name(text + member)) == template_name(text + member)


@st.composite
def _nested(draw: Any) -> list[TraceSpan]:
    """A compile with randomly nested Source slices (what clang writes: inclusions inside inclusions)."""
    spans = [TraceSpan(name="ExecuteCompiler", pid=1, tid=1, start_us=0, dur_us=10_000)]

    def fill(lo: int, hi: int, depth: int) -> None:
        t = lo
        for _ in range(draw(st.integers(0, 3))):
            if hi - t < 4:
                return
            a = draw(st.integers(t, hi - 2))
            b = draw(st.integers(a + 1, hi))
            spans.append(TraceSpan(name="Source", pid=1, tid=1, start_us=a, dur_us=b - a,
                                   args={"detail": f"h{draw(st.integers(0, 30))}.h"}))
            if depth < 4:
                fill(a, b, depth + 1)
            t = b
    fill(0, 10_000, 0)
    return nest(spans)


@settings(max_examples=60, deadline=None)
@given(_nested(), st.integers(1, 5))
def test_header_costs_always_add_up(spans: list[TraceSpan], top_n: int) -> None:
    root = next(i for i, s in enumerate(spans) if s.name == "ExecuteCompiler")
    phases, _ = cost_phases(spans, root, top_n=top_n)
    top_level = sum(s.dur_us for s in spans if s.name == "Source" and spans[s.parent].name == "ExecuteCompiler")
    assert sum(p.duration_s for p in phases) == pytest.approx(top_level / 1e6, abs=1e-9)
    assert len(phases) <= top_n + 1 and all(p.duration_s >= 0 for p in phases)
