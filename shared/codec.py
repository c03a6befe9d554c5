"""Encoders and typed decoders for the wire schema, built once per process.

msgspec decoders validate while they decode, so a malformed message fails here
with a ``msgspec.ValidationError``/``DecodeError`` naming the bad field instead
of deep inside a service.  ``MAX_MESSAGE_BYTES`` bounds what any service will
try to decode as one message, ``MAX_SESSION_BYTES`` as one completed session.
"""

from __future__ import annotations

import msgspec

from buildtel.shared.protocol import PROTOCOL_VERSION, BuildSession, Event, EventBatch, is_session_id

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
# A completed session may be larger than one message: it then travels through the object store
# (shared/bigmsg.py).  This bounds what a service will fetch, hold and decode as one session.
MAX_SESSION_BYTES = 1024**3
MAX_SEQ = 1 << 24

DecodeError = (msgspec.DecodeError, msgspec.ValidationError)

encoder = msgspec.msgpack.Encoder()
batch_decoder = msgspec.msgpack.Decoder(EventBatch)
event_decoder = msgspec.msgpack.Decoder(Event)
session_decoder = msgspec.msgpack.Decoder(BuildSession)


class _Envelope(msgspec.Struct, kw_only=True, tag="batch", tag_field="type", gc=False):
    """``EventBatch`` with its events left as raw MessagePack (same wire schema): decoding it only
    steps over the events' bytes, so each event can then be decoded once, from its own slice."""

    session_id: str
    agent_id: str
    events: list[msgspec.Raw]
    version: int = PROTOCOL_VERSION


_envelope_decoder = msgspec.msgpack.Decoder(_Envelope)


def encode(obj: object) -> bytes:
    return encoder.encode(obj)


def decode_batch(data: bytes) -> EventBatch:
    """Decode and sanity-check an agent's batch; raises ``ValueError`` with the reason."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    return _checked(batch_decoder.decode(data))


def decode_batch_raw(data: bytes) -> tuple[EventBatch, list[msgspec.Raw]]:
    """:func:`decode_batch`, plus each event's own MessagePack bytes (a zero-copy slice of
    ``data``, in order): what the collector keeps in Redis.  Every byte is decoded once: the
    envelope pass steps over the events, then each event is decoded from its slice."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    env = _envelope_decoder.decode(data)
    raws = env.events
    dec = event_decoder.decode
    try:
        events = [dec(r) for r in raws]
    except msgspec.ValidationError as exc:
        # Name the event as a whole-batch decode would (`$.events[i].field`).
        i = _first_bad(raws)
        raise msgspec.ValidationError(str(exc).replace("`$", f"`$.events[{i}]", 1)) from None
    return _checked(EventBatch(session_id=env.session_id, agent_id=env.agent_id, events=events,
                               version=env.version)), raws


def _first_bad(raws: list[msgspec.Raw]) -> int:
    for i, r in enumerate(raws):
        try:
            event_decoder.decode(r)
        except msgspec.ValidationError:
            return i
    return -1


def _checked(batch: EventBatch) -> EventBatch:
    if not is_session_id(batch.session_id):
        raise ValueError(f"session id {batch.session_id[:80]!r} is not 32 lowercase hex digits")
    if not batch.agent_id or len(batch.agent_id) > 200 or any(c in batch.agent_id for c in ":|\n\x00"):
        raise ValueError(f"agent id {batch.agent_id[:80]!r} is empty, too long or has ':', '|' or control characters")
    for ev in batch.events:
        if ev.session_id != batch.session_id or ev.agent_id != batch.agent_id:
            raise ValueError(f"event seq {ev.seq} names another session or agent than its batch")
        # The collector keeps one bit per seq; bounding it bounds that bitmap (2 MiB).
        if ev.seq < 0 or ev.seq >= MAX_SEQ:
            raise ValueError(f"event seq {ev.seq} out of range 0..{MAX_SEQ - 1}")
    return batch


def decode_session(data: bytes) -> BuildSession:
    return session_decoder.decode(data)
