"""Pure logic of the collector: batches -> Redis script payloads, and Redis state -> BuildSession.

The collector keeps no session state in memory.  A batch becomes one payload
that the ``apply`` Lua script (``lua.py``) folds atomically together with the
idempotency check (bit ``seq`` of the agent's bitmap), so any collector can fold
any batch and a redelivered batch changes nothing.  Target events are kept as
*fragments*: the raw MessagePack of the events that were new in one script
call, framed as one msgpack array, so completing a session decodes a handful of
arrays rather than thousands of single events.  When the session completes,
:func:`build_session` folds the state into a :class:`BuildSession`.  Both halves
are testable without Redis or NATS.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from operator import attrgetter
from typing import Any

import msgspec

from buildtel.shared.codec import event_decoder
from buildtel.shared.protocol import (
    BuildFinished,
    BuildSession,
    BuildStarted,
    Completeness,
    Event,
    HealthCheckpoint,
    HealthPoint,
    TargetFinished,
    TargetMetrics,
    TargetStarted,
    TestCase,
    TestResults,
)
from buildtel.shared.totals import summarize_targets

# Event kinds the Lua script treats specially (one byte each); everything else is a fragment.
OP_STARTED = b"S"
OP_HEALTH = b"H"
OP_FINISHED = b"E"
OP_TARGET = b"T"
OP_LOST = b"X"  # a refused event: its raw bytes are replaced by "code<TAB>reason"

_HEAD = struct.Struct(">IcH")
MAX_SESSION_TESTS = 200_000  # test cases kept per session (BuildSession.tests); shared/junit.py's MAX_CASES
REASON_CHARS = 300  # of a refused event's reason kept in Redis and in the stored session
_fragments_decoder = msgspec.msgpack.Decoder(list[Event])


class _RawBatch(msgspec.Struct, gc=False):
    events: list[msgspec.Raw]


_raw_batch_decoder = msgspec.msgpack.Decoder(_RawBatch)


def raw_events(data: bytes) -> list[msgspec.Raw]:
    """Each event's MessagePack bytes of an encoded batch (for bytes not decoded by
    ``codec.decode_batch_raw``, e.g. a batch re-encoded after redaction)."""
    return _raw_batch_decoder.decode(data).events


def ops_payloads(raws: list[msgspec.Raw] | list[bytes], events: list[Event], chunk: int,
                 refused: Mapping[int, tuple[str, str]] | None = None) -> list[bytes]:
    """Encode one validated batch for the Lua script as records Redis' ``struct`` can read,
    ``chunk`` events per payload (one script call each).

    Each record is ``>I4 c1 H c0 I4 c0``: seq, kind, an ordering timestamp (for
    BuildStarted / HealthCheckpoint) and the event's raw MessagePack, sliced out
    of the message (``raws``, one per event) instead of re-encoded (Redis' cmsgpack predates the msgpack
    bin type, hence no msgpack framing here).  Chunks keep every script call
    short, so a large batch never holds Redis for long; folding is idempotent
    per (agent, seq), so a batch folded in several calls, or partly folded
    before a crash, ends up exactly as if it were folded in one.

    ``refused`` (index in ``events`` -> (code, reason)) marks events that broke a bound: they
    go in as OP_LOST records carrying the reason instead of the event, so the script counts
    them as lost (once, like any seq) and completion knows the session is short of them.
    """
    refused = refused or {}
    payloads: list[bytes] = []
    out = bytearray()
    pack = _HEAD.pack
    for i, (ev, raw) in enumerate(zip(events, raws, strict=True)):
        if i and i % chunk == 0:
            payloads.append(bytes(out))
            out = bytearray()
        bad = refused.get(i)
        if bad is not None:
            note = f"{bad[0]}\t{bad[1][:REASON_CHARS]}".encode()
            out += pack(ev.seq, OP_LOST, 0)
            out += len(note).to_bytes(4, "big")
            out += note
            continue
        match ev:
            case TargetFinished() | TargetStarted() | TestResults():  # all kept as fragments
                out += pack(ev.seq, OP_TARGET, 0)
            case BuildStarted(ts=ts) | HealthCheckpoint(ts=ts):
                ts_b = repr(ts).encode()
                out += pack(ev.seq, OP_STARTED if isinstance(ev, BuildStarted) else OP_HEALTH, len(ts_b))
                out += ts_b
            case BuildFinished():
                out += pack(ev.seq, OP_FINISHED, 0)
        out += len(raw).to_bytes(4, "big")
        out += raw
    if out:
        payloads.append(bytes(out))
    return payloads


def fragment_events(fragments: Iterable[bytes]) -> list[Event]:
    """All target events kept for a session, from its fragments (each a msgpack array)."""
    events: list[Event] = []
    for frag in fragments:
        try:
            events.extend(_fragments_decoder.decode(frag))
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue  # written by our own script from validated events; never expected
    return events


def _decode(data: bytes) -> Event | None:
    try:
        return event_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def agent_counts(meta: Mapping[bytes, bytes]) -> dict[str, tuple[int, int]]:
    """Per agent: (events accounted for, highest seq seen).  Accounted for = folded + refused
    (lost with a known reason): both are settled, neither is still to come."""
    out: dict[str, tuple[int, int]] = {}
    for k, v in meta.items():
        key = k.decode()
        if key.startswith(("n:", "lost:")):
            agent = key.partition(":")[2]
            high = int(meta.get(f"max:{agent}".encode(), b"-1"))
            out[agent] = (out.get(agent, (0, high))[0] + int(v), high)
    return out


def health_series(meta: Mapping[bytes, bytes]) -> list[HealthPoint]:
    """The checkpoints the fold kept (``hh:<5 s slot>``), oldest first, as compact points."""
    out = []
    for k, v in meta.items():
        if k.startswith(b"hh:"):
            ev = _decode(v)
            if isinstance(ev, HealthCheckpoint):
                out.append(HealthPoint(ts=ev.ts, status=ev.status, active_workers=ev.active_workers,
                                       worker_count=ev.worker_count, memory_bytes=ev.memory_bytes,
                                       memory_percent=ev.memory_percent, velocity=ev.velocity,
                                       completed_tasks=ev.completed_tasks, failed_tasks=ev.failed_tasks,
                                       agent_id=ev.agent_id))
    return sorted(out, key=lambda p: p.ts)


def finished_event(meta: Mapping[bytes, bytes]) -> BuildFinished | None:
    """The session's BuildFinished, if it has one."""
    raw = meta.get(b"finished")
    fin = _decode(raw) if raw is not None else None
    return fin if isinstance(fin, BuildFinished) else None


