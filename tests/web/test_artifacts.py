"""Flame graphs, diffs and recordings over HTTP (services/web/artifacts.py), end to end: storage,
analyzer, tracer, recorder and web services on the test's NATS and Redis, a real HTTP client, and
``buildtel`` itself (a subprocess) to compare with: the same SVG bytes as ``buildtel flamegraph``,
the same diff as ``buildtel diff --json``.  Every JSON answer is checked against the served
OpenAPI document; every refusal is a problem, never a 500."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from yarl import URL

from buildtel.services.recorder.service import RecorderService
from buildtel.services.web.service import WebService
from buildtel.shared.bus import flush
from buildtel.shared.protocol import Phase, TargetMetrics
from buildtel.shared.recording.store import RecordingStore
from buildtel.shared.settings import Settings
from tests.flamegraph.test_cli import build, cli, store, svg_frames
from tests.recorder.recordings import flagged_stream, make_recording
from tests.web.conftest import Api, eventually

SVG = "image/svg+xml"


def _session(k: int, age_s: float, branch: str = "main") -> Any:
    """Session ``k``: the three targets of ``build`` with durations of its own, and one target
    (``//extra/k<k>:t``) only it has."""
    s = build(age_s=age_s, branch=branch)
    t0 = s.start
    targets = [TargetMetrics(name=t.name, start=t.start, end=t.end + 0.4 * k, duration_s=t.duration_s + 0.4 * k,
                             worker=t.worker, phases=t.phases, mnemonic=t.mnemonic) for t in s.targets]
    extra = TargetMetrics(name=f"//extra/k{k}:t", start=t0, end=t0 + 1.0, duration_s=1.0, worker="w3",
                          phases=[Phase("compile", 1.0)])
    return msgspec.structs.replace(s, targets=[*targets, extra])


@pytest.fixture
async def sessions(api: Api, settings: Settings, nc: Any) -> list[Any]:
    """Four stored sessions, oldest first: three on main, the newest on dev."""
    made = [_session(k, age_s=4000 - 900 * k, branch="dev" if k == 3 else "main") for k in range(4)]
    await store(nc, settings, *made)
    return made


async def _svg(api: Api, path: str, **params: Any) -> bytes:
    async with api.http.get(api.web.url + path, params=params or None) as resp:
        body = await resp.read()
        assert (resp.status, resp.content_type) == (200, SVG), body[:500]
        return body


async def _cli_svg(settings: Settings, tmp_path: Path, *args: str) -> bytes:
    out = tmp_path / "cli.svg"
    code, _, err = await cli(settings, "flamegraph", *args, "-o", str(out))
    assert code == 0, err
    return out.read_bytes()


async def test_flame_graphs_are_the_svgs_buildtel_flamegraph_writes(api: Api, settings: Settings, sessions: list[Any],
                                                                    tmp_path: Path) -> None:
    s0, s1, s2, s3 = sessions
    # One session (by a prefix), with a title and width.
    svg = await _svg(api, f"/api/v1/sessions/{s1.id[:8]}/flamegraph.svg", title="Build <1>", width=900)
    assert svg == await _cli_svg(settings, tmp_path, "--session", s1.id[:8], "--title", "Build <1>", "--width", "900")
    root = ET.fromstring(svg)
    assert root.tag.endswith("svg")
    frames = svg_frames(svg)
    assert frames[("all",)] == sum(round(t.duration_s * 1e6) for t in s1.targets)
    assert {("all", "app", "core", "lib"), ("all", "extra", "k1", "t")} <= {k[:4] for k in frames}
    # Its timeline, one lane per worker.
    chart = await _svg(api, f"/api/v1/sessions/{s2.id}/flamechart.svg", minwidth="0.5")
    assert chart == await _cli_svg(settings, tmp_path, "--session", s2.id, "--chart", "--minwidth", "0.5")
    ET.fromstring(chart)
    assert chart.count(b'class="lane-group"') == len({t.worker for t in s2.targets})
    assert b"//app/core:lib" in chart or b"lib" in chart
    # Summed over the last sessions of a branch; the default window is the last few sessions.
    summed = await _svg(api, "/api/v1/flamegraph.svg", last=2, branch="main", minwidth="1%")
    assert summed == await _cli_svg(settings, tmp_path, "--last", "2", "--branch", "main", "--minwidth", "1%")
    assert svg_frames(summed)[("all",)] == sum(round(t.duration_s * 1e6) for s in (s1, s2) for t in s.targets)
    # The sessions that built one target (a filter the CLI has not: the frames say which were summed).
    built = svg_frames(await _svg(api, "/api/v1/flamegraph.svg", target="//extra/k1:t", minwidth="0"))
    assert built[("all",)] == sum(round(t.duration_s * 1e6) for t in s1.targets)
    assert ("all", "extra", "k1", "t") in built and not any("k2" in k for k in built)
    dev = await _svg(api, "/api/v1/flamegraph.svg", since=str(s3.finish - 1), branch="dev")
    assert svg_frames(dev)[("all",)] == sum(round(t.duration_s * 1e6) for t in s3.targets)
    everything = await _svg(api, "/api/v1/flamegraph.svg")
    assert everything == await _cli_svg(settings, tmp_path, "--last", "20")
    assert b"k3" in everything and b"k0" in everything
    # A differential: s2 against the base s0 (red slower).
    diff = await _svg(api, f"/api/v1/diff/{s0.id}/{s2.id[:10]}/flamegraph.svg")
    assert diff == await _cli_svg(settings, tmp_path, "--session", s2.id, "--diff", f"session:{s0.id}")
    assert b"Differential Flame Graph" in diff
    ET.fromstring(diff)


async def test_diff_of_two_sessions_is_buildtel_diff(api: Api, settings: Settings, sessions: list[Any]) -> None:
    s0, s1 = sessions[0], sessions[1]
    status, ctype, body = await api.get(f"/api/v1/diff/{s0.id[:8]}/{s1.id}")
    assert (status, ctype) == (200, "application/json"), body
    api.check(body, "BuildDiff")
    code, out, err = await cli(settings, "diff", s0.id, s1.id, "--json")
    assert code == 0, err
    assert body == json.loads(out)
    assert (body["a"]["kind"], body["a"]["id"], body["b"]["id"]) == ("session", s0.id, s1.id)
    assert body["targets"]["added"] == ["//extra/k1:t"] and body["targets"]["removed"] == ["//extra/k0:t"]
    # Largest change first: each of the three shared targets is 0.4 s slower.
    assert [round(t["delta_s"], 6) for t in body["targets"]["timing"]] == [0.4, 0.4, 0.4]
    _, _, loose = await api.get(f"/api/v1/diff/{s0.id}/{s1.id}", min_delta=1.0)
    assert loose["targets"]["timing"] == []


async def test_recordings_listed_described_paged_and_diffed(api: Api, settings: Settings, nc: Any,
                                                            recorder: RecorderService, tmp_path: Path) -> None:
    a = make_recording(settings, tmp_path / "a", "int main(){return 0;}\n", {"t0": 1.0, "t1": 2.0, "t2": 3.0})
    b = make_recording(settings, tmp_path / "b", "int main(){return 1;}\n", {"t0": 1.0, "t1": 2.0, "t2": 4.5},
                       cache="remote_hit", targets=40)
    sid, n = await flagged_stream(nc.jetstream(), settings, newer_than=b)
    store = RecordingStore.from_settings(settings)

    async def kept() -> bool:
        return len(store.load_events(sid)) == n

    await eventually(kept)
    seen: list[str] = []
    cursor = None
    while True:
        status, _, page = await api.get("/api/v1/recordings", limit=2, **({"cursor": cursor} if cursor else {}))
        assert status == 200, page
        api.check(page, "RecordingPage")
        seen += [r["id"] for r in page["recordings"]]
        if (cursor := page["next_cursor"]) is None:
            break
    assert seen == [sid, b, a]

    status, _, info = await api.get(f"/api/v1/recordings/{b[:8]}")
    assert status == 200, info
    api.check(info, "RecordingInfo")
    assert (info["id"], info["kind"], info["command"], info["inputs_count"]) == (b, "files", ["make"], 2)
    assert [f["path"] for f in info["inputs"]] == ["Makefile", "main.c"]
    assert info["events"]["total"] == len(store.load_events(b)) and info["events"]["by_type"]["target_finished"] == 40
    assert "int main" not in json.dumps(info)  # hashes of files, never their content

    events: list[Any] = []
    start = 0
    while True:
        status, _, page = await api.get(f"/api/v1/recordings/{b}/events", **{"from": start, "limit": 17})
        assert status == 200, page
        api.check(page, "RecordingEvents")
        events += page["events"]
        if (start := page["next"]) is None:
            break
    kept_events = store.load_events(b)
    assert len(events) == len(kept_events) == page["total"]
    assert [(e["type"], e["agent_id"], e["seq"]) for e in events] == [
        (type(e).__struct_config__.tag, e.agent_id, e.seq) for e in kept_events]

    status, _, d = await api.get(f"/api/v1/recordings/{a}/diff/{b[:10]}")
    assert status == 200, d
    api.check(d, "BuildDiff")
    code, out, err = await cli(settings, "diff", a, b, "--json")
    assert code == 0, err
    assert d == json.loads(out)
    assert d["inputs"]["changed"] == ["main.c"] and d["a"]["kind"] == "recording"


async def test_bad_input_and_unknown_ids_are_problems_and_no_file_is_read(api: Api, settings: Settings,
                                                                          sessions: list[Any],
                                                                          recorder: RecorderService,
                                                                          nc: Any, tmp_path: Path) -> None:
    a = make_recording(settings, tmp_path / "a", "int a;\n", {})
    secret = RecordingStore.from_settings(settings).root.parent / "secret.rec"
    secret.write_bytes(b"not for the web")
    s = sessions[0].id
    cases: list[tuple[str, dict[str, Any], int, str]] = [
        ("/api/v1/sessions/xyz/flamegraph.svg", {}, 400, "not a session id"),
        ("/api/v1/sessions/abc/flamechart.svg", {}, 400, "too short"),
        (f"/api/v1/sessions/{'f' * 32}/flamegraph.svg", {}, 404, "f" * 32),
        ("/api/v1/sessions/fedcba98/flamegraph.svg", {}, 404, "no stored session id starts with"),
        (f"/api/v1/sessions/{s}/flamegraph.svg", {"width": 5}, 400, "width"),
        (f"/api/v1/sessions/{s}/flamegraph.svg", {"minwidth": "lots"}, 400, "minwidth"),
        (f"/api/v1/sessions/{s}/flamegraph.svg", {"colors": "red"}, 400, "unknown parameter 'colors'"),
        (f"/api/v1/sessions/{s}/flamechart.svg", {"minwidth": "5%"}, 400, "percentage"),
        ("/api/v1/flamegraph.svg", {"last": 0}, 400, "last"),
        ("/api/v1/flamegraph.svg", {"outcome": "exploded"}, 400, "outcome"),
        ("/api/v1/flamegraph.svg", {"branch": "nowhere"}, 404, "no sessions match"),
        ("/api/v1/flamegraph.svg", {"since": "soon"}, 400, "since"),
        (f"/api/v1/diff/{s}/{'e' * 32}/flamegraph.svg", {}, 404, "e" * 32),
        (f"/api/v1/diff/{s}/{'e' * 32}", {}, 404, "e" * 32),
        (f"/api/v1/diff/{s}/not-hex", {}, 400, "not a session id"),
        (f"/api/v1/diff/{s}/{s}", {"min_ratio": -1}, 400, "min_ratio"),
        ("/api/v1/recordings", {"limit": 0}, 400, "limit"),
        ("/api/v1/recordings", {"cursor": "!!!"}, 400, "cursor"),
        ("/api/v1/recordings/" + "0" * 32, {}, 404, "no recording"),
        ("/api/v1/recordings/abcdef12", {}, 404, "no recording id starts with"),
        ("/api/v1/recordings/XYZ", {}, 400, "not a recording id"),
        (f"/api/v1/recordings/{a}/events", {"from": -1}, 400, "from"),
        (f"/api/v1/recordings/{a}/events", {"limit": 10**6}, 400, "limit"),
        (f"/api/v1/recordings/{a}/diff/{'0' * 32}", {}, 404, "no recording"),
    ]
    for path, params, expected, says in cases:
        status, ctype, body = await api.get(path, **params)
        api.check_problem(status, ctype, body, expected)
        assert says in body["detail"], (path, params, body)
    # Path-like recording ids: refused by the web service itself; none reaches the recorder, so no
    # file is named, let alone read (an operator connection sees every request on its subjects).
    asked = await nc.subscribe(f"{settings.namespace}.recorder.>")
    await flush(nc)  # the subscription is at the server before any request is sent (a barrier)
    for raw in ("..%2Fsecret.rec", "..%2F..%2Fetc%2Fpasswd", "%2e%2e", "..", "secret.rec",
                "..%2Fsecret.rec/events", "%2F" + str(secret).replace("/", "%2F")):
        async with api.http.get(URL(api.web.url + "/api/v1/recordings/" + raw, encoded=True)) as resp:
            body = await resp.json(content_type=None)
            api.check_problem(resp.status, resp.content_type, body, 400)
            assert "not a recording id" in body["detail"] and "not for the web" not in json.dumps(body)
    status, _, _ = await api.get(f"/api/v1/recordings/{a}")  # a request that does reach it, after them
    assert status == 200
    first = await asked.next_msg(timeout=10)
    assert msgspec.msgpack.decode(first.data) == {"id": a}
    await asked.unsubscribe()


async def test_backends_away_are_503s(settings: Settings, nc: Any) -> None:
    web = WebService(settings, settings.nats_url or "", settings.redis_url or "")  # nothing else runs
    await web.start()
    try:
        async with aiohttp.ClientSession() as http:
            full, other = "a" * 32, "b" * 32
            for path in (f"/api/v1/sessions/{full}/flamegraph.svg", "/api/v1/flamegraph.svg",
                         f"/api/v1/diff/{full}/{other}", f"/api/v1/diff/{full}/{other}/flamegraph.svg",
                         "/api/v1/recordings", f"/api/v1/recordings/{full}", f"/api/v1/recordings/{full}/events",
                         f"/api/v1/recordings/{full}/diff/{other}"):
                async with http.get(web.url + path) as resp:
                    body = await resp.json(content_type=None)
                    assert (resp.status, resp.content_type) == (503, "application/problem+json"), (path, body)
                    assert "did not answer" in body["detail"], body
    finally:
        await web.stop()


async def test_the_openapi_document_describes_the_new_endpoints(api: Api) -> None:
    from openapi_spec_validator import validate

    validate(api.doc)
    paths = api.doc["paths"]
    for p in ("/api/v1/sessions/{id}/flamegraph.svg", "/api/v1/sessions/{id}/flamechart.svg",
              "/api/v1/flamegraph.svg", "/api/v1/diff/{a}/{b}/flamegraph.svg"):
        assert paths[p]["get"]["responses"]["200"]["content"] == {SVG: {"schema": {"type": "string"}}}
    for p, component in (("/api/v1/diff/{a}/{b}", "BuildDiff"), ("/api/v1/recordings", "RecordingPage"),
                         ("/api/v1/recordings/{id}", "RecordingInfo"),
                         ("/api/v1/recordings/{id}/events", "RecordingEvents"),
                         ("/api/v1/recordings/{a}/diff/{b}", "BuildDiff")):
        schema = paths[p]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert schema == {"$ref": f"#/components/schemas/{component}"}
        assert component in api.doc["components"]["schemas"]
