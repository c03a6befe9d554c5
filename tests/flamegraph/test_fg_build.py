"""Flame graphs of builds read as builds: durations, the build at the root, cache colours, a legend,
normalised diffs; folded input follows flamegraph.pl's rules for bad lines."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from buildtel.shared.flamegraph import FlameGraphOptions, Ignored, fmt_duration, iter_folded, parse_folded
from buildtel.shared.flamegraph.build import category_color
from buildtel.shared.flamegraph.sessions import (
    auto_normalize,
    build_marks,
    flame_stacks,
    render_chart,
    render_flamegraph,
    sessions_label,
)
from buildtel.shared.protocol import BuildEnvironment, BuildSession, Phase, TargetMetrics, VcsInfo
from tests.flamegraph.test_fg_svg import by_name, frames


def session(sid: str = "3f9a2c1d" * 4, *, hit: bool = True, failed: bool = True, scale: float = 1.0) -> BuildSession:
    t0 = time.time() - 100
    targets = [
        TargetMetrics(name="//app/core:lib", start=t0, end=t0 + 3, duration_s=3.0 * scale, worker="w1",
                      cache="remote_hit" if hit else "miss", phases=[Phase("compile", 2.0 * scale)]),
        TargetMetrics(name="//app:bin", start=t0 + 3, end=t0 + 5, duration_s=2.0 * scale, worker="w2",
                      status="failed" if failed else "success"),
        TargetMetrics(name="//tools:gen", start=t0, end=t0 + 0.45, duration_s=0.45 * scale, worker="w2"),
    ]
    return BuildSession(id=sid, name="nightly", start=t0, finish=t0 + 5, duration_s=5, targets=targets,
                        environment=BuildEnvironment(vcs=VcsInfo(branch="main")))


def draw(sessions: list[BuildSession], **options: object) -> str:
    cats: dict[str, int] = {}
    stacks = flame_stacks(sessions, categories=cats, sequence=bool(options.get("flamechart")))
    opts = FlameGraphOptions(**{"colors": "cache", "minwidth": 0, **options})  # type: ignore[arg-type]
    return render_flamegraph(stacks, opts, marks=build_marks(sessions_label(sessions), cats))


@pytest.mark.parametrize(("us", "text"), [
    (0, "0 µs"), (850, "850 µs"), (999, "999 µs"), (1_000, "1.0 ms"), (4_500, "4.5 ms"), (450_000, "450 ms"),
    (999_999, "1.00 s"), (1_250_000, "1.25 s"), (12_300_000, "12.3 s"), (125_000_000, "125 s"),
    (725_000_000, "12 min 05 s"), (3_720_000_000, "1 h 02 min")])
def test_durations_read_as_people_write_them(us: int, text: str) -> None:
    assert fmt_duration(us) == text


def test_a_build_is_named_at_the_root_and_timed_in_seconds() -> None:
    svg = draw([session()])
    f = frames(svg)
    root = f[0]
    assert root["d"] == "0" and root["label"] == "session 3f9a2c1d (nightly)"
    assert root["title"] == "session 3f9a2c1d (nightly) (5.45 s, 100%)"
    assert "Flame Graph: session 3f9a2c1d (nightly) (5.45 s)</text>" in svg
    named = by_name(svg)
    assert named["lib"]["title"] == "lib (3.00 s, 55.05%; self 1.00 s)"
    assert named["gen"]["title"] == "gen (450 ms, 8.26%; self 450 ms)"
    # data-t keeps the exact microseconds for tools and zoom.
    assert named["gen"]["t"] == "450000"
    several = draw([session(), session("77b01e00" * 4)])
    assert frames(several)[0]["label"] == "2 builds of main"


def test_colours_say_cache_hit_built_or_failed_with_a_legend() -> None:
    svg = draw([session()])
    named = by_name(svg)
    assert named["lib"]["fill"] == category_color("hit", "lib")
    assert named["compile"]["fill"] == category_color("hit", "compile")
    assert named["bin"]["fill"] == category_color("failed", "bin")
    assert named["gen"]["fill"] == category_color("miss", "gen")
    assert named["app"]["fill"] == category_color("failed", "app")  # a failure below shows through
    assert named["tools"]["fill"] == category_color("miss", "tools")
    legend = re.findall(r'fill="([^"]+)" rx="2" ry="2"/>\n<text [^>]*>([^<]+)</text>',
                        svg[svg.index('<g id="legend">'):svg.index('<g id="frames">')])
    assert [t for _, t in legend] == ["built (cache miss)", "cache hit", "failed"]
    # Hit in one build and built in the other: the package is "mixed", and the legend says so.
    both = by_name(draw([session(failed=False), session("77b01e00" * 4, hit=False, failed=False)]))
    assert both["lib"]["fill"] == category_color("mixed", "lib")
    # The same in a flame chart and a chart.
    chart_f = by_name(draw([session()], flamechart=True))
    assert chart_f["bin"]["fill"] == category_color("failed", "bin")
    chart = render_chart(session(), FlameGraphOptions(colors="cache"))
    assert category_color("hit", "//app/core:lib") in chart and category_color("failed", "//app:bin") in chart


def test_a_named_palette_and_countname_still_apply_to_builds() -> None:
    named = by_name(draw([session()], colors="hot", countname="us"))
    assert named["gen"]["title"] == "gen (450,000 us, 8.26%; self 450,000 us)"
    assert named["gen"]["fill"].startswith("rgb(2")  # flamegraph.pl's hot palette


def test_cache_colours_need_builds() -> None:
    with pytest.raises(ValueError, match="needs stored builds"):
        render_flamegraph(parse_folded("a;b 1\n"), FlameGraphOptions(colors="cache"))


def test_diff_of_builds_is_normalised_when_the_sides_cover_different_numbers_of_builds() -> None:
    assert auto_normalize(None, 5, 10) and not auto_normalize(None, 5, 5) and not auto_normalize(False, 5, 10)
    assert auto_normalize(True, None, None) and not auto_normalize(None, 1, None)
    after = [session(failed=False)]
    base = [session(f"{i:032x}", failed=False) for i in range(4)]  # the same build, 4 times over
    cats: dict[str, int] = {}
    a, b = flame_stacks(after, categories=cats), flame_stacks(base)
    normalize = auto_normalize(None, len(after), len(base))
    svg = render_flamegraph(a, FlameGraphOptions(minwidth=0), base=b, normalize=normalize,
                            marks=build_marks(sessions_label(after), cats, base=sessions_label(base),
                                              normalized=normalize))
    fills = {f["fill"] for f in frames(svg)}
    assert fills == {"rgb(255,255,255)"}, "the same build against 4 of it is unchanged, not all blue"
    assert frames(svg)[0]["label"].startswith("session 3f9a2c1d (nightly) vs 4 builds of main, base scaled")
    raw = render_flamegraph(a, FlameGraphOptions(minwidth=0), base=b, normalize=False,
                            marks=build_marks(sessions_label(after), cats, base=sessions_label(base)))
    blue = [f for f in frames(raw) if not f["title"].endswith("self 0 µs)") and f["d"] != "0"]
    assert blue and all(re.fullmatch(r"rgb\((\d+),\1,255\)", f["fill"]) and f["fill"] != "rgb(255,255,255)"
                        for f in blue), "raw times: four builds against one is all blue"
    assert "faster (less time after)" in raw and "slower (more time after)" in raw
    # A slower target's tooltip gives the change in time too.
    slower = flame_stacks([session(failed=False, scale=2.0)])
    svg = render_flamegraph(slower, FlameGraphOptions(minwidth=0), base=a, marks=build_marks("after", cats, base="b"))
    assert "gen (900 ms, 8.26%; +4.13% = +450 ms; self 900 ms)" in svg


# ----------------------------------------------------------------------------- folded: flamegraph.pl's rules

def test_bad_lines_are_skipped_and_counted() -> None:
    ignored = Ignored()
    got = parse_folded("a;b 10\na;c ten\n\nnothing\n 5\na;d 2.5\na;e 3.\nz\x00y 3\na b  7\n", ignored=ignored)
    assert got.to_dict() == {"a;b": 10, "a;d": 3, "a;e": 3, "z\ufffdy": 3, "a b ": 7}
    assert (ignored.lines, ignored.rounded) == (3, 2)
    assert ignored.message().startswith("Ignored 3 lines with invalid format (first: line 2: count 'ten'")
    chart = Ignored()
    assert [k for k, _ in iter_folded("a 1\nbad\nb 2\n", ignored=chart)] == ["a", "b"] and chart.lines == 1
    with pytest.raises(ValueError, match="line 2"):
        parse_folded("a 1\nbad\n")  # strict without an Ignored


@given(st.lists(st.one_of(st.tuples(st.sampled_from(["a;b", "a;c", "x"]), st.integers(0, 99)),
                          st.sampled_from(["junk", "a;b x", "a;b -1", ";;", "1.2.3"])), max_size=30))
def test_good_lines_count_whatever_the_bad_ones(lines: list) -> None:
    text = "".join(f"{x[0]} {x[1]}\n" if isinstance(x, tuple) else f"{x}\n" for x in lines)
    ignored = Ignored()
    got = parse_folded(text, ignored=ignored)
    assert got.total == sum(x[1] for x in lines if isinstance(x, tuple))
    assert ignored.lines == sum(1 for x in lines if isinstance(x, str))


def test_cli_draws_a_file_with_bad_lines_and_says_how_many(tmp_path: Path) -> None:
    import subprocess
    import sys

    path = tmp_path / "f.folded"
    path.write_text("a;b 10\na;c ten\nnothing\na;d 4\n")
    out = tmp_path / "f.svg"
    run = subprocess.run([sys.executable, "-m", "buildtel.cli.main", "flamegraph", "--folded", str(path), "-o",
                          str(out)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert f"buildtel: {path}: Ignored 2 lines with invalid format (first: {path}:2:" in run.stderr
    assert [f["title"] for f in frames(out.read_text())][:1] == ["all (14 us, 100%)"]
