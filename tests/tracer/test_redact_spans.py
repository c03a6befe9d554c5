"""Spans from other tools are redacted on receipt: a secret in a command line, a URL or an attribute
named like a secret never reaches the trace store (real tracer, real OTLP/HTTP client)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
from hypothesis import given
from hypothesis import strategies as st

from buildtel.services.tracer.otlp import encode_request
from buildtel.services.tracer.redact import redact_spans
from buildtel.services.tracer.service import TracerService
from buildtel.shared.settings import Settings
from buildtel.shared.tracemodel import SpanEvent, SpanRecord

SECRET = "s3cr3t-Zq8vK2pLm9Xw4Rt7"


def _span(**attrs: object) -> SpanRecord:
    return SpanRecord(trace_id="ab" * 16, span_id="cd" * 8, name="compile", start_ns=1, end_ns=2,
                      attributes=dict(attrs), resource={"process.command_line": f"cc --token={SECRET} a.c"},
                      events=[SpanEvent(name="e", time_ns=1, attributes={"db.password": SECRET})])


def test_command_lines_urls_and_secret_keys_are_redacted_ids_are_not() -> None:
    span = _span(**{"process.command_args": ["curl", "-H", f"Authorization: Bearer {SECRET}", "x"],
                    "url.full": f"https://ci.example.com/hook?token={SECRET}",
                    "auth.token": SECRET, "build.session_id": "0123456789abcdef0123456789abcdef",
                    "cache.key": "k1", "build.target": "//a:b"})
    assert redact_spans([span]) == 5
    text = repr(span)
    assert SECRET not in text
    assert span.attributes["build.session_id"] == "0123456789abcdef0123456789abcdef"
    assert span.attributes["cache.key"] == "k1" and span.attributes["build.target"] == "//a:b"
    assert span.resource["process.command_line"].startswith("cc --token=")


@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._/-:", max_size=60))
def test_ordinary_attributes_pass_unchanged(value: str) -> None:
    span = SpanRecord(trace_id="ab" * 16, span_id="cd" * 8, attributes={"code.filepath": value, "build.worker": value})
    assert redact_spans([span]) == 0 and span.attributes == {"code.filepath": value, "build.worker": value}


async def test_a_tool_span_with_a_secret_is_stored_redacted(settings: Settings, nc, tmp_path: Path) -> None:
    svc = TracerService(settings, settings.nats_url or "", settings.redis_url or "", otlp_port=0)
    await svc.start()
    try:
        body = encode_request([_span(**{"process.command_line": f"deploy --password {SECRET}"})])
        headers = {"Content-Type": "application/x-protobuf"}
        async with aiohttp.ClientSession() as http, http.post(svc.otlp_url, data=body, headers=headers) as resp:
            assert resp.status == 200
        for _ in range(200):
            if svc.store.spans_written:
                break
            await asyncio.sleep(0.025)
        assert svc.store.spans_written == 1 and svc.redacted_values >= 3
    finally:
        await svc.stop()
    stored = b"".join(p.read_bytes() for p in settings.traces_dir.rglob("*") if p.is_file())
    assert stored and SECRET.encode() not in stored
