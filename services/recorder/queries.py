"""The recorder's request endpoints (``api.py``), answered from its recording store.

Every handler is synchronous file work (the service runs it in a thread) and reads only what the
store's own methods read: manifests, event logs and the listing of both.  An id from a request
is never joined to a path: it must be 32 lowercase hex digits (the store checks that too) or a
prefix that picks exactly one id from the listing.
"""

from __future__ import annotations

import os
from collections import Counter

import msgspec

from buildtel.services.recorder.api import (
    MAX_FILES,
    DiffRequest,
    EventCounts,
    EventsRequest,
    GetRequest,
    ListCursor,
    ListReply,
    ListRequest,
    RecordingEvents,
    RecordingInfo,
    RecordingSummary,
)
from buildtel.shared.protocol import Event
from buildtel.shared.recording.diff import Side, side_from_store
from buildtel.shared.recording.diffview import typed_diff
from buildtel.shared.recording.manifest import is_recording_id
from buildtel.shared.recording.store import RecordingStore
from buildtel.shared.service import BAD_REQUEST, NOT_FOUND, ServiceError

SHOWN_CANDIDATES = 8
_enc = msgspec.msgpack.Encoder()
_requests: dict[str, msgspec.msgpack.Decoder[object]] = {
    "list": msgspec.msgpack.Decoder(ListRequest), "get": msgspec.msgpack.Decoder(GetRequest),
    "events": msgspec.msgpack.Decoder(EventsRequest), "diff": msgspec.msgpack.Decoder(DiffRequest)}


def summaries(store: RecordingStore) -> list[RecordingSummary]:
    """Every recording in the store, newest first (ties by id): manifests, and the event streams
    no manifest describes."""
    out: dict[str, RecordingSummary] = {}
    for sid in store.event_sessions():
        try:
            created = (store.events / sid).stat().st_mtime
        except OSError:
            continue  # dropped by retention while listing
        out[sid] = RecordingSummary(id=sid, kind="events", created=created, session_id=sid)
    for m in store.list_manifests():
        if m.session_id and m.session_id != m.id:
            out.pop(m.session_id, None)  # its stream belongs to this recording
        out[m.id] = RecordingSummary(id=m.id, kind="files", created=m.created, command=list(m.command),
                                     exit_code=m.exit_code, session_id=m.session_id, inputs=len(m.inputs),
                                     outputs=len(m.outputs))
    return sorted(out.values(), key=lambda s: (-s.created, s.id))


def resolve(store: RecordingStore, ref: str) -> str:
    """The one recording id ``ref`` (a full id or a prefix) names; 404 none, 400 several."""
    if is_recording_id(ref) and (store.has_manifest(ref) or store.has_events(ref)):
        return ref
    matches = sorted({s.id for s in summaries(store) if s.id.startswith(ref)})
    if not matches:
        raise ServiceError(NOT_FOUND, f"no recording has id {ref}" if len(ref) == 32
                           else f"no recording id starts with {ref}")
    if len(matches) > 1:
        shown = ", ".join(m[:12] + "…" for m in matches[:SHOWN_CANDIDATES])
        raise ServiceError(BAD_REQUEST, f"prefix {ref} is ambiguous: {len(matches)} recording ids start with "
                                        f"it ({shown}); give more digits")
    return matches[0]


def list_page(store: RecordingStore, req: ListRequest) -> ListReply:
    items = summaries(store)
    if req.cursor is not None:
        c = req.cursor
        items = [s for s in items if (-s.created, s.id) > (-c.created, c.id)]
    page = items[:req.limit]
    more = len(items) > req.limit
    return ListReply(recordings=page, cursor=ListCursor(page[-1].created, page[-1].id) if more else None)


def counts(events: list[Event]) -> EventCounts:
    if not events:
        return EventCounts()
    types = Counter(type(e).__struct_config__.tag for e in events)
    agents = Counter(e.agent_id for e in events)
    return EventCounts(total=len(events), by_type={str(k): v for k, v in sorted(types.items())},
                       agents=dict(sorted(agents.items())), first_ts=events[0].ts, last_ts=events[-1].ts)


def describe(store: RecordingStore, rid: str) -> RecordingInfo:
    if not store.has_manifest(rid):
        events = store.load_events(rid)
        try:
            created = os.stat(store.events / rid).st_mtime
        except OSError:
            raise ServiceError(NOT_FOUND, f"no recording has id {rid}") from None
        return RecordingInfo(id=rid, kind="events", created=created, session_id=rid, events=counts(events))
    m = store.load_manifest(rid)
    events = store.load_events(m.session_id or rid)
    return RecordingInfo(
        id=m.id, kind="files", created=m.created, session_id=m.session_id, command=list(m.command),
        argv_redacted=m.argv_redacted, cwd=m.cwd, exit_code=m.exit_code, started=m.started, finished=m.finished,
        input_method=m.input_method, environment=m.environment, inputs=m.inputs[:MAX_FILES],
        inputs_count=len(m.inputs), outputs=m.outputs[:MAX_FILES], outputs_count=len(m.outputs),
        removed=m.removed[:MAX_FILES], external_inputs=m.external_inputs[:MAX_FILES], refused=m.refused[:MAX_FILES],
        notes=list(m.notes),
        files_truncated=max(len(m.inputs), len(m.outputs), len(m.removed), len(m.external_inputs),
                            len(m.refused)) > MAX_FILES,
        events=counts(events))


def _stream_of(store: RecordingStore, rid: str) -> str:
    """The event stream a recording's events are in: its session's when its manifest names one."""
    if store.has_manifest(rid):
        return store.load_manifest(rid).session_id or rid
    return rid


def events_page(store: RecordingStore, req: EventsRequest) -> RecordingEvents:
    rid = resolve(store, req.id)
    events = store.load_events(_stream_of(store, rid))
    page = events[req.start:req.start + req.limit]
    end = req.start + len(page)
    return RecordingEvents(id=rid, total=len(events), start=req.start, events=page,
                       next=end if end < len(events) else None)


def _side(store: RecordingStore, ref: str) -> Side:
    rid = resolve(store, ref)
    side = side_from_store(store, rid)
    if side is None:  # dropped by retention since it was resolved
        raise ServiceError(NOT_FOUND, f"no recording has id {rid}")
    return side


def answer(store: RecordingStore, endpoint: str, body: bytes) -> bytes:
    """The encoded reply of ``endpoint`` to ``body`` (a :class:`ServiceError` for a refusal)."""
    try:
        req = _requests[endpoint].decode(body or b"\x80")
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ServiceError(BAD_REQUEST, f"bad {endpoint} request: {exc}") from None
    reply: msgspec.Struct
    match req:
        case ListRequest():
            reply = list_page(store, req)
        case GetRequest():
            reply = describe(store, resolve(store, req.id))
        case EventsRequest():
            reply = events_page(store, req)
        case DiffRequest():
            reply = typed_diff(_side(store, req.a), _side(store, req.b), min_delta_s=req.min_delta_s,
                               min_ratio=req.min_ratio)
        case _:
            raise AssertionError(f"no handler for {endpoint}")
    return _enc.encode(reply)
