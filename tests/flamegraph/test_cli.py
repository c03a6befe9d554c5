"""``buildtel flamegraph`` as a user runs it (subprocesses) against real storage, collector and tracer.

The services run in this process on the session's NATS and Redis, in the test's own namespace;
the CLI is pointed at them with ``--nats-url/--redis-url/--namespace``.  SVGs are checked by
parsing them: every drawn frame's path and count is rebuilt from the ``<g>`` elements.
"""

from __future__ import annotations

import asyncio
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from buildtel.services.collector.service import CollectorService
from buildtel.services.storage.api import StorageClient, StorageError
from buildtel.services.storage.service import StorageService
from buildtel.services.tracer.query import TraceClient
from buildtel.services.tracer.service import TracerService
from buildtel.services.tracer.subjects import TracerSubjects
from buildtel.shared.codec import encode
from buildtel.shared.flamegraph import FlameGraphBuilder, read_folded, target_frames
from buildtel.shared.protocol import BuildSession, Phase, TargetMetrics, new_session_id
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import publish_events, synthetic_build
from tests.util import run_cli as cli

SVG_NS = "{http://www.w3.org/2000/svg}"
_TITLE = re.compile(r"^(.*) \([^()]*, [\d.]+%")




def svg_frames(svg: str | bytes) -> dict[tuple[str, ...], int]:
    """Drawn frame path (the root, whatever its label, as ``all``) -> its count (``data-t``, exact
    microseconds for builds), rebuilt from the SVG's frame groups."""
    root = ET.fromstring(svg)
    frames = []
    for g in root.iter(f"{SVG_NS}g"):
        if "data-d" not in g.attrib:
            continue
        m = _TITLE.match(g.find(f"{SVG_NS}title").text or "")
        assert m, g.find(f"{SVG_NS}title").text
        depth = int(g.attrib["data-d"])
        frames.append((depth, int(g.attrib["data-s"]), int(g.attrib["data-t"]), m.group(1) if depth else "all"))
    frames.sort()
    placed: dict[int, list[tuple[int, int, tuple[str, ...]]]] = {}
    out: dict[tuple[str, ...], int] = {}
    for depth, start, total, name in frames:
        parent: tuple[str, ...] = ()
        if depth:
            [parent] = [p for s, t, p in placed[depth - 1] if s <= start < s + t or (t == 0 and s == start)][:1]
        path = (*parent, name)
        assert path not in out, f"frame {path} drawn twice"
        out[path] = total
        placed.setdefault(depth, []).append((start, total, path))
    return out


def fills(svg: str) -> list[tuple[int, int, int]]:
    return [tuple(map(int, m)) for m in re.findall(r'<rect x="[^"]*" y="[^"]*" width="[^"]*" height="[^"]*" '
                                                   r'fill="rgb\((\d+),(\d+),(\d+)\)"', svg)]


def us(seconds: float) -> int:
    return max(0, round(seconds * 1_000_000))


async def eventually(probe: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = await probe()
            if got:
                return got
        except StorageError as exc:
            if not exc.not_found:
                raise
        except Exception as exc:  # the tracer's QueryError 404 until the session is traced
            if getattr(exc, "code", None) != 404:
                raise
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.1)


def build(sid: str | None = None, *, age_s: float = 600.0, targets: list[TargetMetrics] | None = None,
          branch: str = "main", dur: float = 10.0) -> BuildSession:
    """A stored-looking session that finished ``age_s`` ago."""
    from buildtel.shared.protocol import BuildEnvironment, VcsInfo

    t0 = time.time() - age_s - dur
    ts = targets if targets is not None else [
        TargetMetrics(name="//app/core:lib", start=t0, end=t0 + 3, duration_s=3.0, worker="w1",
                      phases=[Phase("compile", 2.0), Phase("link", 0.5)]),
        TargetMetrics(name="//app:bin", start=t0 + 3, end=t0 + 5, duration_s=2.0, worker="w2", mnemonic="CppLink"),
        TargetMetrics(name="//tools:gen", start=t0, end=t0 + 1.25, duration_s=1.25, worker="w2"),
    ]
    return BuildSession(id=sid or new_session_id(), name="b", start=t0, finish=t0 + dur, duration_s=dur,
                        targets=ts, trace_id=sid, environment=BuildEnvironment(vcs=VcsInfo(branch=branch)))


