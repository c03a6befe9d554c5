"""The thread-safe event buffer every SDK client shares: :class:`Emitter` and :class:`ClientStats`
(argument sanitising is ``buildtel.shared.sanitize``).

:class:`Emitter` holds what every emit method touches: the pending list, the seq
counter and the counters, under one ``threading.Lock`` so that any thread may emit.
Emit methods validate with a few ``type(x) is …`` checks on the common path and
fall back to sanitisers that turn bad values into defaults, so a call never raises;
what only fails at encoding time (lone surrogates, huge ints, oversize values) is
sanitised when the batch is cut, so every accepted event reaches the collector in a
form its typed decoder takes.  The asynchronous transport (batching, publishing,
connecting) is :class:`buildtel.shared.client_async.TelemetryClient`, which extends
:class:`Emitter`.  Its own module so that the dependencies point one way:
``client -> client_sync -> client_async -> emitter``.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import msgspec

from buildtel.shared.identity import default_agent_id
from buildtel.shared.protocol import (
    BuildFinished,
    BuildStarted,
    HealthCheckpoint,
    TargetFinished,
    TargetStarted,
    TestCase,
    TestResults,
    is_session_id,
    new_session_id,
)
from buildtel.shared.sanitize import (
    _CACHES,
    _HEALTH_FIELDS,
    _STATUSES,
    MAX_SEQ,
    _agent_id,
    _now,
    _phases,
    _str_list,
    _text,
    fix_event,
)
from buildtel.shared.settings import Settings

# Cases per test_results event: under the collector's bound on a list (2000), and a batch of
# one event stays far below MAX_BATCH_BYTES even with every name and message at its cap.
TEST_CASES_PER_EVENT = 500
TEST_EVENT_CHARS = 128 * 1024


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
        # Default: the machine, plus a per-process sub-id when joining a given session (shared/identity.py).
        self._aid = _agent_id(agent_id or default_agent_id(settings.agent_id, joining=session_id is not None))
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
                session_id=self._sid, agent_id=self._aid, seq=0, ts=_now() if ts is None else ts,
                name=name or self._name, command=command, environment=environment, labels=labels, record=record,
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
        except Exception:  # noqa: BLE001 - telemetry never raises into the build (counted as rejected)
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
                                start=start, duration_s=duration_s, worker=worker,
                                # Any str here: the check below sends an unknown one through fix_event.
                                status=status, cache=cache,  # type: ignore[arg-type]  # see the line above
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
        except Exception:  # noqa: BLE001 - telemetry never raises into the build (counted as rejected)
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
        except Exception:  # noqa: BLE001 - telemetry never raises into the build (counted as rejected)
            self._reject()

    def test_results(self, cases: list[TestCase], *, source: str = "", ts: float | None = None) -> int:
        """Test cases of one report (shared/junit.py), as as many ``test_results`` events as keep
        each well inside a batch (at most ``TEST_CASES_PER_EVENT`` cases or ~128 KiB of text);
        returns the number of events."""
        if not self._on:
            return 0
        n = 0
        try:
            start, size = 0, 0
            for i, c in enumerate(cases):
                size += len(c.suite) + len(c.name) + len(c.message) + 40
                if i + 1 - start >= TEST_CASES_PER_EVENT or size >= TEST_EVENT_CHARS or i + 1 == len(cases):
                    n += self._push(TestResults(session_id=self._sid, agent_id=self._aid, seq=0,
                                                ts=time.time() if ts is None else ts,
                                                cases=cases[start:i + 1], source=source[:4096]))
                    start, size = i + 1, 0
        except Exception:  # noqa: BLE001 - telemetry never raises into the build (counted as rejected)
            self._reject()
        return n

    def build_finished(self, exit_code: int = 0, cpu_s: float | None = None, peak_rss_bytes: int | None = None,
                       expected_events: Any = None, *, ts: float | None = None, up_to_date: int | None = None,
                       failures: Any = (), log: Any = None, outcome: str | None = None) -> None:
        """This agent's last event: the collector completes the session once it is folded.
        ``outcome`` None: derived from ``exit_code``; ``cancelled``: the build was stopped."""
        if not self._on:
            return
        try:
            self._push(fix_event(BuildFinished(session_id=self._sid, agent_id=self._aid, seq=0,
                                               ts=time.time() if ts is None else ts,
                                               exit_code=exit_code, cpu_s=cpu_s, peak_rss_bytes=peak_rss_bytes,
                                               expected_events=expected_events, up_to_date=up_to_date,
                                               failures=list(failures), log=log,
                                               outcome=outcome)))  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 - telemetry never raises into the build (counted as rejected)
            self._reject()
