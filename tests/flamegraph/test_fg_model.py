"""FlameGraphBuilder / FlameNode: stacks, folded round trips, targets, sessions, spans."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from buildtel.shared.flamegraph import (
    FlameGraphBuilder,
    FlameNode,
    Span,
    parse_folded,
    target_frames,
)
from buildtel.shared.protocol import BuildSession, Phase, TargetMetrics


def test_tree_totals_and_self() -> None:
    b = FlameGraphBuilder()
    b.add_stack(["main", "compile", "parse"], 60)
    b.add_stack("main;compile", 10)
    b.add_stack(["main", "link"], 30)
    b.add_stack(["main", "compile", "parse"], 5)
    root = b.tree()
    assert root.name == "all" and root.total == 105 and root.self == 0
    main = root.children["main"]
    assert (main.total, main.self) == (105, 0)
    compile_ = root.find(["main", "compile"])
    assert compile_ is not None and (compile_.total, compile_.self) == (75, 10)
    assert root.find(["main", "compile", "parse"]) == FlameNode("parse", 65, 65)
    assert root.find(["main", "nope"]) is None
    walked = [(d, n.name) for d, n in root.walk()]
    assert walked == [(0, "all"), (1, "main"), (2, "compile"), (3, "parse"), (2, "link")]


def test_from_folded_sources_and_to_folded(tmp_path: Path) -> None:
    text = "b;c 2\na 1\nb;c 3\n"
    expected = "a 1\nb;c 5\n"
    assert FlameGraphBuilder.from_folded(text).to_folded() == expected
    assert FlameGraphBuilder.from_folded(text.encode()).to_folded() == expected
    assert FlameGraphBuilder.from_folded(text.splitlines()).to_folded() == expected
    p = tmp_path / "x.folded"
    p.write_text(text, encoding="utf-8")
    b = FlameGraphBuilder.from_folded(p, unit="ms")
    assert b.to_folded() == expected and b.stacks.unit == "ms" and b.total == 6
    fs = parse_folded(text, unit="ns")
    b2 = FlameGraphBuilder.from_folded(fs)
    b2.add_stack(["a"], 1)
    assert fs.to_dict() == {"b;c": 5, "a": 1}, "the source must not be mutated"
    assert b2.stacks.unit == "ns" and b2.to_folded() == "a 2\nb;c 5\n"


@pytest.mark.parametrize(
    ("name", "frames"),
    [
        ("//a/b:c", ["a", "b", "c"]),
        ("//a/b", ["a", "b", "b"]),
        ("//:all", ["all"]),
        ("@repo//x/y:z", ["@repo", "x", "y", "z"]),
        ("obj/x/y.o", ["obj", "x", "y.o"]),
        ("./obj//x/y.o", ["obj", "x", "y.o"]),
        ("/abs/path/lib.a", ["abs", "path", "lib.a"]),
        ("build.ninja", ["build.ninja"]),
        ("weird;name\nhere", ["weird:name here"]),
    ],
)
def test_target_frames(name: str, frames: list[str]) -> None:
    assert target_frames(name) == frames


def test_add_target_with_phases() -> None:
    b = FlameGraphBuilder()
    b.add_target("//a/b:c", 1000, [("compile", 600), ("link", 300), ("empty", 0)])
    b.add_target("//a/b:d", 500)
    b.add_target("//a/x:e", 100, [("compile", 150)])  # over-reported phases kept as reported
    assert b.stacks.to_dict() == {
        "a;b;c;compile": 600, "a;b;c;link": 300, "a;b;c": 100,
        "a;b;d": 500, "a;x;e;compile": 150,
    }
    assert b.tree().find(["a", "b"]).total == 1500  # type: ignore[union-attr]


def test_add_session_aggregates_sessions_by_package() -> None:
    def session(sid: str, scale: float) -> BuildSession:
        return BuildSession(id=sid, targets=[
            TargetMetrics(name="//app/core:lib", start=0.0, end=2.0 * scale, duration_s=2.0 * scale,
                          worker="w1", phases=[Phase("compile", 1.5 * scale), Phase("link", 0.25 * scale)]),
            TargetMetrics(name="//app/core:test", start=1.0, end=1.5, duration_s=0.5, worker="w2",
                          mnemonic="TestRunner"),
            TargetMetrics(name="obj/app/main.o", start=0.0, end=0.25, duration_s=0.25, worker="w1"),
        ])

    b = FlameGraphBuilder()
    b.add_session(session("s1", 1.0))
    b.add_session(session("s2", 2.0))
    assert b.stacks.to_dict() == {
        "app;core;lib;compile": 4_500_000,
        "app;core;lib;link": 750_000,
        "app;core;lib": 750_000,
        "app;core;test;TestRunner": 1_000_000,
        "obj;app;main.o": 500_000,
    }
    svg = b.render_svg(title="sessions")
    assert "app" in svg and "TestRunner" in svg


def test_add_spans_uses_self_time_with_parallel_children() -> None:
    spans = [
        Span("r", None, "build", 0, 100),
        Span("c1", "r", "compile", 10, 50),
        Span("c2", "r", "compile2", 30, 70),  # overlaps c1: union covers 10..70
        Span("g", "c1", "parse", 20, 30),
        {"span_id": "o", "parent_id": "missing", "name": "orphan", "start_us": 0, "end_us": 5},
        ("late", "r", "after-end", 95, 130),  # clipped to the parent for the parent's self time
    ]
    b = FlameGraphBuilder()
    b.add_spans(spans)
    assert b.stacks.to_dict() == {
        "build": 100 - 60 - 5,
        "build;compile": 30,
        "build;compile;parse": 10,
        "build;compile2": 40,
        "build;after-end": 35,
        "orphan": 5,
    }


def test_add_spans_accepts_opentelemetry_like_spans() -> None:
    def otel(span_id: int, parent: int | None, name: str, s_ns: int, e_ns: int) -> SimpleNamespace:
        return SimpleNamespace(
            context=SimpleNamespace(span_id=span_id),
            parent=SimpleNamespace(span_id=parent) if parent is not None else None,
            name=name, start_time=s_ns, end_time=e_ns,
        )

    b = FlameGraphBuilder()
    b.add_spans([otel(1, None, "root", 0, 10_000_000), otel(2, 1, "child", 1_000_000, 4_000_000)])
    assert b.stacks.to_dict() == {"root": 7000, "root;child": 3000}


def test_add_spans_survives_cycles() -> None:
    b = FlameGraphBuilder()
    b.add_spans([Span("a", "b", "x", 0, 10), Span("b", "a", "y", 0, 10), Span("r", None, "r", 0, 1)])
    assert b.stacks.to_dict() == {"r": 1}


@given(st.integers(1_600_000_000_000_000, 1_800_000_000_000_000),
       st.lists(st.tuples(st.integers(0, 10**7), st.integers(0, 10**7)), min_size=1, max_size=6),
       st.lists(st.integers(-120, 120), min_size=12, max_size=12))
def test_span_self_times_in_ns_are_exact_microseconds(t0: int, shrinks: list, noise: list) -> None:
    # A trace made from float seconds carries up to ~120 ns of noise on every end (float64 at
    # Unix time is ~240 ns coarse).  Nested spans whose true ends are whole microseconds must
    # weigh exactly their true self time; truncating each end to µs first lost 1 µs now and then.
    lo, hi = 0, 10**9
    bounds = []
    for a, b in shrinks:  # each span strictly inside the previous one
        lo, hi = lo + a, max(lo + a, hi - b)
        bounds.append((lo, hi))
    spans = [Span(i, i - 1 if i else None, f"s{i}", (t0 + s) * 1000 + noise[2 * i], (t0 + e) * 1000 + noise[2 * i + 1])
             for i, (s, e) in enumerate(bounds)]
    b = FlameGraphBuilder()
    b.add_spans(spans, ns=True)
    path = []
    for i, (s, e) in enumerate(bounds):
        path.append(f"s{i}")
        inner = bounds[i + 1][1] - bounds[i + 1][0] if i + 1 < len(bounds) else 0
        assert b.stacks[path] == (e - s) - inner
    assert b.total == bounds[0][1] - bounds[0][0]


def test_span_weights_from_float_seconds_add_up() -> None:
    # The case that failed under load: the 10 s build span and its 5 s of targets from float seconds.
    t0 = 1_712_345_678.123457
    def ns(x: float) -> int:
        return round(x * 1e9)
    spans = [Span("r", None, "b", ns(t0), ns(t0 + 10)), Span("a", "r", "a", ns(t0), ns(t0 + 3)),
             Span("c", "r", "c", ns(t0 + 3), ns(t0 + 5)), Span("g", "r", "g", ns(t0), ns(t0 + 1.25))]
    b = FlameGraphBuilder()
    b.add_spans(spans, ns=True)
    assert (b.stacks["b"], b.stacks["b;a"], b.stacks["b;c"], b.stacks["b;g"]) == (5_000_000, 3_000_000, 2_000_000,
                                                                               1_250_000)
    assert b.total == 11_250_000
