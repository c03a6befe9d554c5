"""Encoders and typed decoders for the wire schema, built once per process.

msgspec decoders validate while they decode, so a malformed message fails here
with a ``msgspec.ValidationError``/``DecodeError`` naming the bad field instead
of deep inside a service.  ``MAX_MESSAGE_BYTES`` bounds what any service will
try to decode.
"""

from __future__ import annotations

import msgspec

from buildtel.shared.protocol import BuildSession, Event, EventBatch, is_session_id

MAX_MESSAGE_BYTES = 8 * 1024 * 1024
MAX_SEQ = 1 << 24

DecodeError = (msgspec.DecodeError, msgspec.ValidationError)

encoder = msgspec.msgpack.Encoder()
batch_decoder = msgspec.msgpack.Decoder(EventBatch)
event_decoder = msgspec.msgpack.Decoder(Event)
session_decoder = msgspec.msgpack.Decoder(BuildSession)


def encode(obj: object) -> bytes:
    return encoder.encode(obj)


def decode_batch(data: bytes) -> EventBatch:
    """Decode and sanity-check an agent's batch; raises ``ValueError`` with the reason."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(data)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    batch = batch_decoder.decode(data)
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
