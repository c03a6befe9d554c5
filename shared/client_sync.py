"""The synchronous side of the SDK: argument sanitising, the thread-safe event buffer, and
:class:`SyncTelemetryClient`.

:class:`Emitter` holds what every emit method touches: the pending list, the seq
counter and the counters, under one ``threading.Lock`` so that any thread may emit.
Emit methods validate with a few ``type(x) is …`` checks on the common path and
fall back to sanitisers that turn bad values into defaults, so a call never raises;
what only fails at encoding time (lone surrogates, huge ints, oversize values) is
sanitised when the batch is cut, so every accepted event reaches the collector in a
form its typed decoder takes.  The
asynchronous transport (batching, publishing, connecting) is
:class:`shared.client.TelemetryClient`, which extends :class:`Emitter`;
:class:`SyncTelemetryClient` runs it on a private event loop in a daemon thread.
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import os
import re
import shlex
import socket
import threading
import time
import weakref
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Self

import msgspec

from shared.protocol import (
    BuildEnvironment,
    BuildFinished,
    BuildStarted,
    HealthCheckpoint,
    Phase,
    TargetFinished,
    TargetStarted,
    is_session_id,
    new_session_id,
)
from shared.redaction import redact_argv, redact_env
from shared.settings import Settings

if TYPE_CHECKING:
    from shared.client import TelemetryClient, UrlSource

MAX_SEQ = 1 << 24  # the collector refuses higher seqs (it keeps one bit per seq)
_now = time.time


# -- sanitising: a bad value becomes a default, never an exception -------------------------------
_MAX_STR = 4096  # characters per string field
_MAX_ITEMS = 2000  # entries per list or dict field
_BIG = 1 << 62  # numbers beyond this are nonsense and would overflow int64 on the wire
_STATUSES = ("success", "failed", "skipped", "cancelled")
_CACHES = ("miss", "local_hit", "remote_hit", "uncacheable")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
# The collector keys Redis hashes with "agent:seq" and "agent|target"; Msg-Id uses ':'.
_BAD_AGENT_CHARS = re.compile(r"[:|\s\x00-\x1f\x7f]")


def _text(v: Any, default: str = "") -> str:
    if v is None:
        return default
    if type(v) is not str:
        try:
            if isinstance(v, (bytes, bytearray, memoryview)):
                v = bytes(v).decode("utf-8", "replace")
            else:  # str subclasses too: msgspec encodes exact str only
                v = str.__str__(v) if isinstance(v, str) else str(v)
        except Exception:  # noqa: BLE001 - a __str__ that raises
            return default
    if len(v) > _MAX_STR:
        v = v[:_MAX_STR]
    if not v.isascii():  # lone surrogates cannot be encoded as UTF-8
        v = v.encode("utf-8", "replace").decode("utf-8")
    return v


def _opt_text(v: Any) -> str | None:
    return None if v is None else _text(v)


def _number(v: Any, default: float | None) -> float | None:
    if type(v) is not float:
        if v is None:
            return default
        try:
            v = float(v)
        except Exception:  # noqa: BLE001
            return default
    return v if -_BIG < v < _BIG else default  # also rejects NaN and infinities


def _integer(v: Any, default: int | None = None, *, lo: int = -_BIG) -> int | None:
    if type(v) is not int:
        if v is None:
            return default
        try:
            v = int(v) if not isinstance(v, float) or -_BIG < v < _BIG else default
        except Exception:  # noqa: BLE001
            return default
    return v if v is not None and lo <= v < _BIG else default


def _choice(v: Any, allowed: tuple[str, ...], default: Any) -> Any:
    try:
        for a in allowed:
            if v == a:
                return a
    except Exception:  # noqa: BLE001, S110 - an __eq__ that raises
        pass
    return default


def _str_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, (str, bytes)):
        return [_text(v)]
    try:
        return [_text(x) for x in itertools.islice(iter(v), _MAX_ITEMS)]
    except Exception:  # noqa: BLE001
        return []


def _str_dict(v: Any) -> dict[str, str]:
    try:
        items = v.items() if hasattr(v, "items") else v
        return {_text(k): _text(x) for k, x in itertools.islice(iter(items), _MAX_ITEMS)} if v else {}
    except Exception:  # noqa: BLE001
        return {}


def _argv(v: Any) -> list[str]:
    if isinstance(v, str):
        try:
            v = shlex.split(v)
        except ValueError:
            v = [v]
    return redact_argv(_str_list(v))


def _phases(v: Any) -> list[Phase]:
    out: list[Phase] = []
    try:
        for p in itertools.islice(iter(v), _MAX_ITEMS):
            try:
                if isinstance(p, Phase):
                    name, dur = p.name, p.duration_s
                elif isinstance(p, Mapping):
                    name, dur = p.get("name"), p.get("duration_s")
                else:
                    name, dur = p  # (name, seconds)
                out.append(Phase(_text(name), _number(dur, 0.0)))  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001, S112 - skip the one bad phase
                continue
    except Exception:  # noqa: BLE001, S110 - not iterable
        pass
    return out


def _environment(v: Any) -> BuildEnvironment | None:
    if v is None:
        return None
    try:
        env = msgspec.convert(msgspec.to_builtins(v) if isinstance(v, msgspec.Struct) else v,
                              BuildEnvironment, strict=False)
    except Exception:  # noqa: BLE001
        return None
    for f in ("os", "os_release", "arch", "hostname", "user", "cwd", "python"):
        setattr(env, f, _text(getattr(env, f)))
    env.cpus, env.memory_bytes = _integer(env.cpus, 0, lo=0), _integer(env.memory_bytes, 0, lo=0)
    env.tool_versions = _str_dict(env.tool_versions)
    env.env = redact_env(_str_dict(env.env))  # whoever captured it, secrets do not leave the agent
    if env.vcs is not None:
        vcs = env.vcs
        vcs.system, vcs.dirty = _text(vcs.system, "git"), vcs.dirty is True
        vcs.commit, vcs.branch, vcs.remote = _opt_text(vcs.commit), _opt_text(vcs.branch), _opt_text(vcs.remote)
    return env


def _counts(v: Any) -> dict[str, int] | None:
    try:
        return {_agent_id(k): _integer(c, 0, lo=0) for k, c in itertools.islice(iter(v.items()), _MAX_ITEMS)} or None
    except Exception:  # noqa: BLE001 - None, or not a mapping
        return None


def _agent_id(v: Any) -> str:
    s = _text(v) if isinstance(v, str) and v else f"{socket.gethostname()}-{os.getpid()}"
    return _BAD_AGENT_CHARS.sub("_", s)[:200] or "agent"


def _nonneg(v: Any) -> int | None:
    return _integer(v, None, lo=0)


def _count(v: Any) -> int:
    return _integer(v, 0, lo=0)  # type: ignore[return-value]


def _rate(v: Any) -> float:
    return _number(v, 0.0)  # type: ignore[return-value]


# Field name -> sanitiser, shared by every event type; the few names whose meaning differs
# between types are overridden per type.  seq, session_id and agent_id are the client's own.
_FIX: dict[str, Any] = {
    "ts": lambda v: _number(v, None) or time.time(), "name": _text, "target": _text, "worker": _text,
    "command": _argv, "environment": _environment, "labels": _str_dict, "record": lambda v: type(v) in (bool, int) and bool(v),
    "traceparent": lambda v: v if type(v) is str and _TRACEPARENT.fullmatch(v) else None,
    "start": _rate, "duration_s": _rate, "cache": lambda v: _choice(v, _CACHES, "miss"),
    "status": lambda v: _choice(v, _STATUSES, "success"), "exit_code": _integer, "kind": _opt_text,
    "mnemonic": _opt_text, "cpu_s": lambda v: _number(v, None), "peak_rss_bytes": _nonneg, "deps": _str_list,
    "phases": _phases, "reasons": _str_list, "eta_s": lambda v: _number(v, None), "expected_events": _counts,
    "outcome": lambda v: _choice(v, ("success", "failed"), None),
    **dict.fromkeys(("completed_tasks", "failed_tasks", "active_tasks", "pending_tasks", "worker_count",
                     "active_workers", "memory_bytes"), _count),
    **dict.fromkeys(("memory_percent", "velocity", "throughput", "utilisation"), _rate),
}
_FIXERS: dict[type, dict[str, Any]] = {
    cls: {f: _FIX[f] for f in cls.__struct_fields__ if f in _FIX}
    for cls in (BuildStarted, TargetStarted, TargetFinished, HealthCheckpoint, BuildFinished)
}
_FIXERS[HealthCheckpoint]["status"] = lambda v: _choice(v, ("healthy", "degraded", "critical"), "healthy")
_FIXERS[BuildFinished]["exit_code"] = lambda v: _integer(v, 0)
_HEALTH_FIELDS = frozenset(HealthCheckpoint.__struct_fields__) - {"session_id", "agent_id", "seq", "ts"}


def fix_event(ev: Any) -> Any:
    """Sanitise every field of ``ev`` in place: afterwards it encodes, is bounded in size and
    passes the collector's typed decoder.  Used for unusual emit arguments and, at batch
    time, for any event whose encoding failed."""
    for f, fix in _FIXERS[type(ev)].items():
        setattr(ev, f, fix(getattr(ev, f)))
    return ev


def shrink(ev: Any) -> Any:
    """The event without its collections: what survives when it alone exceeds a batch."""
    changes = {f: type(x)() for f in ev.__struct_fields__ if isinstance(x := getattr(ev, f), (list, dict))}
    if isinstance(ev, BuildStarted):
        changes["environment"] = None
    return msgspec.structs.replace(ev, **changes)


class ClientStats(msgspec.Struct, kw_only=True):
    sent: int = 0  # events acknowledged by JetStream
    dropped: int = 0  # events refused (buffer full, closed, invalid) or unsent at close
    buffered_max: int = 0  # most events held un-acknowledged at once
    retries: int = 0  # batch re-publishes


class Emitter:
    """Identity, buffer and emit methods; thread-safe.  Subclasses provide ``_kick``."""

    def __init__(self, settings: Settings, *, session_id: str | None = None, agent_id: str | None = None,
                 name: str = "") -> None:
        if session_id is not None and not is_session_id(session_id):
            raise ValueError(f"session_id must be 32 lowercase hex digits, got {str(session_id)[:80]!r}")
        self._settings = settings
        self._on = settings.enabled
        self._sid = session_id or new_session_id()
        self._aid = _agent_id(agent_id or settings.agent_id)
        self._name = _text(name)
        self._bs = settings.batch_size
        self._limit = settings.buffer_limit
        self._lock = threading.Lock()
        self._pending: list[Any] = []
        self._seq = 0
        self._acked = 0  # events since acknowledged, or dropped after acceptance
        # Events that may still be accepted: min(buffer_limit - un-acknowledged, MAX_SEQ - seq);
        # 0 once closed.  One counter keeps the emit path's check to a single comparison.
        self._room = min(self._limit, MAX_SEQ)
        self._open = True
        self._started = False
        self._sent = self._dropped = self._buffered_max = self._retries = 0

    def _kick(self) -> None:
        """Called (from any thread) when a full batch is pending."""

    def _live(self, ev: HealthCheckpoint) -> None:
        """Called with each accepted health checkpoint, for the live (best-effort) subject."""

    @property
    def session_id(self) -> str:
        return self._sid

    @property
    def agent_id(self) -> str:
        return self._aid

    @property
    def events_emitted(self) -> int:
        """The next seq: events accepted so far."""
        return self._seq

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def stats(self) -> ClientStats:
        return ClientStats(sent=self._sent, dropped=self._dropped,
                           buffered_max=max(self._buffered_max, self._buffered), retries=self._retries)

    @property
    def _buffered(self) -> int:
        """Accepted but not yet acknowledged (pending, in a batch, or in flight)."""
        return self._seq - self._acked

    def _update_room(self) -> None:
        """After acknowledgements; call with the lock held."""
        if self._open:
            self._room = min(self._limit - (self._seq - self._acked), MAX_SEQ - self._seq)

    def _stop_accepting(self) -> bool:
        """Refuse every later event; True if this call closed the client."""
        with self._lock:
            was_open, self._open, self._room = self._open, False, 0
        return was_open

    # -- emit: never raise, never block (a lock held for a few list operations) ---------------
    def _push(self, ev: Any) -> bool:
        with self._lock:
            if self._room <= 0:
                self._dropped += 1
                return False
            self._room -= 1
            ev.seq = self._seq
            self._seq += 1
            p = self._pending
            p.append(ev)
            n = len(p)
        if n == self._bs and self._started:
            self._kick()
        return True

    def _reject(self) -> None:
        with self._lock:
            self._dropped += 1

    def build_started(self, name: str = "", command: Any = None, environment: Any = None, labels: Any = None,
                      record: bool = False, traceparent: str | None = None, *, ts: float | None = None) -> None:
        """Once per session, first.  The environment's env and the command are redacted here too;
        ``ts`` backdates the event (e.g. to when the build process was spawned)."""
        if not self._on:
            return
        try:
            self._push(fix_event(BuildStarted(
                session_id=self._sid, agent_id=self._aid, seq=0, ts=ts, name=name or self._name,
                command=command, environment=environment, labels=labels, record=record,
                traceparent=traceparent)))
        except Exception:  # noqa: BLE001 - telemetry must never break the build
            self._reject()

    def target_started(self, target: str, worker: str = "", *, ts: float | None = None) -> None:
        """``ts`` (Unix s) defaults to now; importers and simulations pass the real time."""
        if not self._on:
            return
        try:
            ev = TargetStarted(session_id=self._sid, agent_id=self._aid, seq=0,
                               ts=time.time() if ts is None else ts, target=target, worker=worker)
            if not (type(target) is str and type(worker) is str and type(ev.ts) is float):
                fix_event(ev)
            self._push(ev)
        except Exception:  # noqa: BLE001
            self._reject()

    def target_finished(self, target: str, *, start: float, duration_s: float, status: str = "success",
                        cache: str = "miss", worker: str = "", exit_code: int | None = None,
                        kind: str | None = None, mnemonic: str | None = None, cpu_s: float | None = None,
                        peak_rss_bytes: int | None = None, deps: Any = None, phases: Any = None,
                        ts: float | None = None) -> None:
        if not self._on:
            return
        try:
            ev = TargetFinished(session_id=self._sid, agent_id=self._aid, seq=0,
                                ts=_now() if ts is None else ts, target=target,
                                start=start, duration_s=duration_s, status=status, cache=cache, worker=worker,
                                exit_code=exit_code, kind=kind, mnemonic=mnemonic, cpu_s=cpu_s,
                                peak_rss_bytes=peak_rss_bytes)
            # Cheap checks for what the collector's decoder would reject; what only fails to
            # encode (lone surrogates, huge ints, oversize strings) is fixed at batch time.
            if not (type(target) is str and type(start) is float and type(duration_s) is float
                    and type(ev.ts) is float
                    and status in _STATUSES and cache in _CACHES and type(worker) is str
                    and (exit_code is None or type(exit_code) is int)
                    and (cpu_s is None or type(cpu_s) is float)
                    and (peak_rss_bytes is None or type(peak_rss_bytes) is int)
                    and (kind is None or type(kind) is str) and (mnemonic is None or type(mnemonic) is str)):
                fix_event(ev)
            # Set only when given: passing empty lists to the constructor costs more than the rest.
            if deps is not None:
                ev.deps = _str_list(deps)
            if phases is not None:
                ev.phases = _phases(phases)
            with self._lock:  # _push, inlined on the hottest path
                if self._room <= 0:
                    self._dropped += 1
                    return
                self._room -= 1
                ev.seq = self._seq
                self._seq += 1
                p = self._pending
                p.append(ev)
                n = len(p)
            if n == self._bs and self._started:
                self._kick()
        except Exception:  # noqa: BLE001
            self._reject()

    def health(self, *, ts: float | None = None, **fields: Any) -> None:
        """A :class:`HealthCheckpoint`; unknown field names are ignored, bad values defaulted."""
        if not self._on:
            return
        try:
            known = {k: v for k, v in fields.items() if k in _HEALTH_FIELDS}
            ev = fix_event(HealthCheckpoint(session_id=self._sid, agent_id=self._aid, seq=0,
                                            ts=time.time() if ts is None else ts, **known))
            if self._push(ev):
                self._live(ev)
        except Exception:  # noqa: BLE001
            self._reject()

    def build_finished(self, exit_code: int = 0, cpu_s: float | None = None, peak_rss_bytes: int | None = None,
                       expected_events: Any = None, *, ts: float | None = None) -> None:
        """This agent's last event: the collector completes the session once it is folded."""
        if not self._on:
            return
        try:
            self._push(fix_event(BuildFinished(session_id=self._sid, agent_id=self._aid, seq=0,
                                               ts=time.time() if ts is None else ts,
                                               exit_code=exit_code, cpu_s=cpu_s, peak_rss_bytes=peak_rss_bytes,
                                               expected_events=expected_events)))
        except Exception:  # noqa: BLE001
            self._reject()


