"""Explain an alert before it is published: fetch the builds either side of the change from the
storage service, the load factors they were judged at from the series' ring in Redis and, when
both builds were recorded, the diff of their recordings from the recorder service, then
``explain.explain`` (pure).  Nothing here fails an alert: what cannot be fetched becomes a note
on it, and the alert goes out (telemetry never holds a regression back for want of a detail).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec

from buildtel.services.analyzer import fetch
from buildtel.services.analyzer.alerts import Alert, ring_of
from buildtel.services.analyzer.explain import Difference, explain, input_differences
from buildtel.services.recorder.api import DiffRequest, RecorderClient, RecorderError
from buildtel.shared.keys import Keys
from buildtel.shared.protocol import BuildSession
from buildtel.shared.subjects import Subjects

# Storage consumes the sessions stream on its own: a build the analyzer has just folded may not be
# stored yet.  A build not found is asked for again for this long before the alert goes without it.
NOT_FOUND_WAIT_S = 5.0
# `buildtel run --record` writes the recording's manifest just after the build's last event: the
# first bad build's recording may be a moment behind its session.  Asked again for this long.
RECORDING_WAIT_S = 5.0


async def _factors(redis: Any, keys: Keys, series: list[str]) -> dict[str, float]:
    """Session id -> the build-wide load factor its points were divided by, from these series' rings."""
    out: dict[str, float] = {}
    for name in series:
        data = await redis.hget(keys.analyzer_series(name), "s")
        if not data:
            continue
        try:
            ring = ring_of(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        for e in ring:
            out.setdefault(e.sid, e.f)
    return out


async def _recorded_inputs(nc: Any, namespace: str, good: BuildSession | None, bad: BuildSession | None,
                           timeout: float) -> tuple[list[Difference] | None, list[str]]:
    """The input files that changed between the two builds' recordings; None and a note when they
    cannot be compared.  Recordings are kept by the recorder service on the machine that ran the
    build (their id is the session's): asked over the bus, never read here."""
    if good is None or bad is None or not (good.record and bad.record):
        return None, []  # explain() says which build was not recorded
    client = RecorderClient(nc, Subjects(namespace), timeout=timeout)
    deadline = time.monotonic() + RECORDING_WAIT_S
    while True:
        try:
            return input_differences(await client.diff(DiffRequest(a=good.id, b=bad.id)))
        except RecorderError as exc:
            if exc.code == 404 and time.monotonic() < deadline:
                await asyncio.sleep(0.25)
                continue
            where = (" (made on a machine whose recorder did not answer, or dropped by retention)"
                     if exc.code == 404 else "")
            return None, [f"input files not compared: the recording diff was unavailable: {exc.description}{where}"]
        except Exception as exc:  # noqa: BLE001 - a closed connection: the alert goes out without it
            return None, [f"input files not compared: the recording diff was unavailable: {exc!r}"]


async def explain_alert(alert: Alert, *, nc: Any, redis: Any, keys: Keys, namespace: str, timeout: float,
                        session: BuildSession | None = None,
                        progress: Callable[[], Awaitable[Any]] | None = None) -> Alert:
    """``alert`` with its explanation (a copy; an alert already explained is returned as is).
    ``progress``: called between the storage and the recorder waits (the session message being
    folded is kept ours: both waits together may outlast its ack wait)."""
    prior = alert.explanation
    if prior is not None and prior.summary:
        return alert
    host = prior.host_slowdown if prior is not None else None
    ids = [i for i in (alert.last_good_session_id, alert.first_session_id) if i]
    have = {session.id: session} if session is not None else {}
    notes: list[str] = []
    try:
        want = [i for i in ids if i not in have]
        deadline = time.monotonic() + NOT_FOUND_WAIT_S
        while want:
            got, want = await fetch.sessions_by_id(nc, namespace, want, timeout)
            have.update((s.id, s) for s in got)
            if not want or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.25)
        notes += [f"build {i} was not found in storage (not stored yet, or dropped by retention)" for i in want]
    except fetch.SourceError as exc:
        notes.append(f"the builds could not be compared: {exc.description}")
    except Exception as exc:  # noqa: BLE001 - a timeout or a closed connection: explain what we can
        notes.append(f"the builds could not be compared: {exc!r}")
    branch = alert.branch or "_"
    try:
        factors = await _factors(redis, keys, [f"build|{branch}", alert.series])
    except Exception as exc:  # noqa: BLE001 - Redis blip: the factors are a refinement, say so
        factors = {}
        notes.append(f"load factors unavailable ({exc!r}): durations compared as measured")
    good = have.get(alert.last_good_session_id or "")
    bad = have.get(alert.first_session_id)
    if progress is not None and good is not None and bad is not None and good.record and bad.record:
        with contextlib.suppress(Exception):
            await progress()
    inputs, more = await _recorded_inputs(nc, namespace, good, bad, timeout)
    notes += more
    e = explain(good, bad, f_good=factors.get(alert.last_good_session_id or "", 1.0),
                f_bad=factors.get(alert.first_session_id, 1.0), host=host, notes=notes, inputs=inputs)
    if not e.summary:
        e.summary = "no explanation: " + ("; ".join(notes) if notes else "nothing to compare")
    return msgspec.structs.replace(alert, explanation=e)