# "Not decoded yet": the functions below take the session's BuildFinished when their caller has
# decoded it already (the sweep decodes it once per session and hands it to each of them).
UNREAD: Any = object()


def is_ready(meta: Mapping[bytes, bytes], fin: BuildFinished | None = UNREAD) -> bool:
    """True when a finished session has folded every event it will get.

    With ``expected_events`` from the finishing agent we know exactly; without,
    a single-agent session is ready once its sequence has no gaps.  Multi-agent
    sessions without counts wait for the grace period instead.
    """
    if fin is UNREAD:
        fin = finished_event(meta)
    if fin is None:
        return False
    counts = agent_counts(meta)
    if fin.expected_events:
        return all(counts.get(a, (0, -1))[0] >= n for a, n in fin.expected_events.items())
    if set(counts) != {fin.agent_id}:
        return False
    n, high = counts[fin.agent_id]
    return n == high + 1 and high == fin.seq


def missing_events(meta: Mapping[bytes, bytes], fin: BuildFinished | None = UNREAD) -> bool:
    """True when a finished session is known to lack events still in flight: the finishing
    agent gave counts that are not reached, or (alone) has a gap in its sequence.  Such a
    session waits for them (redeliveries after a collector crash) up to ``gap_wait_s`` after its
    last event rather than completing at the end of the grace period with part of its targets;
    then it completes marked incomplete (``completeness.py``)."""
    if fin is UNREAD:
        fin = finished_event(meta)
    if fin is None:
        return False
    counts = agent_counts(meta)
    if fin.expected_events:
        return any(counts.get(a, (0, -1))[0] < n for a, n in fin.expected_events.items())
    if set(counts) == {fin.agent_id}:
        n, high = counts[fin.agent_id]
        return n < max(high, fin.seq) + 1
    return False


def _later(a: TargetFinished, b: TargetFinished) -> TargetFinished:
    # The attempt that ended last is the target's result; earlier ones are retries.
    return b if (b.start + b.duration_s, b.seq) > (a.start + a.duration_s, a.seq) else a


def _metrics(last: TargetFinished, attempts: int) -> TargetMetrics:
    return TargetMetrics(
        name=last.target,
        start=last.start,
        end=last.start + last.duration_s,
        duration_s=last.duration_s,
        status=last.status,
        cache=last.cache,
        worker=last.worker,
        agent_id=last.agent_id,
        exit_code=last.exit_code,
        kind=last.kind,
        mnemonic=last.mnemonic,
        cpu_s=last.cpu_s,
        peak_rss_bytes=last.peak_rss_bytes,
        attempts=attempts,
        deps=last.deps,
        phases=last.phases,
    )


# Fragments arrive sorted by their field (agent, first seq), so a stable sort on start alone is
# deterministic and avoids building a tuple key per target.
_by_start = attrgetter("start")