async def store(nc: Any, settings: Settings, *sessions: BuildSession) -> None:
    """Publish completed sessions and wait until storage has every one."""
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    for s in sessions:
        await js.publish(subjects.sessions_completed, encode(s), headers={"Nats-Msg-Id": s.id})
    client = StorageClient(nc, subjects)
    for s in sessions:
        await eventually(lambda s=s: client.get(s.id))


@pytest.fixture
async def stack(settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[Settings]:
    """Storage, collector and tracer in this process, on the test's NATS/Redis and namespace."""
    quick = settings.with_(fsync=False)
    services = [StorageService(quick, quick.nats_url or "", quick.redis_url or ""),
                CollectorService(quick, quick.nats_url or "", quick.redis_url or ""),
                TracerService(quick, quick.nats_url or "", quick.redis_url or "", otlp_port=0)]
    for svc in services:
        await svc.start()
    yield quick
    for svc in reversed(services):
        await svc.stop()


async def test_session_draws_every_target_by_package_and_folded_out_round_trips(stack, nc, tmp_path: Path) -> None:
    # The real path: events through the collector, the completed session into storage.
    sid, per_agent, _ = synthetic_build(targets=30, seed=3)
    for agent, events in per_agent.items():
        await publish_events(nc.jetstream(), Subjects(stack.namespace), sid, agent, events)
    session = await eventually(lambda: StorageClient(nc, Subjects(stack.namespace)).get(sid))
    svg_path, folded_path = tmp_path / "s.svg", tmp_path / "s.folded"
    code, _, err = await cli(stack, "flamegraph", "--session", sid[:10], "--minwidth", "0", "-o", str(svg_path),
                             "--folded-out", str(folded_path))
    assert code == 0, err
    assert f"flame graph of session {sid}" in err
    frames = svg_frames(svg_path.read_bytes())
    assert frames[("all",)] == sum(us(t.duration_s) for t in session.targets)
    for t in session.targets:
        path = ("all", *target_frames(t.name))
        assert path[1:4] == (f"pkg{t.name[5]}", "sub", t.name.split(":")[1])
        assert frames[path] == us(t.duration_s), t.name
    # The session is named at the root, in seconds; colours by cache result.
    svg = svg_path.read_text()
    assert f"<title>session {sid[:8]}" in svg and '<g id="legend">' in svg
    # The folded stacks are the session's, and drawing them again gives the same frames, in the
    # same places (only the build's dressing -- root name, seconds, colours -- needs the session).
    expected = FlameGraphBuilder()
    expected.add_session(session)
    assert read_folded(folded_path) == expected.stacks
    again = tmp_path / "again.svg"
    code, _, err = await cli(stack, "flamegraph", "--folded", str(folded_path), "--minwidth", "0", "-o", str(again))
    assert code == 0, err
    assert svg_frames(again.read_bytes()) == frames
    place = re.compile(r'data-s="\d+" data-t="\d+" data-d="\d+"')
    assert place.findall(again.read_text()) == place.findall(svg)
    # -o - writes the same SVG to stdout.
    code, out, err = await cli(stack, "flamegraph", "--session", sid, "--minwidth", "0", "-o", "-")
    assert code == 0 and out.encode() == svg_path.read_bytes() and err == ""


async def test_last_n_sums_the_newest_sessions_and_branch_filters(stack, nc, tmp_path: Path) -> None:
    base = build(age_s=4000)
    old = build(age_s=3000, targets=[TargetMetrics(name="//gone:x", start=base.start, end=base.start + 7,
                                                   duration_s=7.0, worker="w1")])
    newer = [build(age_s=2000 - 100 * i) for i in range(3)]
    feature = build(age_s=50, branch="feature")
    await store(nc, stack, base, old, *newer, feature)
    out = tmp_path / "last.svg"
    code, _, err = await cli(stack, "flamegraph", "--last", "3", "--branch", "main", "--minwidth", "0", "-o", str(out))
    assert code == 0, err
    assert "flame graph of 3 sessions" in err
    frames = svg_frames(out.read_text())
    one = {t.name: us(t.duration_s) for t in base.targets}
    assert frames[("all",)] == 3 * sum(one.values())
    assert frames[("all", "app", "core", "lib", "compile")] == 3 * 2_000_000
    assert frames[("all", "app", "core", "lib")] == 3 * 3_000_000  # 2 + 0.5 of phases, 0.5 s of its own
    assert frames[("all", "app", "bin", "CppLink")] == 3 * 2_000_000  # the mnemonic stands in for phases
    assert not [p for p in frames if "gone" in p]  # the fourth-newest main build is not among the last 3
    # Without --branch the feature build is the newest; with --last 5 the old one counts too.
    code, _, err = await cli(stack, "flamegraph", "--last", "5", "--minwidth", "0", "-o", str(out))
    frames = svg_frames(out.read_text())
    assert code == 0 and frames[("all",)] == 4 * sum(one.values()) + 7_000_000
    assert frames[("all", "gone", "x")] == 7_000_000


async def test_folded_diff_is_red_where_slower_and_blue_where_faster_without_a_stack(tmp_path: Path,
                                                                                     settings: Settings) -> None:
    before, after = tmp_path / "before.folded", tmp_path / "after.folded"
    before.write_text("app;core;compile 500000\napp;core;link 100000\napp;test 300000\n")
    after.write_text("app;core;compile 900000\napp;core;link 100000\napp;test 100000\n")
    out = tmp_path / "diff.svg"
    # An unreachable bus: a folded-only diff must not need one.
    dead = settings.with_(nats_url="nats://127.0.0.1:1", redis_url="redis://127.0.0.1:1")
    code, _, err = await cli(dead, "flamegraph", "--folded", str(after), "--diff", f"folded:{before}", "-o", str(out))
    assert code == 0, err
    svg = out.read_text()
    ET.fromstring(svg)
    colours = fills(svg)
    assert any(r == 255 and g == b < 255 for r, g, b in colours), "no red (slower) frame"
    assert any(b == 255 and r == g < 255 for r, g, b in colours), "no blue (faster) frame"
    frames = svg_frames(svg)
    assert frames[("all",)] == 1_100_000 and frames[("all", "app", "core", "compile")] == 900_000
    red = re.search(r"<title>compile \(900,000 us, [\d.]+%; \+([\d.]+)%", svg)
    assert red and float(red.group(1)) == pytest.approx(100 * 400_000 / 1_100_000, abs=0.01)
    # Widths from the base, and normalised: the base scaled to the new total first.
    code, _, err = await cli(dead, "flamegraph", "--folded", str(after), "--diff", f"folded:{before}",
                             "--diff-widths", "before", "--normalize", "-o", str(out))
    assert code == 0, err
    assert svg_frames(out.read_text())[("all",)] == 1_100_000 * 500_000 // 900_000 + 1_100_000 * 100_000 // 900_000 \
        + 1_100_000 * 300_000 // 900_000


async def test_chart_has_one_lane_per_worker(stack, nc, tmp_path: Path) -> None:
    sid, per_agent, _ = synthetic_build(agents=("agent-a", "agent-b"), targets=24, seed=9)
    for agent, events in per_agent.items():
        await publish_events(nc.jetstream(), Subjects(stack.namespace), sid, agent, events)
    session = await eventually(lambda: StorageClient(nc, Subjects(stack.namespace)).get(sid))
    out = tmp_path / "chart.svg"
    code, _, err = await cli(stack, "flamegraph", "--session", sid, "--chart", "--title", "Timeline", "-o", str(out))
    assert code == 0, err
    root = ET.fromstring(out.read_text())
    lanes = [g for g in root.iter(f"{SVG_NS}g") if g.attrib.get("class") == "lane-group"]
    workers = {t.worker for t in session.targets}
    assert len(workers) == 4 and len(lanes) == len(workers)
    assert {g.find(f"{SVG_NS}text").text for g in lanes} == workers
    bars = [g for g in root.iter(f"{SVG_NS}g") if "data-worker" in g.attrib]
    assert len(bars) == len(session.targets) and "Timeline" in out.read_text()


async def test_trace_is_weighted_by_self_time(stack, nc, tmp_path: Path) -> None:
    sid = new_session_id()
    session = build(sid, dur=10.0)
    await nc.jetstream().publish(Subjects(stack.namespace).sessions_completed, encode(session),
                                 headers={"Nats-Msg-Id": sid})
    client = TraceClient(nc, TracerSubjects(Subjects(stack.namespace)))
    trace = await eventually(lambda: client.session(sid))
    out = tmp_path / "trace.svg"
    code, _, err = await cli(stack, "flamegraph", "--trace", sid, "--minwidth", "0", "-o", str(out))
    assert code == 0, err
    frames = svg_frames(out.read_text())
    [root] = [s for s in trace.spans if not s.parent_span_id]
    assert round((root.end_ns - root.start_ns) / 1000) == 10_000_000
    # Self time: the build span keeps the 5 s no target covers (the targets run from 0 to 5 s,
    # two of them in parallel), each target its whole time, so the total is 5 + 3 + 2 + 1.25 s.
    assert frames[("all", "b")] == frames[("all",)] == 11_250_000
    assert sum(v for p, v in frames.items() if len(p) == 3) == 6_250_000
    # A target's phases are its children, so the target's own frame keeps only the rest.
    lib = ("all", "b", "//app/core:lib")
    assert frames[lib] == 3_000_000 and frames[(*lib, "compile")] == 2_000_000 and frames[(*lib, "link")] == 500_000
    # As a flame chart (spans in start order) the totals are the same.
    code, _, err = await cli(stack, "flamegraph", "--trace", sid, "--flamechart", "--minwidth", "0", "-o", str(out))
    assert code == 0, err
    assert svg_frames(out.read_text())[("all",)] == 11_250_000 and "Flame Chart" in out.read_text()


async def test_errors_are_one_line(stack, nc, tmp_path: Path) -> None:
    bad = tmp_path / "bad.folded"
    bad.write_text("a;b ten\na;c 1.2.3\n")
    empty = tmp_path / "empty.folded"
    empty.write_text("\n")
    cases = [
        (("--session", "0123456789abcdef0123456789abcdef"), "storage error 404"),
        (("--session", "abcdef12"), "no session id starts with abcdef12"),
        (("--last", "5"), "no sessions stored"),
        (("--folded", str(bad)), f"{bad}: no stacks in the file (Ignored 2 lines with invalid format (first: "
                                 f"{bad}:1: count 'ten' is not a non-negative integer"),
        (("--folded", str(empty)), "no stacks"),
        (("--folded", str(bad), "--chart"), "--chart draws one session's timeline"),
        (("--folded", str(bad), "--diff", "last:zero"), "last:N needs a whole number"),
        (("--folded", str(bad), "--diff", "nothing"), "expected session:ID, last:N[:BRANCH], trace:ID or folded:FILE"),
        (("--folded", str(bad), "--colors", "plaid"), "unknown colors 'plaid'"),
        (("--trace", "feedfacefeedfacefeedfacefeedface"), "no trace stored for"),
        (("--last", "2", "--normalize"), "--normalize needs --diff"),
        (("--folded", str(empty), "--colors", "cache"), "no stacks"),
        (("--trace", "feedfacefeedfacefeedfacefeedface", "--colors", "cache"), "no trace stored"),
    ]
    for args, message in cases:
        code, out, err = await cli(stack, "flamegraph", *args, "-o", str(tmp_path / "x.svg"))
        assert code == 2, (args, err)
        assert err.startswith("buildtel: error: ") and err.count("\n") == 1 and message in err, (args, err)
        assert out == ""
    assert not (tmp_path / "x.svg").exists()
