"""The notifier service: delivers each regression alert to every subscription that wants it (the file's and
those made over the web API, reloaded from Redis when they change: stored.py).

It reads the alerts stream with one durable consumer shared by every replica.  An alert message
is only *routed* there: for each matching subscription (services/notifier/config.py) one
delivery is queued in Redis, or the alert joins that subscription's daily digest; then the
message is acked.  Sending happens in a worker loop on every replica, from the shared queue
(services/notifier/queue.py: claims with leases, exactly one delivery per alert and
subscription), so a slow or dead receiver never holds the stream back and a retry survives a
restart.

A failed attempt is retried after an exponential backoff with full jitter until
``retry_for_s`` has passed since the first, then dead-lettered on ``<ns>.deadletter.notifier``
with the reason; a 4xx answer (but 408/425/429) is final at once.  Each attempt first reads the
alert's state (shared/alertstate.py): a muted series or an acknowledged alert is not delivered
(counted as suppressed).  docs/alerts.md is the user's description.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec
from nats.js.api import StreamConfig

from buildtel.services.analyzer.alerts import Alert, alert_decoder
from buildtel.services.analyzer.api import alerts_stream_config
from buildtel.services.analyzer.subjects import AnalyzerSubjects
from buildtel.services.notifier import payload, stored
from buildtel.services.notifier.config import Loaded, Subscription, load
from buildtel.services.notifier.queue import Job, Queue, digest_period
from buildtel.shared import alertstate, keymigrate
from buildtel.shared.bus import publish_dead_letter
from buildtel.shared.service import BusService, Consumer, Worker
from buildtel.shared.settings import Settings
from buildtel.shared.stackfile import read_stack_file

RETRYABLE_4XX = (408, 425, 429)
CONCURRENCY = 16  # deliveries one replica has in flight at once


class Failed(Exception):
    """One attempt failed; ``final``: retrying cannot help (a 4xx, a redirect)."""

    def __init__(self, reason: str, *, final: bool = False) -> None:
        super().__init__(reason)
        self.final = final


class NotifierService(BusService):
    name = "notifier"
    description = "Delivers regression alerts to webhooks, Slack/Mattermost and NATS subjects"

    def __init__(self, settings: Settings, nats_url: str, redis_url: str, *, metrics_port: int | None = None,
                 config: Loaded | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(settings, nats_url, redis_url, metrics_port=metrics_port)
        # The file is read once, at construction: a bad one fails `buildtel up`/`serve` at once.
        self.config = config if config is not None else load(settings.alerts_config)
        self.clock = clock  # tests move the clock to a digest's hour instead of waiting for it
        self.queue: Queue | None = None
        self.http: aiohttp.ClientSession | None = None
        self.wake = asyncio.Event()
        self.routed = 0
        self.stale = 0
        self.results: dict[str, int] = {"done": 0, "dead": 0, "suppressed": 0, "failed": 0}
        self.retries = 0
        # Subscriptions made over the web API (stored.py), reloaded when their version moves.
        self.api_subs: tuple[Subscription, ...] = ()
        self.api_secrets: dict[str, bytes] = {}
        self.api_subs_version = -1

    @property
    def subscriptions(self) -> list[Subscription]:
        """The file's subscriptions for this tenant, then the API's whose id the file does not use."""
        mine = self.config.for_tenant(self.settings.namespace)
        taken = {s.id for s in self.config.subscriptions}
        return mine + [s for s in self.api_subs if s.id not in taken]

    def _secret(self, sub_id: str) -> bytes | None:
        if any(s.id == sub_id for s in self.config.subscriptions):
            return self.config.secrets.get(sub_id)
        return self.api_secrets.get(sub_id)

    def streams(self) -> list[StreamConfig]:
        return [alerts_stream_config(AnalyzerSubjects(self.subjects))]

    def consumers(self) -> list[Consumer]:
        return [Consumer(stream=self.subjects.alerts_stream, subject=self.subjects.alerts_all, durable="notifier",
                         handler=self._route, what="route", cancel_idle_fetch=True, nak_delay=lambda n: 1.0)]

    def workers(self) -> list[Worker]:
        return [Worker("deliver", self._deliver_loop), Worker("digest", self._digest_loop),
                Worker("subscriptions", self._subscriptions_loop)]

    def counters(self) -> dict[str, float]:
        return {"alerts_routed_total": self.routed, "alerts_stale_total": self.stale,
                "deliveries_ok_total": self.results["done"], "deliveries_failed_total": self.results["failed"],
                "deliveries_dead_total": self.results["dead"],
                "deliveries_suppressed_total": self.results["suppressed"], "delivery_retries_total": self.retries,
                "subscriptions": len(self.subscriptions)}

    async def prepare(self, stack: Any) -> None:
        for w in self.config.warnings:
            self.log.warning("notifier.config_readable", warning=w)
        self.queue = Queue(self.redis, self.keys, self.owner)
        await keymigrate.run("notifier", keymigrate.migrate_notifier(self.redis, self.keys))  # pre-tag keys
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.delivery.timeout_s))
        stack.push_async_callback(self.http.close)  # after the workers stopped (callbacks run in reverse)
        try:
            await self._reload_api()
        except Exception as exc:  # noqa: BLE001 - Redis away at start: the loop below tries again
            self.log.warning("notifier.api_subscriptions_failed", error=f"{type(exc).__name__}: {exc}")

    async def started_fields(self) -> dict[str, Any]:
        return {"subscriptions": [s.id for s in self.subscriptions], "stream": self.subjects.alerts_stream,
                "api_subscriptions": len(self.api_subs)}

    def stopped_fields(self) -> dict[str, Any]:
        return {"routed": self.routed, **self.results}

    # -- routing (the consumer) ----------------------------------------------------------------
    async def _route(self, msg: Any) -> None:
        try:
            alert = alert_decoder.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await self.dead_letter(msg, f"not an alert: {exc}", code="invalid")
            return
        assert self.queue is not None
        now = self.clock()
        if now - alert.detected_at > self.config.delivery.max_alert_age_s:
            self.stale += 1  # history replayed to a new consumer: too old to page anyone about
            await msg.ack()
            return
        for sub in self.subscriptions:
            if not sub.matches(alert, self.settings.namespace):
                continue
            if sub.digest == "daily":
                hour = sub.digest_hour if sub.digest_hour is not None else self.config.delivery.digest_hour
                period, send_at = digest_period(now, hour)
                await self.queue.add_to_digest(sub.id, alert, period, send_at)
            else:
                await self.queue.enqueue(Job(sub=sub.id, item=alert.id, alerts=[alert], created=now), now)
        self.routed += 1
        await msg.ack()
        self.wake.set()

    # -- delivering (every replica) ------------------------------------------------------------
    async def _deliver_loop(self) -> None:
        assert self.queue is not None
        busy: set[str] = set()
        gate = asyncio.Semaphore(CONCURRENCY)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while not self.stopping.is_set():
                try:
                    due = await self.queue.due(self.clock(), 4 * CONCURRENCY)
                except Exception as exc:  # noqa: BLE001 - Redis away: the queue is still there later
                    self.log.warning("notifier.queue_failed", error=f"{type(exc).__name__}: {exc}")
                    due = []
                for key in due:
                    if key in busy:
                        continue
                    await gate.acquire()
                    busy.add(key)
                    task = asyncio.create_task(self._deliver_one(key))
                    tasks.add(task)
                    task.add_done_callback(self._finished(tasks, busy, key, gate))
                if len(due) < 4 * CONCURRENCY and await self.idle(self.config.delivery.poll_s, self.wake):
                    break
        finally:
            if tasks:  # an attempt in flight ends within timeout_s; its claim protects it anyway
                await asyncio.wait(tasks, timeout=self.config.delivery.timeout_s + 1)

    @staticmethod
    def _finished(tasks: set[asyncio.Task[None]], busy: set[str], key: str,
                  gate: asyncio.Semaphore) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            tasks.discard(task)
            busy.discard(key)
            gate.release()
        return done

    async def _deliver_one(self, key: str) -> None:
        assert self.queue is not None
        d = self.config.delivery
        try:
            job = await self.queue.claim(key, self.clock(), d.lease_s)
            if job is None:
                return
            sub = next((s for s in self.subscriptions if s.id == job.sub), None)
            if sub is None:  # the subscription was removed from the file since
                await self.queue.end(job, "dead")
                await self._dead_letter(job, f"subscription {job.sub!r} no longer exists", "no_subscription")
                return
            items = await self._with_state(job)
            if not items:
                self.results["suppressed"] += 1
                await self.queue.end(job, "suppressed")
                return
            try:
                await self._send(sub, job, items)
            except Failed as exc:
                await self._failed(job, str(exc), exc.final)
                return
            self.results["done"] += 1
            await self.queue.end(job, "done")
        except Exception as exc:  # noqa: BLE001 - Redis or NATS away: the claim expires, it is retried
            self.log.error("notifier.delivery_error", subscription=key.split("|")[0],
                           error=f"{type(exc).__name__}: {exc}")

    async def _with_state(self, job: Job) -> list[tuple[Alert, alertstate.AlertState]]:
        """The job's alerts with their state, without the muted and acknowledged ones."""
        found = await alertstate.states(self.redis, self.keys, [
            (a.id, alertstate.series_key(a.kind, a.branch, a.target), a.detected_at) for a in job.alerts])
        return [(a, s) for a, s in zip(job.alerts, found, strict=True) if s.status == "open"]

    async def _failed(self, job: Job, reason: str, final: bool) -> None:
        assert self.queue is not None
        d = self.config.delivery
        self.results["failed"] += 1
        job.attempts += 1
        job.last_error = reason[:500]
        now = self.clock()
        delay = random.uniform(0, min(d.backoff_max_s, d.backoff_initial_s * 2 ** (job.attempts - 1)))
        self.log.warning("notifier.attempt_failed", subscription=job.sub, item=job.item, attempt=job.attempts,
                         error=job.last_error, final=final)
        if final or now + delay - job.created > d.retry_for_s:
            why = ("refused" if final else f"still failing after {now - job.created:.0f} s (retry_for_s "
                   f"{d.retry_for_s:g})")
            await self._dead_letter(job, f"delivery to subscription {job.sub!r} {why}, {job.attempts} "
                                         f"attempt(s); last error: {job.last_error}",
                                    "refused" if final else "retries_exhausted")
            await self.queue.end(job, "dead")
            return
        self.retries += 1
        await self.queue.retry(job, now + delay)

    async def _dead_letter(self, job: Job, reason: str, code: str) -> None:
        self.results["dead"] += 1
        self.dead_letters += 1
        self.rejected[code] = self.rejected.get(code, 0) + 1
        self.log.warning("notifier.dead_letter", subscription=job.sub, item=job.item, code=code, reason=reason[:300])
        a = job.alerts[0]
        await publish_dead_letter(self.nc, self.redis, self.subjects, self.keys, service=self.name,
                                  subject=self.subjects.alert(a.kind, a.branch, a.target), reason=reason,
                                  data=msgspec.json.encode(job.alerts),
                                  headers={"Buildtel-Reason-Code": code, "Buildtel-Subscription": job.sub,
                                           payload.DELIVERY: self._delivery_id(job)})
        await self.redis.incr(self.keys.dead_letters(self.name, code))

    def _delivery_id(self, job: Job) -> str:
        return payload.delivery_id(self.settings.namespace, job.sub, job.item)

    def _web_url(self) -> str | None:
        if self.settings.web_url:
            return self.settings.web_url
        info = read_stack_file(self.settings)  # `buildtel up` writes its dashboard's address there
        return str(info["web_url"]) if info and info.get("web_url") else None

    async def _send(self, sub: Subscription, job: Job, items: list[tuple[Alert, alertstate.AlertState]]) -> None:
        body = payload.body("digest" if job.period else "alert", delivery=self._delivery_id(job), subscription=sub.id,
                            tenant=self.settings.namespace, items=items, web=self._web_url(), period=job.period)
        secret = self._secret(sub.id)
        if sub.kind == "nats":
            data = payload.encode(body)
            try:
                await self.nc.publish(self.subjects.notify(sub.subject or ""), data,
                                      headers=payload.headers(body, data, secret, self.clock()))
                await self.nc.flush(timeout=5)
            except Exception as exc:  # noqa: BLE001 - NATS away: retried like a failed POST
                raise Failed(f"publish: {type(exc).__name__}") from None
            return
        data = msgspec.json.encode(payload.slack(body)) if sub.kind == "slack" else payload.encode(body)
        assert self.http is not None and sub.url
        try:
            async with self.http.post(sub.url, data=data, headers=payload.headers(body, data, secret, self.clock()),
                                      allow_redirects=False) as resp:
                status = resp.status
                await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            # Never the URL (a Slack webhook's path is its credential): the exception's kind and,
            # for a refused connection, which host.
            host = getattr(getattr(exc, "conn_key", None), "host", None)
            raise Failed(f"{type(exc).__name__}" + (f" ({host})" if host else "")) from None
        if 200 <= status < 300:
            return
        final = 300 <= status < 500 and status not in RETRYABLE_4XX
        raise Failed(f"HTTP {status}", final=final)

    # -- subscriptions made over the API ---------------------------------------------------------
    async def _reload_api(self) -> None:
        """Re-read the API's subscriptions when their version moved (one GET when it did not)."""
        v = await stored.version(self.redis, self.keys)
        if v == self.api_subs_version:
            return
        found, bad = await stored.load_all(self.redis, self.keys)
        for b in bad:
            self.log.error("notifier.api_subscription_unreadable", entry=b[:300])
        taken = {s.id for s in self.config.subscriptions}
        for st in found:
            if st.subscription.id in taken:
                self.log.warning("notifier.api_subscription_shadowed", subscription=st.subscription.id,
                                 why="the subscriptions file has the same id; the file's is used")
        self.api_secrets = {st.subscription.id: st.subscription.secret.encode()
                            for st in found if st.subscription.secret}
        self.api_subs = tuple(msgspec.structs.replace(st.subscription, secret=None) for st in found)
        self.api_subs_version = v
        self.log.info("notifier.api_subscriptions", version=v, subscriptions=[s.id for s in self.api_subs])

    async def _subscriptions_loop(self) -> None:
        while not self.stopping.is_set():
            try:
                await self._reload_api()
            except Exception as exc:  # noqa: BLE001 - Redis away: the subscriptions in hand stay in use
                self.log.warning("notifier.api_subscriptions_failed", error=f"{type(exc).__name__}: {exc}")
            if await self.idle(self.config.delivery.poll_s):
                return

    # -- daily digests ---------------------------------------------------------------------------
    async def _digest_loop(self) -> None:
        assert self.queue is not None
        while not self.stopping.is_set():
            try:
                for sub, period in await self.queue.due_digests(self.clock()):
                    if await self.queue.queue_digest(sub, period, self.clock()):
                        self.wake.set()
            except Exception as exc:  # noqa: BLE001 - Redis away: the digest is still due next time
                self.log.warning("notifier.digest_failed", error=f"{type(exc).__name__}: {exc}")
            if await self.idle(self.config.delivery.poll_s):
                return
