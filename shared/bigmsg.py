"""Completed sessions larger than one NATS message: carried through a JetStream object store.

A session whose encoding does not fit one message of the sessions stream (the server's
``max_payload`` and the stream's 8 MiB ``max_msg_size``, less :data:`HEADROOM` for headers) is
written to the namespace's object store bucket (``Subjects.sessions_bucket``, stream
``OBJ_<bucket>``, declared by the services with the other streams, :func:`stream_config`) and a
**reference** is published on ``NS.sessions.completed`` instead: an empty body, the same
``Nats-Msg-Id`` (the session id, so duplicates are still dropped), and the headers

* ``Buildtel-Object: <bucket>/<name>`` — the object; ``name`` is the SHA-256 of the bytes (hex),
  so an object is written once per content and never replaced under a reader;
* ``Buildtel-Object-Size`` — its length in bytes;
* ``Buildtel-Object-Digest`` — ``SHA-256=<base64url>``, as the object store's own meta says.

The layout is the standard object store's (chunks on ``$O.<bucket>.C.<nuid>``, 1 MiB each; the
meta as JSON on ``$O.<bucket>.M.<base64url(name)>``), so ``nats object get`` reads it too; it is
written and read here rather than through nats-py's ``ObjectStore`` so that reading needs only
direct gets (no consumer: a read-only permission), a missing chunk is found at once instead of
waiting forever, and the session is assembled in one buffer of known size.

Consumers never see a reference: the service skeleton (``shared/service.py``) calls
:func:`resolve` for every message of the sessions stream that carries one, and dead-letters a
reference whose object is missing or corrupt (:class:`ObjectUnusable`, with a reason code).
Objects are not deleted by their readers (three services read each one): the bucket keeps them
as long as the sessions stream keeps the references (``max_age`` 30 days), bounded in bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.js import api
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from buildtel.shared.codec import MAX_SESSION_BYTES
from buildtel.shared.subjects import Subjects

OBJECT_HEADER = "Buildtel-Object"
SIZE_HEADER = "Buildtel-Object-Size"
DIGEST_HEADER = "Buildtel-Object-Digest"
SESSION_MSG_BYTES = 8 * 1024 * 1024  # the sessions stream's max_msg_size (shared/bus.py)
HEADROOM = 4096  # of a message's room, kept for its headers
CHUNK_BYTES = 1024 * 1024
BUCKET_MAX_AGE_S = 30 * 86400.0  # as the sessions stream: an object lives as long as its reference
BUCKET_MAX_BYTES = 4 * 1024**3  # as the sessions stream; objects are needed only until consumed
_DIGEST_PREFIX = "SHA-256="


class ObjectUnusable(Exception):
    """A reference that can never be resolved (the object is gone, damaged, or the headers are
    malformed): ``code`` for the dead-letter counters, ``reason`` in words."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Reference:
    bucket: str
    name: str
    size: int
    digest: str


def object_stream(bucket: str) -> str:
    return f"OBJ_{bucket}"


def chunk_subject(bucket: str, nuid: str) -> str:
    return f"$O.{bucket}.C.{nuid}"


def meta_subject(bucket: str, name: str) -> str:
    return f"$O.{bucket}.M.{base64.urlsafe_b64encode(name.encode()).decode()}"


def stream_config(subjects: Subjects) -> StreamConfig:
    """The bucket's stream, as ``create_object_store`` would make it, with our limits.  Discard
    old: a full bucket drops its oldest chunks (whose references are the oldest too) rather than
    refuse a new session."""
    return bucket_stream_config(subjects.sessions_bucket, max_age_s=BUCKET_MAX_AGE_S, max_bytes=BUCKET_MAX_BYTES)


