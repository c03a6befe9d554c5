"""Pure logic of the collector: events -> Redis operations, and Redis state -> BuildSession.

The collector keeps no session state in memory.  Each event becomes one small
operation that the ``apply`` Lua script (``lua.py``) performs atomically
together with the idempotency check (bit ``seq`` of the agent's bitmap), so any
collector can fold any batch and a redelivered batch changes nothing.  When the
session completes, :func:`build_session` folds the hash contents into a
:class:`BuildSession`.  Both halves are testable without Redis or NATS.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import msgspec

from shared.codec import encode, event_decoder
from shared.protocol import (
    CACHE_HITS,
    BuildFinished,
    BuildSession,
    BuildStarted,
    Event,
    HealthCheckpoint,
    SessionTotals,
    TargetFinished,
    TargetMetrics,
    TargetStarted,
)

# Operation kinds understood by the Lua script (one byte each, to keep the payload small).
OP_STARTED = "S"
OP_TARGET_STARTED = "T"
OP_TARGET_FINISHED = "F"
OP_HEALTH = "H"
OP_FINISHED = "E"

_HEAD = struct.Struct(">Ic")


def _op(seq: int, kind: str, f1: str, f2: str, data: bytes) -> bytes:
    b1, b2 = f1.encode(), f2.encode()
    return b"".join((_HEAD.pack(seq, kind.encode()), len(b1).to_bytes(2, "big"), b1,
                     len(b2).to_bytes(2, "big"), b2, len(data).to_bytes(4, "big"), data))


def ops_payload(events: list[Event]) -> tuple[bytes, bool]:
    """Encode a batch for the Lua script as packed records Redis' ``struct`` can read.

    Each record is ``>I4 c1 H c0 H c0 I4 c0``: seq, kind, field1, field2 and the
    encoded event (Redis' cmsgpack predates the msgpack bin type, hence no msgpack
    here).  For a finished target,
    field1 is the targets-hash field (``agent:seq``, one per attempt) and field2
    the running-hash field to clear; for started/health the ordering timestamp.
    Returns the payload and whether it contains a BuildFinished.
    """
    flat: list[bytes] = []
    finished = False
    for ev in events:
        data = encode(ev)
        match ev:
            case TargetFinished(agent_id=agent, seq=seq, target=target):
                flat.append(_op(seq, OP_TARGET_FINISHED, f"{agent}:{seq}", f"{agent}|{target}", data))
            case TargetStarted(agent_id=agent, seq=seq, target=target):
                flat.append(_op(seq, OP_TARGET_STARTED, f"{agent}|{target}", "", data))
            case HealthCheckpoint(seq=seq, ts=ts):
                flat.append(_op(seq, OP_HEALTH, repr(ts), "", data))
            case BuildStarted(seq=seq, ts=ts):
                flat.append(_op(seq, OP_STARTED, repr(ts), "", data))
            case BuildFinished(seq=seq):
                flat.append(_op(seq, OP_FINISHED, "", "", data))
                finished = True
    return b"".join(flat), finished


def _decode(data: bytes) -> Event | None:
    try:
        return event_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def agent_counts(meta: Mapping[bytes, bytes]) -> dict[str, tuple[int, int]]:
    """Per agent: (events folded, highest seq seen)."""
    out: dict[str, tuple[int, int]] = {}
    for k, v in meta.items():
        key = k.decode()
        if key.startswith("n:"):
            agent = key[2:]
            high = int(meta.get(f"max:{agent}".encode(), b"-1"))
            out[agent] = (int(v), high)
    return out


def is_ready(meta: Mapping[bytes, bytes]) -> bool:
    """True when a finished session has folded every event it will get.

    With ``expected_events`` from the finishing agent we know exactly; without,
    a single-agent session is ready once its sequence has no gaps.  Multi-agent
    sessions without counts wait for the grace period instead.
    """
    raw = meta.get(b"finished")
    if raw is None:
        return False
    fin = _decode(raw)
    if not isinstance(fin, BuildFinished):
        return False
    counts = agent_counts(meta)
    if fin.expected_events:
        return all(counts.get(a, (0, -1))[0] >= n for a, n in fin.expected_events.items())
    if set(counts) != {fin.agent_id}:
        return False
    n, high = counts[fin.agent_id]
    return n == high + 1 and high == fin.seq


def _metrics(attempts: list[TargetFinished]) -> TargetMetrics:
    # The attempt that ended last is the target's result; earlier ones are retries.
    last = max(attempts, key=lambda e: (e.start + e.duration_s, e.seq))
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
        attempts=len(attempts),
        deps=last.deps,
        phases=last.phases,
    )


def build_session(
    session_id: str,
    meta: Mapping[bytes, bytes],
    targets: Mapping[bytes, bytes],
    running: Mapping[bytes, bytes] | None = None,
    *,
    now: float,
) -> BuildSession:
    """Fold the hot state of one session into its completed form (abandoned if never finished)."""
    started = _decode(meta[b"started"]) if b"started" in meta else None
    finished = _decode(meta[b"finished"]) if b"finished" in meta else None
    health = _decode(meta[b"health"]) if b"health" in meta else None
    started = started if isinstance(started, BuildStarted) else None
    finished = finished if isinstance(finished, BuildFinished) else None

    by_name: dict[str, list[TargetFinished]] = {}
    for raw in targets.values():
        ev = _decode(raw)
        if isinstance(ev, TargetFinished):
            by_name.setdefault(ev.target, []).append(ev)
    done_keys = {f"{a.agent_id}|{a.target}" for evs in by_name.values() for a in evs}
    metrics = sorted((_metrics(evs) for evs in by_name.values()), key=lambda m: (m.start, m.name))

    if finished is None:
        # Abandoned: keep what ran; targets still running are recorded as cancelled at the
        # last moment we heard of the session.
        last_seen = float(meta.get(b"last", b"0") or 0) or now
        for field, raw in (running or {}).items():
            ev = _decode(raw)
            if isinstance(ev, TargetStarted) and field.decode() not in done_keys and ev.target not in by_name:
                metrics.append(TargetMetrics(name=ev.target, start=ev.ts, end=last_seen,
                                             duration_s=max(0.0, last_seen - ev.ts), status="cancelled",
                                             cache="uncacheable", worker=ev.worker, agent_id=ev.agent_id))
        metrics.sort(key=lambda m: (m.start, m.name))

    first_ts = started.ts if started else min((m.start for m in metrics), default=now)
    if finished is not None:
        finish_ts = finished.ts
        exit_code: int | None = finished.exit_code
        outcome = finished.outcome or ("success" if finished.exit_code == 0 else "failed")
    else:
        finish_ts = max([float(meta.get(b"last", b"0") or 0)] + [m.end for m in metrics]) or now
        exit_code, outcome = None, "abandoned"

    totals = SessionTotals(events=int(meta.get(b"events", b"0")))
    hits = misses = 0
    for m in metrics:
        totals.targets += 1
        totals.target_time_s += m.duration_s
        totals.cpu_s += m.cpu_s or 0.0
        if m.status == "success":
            totals.succeeded += 1
        elif m.status == "failed":
            totals.failed += 1
        elif m.status == "skipped":
            totals.skipped += 1
        else:
            totals.cancelled += 1
        if m.cache in CACHE_HITS:
            hits += 1
        elif m.cache == "miss":
            misses += 1

    traceparent = started.traceparent if started else None
    trace_id = traceparent.split("-")[1] if traceparent and traceparent.count("-") >= 3 else session_id
    return BuildSession(
        id=session_id,
        name=started.name if started else "",
        start=first_ts,
        finish=finish_ts,
        duration_s=max(0.0, finish_ts - first_ts),
        outcome=outcome,  # type: ignore[arg-type]
        exit_code=exit_code,
        command=started.command if started else [],
        labels=started.labels if started else {},
        agents=sorted(agent_counts(meta)),
        environment=started.environment if started else None,
        targets=metrics,
        cache_hits=hits,
        cache_misses=misses,
        cache_hit_rate=hits / (hits + misses) if hits + misses else 0.0,
        totals=totals,
        health=health if isinstance(health, HealthCheckpoint) else None,
        cpu_s=finished.cpu_s if finished else None,
        peak_rss_bytes=finished.peak_rss_bytes if finished else None,
        trace_id=trace_id,
        record=started.record if started else False,
    )
