"""The analyzer's ``flamegraph`` endpoint: the CLI's SVG bytes, sessions from storage, size limits, errors.

Storage and the analyzer run in this process on the test's NATS/Redis; the CLI runs as a
subprocess against them (``tests/flamegraph/test_cli.py`` has the helpers).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from buildtel.services.analyzer import service as analyzer_service
from buildtel.services.analyzer.api import AnalyzerClient, AnalyzerError, FlameGraphSelection
from buildtel.services.analyzer.service import AnalyzerService
from buildtel.services.storage.service import StorageService
from buildtel.shared.protocol import Phase, TargetMetrics
from buildtel.shared.settings import Settings
from tests.flamegraph.test_cli import build, cli, store, svg_frames


def _varied(k: int, age_s: float, **kw: Any) -> Any:
    """Session ``k``: its own mix of durations, one target only some sessions have."""
    s = build(age_s=age_s, **kw)
    t0 = s.start
    extra = [TargetMetrics(name=f"//extra/k{k % 2}:t", start=t0, end=t0 + 0.5 * k, duration_s=0.5 * k, worker="w3")]
    targets = [TargetMetrics(name=t.name, start=t.start, end=t.end + 0.1 * k, duration_s=t.duration_s + 0.1 * k,
                             worker=t.worker, phases=t.phases, mnemonic=t.mnemonic) for t in s.targets]
    return msgspec.structs.replace(s, targets=targets + (extra if k else []))


async def _started(settings: Settings, nc: Any, sessions: list[Any], **analyzer_kw: Any) -> list[Any]:
    """Start storage and an analyzer, store ``sessions`` and wait until the analyzer folded them."""
    svcs = [StorageService(settings, settings.nats_url or "", settings.redis_url or ""),
            AnalyzerService(settings, settings.nats_url or "", settings.redis_url or "", **analyzer_kw)]
    for svc in svcs:
        await svc.start()
    await store(nc, settings, *sessions)
    client = AnalyzerClient(nc, settings.namespace, timeout=10)
    for _ in range(400):
        if (await client.stats()).sessions == len(sessions):
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the analyzer did not fold every session")
    return svcs


@pytest.fixture
async def farm(settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[tuple[Settings, list[Any]]]:
    quick = settings.with_(fsync=False)
    sessions = [_varied(k, age_s=5000 - 600 * k) for k in range(5)] + [_varied(7, age_s=60, branch="feature")]
    svcs = await _started(quick, nc, sessions)
    yield quick, sessions
    for svc in reversed(svcs):
        await svc.stop()


async def _same(settings: Settings, nc: Any, tmp_path: Path, cli_args: list[str], **request: Any) -> Any:
    """The endpoint's reply, after checking the CLI wrote exactly the same SVG (and folded) bytes."""
    out, folded = tmp_path / "cli.svg", tmp_path / "cli.folded"
    code, _, err = await cli(settings, "flamegraph", *cli_args, "-o", str(out), "--folded-out", str(folded))
    assert code == 0, err
    reply = await AnalyzerClient(nc, settings.namespace, timeout=20).flamegraph(folded=True, **request)
    assert reply.svg == out.read_bytes(), cli_args
    assert reply.folded == folded.read_text()
    return reply


async def test_endpoint_and_cli_give_the_same_bytes(farm, nc, tmp_path: Path) -> None:
    settings, sessions = farm
    main = sessions[:5]
    reply = await _same(settings, nc, tmp_path, ["--last", "3", "--branch", "main", "--title", "Last 3 <main>",
                                                 "--subtitle", "nightly", "--width", "900", "--minwidth", "0.5%",
                                                 "--colors", "java"],
                        last=3, branch="main", title="Last 3 <main>", subtitle="nightly", width=900,
                        minwidth="0.5%", colors="java")
    assert (reply.sessions, reply.partial, reply.notes, reply.search_data) == (3, False, [], True)
    expected = sum(round(t.duration_s * 1e6) for s in main[-3:] for t in s.targets)
    assert reply.total_us == expected == svg_frames(reply.svg)[("all",)]
    # One session by id (the CLI takes a prefix), and icicle / reversed / flame chart renderings.
    await _same(settings, nc, tmp_path, ["--session", main[1].id[:8], "--inverted", "--hash"],
                session=main[1].id, inverted=True, hash=True)
    await _same(settings, nc, tmp_path, ["--last", "4", "--reverse", "--no-search-data", "--countname", "µs"],
                last=4, reverse=True, search_data=False, countname="µs")
    await _same(settings, nc, tmp_path, ["--last", "2", "--flamechart", "--height", "20"],
                last=2, flamechart=True, height=20)
    # A differential against one session, and against a window.
    diff = await _same(settings, nc, tmp_path, ["--last", "2", "--diff", f"session:{main[0].id}", "--diff-color",
                                                "total", "--normalize", "--negate"],
                       last=2, diff=FlameGraphSelection(session=main[0].id), diff_color="total", normalize=True,
                       negate=True)
    assert diff.base_sessions == 1 and b"Differential Flame Graph" in diff.svg
    await _same(settings, nc, tmp_path, ["--session", main[4].id, "--diff", "last:3:main", "--diff-widths", "before"],
                session=main[4].id, diff=FlameGraphSelection(last=3, branch="main"), diff_widths="before")
    # The chart of one session.
    chart = await _same(settings, nc, tmp_path, ["--session", main[2].id, "--chart", "--width", "1000"],
                        session=main[2].id, chart=True, width=1000)
    assert chart.svg.count(b'class="lane-group"') == len({t.worker for t in main[2].targets})


