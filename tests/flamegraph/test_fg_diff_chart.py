"""Differential flame graphs (colour direction) and the per-worker build chart."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from buildtel.shared.flamegraph import (
    BuildChartGenerator,
    chart_items_from_session,
    diff_folded,
    parse_diff_folded,
    parse_folded,
    render_diff_svg,
)
from buildtel.shared.flamegraph.chart import assign_rows
from buildtel.shared.protocol import BuildSession, TargetMetrics

SVGNS = "{http://www.w3.org/2000/svg}"


def fills(svg: str) -> dict[str, tuple[str, str]]:
    root = ET.fromstring(svg)
    out = {}
    for g in root.find(f".//{SVGNS}g[@id='frames']"):  # type: ignore[union-attr]
        title = g.find(f"{SVGNS}title").text or ""  # type: ignore[union-attr]
        out[title.split(" (")[0]] = (g.find(f"{SVGNS}rect").get("fill"), title)  # type: ignore[union-attr]
    return out


BEFORE = parse_folded("a;b 10\na;c 10\na;d 5\n")
AFTER = parse_folded("a;b 20\na;c 5\na;d 5\n")


def test_red_where_slower_blue_where_faster() -> None:
    f = fills(render_diff_svg(BEFORE, AFTER))
    # maxdelta = 10: +10 -> rgb(255, 210*0/10, ..) ; -5 -> rgb(210*5/10, .., 255)
    assert f["b"][0] == "rgb(255,0,0)"
    assert f["c"][0] == "rgb(105,105,255)"
    assert f["d"][0] == "rgb(255,255,255)"
    assert f["a"][0] == "rgb(255,255,255)"  # no self time: white, as flamegraph.pl
    # widths and percentages from "after" (total 30); the change relative to it
    assert f["b"][1] == "b (20 us, 66.67%; +33.33%; self 20 us)"
    assert f["c"][1] == "c (5 us, 16.67%; -16.67%; self 5 us)"


def test_both_directions_and_negate() -> None:
    f = fills(render_diff_svg(BEFORE, AFTER, widths="before"))
    # widths from "before" (total 25), colours still red = slower
    assert f["b"][0] == "rgb(255,0,0)" and f["b"][1].startswith("b (10 us, 40.00%; +40.00%")
    assert f["c"][0] == "rgb(105,105,255)"
    f = fills(render_diff_svg(BEFORE, AFTER, negate=True))
    assert f["b"][0] == "rgb(0,0,255)" and f["c"][0] == "rgb(255,105,105)"
    assert f["b"][1].startswith("b (20 us, 66.67%; -33.33%")


def test_color_by_total_and_normalize() -> None:
    f = fills(render_diff_svg(BEFORE, AFTER, color_by="total"))
    # subtree deltas: a +5, b +10, c -5; scale by the largest frame delta (10)
    assert f["a"][0] == "rgb(255,105,105)" and f["b"][0] == "rgb(255,0,0)"
    d = diff_folded(BEFORE, AFTER, normalize=True)  # before scaled by 30/25, truncated
    assert d.pairs == {"a\x00b": (12, 20), "a\x00c": (12, 5), "a\x00d": (6, 5)}


def test_stacks_on_one_side_only_and_text_roundtrip() -> None:
    d = diff_folded(parse_folded("x;old 4\nx;same 1\n"), parse_folded("x;new 6\nx;same 1\n"))
    assert d.to_text() == "x;new 0 6\nx;old 4 0\nx;same 1 1\n"
    assert parse_diff_folded(d.to_text()).pairs == d.pairs
    assert (d.before_total, d.after_total) == (5, 7)
    assert d.side("before").to_dict() == {"x;old": 4, "x;same": 1}
    f = fills(render_diff_svg(d))
    assert "old" not in f  # zero width in "after"
    assert f["new"][0] == "rgb(255,0,0)"
    with pytest.raises(ValueError):
        parse_diff_folded("a 1\n")


def test_diff_requires_matching_units() -> None:
    with pytest.raises(ValueError):
        diff_folded(parse_folded("a 1", unit="ms"), parse_folded("a 1", unit="us"))


def test_chart_lanes_rows_and_order() -> None:
    items = [
        ("//a:x", "w10", 0, 100),
        ("//a:y", "w2", 0, 50),
        ("//a:z", "w2", 20, 80),   # overlaps y -> second row
        ("//a:n", "w2", 60, 70),   # y is done by then -> first row again
        ("//b:q", "w1", 10, 30),
    ]
    lanes = assign_rows(items)
    assert list(lanes) == ["w1", "w2", "w10"]
    assert [(b.name, b.row) for b in lanes["w2"]] == [("//a:y", 0), ("//a:z", 1), ("//a:n", 0)]
    svg = BuildChartGenerator(width=1000).render(items)
    root = ET.fromstring(svg)
    bars = root.find(f".//{SVGNS}g[@id='bars']")
    assert bars is not None and len(bars) == 5
    lanes_g = root.find(f".//{SVGNS}g[@id='lanes']")
    labels = [g.find(f"{SVGNS}text").text for g in lanes_g]  # type: ignore[union-attr]
    assert labels == ["w1", "w2", "w10"]
    ys = {g.find(f"{SVGNS}title").text.split(" (")[0]: float(g.find(f"{SVGNS}rect").get("y"))  # type: ignore[union-attr]
          for g in bars}
    assert ys["//a:z"] == ys["//a:y"] + 16 == ys["//a:n"] + 16
    assert ys["//b:q"] < ys["//a:y"] < ys["//a:x"]
    assert svg == BuildChartGenerator(width=1000).render(list(reversed(items)))
    with pytest.raises(ValueError):
        assign_rows([("bad", "w", 10, 5)])


def test_chart_from_session() -> None:
    s = BuildSession(id="s", start=1000.0, targets=[
        TargetMetrics(name="//a:b", start=1000.5, end=1002.0, duration_s=1.5, worker="w1"),
        TargetMetrics(name="//a:c", start=1001.0, end=1001.25, duration_s=0.25, agent_id="agent-7"),
    ])
    assert chart_items_from_session(s) == [("//a:b", "w1", 500_000, 2_000_000),
                                           ("//a:c", "agent-7", 1_000_000, 1_250_000)]
    svg = BuildChartGenerator().render_session(s)
    assert "duration 1.50 s" in svg and "agent-7" in svg
