"""Exercises the tracing API in a fresh process (the API installs a process-wide provider).

Prints one JSON object: the finished spans (from an in-memory exporter) and
what the script observed along the way.  ``NATS_URL`` enables a NATS
header round trip.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from buildtel.services.tracer import api


def main() -> int:
    memory = InMemorySpanExporter()
    api.configure_tracing(service_name="probe", exporter=memory)  # shutdown_tracing() flushes the batch
    seen: dict[str, object] = {}
    with api.start_trace("root", new_trace=True, answer=42) as root:
        seen["root"] = root.span_id
        api.set_attribute("list", [1, 2, 3])
        with api.start_span("child", kind=api.SpanKind.CLIENT, attributes={"http.method": "GET"}):
            api.add_event("retry", attempt=2)
            api.set_status("ok", "ignored for ok")
        handle = api.start_span("imperative")
        seen["current_during"] = format(api.current_span().get_span_context().span_id, "016x") == handle.span_id
        try:
            raise ValueError("bad input")
        except ValueError as exc:
            api.record_exception(exc)
            api.set_status("error", "could not parse")
        api.finish_span()
        seen["current_after"] = format(api.current_span().get_span_context().span_id, "016x")
        try:
            with api.start_span("escaping"):
                raise KeyError("missing")
        except KeyError:
            pass
        with api.start_trace("nested-trace") as nested:
            seen["nested_parent_is_root"] = nested.span.parent.span_id == int(root.span_id, 16)
        env = api.child_env({})
        seen["child_env"] = env.get("TRACEPARENT")
        headers = api.inject_headers({})
        seen["headers"] = headers
    with api.start_span("consumer", parent=api.extract_headers(headers)):
        pass
    with api.start_trace("session-step", session_id="ab" * 16) as step:
        seen["session_trace"] = step.trace_id
    os.environ["TRACEPARENT"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    with api.start_trace("from-env") as from_env:
        seen["env_trace"] = from_env.trace_id
    if os.environ.get("NATS_URL"):
        seen["nats"] = asyncio.run(_nats_round_trip(os.environ["NATS_URL"]))
    api.shutdown_tracing()
    spans = {}
    for s in memory.get_finished_spans():
        spans[s.name] = {
            "trace_id": f"{s.context.trace_id:032x}", "span_id": f"{s.context.span_id:016x}",
            "parent": f"{s.parent.span_id:016x}" if s.parent else None, "kind": s.kind.name,
            "attributes": {k: list(v) if isinstance(v, tuple) else v for k, v in s.attributes.items()},
            "events": [[e.name, dict(e.attributes)] for e in s.events],
            "status": [s.status.status_code.name, s.status.description],
            "service": s.resource.attributes.get("service.name"),
        }
    print(json.dumps({"seen": seen, "spans": spans}, default=str))
    return 0


async def _nats_round_trip(url: str) -> dict[str, str]:
    import nats

    nc = await nats.connect(url)
    sub = await nc.subscribe("probe.subject")
    with api.start_span("publish", kind=api.SpanKind.PRODUCER) as pub:
        await nc.publish("probe.subject", b"x", headers=api.inject_headers({}))
    msg = await sub.next_msg(timeout=5)
    with api.start_span("process", kind=api.SpanKind.CONSUMER, parent=api.extract_headers(msg.headers)) as proc:
        out = {"publisher": pub.span_id, "trace": pub.trace_id, "consumer_trace": proc.trace_id,
               "consumer_parent": format(proc.span.parent.span_id, "016x")}
    await nc.close()
    return out


if __name__ == "__main__":
    sys.exit(main())