class SyncTelemetryClient:
    """The client for synchronous code: the async client on a private loop in a daemon thread.

    Emit methods are the async client's own (bound once here, so a call costs the same);
    they only take a lock, so any thread may call them.  ``close()`` blocks at most
    ``timeout`` (plus thread teardown); an ``atexit`` hook closes a forgotten client.
    """

    def __init__(self, settings: Settings, *, nats_url: UrlSource = None, session_id: str | None = None,
                 agent_id: str | None = None, name: str = "") -> None:
        from shared.client import TelemetryClient

        self._client: TelemetryClient = TelemetryClient(settings, nats_url=nats_url, session_id=session_id,
                                                        agent_id=agent_id, name=name)
        c = self._client
        self.build_started, self.target_started, self.target_finished = (
            c.build_started, c.target_started, c.target_finished)
        self.health, self.build_finished = c.health, c.build_finished
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed: ClientStats | None = None

    session_id = property(lambda self: self._client.session_id)
    agent_id = property(lambda self: self._client.agent_id)
    events_emitted = property(lambda self: self._client.events_emitted)
    dropped = property(lambda self: self._client.dropped)
    connected = property(lambda self: self._client.connected)
    reached_bus = property(lambda self: self._client.reached_bus)
    stats = property(lambda self: self._client.stats)
    last_error = property(lambda self: self._client.last_error)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> SyncTelemetryClient:
        if not self._client._on or self._thread is not None or self._closed is not None:
            return self
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=_run_loop, args=(loop,), name="buildtel-telemetry", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        asyncio.run_coroutine_threadsafe(self._client.start(), loop).result()
        atexit.register(self._atexit)
        if hasattr(os, "register_at_fork"):
            ref = weakref.ref(self)
            os.register_at_fork(after_in_child=lambda: (c := ref()) is not None and c._forked())
        return self

    def _forked(self) -> None:
        # A forked child has no loop thread: it must neither buffer forever nor wait in close().
        self._client._stop_accepting()
        self._closed = ClientStats()
        atexit.unregister(self._atexit)

    def close(self, timeout: float = 2.0, *, warn: bool = True) -> ClientStats:
        if self._closed is not None:
            return self._closed
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:  # never started (or disabled): nothing was sent
            self._closed = self._client.abandon(warn=warn)
            return self._closed
        atexit.unregister(self._atexit)
        fut = asyncio.run_coroutine_threadsafe(self._client.close(timeout, warn=warn), loop)
        try:
            stats = fut.result(timeout + 1.0)
        except Exception:  # noqa: BLE001 - close must not raise either
            stats = self._client.stats
        loop.call_soon_threadsafe(loop.stop)
        thread.join(1.0)
        self._closed = stats
        return stats

    def _atexit(self) -> None:
        self.close(timeout=2.0)


def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