def build_session(
    session_id: str,
    meta: Mapping[bytes, bytes],
    fragments: Iterable[bytes],
    *,
    now: float,
    completeness: Completeness | None = None,
    finished: BuildFinished | None = UNREAD,
) -> BuildSession:
    """Fold the hot state of one session into its completed form (abandoned if never finished);
    ``completeness`` (``completeness.py``) is stored with it as it is; ``finished``: the
    session's BuildFinished if the caller has decoded it (:func:`finished_event`)."""
    started = _decode(meta[b"started"]) if b"started" in meta else None
    if finished is UNREAD:
        finished = finished_event(meta)
    health = _decode(meta[b"health"]) if b"health" in meta else None
    series = health_series(meta)
    started = started if isinstance(started, BuildStarted) else None

    by_name: dict[str, TargetFinished] = {}
    retried: dict[str, int] = {}
    running: dict[tuple[str, str], TargetStarted] = {}
    tests: list[TestCase] = []
    tests_dropped = 0
    for ev in fragment_events(fragments):
        if type(ev) is TargetFinished:
            prev = by_name.get(ev.target)
            if prev is None:
                by_name[ev.target] = ev
            else:
                by_name[ev.target] = _later(prev, ev)
                retried[ev.target] = retried.get(ev.target, 1) + 1
        elif type(ev) is TargetStarted:
            running[(ev.agent_id, ev.target)] = ev
        elif type(ev) is TestResults:
            # Bounded like every part of a session: past the cap, counted, not kept.
            room = MAX_SESSION_TESTS - len(tests)
            tests.extend(ev.cases[:max(room, 0)])
            tests_dropped += max(0, len(ev.cases) - max(room, 0))
    metrics = [_metrics(ev, retried.get(name, 1)) for name, ev in by_name.items()]
    metrics.sort(key=_by_start)

    if finished is None:
        # Abandoned: keep what ran; targets started but never finished are recorded as
        # cancelled at the last moment we heard of the session.
        last_seen = float(meta.get(b"last", b"0") or 0) or now
        for ev in running.values():
            if ev.target not in by_name:
                metrics.append(TargetMetrics(name=ev.target, start=ev.ts, end=last_seen,
                                             duration_s=max(0.0, last_seen - ev.ts), status="cancelled",
                                             cache="uncacheable", worker=ev.worker, agent_id=ev.agent_id))
        metrics.sort(key=_by_start)

    first_ts = started.ts if started else min((m.start for m in metrics), default=now)
    if finished is not None:
        finish_ts = finished.ts
        exit_code: int | None = finished.exit_code if finished.exit_code_known else None
        outcome: str = finished.outcome or ("success" if finished.exit_code == 0 else "failed")
    else:
        finish_ts = max([float(meta.get(b"last", b"0") or 0)] + [m.end for m in metrics]) or now
        exit_code, outcome = None, "abandoned"

    totals, hits, misses = summarize_targets(metrics, events=int(meta.get(b"events", b"0")))
    if finished is not None and finished.cache_hits is not None and finished.cache_misses is not None:
        hits, misses = finished.cache_hits, finished.cache_misses  # the tool's own figures (Bazel's action cache)

    parts = (started.traceparent or "").split("-") if started else []
    trace_id, parent_span_id = (parts[1], parts[2]) if len(parts) >= 4 else (session_id, None)
    return BuildSession(
        id=session_id,
        name=started.name if started else "",
        start=first_ts,
        finish=finish_ts,
        duration_s=max(0.0, finish_ts - first_ts),
        outcome=outcome,  # type: ignore[arg-type]
        exit_code=exit_code,
        command=started.command if started else [],
        labels={**(started.labels if started else {}), **(finished.labels if finished else {})},
        agents=sorted(agent_counts(meta)),
        environment=started.environment if started else None,
        targets=metrics,
        cache_hits=hits,
        cache_misses=misses,
        cache_hit_rate=hits / (hits + misses) if hits + misses else 0.0,
        totals=totals,
        health=health if isinstance(health, HealthCheckpoint) else None,
        health_series=series,
        health_series_dropped=int(meta.get(b"hdrop", b"0")),
        cpu_s=finished.cpu_s if finished else None,
        peak_rss_bytes=finished.peak_rss_bytes if finished else None,
        up_to_date=finished.up_to_date if finished else None,
        failures=finished.failures if finished else [],
        log=finished.log if finished else None,
        trace_id=trace_id,
        parent_span_id=parent_span_id,
        record=started.record if started else False,
        completeness=completeness,
        tests=tests,
        tests_dropped=tests_dropped,
    )


def without_detail(session: BuildSession) -> BuildSession:
    """The session with per-target phases and dependencies dropped (for oversized sessions)."""
    return msgspec.structs.replace(
        session, targets=[msgspec.structs.replace(t, phases=[], deps=[]) for t in session.targets])


def longest_targets(session: BuildSession, keep: int) -> BuildSession:
    """The session with only its ``keep`` longest targets; totals still describe all of them."""
    kept = sorted(session.targets, key=lambda t: -t.duration_s)[:keep]
    kept.sort(key=_by_start)
    return msgspec.structs.replace(session, targets=kept)
