"""Analyzer service: regression alerts from completed sessions, and analytics on request.

Work split (any number of replicas, see ``docs/analytics.md``):

* sessions: every replica pulls from ONE durable JetStream consumer (``analyzer``)
  on the sessions stream, so each session goes to one replica at a time; a session
  is acknowledged only after all its series are folded and its alerts are out, so
  a replica killed mid-way leaves it to be redelivered (after ``ack_wait_s``);
* series: detector state lives in Redis, one hash per series with a version; a
  replica reads, folds in Python, and commits with a compare-and-set script
  (``lua.COMMIT``) that also records "this session was folded into this series",
  so two replicas folding consecutive sessions of one series serialise (the loser
  re-reads and re-folds) and a redelivered session is never counted twice;
* alerts: committed into an outbox in the same script, then published to
  JetStream with ``Nats-Msg-Id`` = alert id (hash of session id + series) and
  removed from the outbox; a sweeper in every replica republishes what a dead
  replica left there, and the stream's duplicate window drops the copy;
* requests: a NATS micro service, queue group ``q``: one replica answers each.

Nothing lives only in a replica's memory, so SIGKILL loses no state.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import msgspec

from buildtel.services.analyzer import fetch, lua
from buildtel.services.analyzer.alerts import (
    Alert,
    alert_decoder,
    encode_alert,
    fold,
    history,
    series_points,
)
from buildtel.services.analyzer.analytics import ReportFilter, TelemetryAnalyzer
from buildtel.services.analyzer.api import (
    API_VERSION,
    AnalyzerStats,
    FlameGraphSelection,
    alerts_stream_config,
    flame_request_decoder,
    request_decoder,
)
from buildtel.services.analyzer.columns import gc_paused
from buildtel.services.analyzer.explainer import explain_alert
from buildtel.services.analyzer.flamerender import flame_reply
from buildtel.services.analyzer.hostload import NORMAL, Judgement, judge
from buildtel.services.analyzer.rowreport import report_from_frame
from buildtel.services.analyzer.subjects import AnalyzerSubjects
from buildtel.shared import keymigrate
from buildtel.shared.bus import MAX_DELIVER
from buildtel.shared.codec import decode_session
from buildtel.shared.flamegraph.sessions import flame_options
from buildtel.shared.keys import SHARDS, shard
from buildtel.shared.partitions import consumer_filters
from buildtel.shared.protocol import BuildSession
from buildtel.shared.rediscluster import is_noscript, load_scripts
from buildtel.shared.service import (
    BAD_GATEWAY,
    BAD_REQUEST,
    NOT_FOUND,
    TOO_LARGE,
    BusService,
    Consumer,
    Endpoint,
    ServiceError,
    Worker,
)
from buildtel.shared.settings import Settings

DURABLE = "analyzer"
# One session per fetch: nats-py's fetch(n > 1) waits for n messages or its timeout once it is
# long-polling, which would delay a lone session by up to the timeout; and a series stays close
# to stream order across replicas (at most one session in flight per replica).
FETCH_BATCH = 1
ACK_WAIT_S = 10.0  # a dead replica's unacked sessions come back after this
DONE_TTL_S = 3 * 86400  # how long "session S was folded into series X" is remembered
SERIES_TTL_S = 30 * 86400  # a series nobody fed for this long (a merged branch) is forgotten
OUTBOX_INTERVAL_S = 1.0
OUTBOX_GRACE_S = 2.0  # leave a fresh outbox entry to the replica that is publishing it
MAX_CAS_ATTEMPTS = 100
THREAD_FOLD_OVER = 16  # series per session above which folding runs off the event loop
COMMIT_CHUNK = 2000  # series read, folded and committed per Redis round trip (bounded replies and scripts)
POISON_DELIVERIES = MAX_DELIVER  # a session that failed this often is dead-lettered, not retried forever
EXPLAIN_TIMEOUT_S = 3.0  # per storage or recorder request while explaining an alert (then it goes out with a note)
_REPLY_OVERHEAD = 4096
FLAME_REPLY_LIMIT: int | None = None  # bytes; None = the server's max_payload (tests lower it)
_enc = msgspec.msgpack.Encoder()


def _series_of(data: bytes) -> str:
    """The series of an encoded outbox alert (for shared/keymigrate.py); ValueError if unreadable."""
    try:
        return alert_decoder.decode(data).series
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(str(exc)) from None


class AnalyzerService(BusService):
    name = "analyzer"
    api_version = API_VERSION
    description = "Builder Telemetry analytics and regression alerts"

    def __init__(self, settings: Settings, nats_url: str, redis_url: str, *, ack_wait_s: float = ACK_WAIT_S,
                 storage_timeout_s: float = 10.0, metrics_port: int | None = None) -> None:
        super().__init__(settings, nats_url, redis_url, metrics_port=metrics_port)
        self.asubjects = AnalyzerSubjects(self.subjects)
        self.ack_wait_s = ack_wait_s
        self.storage_timeout_s = storage_timeout_s  # per request to storage (a report pages: many requests)
        # Counters of this replica, for tests and logs.
        self.sessions_in = 0
        self.alerts_out = 0
        self.requests = 0
        self.conflicts = 0

    # -- declarations (shared/service.py) -------------------------------------------------------
    def streams(self) -> list[Any]:
        return [alerts_stream_config(self.asubjects)]

    def consumers(self) -> list[Consumer]:
        # Sessions that fail in _handle are dead-lettered on their POISON_DELIVERIES-th delivery; one a
        # replica never finishes (dies on, or is too slow for) from the server's advisory.
        return [Consumer(stream=self.subjects.sessions_stream, subject=self.subjects.sessions_completed,
                         durable=DURABLE, handler=self._handle, what="session", fetch=FETCH_BATCH,
                         fetch_timeout_s=1.0, ack_wait_s=self.ack_wait_s, max_ack_pending=256,
                         max_deliver=MAX_DELIVER, poison_after=POISON_DELIVERIES, failure_pause_s=0.2,
                         filter_subjects=consumer_filters(self.subjects, self.settings.storage_partitions))]

    def endpoints(self) -> list[Endpoint]:
        e = self.asubjects.endpoint
        return [Endpoint("report", e("report"), self._api_report), Endpoint("stats", e("stats"), self._api_stats),
                Endpoint("flamegraph", e("flamegraph"), self._api_flamegraph)]

    def workers(self) -> list[Worker]:
        return [Worker("outbox", self._sweep_outbox)]

    async def prepare(self, stack: AsyncExitStack) -> None:
        self._commit = self.redis.register_script(lua.COMMIT)
        self._seen = self.redis.register_script(lua.SESSION_SEEN)
        await load_scripts(self.redis, self._commit)  # a cluster pipeline does not load it itself
        await keymigrate.run("analyzer", keymigrate.migrate_analyzer(self.redis, self.keys, _series_of))

    def counters(self) -> dict[str, float]:
        return {"sessions_in_total": self.sessions_in, "alerts_total": self.alerts_out, "requests_total": self.requests,
                "conflicts_total": self.conflicts}

    async def started_fields(self) -> dict[str, Any]:
        return {"stream": self.subjects.sessions_stream, "alerts": self.subjects.alerts_stream}

    def stopped_fields(self) -> dict[str, Any]:
        return {"sessions": self.sessions_in, "alerts": self.alerts_out, "requests": self.requests}

    # -- sessions ----------------------------------------------------------------------------
    async def _handle(self, msg: Any) -> None:
        try:
            with gc_paused():
                session = decode_session(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self.dead_letter(msg, f"undecodable session: {exc}")
            return
        meta = msg.metadata
        if meta.num_delivered > 1:
            await self.redis.hincrby(self.keys.analyzer_stats(shard(session.id)), "redelivered", 1)
        alerts = await self.fold_session(session, seq=meta.sequence.stream, progress=msg.in_progress)
        for a in alerts:
            # Explaining an alert may wait for storage (explainer.NOT_FOUND_WAIT_S): keep the
            # session ours meanwhile rather than let the ack wait hand it to another replica.
            with contextlib.suppress(Exception):
                await msg.in_progress()
            await self._publish(a, session, progress=msg.in_progress)
        # Counted once per session id (a marker in its done hash), after all its series are folded.
        n = shard(session.id)
        await self._seen(keys=[self.keys.analyzer_done(session.id, n), self.keys.analyzer_stats(n)], args=[DONE_TTL_S])
        await msg.ack()
        self.sessions_in += 1

    def _series_key(self, series: str) -> str:
        return self.keys.analyzer_series(series)

    async def fold_session(self, session: BuildSession, seq: int | None = None,
                           progress: Callable[[], Awaitable[Any]] | None = None) -> list[Alert]:
        """Fold every series point of ``session`` exactly once; return the alerts this call committed.

        ``seq`` (the session's stream sequence) lets a late redelivery be recognised (alerts.LATE_WINDOW).
        ``progress`` is called after every chunk of series: JetStream's "in progress", so a build
        whose folding outlasts the ack wait is not redelivered (and counted towards poison) meanwhile."""
        pending = {p.series: p for p in series_points(session)}
        committed: list[Alert] = []
        # What the build's targets say of its machine, judged once from the first chunk's states
        # (all of them up to COMMIT_CHUNK series; a bigger build is judged on its first targets).
        judgement: Judgement | None = None
        decoded: dict[str, tuple[bytes, Any]] = {}  # states the judgement decoded, for folding to reuse
        for attempt in range(MAX_CAS_ATTEMPTS):
            if not pending:
                return committed
            retry: dict[str, Any] = {}
            every = list(pending)
            # In bounded chunks: each series commits on its own (per-series compare-and-set and done
            # marker), and one script call or pipeline over the ~640,000 series of a huge build
            # timed out writing to Redis and had the session dead-lettered.
            for i in range(0, len(every), COMMIT_CHUNK):
                # Grouped by shard (shared/keys.py): a series, its done marker, the outbox and the
                # counters it commits to share one hash slot, so one COMMIT per shard.
                groups: dict[int, list[str]] = {}
                for name in every[i:i + COMMIT_CHUNK]:
                    groups.setdefault(shard(name), []).append(name)
                names = [name for group in groups.values() for name in group]
                pipe = self.redis.pipeline(transaction=False)
                for name in names:
                    pipe.hmget(self._series_key(name), "v", "s")
                for n, group in groups.items():
                    pipe.hmget(self.keys.analyzer_done(session.id, n), group)
                states = await pipe.execute()
                done_flags = [f for per in states[len(names):] for f in per]
                states = states[:len(names)]
                if judgement is None:
                    judgement = judge(session, history({nm: st[1] for nm, st in zip(names, states, strict=True)},
                                                       pending, session.id, decoded))
                batch = (session, seq, names, states, done_flags, pending, time.time(), judgement, decoded)
                if len(names) > THREAD_FOLD_OVER:
                    # ~0.5 ms per series: a 200-target session would hold the event loop for 100 ms,
                    # and with it the replies of this replica's analytics API.
                    tried = await asyncio.to_thread(self._fold_batch, *batch)
                else:
                    tried = self._fold_batch(*batch)
                if not tried:
                    continue
                statuses = await self._commit_by_shard(session.id, tried)
                for (name, alert, _), status in zip(tried, statuses, strict=True):
                    if int(status) == 0:
                        retry[name] = pending[name]
                    elif int(status) == 1 and alert is not None:
                        committed.append(alert)
                if progress is not None and len(every) > COMMIT_CHUNK:
                    with contextlib.suppress(Exception):  # the ack wait is a hint; folding goes on
                        await progress()
            if retry:
                self.conflicts += len(retry)
                # Another replica is folding the same series: back off a little, re-read, re-fold.
                await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
            pending = retry
        if not pending:
            return committed
        raise RuntimeError(f"session {session.id}: series kept changing under {MAX_CAS_ATTEMPTS} attempts")

    def _fold_batch(self, session: BuildSession, seq: int | None, names: list[str], states: list[Any],
                    done_flags: list[Any], pending: dict[str, Any], now: float, judgement: Judgement = NORMAL,
                    decoded: dict[str, tuple[bytes, Any]] | None = None
                    ) -> list[tuple[str, Alert | None, list[Any]]]:
        """Fold the series not yet folded for ``session``: (series, alert, its six COMMIT
        arguments) in commit order.  CPU only, so it may run in a worker thread."""
        tried: list[tuple[str, Alert | None, list[Any]]] = []
        for name, (version, state), done in zip(names, states, done_flags, strict=True):
            if done is not None:
                continue  # folded before (a redelivery): nothing to do for this series
            # The judgement's decoded copy, once, and only of these very bytes (a re-read differs).
            seen = decoded.pop(name, None) if decoded is not None else None
            new_state, alert, late = fold(state, pending[name], session, now=now, seq=seq, judgement=judgement,
                                          decoded=seen[1] if seen is not None and seen[0] is state else None)
            tried.append((name, alert, [name, int(version or 0), new_state, alert.id if alert else "",
                                        encode_alert(alert) if alert else "", "1" if late else "0"]))
        return tried

    async def _commit_by_shard(self, sid: str, tried: list[tuple[str, Alert | None, list[Any]]]) -> list[Any]:
        """One COMMIT per shard of the ``tried`` series (one round trip for all); their statuses in
        the order of ``tried``."""
        groups: dict[int, list[int]] = {}
        for j, (name, _, _) in enumerate(tried):
            groups.setdefault(shard(name), []).append(j)
        pipe = self.redis.pipeline(transaction=False)
        k = self.keys
        for n, idx in groups.items():
            args: list[Any] = [DONE_TTL_S, SERIES_TTL_S]
            for j in idx:
                args += tried[j][2]
            await self._commit(keys=[k.analyzer_done(sid, n), k.analyzer_outbox(n), k.analyzer_stats(n),
                                     *(self._series_key(tried[j][0]) for j in idx)], args=args, client=pipe)
        try:
            results = await pipe.execute()
        except Exception as exc:
            if is_noscript(exc):  # a cluster node restarted without its scripts: load them for the retry
                with contextlib.suppress(Exception):
                    await load_scripts(self.redis, self._commit)
            raise
        statuses: list[Any] = [None] * len(tried)
        for idx, res in zip(groups.values(), results, strict=True):
            for j, status in zip(idx, res, strict=True):
                statuses[j] = status
        return statuses

    async def _publish(self, alert: Alert, session: BuildSession | None = None,
                       progress: Callable[[], Awaitable[Any]] | None = None) -> None:
        # The explanation needs the two stored builds either side of the change: fetched now, not
        # at commit time (folding does no I/O); the sweeper's republish explains it the same way.
        alert = await explain_alert(alert, nc=self.nc, redis=self.redis, keys=self.keys,
                                    namespace=self.settings.namespace, timeout=EXPLAIN_TIMEOUT_S, session=session,
                                    progress=progress)
        subject = self.subjects.alert(alert.kind, alert.branch, alert.host if alert.kind == "host" else alert.target)
        try:
            await self.js.publish(subject, encode_alert(alert), timeout=5.0,
                                  headers={"Nats-Msg-Id": alert.id, "Buildtel-Alert-Direction": alert.direction})
        except Exception as exc:  # noqa: BLE001 - it stays in the outbox; the sweeper retries
            self.log.warning("analyzer.alert_publish_failed", alert=alert.id, error=repr(exc))
            return
        await self.redis.hdel(self.keys.analyzer_outbox(shard(alert.series)), alert.id)
        self.alerts_out += 1
        self.log.info("analyzer.alert", id=alert.id, series=alert.series, direction=alert.direction,
                 change_pct=round(alert.change_pct, 1), session_id=alert.first_session_id,
                 commits=alert.commit_range)

    async def _sweep_outbox(self) -> None:
        while not await self.idle(OUTBOX_INTERVAL_S):
            try:
                await self.sweep_outbox_once()
            except Exception as exc:  # noqa: BLE001 - Redis/NATS blips: next round retries
                self.log.warning("analyzer.outbox_failed", error=repr(exc))

    async def sweep_outbox_once(self, grace_s: float = OUTBOX_GRACE_S) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for shard_n in range(SHARDS):
            pipe.hgetall(self.keys.analyzer_outbox(shard_n))
        now, n = time.time(), 0
        for shard_n, entries in enumerate(await pipe.execute()):
            for raw_id, data in entries.items():
                try:
                    alert = alert_decoder.decode(data)
                except (msgspec.DecodeError, msgspec.ValidationError):
                    self.log.error("analyzer.outbox_undecodable", alert=raw_id.decode(errors="replace"))
                    await self.redis.hdel(self.keys.analyzer_outbox(shard_n), raw_id)
                    continue
                if now - alert.detected_at >= grace_s:
                    await self._publish(alert)
                    n += 1
        return n

    async def outbox_size(self) -> int:
        """Alerts committed but not yet published, over every shard."""
        pipe = self.redis.pipeline(transaction=False)
        for n in range(SHARDS):
            pipe.hlen(self.keys.analyzer_outbox(n))
        return sum(int(x) for x in await pipe.execute())

    # -- requests ----------------------------------------------------------------------------
    async def _api_report(self, data: bytes) -> bytes:
        self.requests += 1
        try:
            r = request_decoder.decode(data or b"\x80")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ServiceError(BAD_REQUEST, f"bad report request: {exc}") from None
        f = r.filter()
        analyzer = TelemetryAnalyzer(critical_paths=r.critical_paths, speedup_pct=r.speedup_pct)
        notes: list[str] = []
        try:
            # Report rows, not sessions (storage/columns.py); whole sessions only for the critical paths.
            frame = await fetch.load_frame(self.nc, self.settings.namespace, f, self.storage_timeout_s)
            recent, gone = await fetch.sessions_by_id(self.nc, self.settings.namespace,
                                                      frame.recent_ids(analyzer.critical_paths),
                                                      self.storage_timeout_s)
        except fetch.SourceError as exc:
            raise ServiceError(exc.code if exc.code == 503 else BAD_GATEWAY, exc.description) from None
        if gone:
            notes.append(f"{len(gone)} of the most recent sessions left storage (retention) before their critical "
                         f"paths were read; the bottlenecks cover the other {len(recent)}")

        def compute() -> bytes:
            rep = report_from_frame(analyzer, frame, filters=f, recent=recent, include_sessions=r.include_sessions,
                                    top_targets=r.top_targets)
            rep.notes = notes + frame.partial
            rep.partial = rep.partial or bool(frame.partial)
            rep.partial_notes = list(frame.partial)
            return _enc.encode(rep)

        data = await asyncio.to_thread(compute)
        budget = max(1024, int(self.nc.max_payload) - _REPLY_OVERHEAD)
        if len(data) > budget:
            raise ServiceError(TOO_LARGE, f"report is {len(data)} bytes, more than one NATS message ({budget}) holds: "
                                      "ask for fewer sessions, no session rows or fewer targets")
        return data

    async def _api_stats(self, data: bytes) -> bytes:
        self.requests += 1
        pipe = self.redis.pipeline(transaction=False)
        for n in range(SHARDS):
            pipe.hgetall(self.keys.analyzer_stats(n))
        c: dict[str, int] = {}
        for raw in await pipe.execute():  # the counters are kept per shard: the figures are the sums
            for k, v in raw.items():
                c[k.decode()] = c.get(k.decode(), 0) + int(v)
        stats = AnalyzerStats(sessions=c.get("sessions", 0), points=c.get("points", 0), alerts=c.get("alerts", 0),
                              late=c.get("late", 0), redelivered=c.get("redelivered", 0),
                              outbox=await self.outbox_size(), replica=self.owner)
        return _enc.encode(stats)

    # -- flame graphs (see api.FlameGraphRequest) ----------------------------------------------
    async def _api_flamegraph(self, body: bytes) -> bytes:
        self.requests += 1
        try:
            r = flame_request_decoder.decode(body or b"\x80")
            options = flame_options(r)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError, TypeError) as exc:
            raise ServiceError(BAD_REQUEST, f"bad flamegraph request: {exc}") from None
        notes: list[str] = []
        sessions = await self._flame_select(r)
        base = await self._flame_select(r.diff) if r.diff else None
        if not sessions or (base is not None and not base):
            raise ServiceError(NOT_FOUND, f"no sessions match the {'diff base' if sessions else 'selection'}")
        budget = max(1024, (FLAME_REPLY_LIMIT or int(self.nc.max_payload)) - _REPLY_OVERHEAD)
        try:
            data = await asyncio.to_thread(flame_reply, r, options, sessions, base, budget,
                                           partial=False, notes=notes)
        except ValueError as exc:
            raise ServiceError(BAD_REQUEST, f"bad flamegraph request: {exc}") from None
        if len(data) > budget:
            raise ServiceError(TOO_LARGE, f"flame graph is {len(data)} bytes even without search data, more than one "
                                      f"NATS message ({budget}) holds: raise minwidth (e.g. 1 px or '0.5%'), select "
                                      f"fewer sessions{' or leave out the folded stacks' if r.folded else ''}")
        return data

    async def _flame_select(self, sel: FlameGraphSelection) -> list[BuildSession]:
        """One session by id, or a window, from storage (the analyzer keeps no history)."""
        if sel.session and sel.filter() != ReportFilter():
            raise ServiceError(BAD_REQUEST, "give a session or a window (last/since/until/branch/outcome/target), "
                                            "not both")
        try:
            if sel.session:
                return [await fetch.session(self.nc, self.settings.namespace, sel.session, self.storage_timeout_s)]
            return await fetch.window(self.nc, self.settings.namespace, sel.filter(), self.storage_timeout_s)
        except fetch.SourceError as exc:
            what = f"session {sel.session!r}: " if sel.session else ""
            code = NOT_FOUND if exc.code == 404 else (exc.code if exc.code == 503 else BAD_GATEWAY)
            raise ServiceError(code, what + exc.description) from None
