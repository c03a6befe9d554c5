"""Encoders and typed decoders for the wire schema, built once per process.

msgspec decoders validate while they decode, so a malformed message fails here
with a ``msgspec.ValidationError``/``DecodeError`` naming the bad field instead
of deep inside a service.  ``MAX_MESSAGE_BYTES`` bounds what any service will
try to decode.
"""

from __future__ import annotations

import msgspec

from shared.protocol import BuildSession, Event, EventBatch

MAX_MESSAGE_BYTES = 8 * 1024 * 1024

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
    for ev in batch.events:
        if ev.session_id != batch.session_id or ev.agent_id != batch.agent_id:
            raise ValueError(f"event seq {ev.seq} names another session or agent than its batch")
        if ev.seq < 0 or ev.seq > 1 << 31:
            raise ValueError(f"event seq {ev.seq} out of range")
    return batch


def decode_session(data: bytes) -> BuildSession:
    return session_decoder.decode(data)
