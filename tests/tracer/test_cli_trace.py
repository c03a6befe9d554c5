"""``buildtel trace``: the span tree a user reads, and exports to a file and to Zipkin."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from aiohttp import web

from buildtel.shared.codec import encode
from buildtel.shared.protocol import new_session_id
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.tracer.helpers import eventually
from tests.tracer.test_build_traces import _session
from tests.util import stack_env


async def _buildtel(settings: Settings, *argv: str) -> tuple[int, str, str]:
    env = dict(os.environ, **stack_env(settings))
    env.update(BUILDER_TELEMETRY_NATS_URL=settings.nats_url or "", BUILDER_TELEMETRY_REDIS_URL=settings.redis_url or "",
               BUILDER_TELEMETRY_NAMESPACE=settings.namespace, BUILDER_TELEMETRY_CACHE_DIR=str(settings.cache_dir))
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "buildtel.cli.main", *argv, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


async def _stored_session(tracer: Any, client: Any, nc: Any, settings: Settings) -> str:
    sid = new_session_id()
    await nc.jetstream().publish(Subjects(settings.namespace).sessions_completed, encode(_session(sid)),
                                 headers={"Nats-Msg-Id": sid})
    await eventually(lambda: client.session(sid))
    return sid


async def test_trace_prints_the_span_tree_with_timings(tracer, client, nc, settings, tmp_path) -> None:
    sid = await _stored_session(tracer, client, nc, settings)
    code, out, err = await _buildtel(settings, "trace", sid)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith(f"trace {sid}  session {sid}  6 spans  10.000s")
    body = "\n".join(lines[2:])
    assert "ci-build  [build]" in body and "ERROR" in body and "build failed (exit code 1)" in body
    # Indentation shows parentage: targets under the build, phases under their target.
    lib = next(i for i, ln in enumerate(lines) if ln.endswith("//app:lib  worker=w1 cache=miss"))
    assert "├─ //app:lib" in lines[lib] and "│  ├─ compile" in lines[lib + 1] and "│  └─ link" in lines[lib + 2]
    assert "+1.000s" in lines[lib] and "3.000s" in lines[lib] and "2.000s" in lines[lib + 1]
    code, out, _ = await _buildtel(settings, "trace", sid, "--json")
    assert code == 0 and len(json.loads(out)["spans"]) == 6


async def test_trace_export_to_a_jaeger_file_and_to_zipkin(tracer, client, nc, settings, tmp_path) -> None:
    sid = await _stored_session(tracer, client, nc, settings)
    path = tmp_path / "build.json"
    code, out, err = await _buildtel(settings, "trace", "export", sid, "--jaeger-file", str(path))
    assert code == 0, err
    assert "6 spans" in out
    [trace] = json.loads(path.read_text())["data"]
    assert trace["traceID"] == sid and len(trace["spans"]) == 6

    received: list[Any] = []

    async def zipkin(request: web.Request) -> web.Response:
        received.extend(await request.json())
        return web.Response(status=202)

    app = web.Application()
    app.router.add_post("/api/v2/spans", zipkin)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}"
        code, out, err = await _buildtel(settings, "trace", "export", sid, "--zipkin", url)
        assert code == 0, err
    finally:
        await runner.cleanup()
    assert len(received) == 6 and {s["traceId"] for s in received} == {sid}


async def test_unknown_trace_is_one_clear_error(tracer, settings) -> None:
    code, out, err = await _buildtel(settings, "trace", "f" * 32)
    assert code == 2 and out == ""
    assert err.strip() == f"buildtel: error: no trace stored for {'f' * 32!r} (is it a session or trace id?)"
    code, _, err = await _buildtel(settings, "trace", "export", "f" * 32)
    assert code == 2 and "--jaeger-file" in err
