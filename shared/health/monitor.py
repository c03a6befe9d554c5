"""Live build health: task counts in, :class:`HealthCheckpoint` fields and a status out.

:class:`HealthMonitor` is pure bookkeeping (no bus, no threads, no clock of its
own unless you let it read ``time.monotonic``): feed it task starts and ends,
the build's memory and, where tasks are only seen when they end (ninja), the
number running; ask it for a :meth:`~HealthMonitor.checkpoint` at each interval.
:func:`evaluate` turns a checkpoint's figures into ``healthy``/``degraded``/
``critical`` with one human-readable reason per rule that fired; the rules and
their thresholds are :class:`HealthRules` and are documented in ``docs/health.md``.

Definitions (also in ``docs/health.md``):

* ``completed_tasks`` counts every task that ended, whatever its status;
  ``failed_tasks`` is the subset that failed;
* ``velocity`` is tasks completed per second over the last ``interval_s`` (a sliding
  window, so a final checkpoint right after a regular one is not a spike),
  ``throughput`` tasks completed per second since the build started;
* ``utilisation`` = ``active_workers / worker_count`` (0 when the worker count is unknown);
* ``pending_tasks`` is 0 and ``eta_s`` is None when the total is unknown (live make
  and ninja capture cannot know it without a dry run; see ``docs/health.md``);
  with a known total, ``eta_s`` = (pending + active) / velocity (throughput while
  velocity is 0): the work not finished yet, at the recent rate.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from buildtel.shared.protocol import HealthState

HealthStatus = HealthState  # "healthy" | "degraded" | "critical", worst first in reports
DEFAULT_INTERVAL_S = 5.0


@dataclass(frozen=True, slots=True)
class HealthRules:
    """Thresholds of the status rules; see ``docs/health.md`` for why these values."""

    failure_rate_critical: float = 0.25  # share of finished tasks that failed
    min_tasks_for_rate: int = 4  # fewer finished tasks: one failure is "degraded", never "critical"
    stall_degraded_s: float = 120.0  # no task finished for this long while some are running/pending
    stall_critical_s: float = 600.0
    memory_degraded_percent: float = 90.0  # host memory in use
    memory_critical_percent: float = 97.0


_RANK = {"healthy": 0, "degraded": 1, "critical": 2}


def evaluate(fields: dict[str, Any], *, stalled_s: float | None,
             rules: HealthRules = HealthRules()) -> tuple[HealthStatus, list[str]]:
    """Status and reasons of one checkpoint's figures.

    ``stalled_s``: seconds since the last task finished (or since the build started
    when none has), or None when the build has no task tracking at all (a plain
    command: progress cannot stall because it is not measured)."""
    status: str = "healthy"
    reasons: list[str] = []

    def hit(level: str, reason: str) -> None:
        nonlocal status
        reasons.append(reason)
        if _RANK[level] > _RANK[status]:
            status = level

    done, failed = fields.get("completed_tasks", 0), fields.get("failed_tasks", 0)
    if failed:
        rate = failed / done if done else 1.0
        text = f"{failed} of {done} finished tasks failed ({rate:.0%})"
        hit("critical" if done >= rules.min_tasks_for_rate and rate >= rules.failure_rate_critical else "degraded",
            text)
    busy = fields.get("active_tasks", 0) > 0 or fields.get("pending_tasks", 0) > 0
    if stalled_s is not None and busy and stalled_s >= rules.stall_degraded_s:
        hit("critical" if stalled_s >= rules.stall_critical_s else "degraded",
            f"no task finished for {stalled_s:.0f}s while {fields.get('active_tasks', 0)} run")
    mem = fields.get("memory_percent", 0.0)
    if mem >= rules.memory_degraded_percent:
        hit("critical" if mem >= rules.memory_critical_percent else "degraded", f"host memory {mem:.0f}% in use")
    return cast(HealthStatus, status), reasons


class HealthMonitor:
    """Counts of one build, turned into checkpoint fields on demand.  Not thread-safe: one
    feeder thread (the capture's) calls everything."""

    def __init__(self, *, interval_s: float = DEFAULT_INTERVAL_S, worker_count: int = 0,
                 total_tasks: int | None = None, rules: HealthRules = HealthRules(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.worker_count = worker_count
        self.total_tasks = total_tasks
        self.rules = rules
        self._clock = clock
        self.started_at = clock()
        self.completed = 0
        self.failed = 0
        self._active: set[Any] = set()
        self._external_active: int | None = None  # running tasks counted from outside (ninja)
        self.tracking = False  # any task seen, or a capture that counts running tasks
        self.memory_bytes = 0
        self.memory_percent = 0.0
        self._last_done_at = self.started_at
        self._last_cp_at = self.started_at
        self._recent: deque[float] = deque()  # completion times within the velocity window
        self.last: dict[str, Any] | None = None

    # -- feeding ---------------------------------------------------------------------------
    def task_started(self, key: Any) -> None:
        self.tracking = True
        self._active.add(key)

    def task_finished(self, key: Any, *, failed: bool = False) -> None:
        self.tracking = True
        self._active.discard(key)
        self.completed += 1
        self.failed += bool(failed)
        self._last_done_at = now = self._clock()
        self._recent.append(now)
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0] <= now - self.interval_s:
            self._recent.popleft()

    def set_active(self, n: int | None) -> None:
        """Running tasks as counted elsewhere (ninja's children); None: use started - finished."""
        if n is not None:
            self.tracking = True
        self._external_active = n

    def set_memory(self, rss_bytes: int, host_percent: float) -> None:
        self.memory_bytes, self.memory_percent = int(rss_bytes), float(host_percent)

    @property
    def active(self) -> int:
        return self._external_active if self._external_active is not None else len(self._active)

    def due(self) -> bool:
        return self._clock() - self._last_cp_at >= self.interval_s

    # -- checkpoint ------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        """Keyword arguments for ``client.health``."""
        now = self._clock()
        elapsed = now - self.started_at
        self._trim(now)
        window = min(self.interval_s, elapsed)
        velocity = len(self._recent) / window if window > 0 else 0.0
        throughput = self.completed / elapsed if elapsed > 0 else 0.0
        active = self.active
        workers = self.worker_count
        # A capture that under-reports -j (make without -j in MAKEFLAGS) must not exceed 100 %.
        active_workers = min(active, workers) if workers else active
        pending = max(self.total_tasks - self.completed - active, 0) if self.total_tasks is not None else 0
        eta: float | None = None
        if self.total_tasks is not None:
            rate = velocity or throughput
            eta = 0.0 if pending + active == 0 else (pending + active) / rate if rate > 0 else None
        fields: dict[str, Any] = {
            "completed_tasks": self.completed, "failed_tasks": self.failed, "active_tasks": active,
            "pending_tasks": pending, "worker_count": workers, "active_workers": active_workers,
            "memory_bytes": self.memory_bytes, "memory_percent": round(self.memory_percent, 2),
            "velocity": round(velocity, 4), "throughput": round(throughput, 4),
            "utilisation": round(active_workers / workers, 4) if workers else 0.0, "eta_s": eta,
        }
        stalled = (now - self._last_done_at) if self.tracking else None
        fields["status"], fields["reasons"] = evaluate(fields, stalled_s=stalled, rules=self.rules)
        self._last_cp_at = now
        self.last = fields
        return fields