def bucket_stream_config(bucket: str, *, max_age_s: float, max_bytes: int) -> StreamConfig:
    """The stream of object-store bucket ``bucket`` as ``create_object_store`` makes it (chunk and
    meta subjects, rollups, direct gets), with these limits; oldest chunks dropped when full."""
    return StreamConfig(
        name=object_stream(bucket),
        subjects=[f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        max_age=max_age_s,
        max_bytes=max_bytes,
        discard=DiscardPolicy.OLD,
        allow_rollup_hdrs=True,
        allow_direct=True,
    )


def message_limit(nc: Any) -> int:
    """The largest session body published as one message on this connection."""
    return min(int(nc.max_payload or SESSION_MSG_BYTES), SESSION_MSG_BYTES) - HEADROOM


def digest_of(data: bytes) -> tuple[str, str]:
    """(object name, digest header) of ``data``."""
    sha = hashlib.sha256(data).digest()
    return sha.hex(), _DIGEST_PREFIX + base64.urlsafe_b64encode(sha).decode()


async def _info(js: Any, bucket: str, name: str) -> api.ObjectInfo | None:
    try:
        raw = await js.get_msg(object_stream(bucket), subject=meta_subject(bucket, name), direct=True)
    except NotFoundError:
        return None
    try:
        info = api.ObjectInfo.from_response(json.loads(raw.data or b""))
    except Exception as exc:  # noqa: BLE001 - any unreadable meta is a damaged object
        raise ObjectUnusable("object_corrupt", f"object {bucket}/{name}: unreadable meta ({exc})") from None
    return None if info.deleted else info


async def object_info(js: Any, bucket: str, name: str) -> api.ObjectInfo | None:
    """The meta of object ``name`` of ``bucket``; None when there is none (:class:`ObjectUnusable`
    when it is unreadable).  Direct gets only, as every reader here."""
    return await _info(js, bucket, name)


async def _whole(js: Any, bucket: str, info: api.ObjectInfo) -> bool:
    """Whether every chunk of an existing object is still in the bucket (the oldest go first)."""
    subject = chunk_subject(bucket, info.nuid or "")
    si = await js.stream_info(object_stream(bucket), subjects_filter=subject)
    return int((si.state.subjects or {}).get(subject, 0)) == int(info.chunks or 0)


async def put(js: Any, bucket: str, data: bytes, *, timeout: float = 10.0) -> Reference:
    """Write ``data`` as an object named by its digest (nothing is written when a whole object of
    that content is already there) and return the reference to publish."""
    name, digest = digest_of(data)
    ref = Reference(bucket, name, len(data), digest)
    old = await _info(js, bucket, name)
    if old is not None and old.digest == digest and old.size == len(data) and await _whole(js, bucket, old):
        return ref
    nuid = uuid.uuid4().hex
    subject = chunk_subject(bucket, nuid)
    stream = object_stream(bucket)
    view = memoryview(data)
    chunks = 0
    for off in range(0, len(data), CHUNK_BYTES):
        # A publish that fails leaves chunks no meta names: unreferenced, they age out with the bucket.
        await js.publish(subject, bytes(view[off:off + CHUNK_BYTES]), stream=stream, timeout=timeout)
        chunks += 1
    info = api.ObjectInfo(name=name, bucket=bucket, nuid=nuid, size=len(data), chunks=chunks, digest=digest,
                          mtime=datetime.now(UTC).isoformat(),
                          options=api.ObjectMetaOptions(max_chunk_size=CHUNK_BYTES))
    await js.publish(meta_subject(bucket, name), json.dumps(info.as_dict()).encode(), stream=stream,
                     headers={"Nats-Rollup": "sub"}, timeout=timeout)
    return ref


def reference_headers(ref: Reference) -> dict[str, str]:
    return {OBJECT_HEADER: f"{ref.bucket}/{ref.name}", SIZE_HEADER: str(ref.size), DIGEST_HEADER: ref.digest}


async def publish_session(js: Any, nc: Any, subjects: Subjects, data: bytes, *, msg_id: str,
                          timeout: float = 10.0, subject: str | None = None) -> Any:
    """Publish an encoded session on ``NS.sessions.completed``: as one message when it fits,
    else through the bucket as a reference.  Returns the stream's publish ack.  ``subject``: the
    partitioned form (``shared/partitions.py``), else the bare subject."""
    headers = {"Nats-Msg-Id": msg_id}
    subject = subject or subjects.sessions_completed
    if len(data) <= message_limit(nc):
        return await js.publish(subject, data, headers=headers, timeout=timeout)
    if len(data) > MAX_SESSION_BYTES:
        raise ValueError(f"session of {len(data)} bytes exceeds the {MAX_SESSION_BYTES}-byte limit of a session")
    ref = await put(js, subjects.sessions_bucket, data, timeout=timeout)
    return await js.publish(subject, b"", headers={**headers, **reference_headers(ref)},
                            timeout=timeout)


def reference(headers: dict[str, str] | None) -> Reference | None:
    """The reference a message carries, None for a plain message; :class:`ObjectUnusable` when
    its headers are malformed."""
    if not headers or OBJECT_HEADER not in headers:
        return None
    where = headers.get(OBJECT_HEADER, "")
    bucket, _, name = where.partition("/")
    try:
        size = int(headers.get(SIZE_HEADER, ""))
    except ValueError:
        size = -1
    digest = headers.get(DIGEST_HEADER, "")
    if not bucket or not name or size < 0 or not digest.startswith(_DIGEST_PREFIX):
        raise ObjectUnusable("bad_reference", f"malformed object reference {where[:200]!r} "
                                              f"(size {headers.get(SIZE_HEADER)!r}, digest {digest[:80]!r})")
    return Reference(bucket, name, size, digest)


async def resolve(js: Any, ref: Reference, *, expected_bucket: str) -> bytes:
    """The bytes of the referenced object, whole and checked against the reference's size and
    digest.  :class:`ObjectUnusable` when they can never be had; NATS errors (timeouts) as they
    come, for the caller to retry."""
    where = f"{ref.bucket}/{ref.name}"
    if ref.bucket != expected_bucket:
        raise ObjectUnusable("bad_reference", f"object {where} is not in this namespace's bucket {expected_bucket}")
    if ref.size > MAX_SESSION_BYTES:
        raise ObjectUnusable("too_large", f"object {where} of {ref.size} bytes exceeds the "
                                          f"{MAX_SESSION_BYTES}-byte limit of a session")
    info = await _info(js, ref.bucket, ref.name)
    if info is None:
        raise ObjectUnusable("object_missing", f"object {where} ({ref.size} bytes) is not in the bucket "
                                               "(expired, dropped when the bucket was full, or never written)")
    if info.size != ref.size or info.digest != ref.digest:
        raise ObjectUnusable("object_corrupt", f"object {where}: the bucket holds {info.size} bytes with digest "
                                               f"{info.digest}, the reference says {ref.size} bytes, {ref.digest}")
    buf = bytearray(ref.size)
    sha = hashlib.sha256()
    stream, subject = object_stream(ref.bucket), chunk_subject(ref.bucket, info.nuid or "")
    off = chunks = 0
    seq = 1
    while off < ref.size:
        try:
            raw = await js.get_msg(stream, seq=seq, subject=subject, direct=True, next=True)
        except NotFoundError:
            raise ObjectUnusable("object_corrupt", f"object {where}: only {chunks} of {info.chunks} chunks "
                                                   f"({off} of {ref.size} bytes) are left in the bucket") from None
        data = raw.data or b""
        if off + len(data) > ref.size:
            raise ObjectUnusable("object_corrupt", f"object {where}: its chunks hold more than {ref.size} bytes")
        buf[off:off + len(data)] = data
        sha.update(data)
        off += len(data)
        chunks += 1
        seq = int(raw.seq or seq) + 1
    if _DIGEST_PREFIX + base64.urlsafe_b64encode(sha.digest()).decode() != ref.digest:
        raise ObjectUnusable("object_corrupt", f"object {where}: its {ref.size} bytes do not match digest {ref.digest}")
    return bytes(buf)
