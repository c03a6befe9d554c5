"""The recorder's request endpoints (services/recorder/api.py) on real NATS and Redis: recordings
listed newest first and paged, described without file contents, their events paged, diffs equal
to ``buildtel diff --json``; bad and path-like ids refused before any file is named."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest

from buildtel.services.recorder.api import (
    DiffRequest,
    EventsRequest,
    ListRequest,
    RecorderClient,
    RecorderError,
    endpoint_subject,
)
from buildtel.services.recorder.service import RecorderService
from buildtel.shared.recording.store import RecordingStore
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.flamegraph.test_cli import cli
from tests.recorder.recordings import flagged_stream, make_recording
from tests.web.conftest import eventually


@pytest.fixture
async def recordings(settings: Settings, nc: Any, recorder: RecorderService, tmp_path: Path) -> dict[str, Any]:
    """Two file recordings (b: main.c changed, t2 slower, t1 a remote hit) and, newest, an event
    stream the service kept from the bus."""
    a = make_recording(settings, tmp_path / "a", "int main(){return 0;}\n", {"t0": 1.0, "t1": 2.0, "t2": 3.0})
    b = make_recording(settings, tmp_path / "b", "int main(){return 1;}\n", {"t0": 1.0, "t1": 2.0, "t2": 4.5},
                       cache="remote_hit")
    sid, n = await flagged_stream(nc.jetstream(), settings, newer_than=b)
    store = RecordingStore.from_settings(settings)

    async def kept() -> bool:
        return len(store.load_events(sid)) == n

    await eventually(kept)
    return {"a": a, "b": b, "stream": sid, "events": n, "store": store}


async def test_list_describe_events_and_diff(settings: Settings, nc: Any, recordings: dict[str, Any]) -> None:
    a, b, sid, store = recordings["a"], recordings["b"], recordings["stream"], recordings["store"]
    client = RecorderClient(nc, Subjects(settings.namespace))
    # Newest first, in pages of two.
    first = await client.list(ListRequest(limit=2))
    assert [r.id for r in first.recordings] == [sid, b] and first.cursor is not None
    rest = await client.list(ListRequest(limit=2, cursor=first.cursor))
    assert [r.id for r in rest.recordings] == [a] and rest.cursor is None
    assert (rest.recordings[0].kind, rest.recordings[0].inputs, first.recordings[0].kind) == ("files", 2, "events")

    info = await client.get(a[:8])  # a unique prefix
    assert (info.id, info.kind, info.command, info.exit_code) == (a, "files", ["make"], 0)
    assert [f.path for f in info.inputs] == ["Makefile", "main.c"] and info.inputs_count == 2
    events = store.load_events(a)
    assert info.events.total == len(events) and sum(info.events.by_type.values()) == len(events)
    assert info.events.by_type["target_finished"] == 3
    # What a recording holds about its files is their hashes, never their content.
    raw = await nc.request(endpoint_subject(Subjects(settings.namespace), "get"), msgspec.msgpack.encode({"id": a}))
    assert b"int main" not in raw.data
    stream = await client.get(sid)
    assert (stream.kind, stream.events.total, stream.inputs) == ("events", recordings["events"], [])

    # Events in pages of 5, in the store's (time) order.
    got, start = [], 0
    while True:
        page = await client.events(EventsRequest(id=a, start=start, limit=5))
        assert page.total == len(events) and len(page.events) <= 5
        got += page.events
        if page.next is None:
            break
        start = page.next
    assert msgspec.msgpack.encode(got) == msgspec.msgpack.encode(events)
    beyond = await client.events(EventsRequest(id=a, start=10_000))
    assert (beyond.events, beyond.next) == ([], None)

    # The diff is the CLI's, field for field.
    d = await client.diff(DiffRequest(a=a, b=b))
    code, out, err = await cli(settings, "diff", a, b, "--json")
    assert code == 0, err
    assert msgspec.to_builtins(d) == json.loads(out)
    assert d.inputs is not None and d.inputs.changed == ["main.c"]
    assert [(t.target.rsplit(":", 1)[-1], t.delta_s) for t in d.targets.timing] == [("t2", 1.5)]


async def test_bad_and_unknown_ids_are_refused_and_name_no_file(settings: Settings, nc: Any,
                                                                recordings: dict[str, Any]) -> None:
    store: RecordingStore = recordings["store"]
    # A file next to the store a path-like id would reach: it must never be read.
    secret = store.root.parent / "secret.rec"
    secret.write_bytes(b"not for the recorder")
    client = RecorderClient(nc, Subjects(settings.namespace))
    subject = endpoint_subject(Subjects(settings.namespace), "get")
    for word in ("../secret", "../../etc/passwd", "0" * 31 + "/", "ABCDEF", "abc", "x" * 32, "a" * 33):
        reply = await nc.request(subject, msgspec.msgpack.encode({"id": word}), timeout=10)
        assert reply.headers and reply.headers.get("Nats-Service-Error-Code") == "400", (word, reply.headers)
        assert b"not for the recorder" not in reply.data
    for call in (client.get("0" * 32), client.events(EventsRequest(id="1" * 32)),
                 client.diff(DiffRequest(a="0" * 32, b=recordings["a"]))):
        with pytest.raises(RecorderError) as err:
            await call
        assert err.value.code == 404
    for body in (b"\xc1", msgspec.msgpack.encode({"limit": 0}), msgspec.msgpack.encode({"cursor": "x"})):
        reply = await nc.request(endpoint_subject(Subjects(settings.namespace), "list"), body, timeout=10)
        assert reply.headers and reply.headers.get("Nats-Service-Error-Code") == "400"
