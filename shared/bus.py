"""NATS and Redis connections, JetStream streams, and the dead-letter path.

Services call :func:`connect_nats` / :func:`connect_redis` with the one
:class:`Settings`; credentials, tokens and TLS come from there.  Streams are
declared by :func:`ensure_streams`, idempotently, by whichever process starts
first; limits are documented in ``docs/protocol.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ssl
import time
from typing import Any

import msgspec
import nats
import nats.errors
import redis.asyncio as aioredis
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, BadRequestError, ServiceUnavailableError

from buildtel.shared import bigmsg, logstore
from buildtel.shared import partitions as partitions_mod
from buildtel.shared.auth import inbox_prefix
from buildtel.shared.keys import Keys
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects

GiB = 1024**3
DAY_S = 86400.0


def nats_options(settings: Settings, *, name: str, role: str) -> dict[str, Any]:
    """Connection options for a client acting as ``role`` (see :mod:`buildtel.shared.auth`).

    Credentials configured explicitly (creds file, token, user) win; otherwise a local stack's
    per-role password is used.  Replies always come to the role's own inbox prefix, so a server
    that gives each role only its inbox works.
    """
    opts: dict[str, Any] = {"name": name, "inbox_prefix": inbox_prefix(role).encode()}
    explicit = settings.nats_creds or settings.nats_token or settings.nats_user
    if not explicit and settings.stack_auth is not None:
        opts["user"] = role
        opts["password"] = settings.stack_auth.password(role)
    if settings.nats_creds:
        opts["user_credentials"] = str(settings.nats_creds)
    if settings.nats_token:
        opts["token"] = settings.nats_token
    if settings.nats_user:
        opts["user"] = settings.nats_user
        opts["password"] = settings.nats_password or ""
    if settings.nats_tls_ca or settings.nats_tls_cert:
        ctx = ssl.create_default_context(cafile=str(settings.nats_tls_ca) if settings.nats_tls_ca else None)
        if settings.nats_tls_cert:
            ctx.load_cert_chain(str(settings.nats_tls_cert),
                                str(settings.nats_tls_key) if settings.nats_tls_key else None)
        opts["tls"] = ctx
    return opts


def has_credentials(settings: Settings) -> bool:
    """Whether connections authenticate (then each role has only its permissions: an agent, for
    one, may not declare streams and relies on the services having done it)."""
    return bool(settings.nats_creds or settings.nats_token or settings.nats_user or settings.stack_auth)


async def connect_nats(settings: Settings, url: str, *, name: str, role: str, **extra: Any) -> NATS:
    """A connection as ``role``: reconnects forever, so a NATS restart is waited out, not fatal.

    A publish or subscription the role is not permitted is refused by the server asynchronously;
    it is logged here with the subject, so a misconfigured role is never a silent drop.
    """
    opts = nats_options(settings, name=name, role=role)

    async def on_error(exc: Exception) -> None:
        text = str(exc)
        if "ermission" in text or "uthorization" in text:
            import structlog

            from buildtel.shared import logs

            if not structlog.is_configured():  # never print to stdout: it may be a build's output
                logs.configure()
            logs.get_logger("bus").warning("nats.permission_denied", role=role, client=name, error=text)

    opts.update(
        servers=[u.strip() for u in url.split(",")],
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        connect_timeout=5,
        error_cb=on_error,
    )
    opts.update(extra)
    return await nats.connect(**opts)


async def flush(nc: NATS, timeout: float = 5) -> None:
    """Return when the server has processed every command this connection sent so far.

    ``nc.flush()`` alone does not promise that in nats-py 2.16: its PING is written to the
    socket ahead of the commands still queued for the flusher task (subscriptions,
    publishes), so the PONG can arrive before the server has seen them.  A service that
    answered "started" after such a flush got "no responders" on its first request about
    once in ten starts on a loaded machine.  Writing the queue out first (and waiting for
    it) puts the PING behind everything sent before it.
    """
    push = getattr(nc, "_flush_pending", None)  # private, but the only way to wait for the queue
    if push is not None:
        await asyncio.wait_for(push(force_flush=True), timeout)
    await nc.flush(timeout=timeout)  # type: ignore[arg-type]  # nats-py annotates timeout as int


async def close_nats(nc: NATS | None, subscriptions: list[Any] | None = None) -> None:
    """Unsubscribe, flush what was published, close. Idempotent.

    Used instead of ``drain()``: nats-py's drain waits out its full timeout when a
    JetStream pull subscription is open, and callers have already stopped their
    consumers, so there is nothing left to drain.
    """
    if nc is None or nc.is_closed:
        return
    for sub in subscriptions or []:
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
    with contextlib.suppress(Exception):
        await flush(nc, timeout=2)
    with contextlib.suppress(Exception):
        await nc.close()


def connect_redis(url: str) -> aioredis.Redis:
    """A single Redis (``redis://``), or a Redis Cluster (``redis+cluster://``, shared/rediscluster.py)."""
    from buildtel.shared.rediscluster import connect_cluster, is_cluster_url

    if is_cluster_url(url):
        cluster: aioredis.Redis = connect_cluster(url)  # the same commands; typed as the single client
        return cluster
    return aioredis.Redis.from_url(url, decode_responses=False, health_check_interval=30)


def stream_configs(subjects: Subjects, partitions: int = 1) -> list[StreamConfig]:
    """The shared streams; ``partitions`` > 1 maps completed sessions to storage partitions
    (``shared/partitions.py``)."""
    completed = [subjects.sessions_completed]
    if partitions > 1:
        completed.append(f"{subjects.sessions_completed}.*")  # the id, mapped to its partition
    return [
        # Agent events: limits retention (not work-queue) so the recorder can read the same
        # stream as the collectors; Nats-Msg-Id de-duplicates agent retries within 2 min.
        StreamConfig(
            name=subjects.events_stream,
            subjects=[subjects.events_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=7 * DAY_S,
            max_bytes=4 * GiB,
            max_msg_size=8 * 1024 * 1024,
            discard=DiscardPolicy.OLD,
            duplicate_window=120.0,
        ),
        StreamConfig(
            name=subjects.sessions_stream,
            # Durable consumers (storage, analyzer, tracer) filter on sessions.completed; the
            # started announcements are for live followers (the web API's stream).
            subjects=[*completed, subjects.sessions_started],
            subject_transform=partitions_mod.stream_transform(subjects, partitions),
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=30 * DAY_S,
            max_bytes=4 * GiB,
            max_msg_size=bigmsg.SESSION_MSG_BYTES,  # larger sessions go through the object store
            duplicate_window=600.0,
        ),
        StreamConfig(
            name=subjects.dead_letter_stream,
            subjects=[subjects.dead_letter_all],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_msgs=100_000,
            max_age=7 * DAY_S,
            max_bytes=GiB,
        ),
        # Sessions too large for one message of NS_SESSIONS (shared/bigmsg.py).
        bigmsg.stream_config(subjects),
        # Console logs of builds, beside their sessions (shared/logstore.py).
        logstore.stream_config(subjects),
    ]


class StreamReplicasError(RuntimeError):
    """A stream could not be given the replica count asked for; the message says which and why."""


# JetStream answers these while a cluster forms (no meta leader yet, too few peers known): a
# stream declared then is retried, not failed, so services may start before the cluster is whole.
_TRANSIENT_JS_CODES = {10008, 10023}  # "temporarily unavailable", "insufficient resources"
DECLARE_DEADLINE_S = 60.0
_STREAM_NAME_IN_USE = 10058  # exists with another configuration
_NOT_CLUSTERED = 10074  # "replicas > 1 not supported in non-clustered mode"


def _replicas_error(stream: str, want: int, exc: APIError) -> StreamReplicasError:
    return StreamReplicasError(f"stream {stream}: cannot create it with {want} replicas "
                               f"(BUILDER_TELEMETRY_REPLICAS): {exc.description or exc}")


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, (ServiceUnavailableError, nats.errors.NoRespondersError, nats.errors.TimeoutError,
                        TimeoutError)):
        return True
    return isinstance(exc, APIError) and exc.err_code in _TRANSIENT_JS_CODES


async def ensure_stream(js: JetStreamContext, cfg: StreamConfig, *, replicas: int | None = None) -> None:
    """Declare one stream, idempotently, with ``replicas`` copies (``BUILDER_TELEMETRY_REPLICAS``).

    ``replicas`` None: a new stream gets ``cfg``'s count (1 unless set) and an existing one keeps
    its own, so a client with default settings never scales down a farm's R3 streams.  A count
    the cluster cannot give (fewer servers than replicas) raises :class:`StreamReplicasError`
    naming the stream and both counts.  While the cluster forms, declaring is retried.
    """
    deadline = time.monotonic() + DECLARE_DEADLINE_S
    while True:
        try:
            await _declare_stream(js, cfg, replicas)
            return
        except StreamReplicasError:
            raise
        except Exception as exc:
            if not _transient(exc):
                raise
            if time.monotonic() > deadline:
                if isinstance(exc, APIError) and exc.err_code == 10023:
                    raise StreamReplicasError(
                        f"stream {cfg.name}: the cluster has too few JetStream servers for "
                        f"{replicas or cfg.num_replicas or 1} replicas (BUILDER_TELEMETRY_REPLICAS): "
                        f"{exc.description}") from None
                raise
            await asyncio.sleep(0.25)


async def _declare_stream(js: JetStreamContext, cfg: StreamConfig, replicas: int | None) -> None:
    want = replicas if replicas is not None else (cfg.num_replicas or 1)
    name = cfg.name or ""
    try:
        await js.add_stream(dataclasses.replace(cfg, num_replicas=want))
        return
    except BadRequestError as exc:
        if exc.err_code != _STREAM_NAME_IN_USE:
            about_replicas = any(w in (exc.description or "").lower() for w in ("replica", "peer", "placement"))
            raise _replicas_error(name, want, exc) if want > 1 and about_replicas else exc from None
    except APIError as exc:
        raise _replicas_error(name, want, exc) if exc.err_code == _NOT_CLUSTERED else exc from None
    # Exists with other limits (an older version declared it) or another replica count: converge
    # on ours, keeping its count unless one was asked for.  An existing stream keeps its subject
    # transform (the storage partitioning, ``shared/partitions.py``) whatever the declaration says:
    # only ``buildtel storage rebalance`` changes the partition count, never a process that starts.
    current = (await js.stream_info(name)).config
    have = current.num_replicas or 1
    target = replicas if replicas is not None else have
    if _transform(current) != _transform(cfg):
        cfg = dataclasses.replace(cfg, subject_transform=current.subject_transform, subjects=current.subjects)
    try:
        await js.update_stream(dataclasses.replace(cfg, num_replicas=target))
    except APIError as exc:
        if target != have and not _transient(exc):
            raise StreamReplicasError(
                f"stream {cfg.name} has {have} replicas, BUILDER_TELEMETRY_REPLICAS asks for {target}, and the "
                f"server refused the update: {exc.description or exc}") from None
        raise


async def converge_consumer_replicas(js: JetStreamContext, stream: str, durable: str,
                                     replicas: int | None) -> str | None:
    """Give an existing durable consumer ``replicas`` copies (it keeps its count otherwise: a
    consumer made before BUILDER_TELEMETRY_REPLICAS changed).  Returns why it could not, for the
    caller's log line, else None.  0 (follow the stream) already has the stream's count."""
    if replicas is None:
        return None
    info = await js.consumer_info(stream, durable)
    have = info.config.num_replicas or 0
    if have in (0, replicas):
        return None
    deadline = time.monotonic() + DECLARE_DEADLINE_S / 2
    while True:
        try:
            await js.add_consumer(stream, config=dataclasses.replace(info.config, num_replicas=replicas))
            return None
        except APIError as exc:
            # The stream's own scale-up (just asked by ensure_stream) completes asynchronously.
            if "exceeds parent stream" in (exc.description or "") and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                continue
            return (f"consumer {durable} of stream {stream} has {have} replicas, BUILDER_TELEMETRY_REPLICAS asks "
                    f"for {replicas}: {exc.description or exc}")


def _transform(cfg: StreamConfig) -> tuple[str, str] | None:
    t = cfg.subject_transform
    return None if t is None else (t.src, t.dest)


async def ensure_streams(js: JetStreamContext, subjects: Subjects, extra: list[StreamConfig] | None = None,
                         *, partitions: int = 1, replicas: int | None = None) -> None:
    for cfg in stream_configs(subjects, partitions) + list(extra or []):
        await ensure_stream(js, cfg, replicas=replicas)


class DeadLetter(msgspec.Struct, kw_only=True):
    """What a service publishes for input it could not use: the reason and the raw bytes."""

    service: str
    subject: str
    reason: str
    ts: float
    data: bytes
    headers: dict[str, str] = {}


_dl_encoder = msgspec.msgpack.Encoder()
dead_letter_decoder = msgspec.msgpack.Decoder(DeadLetter)


async def publish_dead_letter(
    nc: NATS,
    r: aioredis.Redis | None,
    subjects: Subjects,
    keys: Keys,
    *,
    service: str,
    subject: str,
    reason: str,
    data: bytes,
    headers: dict[str, str] | None = None,
) -> None:
    """Park bad input on ``<ns>.deadletter.<service>`` and count it; never raises."""
    msg = DeadLetter(service=service, subject=subject, reason=reason[:2000], ts=time.time(),
                     data=data[: 1024 * 1024], headers=dict(headers or {}))
    try:
        await nc.publish(subjects.dead_letter(service), _dl_encoder.encode(msg))
        if r is not None:
            await r.incr(keys.dead_letters(service))
    except Exception:  # noqa: BLE001 - a failing dead-letter path must not take the service down
        pass


# -- poison messages: max_deliver, and a dead letter driven by its advisory ------------------
# Every JetStream consumer stops redelivering a message after this many deliveries; the server
# then announces it on the MAX_DELIVERIES advisory, and watch_max_deliveries() parks the message
# on the dead-letter subject with the reason, so one bad message cannot stall a consumer.
MAX_DELIVER = 5


class MaxDeliveriesAdvisory(msgspec.Struct):
    """``io.nats.jetstream.advisory.v1.max_deliver`` (the fields used here)."""

    stream: str
    consumer: str
    stream_seq: int
    deliveries: int


_advisory_decoder = msgspec.json.Decoder(MaxDeliveriesAdvisory)


def max_deliveries_subject(stream: str, consumer: str) -> str:
    return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.{consumer}"


def _failures_key(keys: Keys, stream: str, consumer: str) -> str:
    return keys.poison(stream, consumer)


async def note_failure(r: aioredis.Redis | None, keys: Keys, *, stream: str, consumer: str, seq: int,
                       reason: str) -> None:
    """Remember why a delivery of stream message ``seq`` failed (for its eventual dead letter)."""
    if r is None:
        return
    key = _failures_key(keys, stream, consumer)
    with contextlib.suppress(Exception):  # only enriches a later reason; the failure is logged by the caller
        pipe = r.pipeline(transaction=False)
        pipe.hset(key, str(seq), reason[:2000])
        pipe.expire(key, int(7 * DAY_S))
        await pipe.execute()


async def watch_max_deliveries(nc: NATS, r: aioredis.Redis | None, subjects: Subjects, keys: Keys, *,
                               service: str, stream: str, consumer: str, counter: Any = None,
                               lost: Any = None) -> Any:
    """Dead-letter every message of ``stream`` that ``consumer`` gave up on (max_deliver reached).

    Subscribes to the consumer's MAX_DELIVERIES advisory in a queue group, so one replica
    handles each advisory; fetches the message by stream sequence and publishes it to
    ``NS.deadletter.<service>`` with the reason (and the last recorded failure, see
    :func:`note_failure`).  ``counter()`` is called once per dead letter, and ``await
    lost(subject, reason)`` (when given) lets the service mark what the message belonged to as
    incomplete.  Returns the subscription (unsubscribe it on stop).
    """
    js = nc.jetstream()
    key = _failures_key(keys, stream, consumer)

    async def handle(msg: Any) -> None:
        try:
            adv = _advisory_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return  # not an advisory we understand (another server version): nothing to act on
        seq = adv.stream_seq
        reason = f"not acknowledged after {adv.deliveries} deliveries (max_deliver) by consumer {consumer}"
        last = None
        if r is not None:
            with contextlib.suppress(Exception):
                last = await r.hget(key, str(seq))
        if last:
            reason += f"; last failure: {last.decode(errors='replace') if isinstance(last, bytes) else last}"
        data, subject, headers = b"", "", {}
        try:
            raw = await js.get_msg(stream, seq)
            data, subject, headers = raw.data or b"", raw.subject or "", dict(raw.headers or {})
        except Exception as exc:  # noqa: BLE001 - aged out or deleted: the letter still says what happened
            reason += f"; the message is no longer in stream {stream} ({type(exc).__name__})"
        headers.update({"Nats-Stream": stream, "Nats-Stream-Seq": str(seq), "Nats-Consumer": consumer})
        await publish_dead_letter(nc, r, subjects, keys, service=service, subject=subject, reason=reason,
                                  data=data, headers=headers)
        if counter is not None:
            counter(reason)
        if lost is not None and subject:
            with contextlib.suppress(Exception):
                await lost(subject, reason)
        if r is not None:
            with contextlib.suppress(Exception):
                await r.hdel(key, str(seq))

    return await nc.subscribe(max_deliveries_subject(stream, consumer), queue=f"{service}-max-deliveries",
                              cb=handle)
