"""The builds' console logs in the JetStream object store: one object per session, named by its
id, in the bucket ``<NS>_BUILD_LOGS`` (``Subjects.logs_bucket``).

Objects use the object store's layout (chunks on ``$O.<bucket>.C.<nuid>``, the meta on
``$O.<bucket>.M.<name>``, rolled up), so ``nats object get`` reads them too.  The agent writes
(publish only: its role may not read or manage streams); readers use direct gets
(``bigmsg.object_info``/``bigmsg.resolve``); storage deletes a log when retention drops its
session (a purge of the object's two subjects).  The bucket's own limits (age, bytes) are the
backstop.  ``docs/failures.md``.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Any

from nats.js import api
from nats.js.api import StreamConfig

from buildtel.shared import bigmsg
from buildtel.shared.subjects import Subjects

BUCKET_MAX_AGE_S = 365 * 86400.0  # storage deletes a log with its session; this only catches strays
BUCKET_MAX_BYTES = 8 * 1024**3
CHUNK_BYTES = 256 * 1024  # an agent's connection may have a small max_payload


def stream_config(subjects: Subjects) -> StreamConfig:
    """The logs bucket's stream (``bigmsg.bucket_stream_config``), with the logs' limits."""
    return bigmsg.bucket_stream_config(subjects.logs_bucket, max_age_s=BUCKET_MAX_AGE_S, max_bytes=BUCKET_MAX_BYTES)


async def put_log(js: Any, subjects: Subjects, name: str, data: bytes, *, timeout: float = 10.0) -> None:
    """Write ``data`` as object ``name`` (publishes only; the stream's acks say it is stored)."""
    bucket = subjects.logs_bucket
    stream = bigmsg.object_stream(bucket)
    nuid = uuid.uuid4().hex
    subject = bigmsg.chunk_subject(bucket, nuid)
    chunks = 0
    for off in range(0, max(len(data), 1), CHUNK_BYTES):
        await js.publish(subject, data[off:off + CHUNK_BYTES], stream=stream, timeout=timeout)
        chunks += 1
    _name, digest = bigmsg.digest_of(data)
    info = api.ObjectInfo(name=name, bucket=bucket, nuid=nuid, size=len(data), chunks=chunks, digest=digest,
                          mtime=datetime.now(UTC).isoformat(),
                          options=api.ObjectMetaOptions(max_chunk_size=CHUNK_BYTES))
    await js.publish(bigmsg.meta_subject(bucket, name), json.dumps(info.as_dict()).encode(), stream=stream,
                     headers={"Nats-Rollup": "sub"}, timeout=timeout)


async def get_log(js: Any, subjects: Subjects, name: str) -> bytes | None:
    """Object ``name`` (compressed), None when there is none; ``bigmsg.ObjectUnusable`` when damaged."""
    bucket = subjects.logs_bucket
    info = await bigmsg.object_info(js, bucket, name)
    if info is None:
        return None
    ref = bigmsg.Reference(bucket, name, int(info.size or 0), info.digest or "")
    if ref.size == 0:
        return b""
    try:
        return await bigmsg.resolve(js, ref, expected_bucket=bucket)
    except bigmsg.ObjectUnusable as exc:
        if exc.code == "object_missing":  # deleted (retention) between the two reads: not damaged, gone
            return None
        raise


async def delete_log(js: Any, subjects: Subjects, name: str) -> bool:
    """Purge object ``name`` (its chunks and its meta); False when there was none."""
    bucket = subjects.logs_bucket
    info = await bigmsg.object_info(js, bucket, name)
    if info is None:
        return False
    stream = bigmsg.object_stream(bucket)
    # The meta first: from then on a reader finds no log, rather than a log whose chunks are
    # already gone (chunks first left that window open; a loaded test run read into it).
    await js.purge_stream(stream, subject=bigmsg.meta_subject(bucket, name))
    await js.purge_stream(stream, subject=bigmsg.chunk_subject(bucket, info.nuid or ""))
    return True


async def delete_logs(js: Any, subjects: Subjects, names: list[str], *, stop: Any = None) -> tuple[int, str]:
    """Delete the logs of ``names`` (those that have one): (how many were deleted, the last error)."""
    deleted, error = 0, ""
    for name in names:
        if stop is not None and stop.is_set():
            break
        try:
            deleted += await delete_log(js, subjects, name)
        except Exception as exc:  # noqa: BLE001 - the bucket's own limits are the backstop
            error = f"{name}: {exc!r}"
    return deleted, error
