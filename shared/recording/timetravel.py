"""Time travel through a recorded event stream, and republishing it under a new session id.

:class:`Timeline` replays the events of a recording in order and answers "what
did the build look like after step N / at second S": targets done, running and
pending, busy workers, cache hits so far.  *Pending* means a target the build
will start later: the whole stream is known, so every target it ever mentions
counts from step 0.  Step N is the state after the first N events (step 0:
nothing has happened yet).

:func:`republish` feeds a recorded stream back to the bus as a new session so
newer analyzers can reprocess an old build.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from buildtel.shared.codec import encode
from buildtel.shared.protocol import (
    CACHE_HITS,
    BuildFinished,
    BuildStarted,
    Event,
    EventBatch,
    HealthCheckpoint,
    TargetFinished,
    TargetStarted,
    TestResults,
    is_session_id,
    new_session_id,
)
from buildtel.shared.subjects import Subjects

REPUBLISH_BATCH = 200


@dataclass
class BuildState:
    step: int
    total_steps: int
    t: float  # seconds since the first event
    event: str  # what the last applied event was, for display
    done: list[str]
    running: dict[str, tuple[str, float]]  # target -> (worker, started, as seconds since the first event)
    pending: list[str]
    failed: list[str] = field(default_factory=list)
    cache_hits: int = 0
    cache_misses: int = 0
    finished: bool = False
    exit_code: int | None = None
    health: HealthCheckpoint | None = None

    @property
    def workers_busy(self) -> list[str]:
        return sorted({w for w, _ in self.running.values()})

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step, "total_steps": self.total_steps, "t": round(self.t, 6), "event": self.event,
            "done": len(self.done), "running": len(self.running), "pending": len(self.pending),
            "failed": len(self.failed), "cache_hits": self.cache_hits, "cache_misses": self.cache_misses,
            "workers_busy": self.workers_busy, "running_targets": sorted(self.running),
            "finished": self.finished, "exit_code": self.exit_code,
            "health": msgspec.to_builtins(self.health) if self.health else None,
        }


def describe(ev: Event) -> str:
    if isinstance(ev, TargetStarted):
        return f"target_started {ev.target}" + (f" on {ev.worker}" if ev.worker else "")
    if isinstance(ev, TargetFinished):
        return f"target_finished {ev.target} ({ev.status}, {ev.cache}, {ev.duration_s:.3f}s)"
    if isinstance(ev, BuildStarted):
        return f"build_started {' '.join(ev.command)[:80]}"
    if isinstance(ev, BuildFinished):
        return f"build_finished exit {ev.exit_code}"
    if isinstance(ev, TestResults):
        return f"test_results {len(ev.cases)} case(s)" + (f" of {ev.source}" if ev.source else "")
    return f"health {ev.status}"


class Timeline:
    def __init__(self, events: Sequence[Event]) -> None:
        self.events = sorted(events, key=lambda e: (e.ts, e.agent_id, e.seq))
        self.t0 = self.events[0].ts if self.events else 0.0
        self._times = [e.ts - self.t0 for e in self.events]
        seen: dict[str, None] = {}
        for e in self.events:
            if isinstance(e, (TargetStarted, TargetFinished)):
                seen.setdefault(e.target, None)
        self.targets = list(seen)

    def __len__(self) -> int:
        return len(self.events)

    def step_at(self, seconds: float) -> int:
        """The step reached ``seconds`` after the first event (every event at or before it applied)."""
        return bisect.bisect_right(self._times, seconds)

    def state(self, step: int) -> BuildState:
        step = max(0, min(step, len(self.events)))
        running: dict[str, tuple[str, float]] = {}
        done: dict[str, None] = {}
        failed: set[str] = set()
        hits = misses = 0
        finished, exit_code, health = False, None, None
        for ev in self.events[:step]:
            if isinstance(ev, TargetStarted):
                done.pop(ev.target, None)  # a retry runs again
                running[ev.target] = (ev.worker or f"{ev.agent_id}/?", ev.ts - self.t0)
            elif isinstance(ev, TargetFinished):
                running.pop(ev.target, None)
                done[ev.target] = None
                failed.discard(ev.target)
                if ev.status == "failed":
                    failed.add(ev.target)
                hits += ev.cache in CACHE_HITS
                misses += ev.cache == "miss"
            elif isinstance(ev, HealthCheckpoint):
                health = ev
            elif isinstance(ev, BuildFinished):
                finished, exit_code = True, ev.exit_code
        pending = [t for t in self.targets if t not in done and t not in running]
        last = self.events[step - 1] if step else None
        return BuildState(step=step, total_steps=len(self.events), t=self._times[step - 1] if step else 0.0,
                          event=describe(last) if last else "(before the first event)", done=list(done),
                          running=running, pending=pending, failed=sorted(failed), cache_hits=hits,
                          cache_misses=misses, finished=finished, exit_code=exit_code, health=health)


def render(state: BuildState, *, limit: int = 10) -> str:
    lines = [
        f"step {state.step}/{state.total_steps}  t=+{state.t:.3f}s  {state.event}",
        (f"targets: {len(state.done)} done ({len(state.failed)} failed), {len(state.running)} running, "
         f"{len(state.pending)} pending"),
        f"workers busy: {len(state.workers_busy)}" + (f" ({', '.join(state.workers_busy[:limit])})"
                                                      if state.workers_busy else ""),
        f"cache hits so far: {state.cache_hits} (misses {state.cache_misses})",
    ]
    if state.health is not None:
        h = state.health
        lines.append(f"health: {h.status}, {h.active_workers}/{h.worker_count} workers active")
    for target, (worker, since) in sorted(state.running.items(), key=lambda kv: kv[1][1])[:limit]:
        lines.append(f"  running {target} on {worker} for {max(0.0, state.t - since):.3f}s")
    if state.finished:
        lines.append(f"build finished, exit code {state.exit_code}")
    return "\n".join(lines)


def rewrite(events: Sequence[Event], new_sid: str, *, source: str | None = None) -> list[Event]:
    """The events with ``session_id`` replaced; BuildStarted loses ``record`` (the stream is already
    kept) and gains a ``republished_from`` label naming the original session."""
    out: list[Event] = []
    for ev in events:
        changes: dict[str, Any] = {"session_id": new_sid}
        if isinstance(ev, BuildStarted):
            changes["record"] = False
            if source:
                changes["labels"] = {**ev.labels, "republished_from": source}
        out.append(msgspec.structs.replace(ev, **changes))
    return out


async def republish(js: Any, subjects: Subjects, events: Sequence[Event], *, new_sid: str | None = None,
                    source: str | None = None) -> tuple[str, int]:
    """Publish ``events`` as a new session: EventBatches per agent, in seq order, with Nats-Msg-Id.
    Returns (new session id, events published)."""
    sid = new_sid or new_session_id()
    if not is_session_id(sid):
        raise ValueError(f"{sid!r} is not a session id")
    per_agent: dict[str, list[Event]] = {}
    for ev in rewrite(events, sid, source=source):
        per_agent.setdefault(ev.agent_id, []).append(ev)
    sent = 0
    for agent, evs in per_agent.items():
        evs.sort(key=lambda e: e.seq)
        for i in range(0, len(evs), REPUBLISH_BATCH):
            chunk = evs[i:i + REPUBLISH_BATCH]
            data = encode(EventBatch(session_id=sid, agent_id=agent, events=chunk))
            await js.publish(subjects.events(sid), data, headers={"Nats-Msg-Id": f"{sid}:{agent}:{chunk[0].seq}"},
                             timeout=10.0)
            sent += len(chunk)
    return sid, sent