async def test_sessions_come_from_storage_and_without_it_the_reply_says_so(settings, nc, redis_client,
                                                                          tmp_path: Path) -> None:
    quick = settings.with_(fsync=False)
    sessions = [_varied(k, age_s=5000 - 600 * k) for k in range(5)]
    svcs = await _started(quick, nc, sessions)
    try:
        reply = await _same(quick, nc, tmp_path, ["--last", "4"], last=4)
        assert reply.sessions == 4 and not reply.partial
        await _same(quick, nc, tmp_path, ["--session", sessions[0].id], session=sessions[0].id)
        client = AnalyzerClient(nc, quick.namespace, timeout=10)
        await svcs[0].stop()  # no storage: a clear refusal, never a partial flame graph
        for request in ({"last": 4}, {"session": sessions[0].id}):
            with pytest.raises(AnalyzerError) as err:
                await client.flamegraph(**request)
            assert err.value.code == 503 and "storage service is not answering" in err.value.description
    finally:
        for svc in reversed(svcs):
            await svc.stop()


async def test_too_big_drops_search_data_then_refuses_with_advice(settings, nc, redis_client, monkeypatch) -> None:
    quick = settings.with_(fsync=False)
    big = build(age_s=100, targets=[
        TargetMetrics(name=f"//pkg{i % 40}/sub{i % 7}:target_{i}", start=0.0, end=1.0, duration_s=0.001 * (1 + i % 9),
                      worker=f"w{i % 8}", phases=[Phase("compile", 0.0005)]) for i in range(3000)])
    svcs = await _started(quick, nc, [big])
    try:
        client = AnalyzerClient(nc, quick.namespace, timeout=20)
        full = await client.flamegraph(session=big.id, minwidth="2%")
        lean = await client.flamegraph(session=big.id, minwidth="2%", search_data=False)
        full_size, lean_size = len(msgspec.msgpack.encode(full)), len(msgspec.msgpack.encode(lean))
        assert full.search_data and not lean.search_data and lean_size * 2 < full_size
        monkeypatch.setattr(analyzer_service, "FLAME_REPLY_LIMIT", (full_size + lean_size) // 2 + 4096)
        shrunk = await client.flamegraph(session=big.id, minwidth="2%")
        assert shrunk.svg == lean.svg and not shrunk.search_data
        assert shrunk.notes == ["search data dropped to fit one NATS message"]
        monkeypatch.setattr(analyzer_service, "FLAME_REPLY_LIMIT", lean_size // 2 + 4096)
        with pytest.raises(AnalyzerError) as err:
            await client.flamegraph(session=big.id, minwidth="2%")
        assert err.value.code == 413 and "raise minwidth" in err.value.description
        assert "fewer sessions" in err.value.description
    finally:
        for svc in reversed(svcs):
            await svc.stop()


async def test_bad_requests_are_refused_with_codes(farm, nc) -> None:
    settings, sessions = farm
    client = AnalyzerClient(nc, settings.namespace, timeout=10)
    cases = [
        ({"session": "0" * 31 + "1"}, 404, "session"),
        ({"session": sessions[0].id, "last": 3}, 400, "not both"),
        ({"last": 2, "colors": "plaid"}, 400, "unknown colors"),
        ({"last": 2, "minwidth": "wide"}, 400, "minwidth"),
        ({"last": 2, "chart": True}, 400, "chart draws one session"),
        ({"session": sessions[0].id, "chart": True, "reverse": True}, 400, "reverse"),
        ({"last": 2, "flamechart": True, "diff": FlameGraphSelection(last=1)}, 400, "flame chart"),
        ({"branch": "no-such-branch"}, 404, "no sessions match the selection"),
        ({"last": 2, "diff": FlameGraphSelection(branch="no-such-branch")}, 404, "diff base"),
    ]
    for request, code, words in cases:
        with pytest.raises(AnalyzerError) as err:
            await client.flamegraph(**request)
        assert err.value.code == code and words in err.value.description, (request, err.value)
