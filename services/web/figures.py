"""Per-tenant build figures for ``/metrics``: what the live feed (``stream.py``) sees finish.

Named after the OpenTelemetry CI/CD semantic conventions where one exists (``cicd.pipeline.*``,
exported the Prometheus way: dots as ``_``, units as a suffix), ``buildtel_*`` otherwise; the
list, and the mapping of our outcomes to ``cicd.pipeline.result``, is in ``docs/metrics.md``.

Labels stay bounded: ``tenant`` (at most ``MAX_FEEDS`` of them, ``stream.py``), the result (a
fixed set), and an alert's ``kind``/``direction`` (fixed sets, anything else is ``other``).  No
session id, branch or target name ever becomes a label.  Counters start at 0 when the service
starts (Prometheus handles the reset); they count what the feed saw finish since then.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

# Our outcome -> cicd.pipeline.result.  "abandoned" (no build_finished before the inactivity
# timeout: the agent died or lost the bus) is the CI system's failure, not the build's: "error";
# "cancelled" is the convention's "cancellation"; "unknown" (an import without evidence) claims
# nothing: "error" as well, never "success".
RESULTS = {"success": "success", "failed": "failure", "abandoned": "error", "cancelled": "cancellation",
           "unknown": "error"}
UNKNOWN_RESULT = "error"  # an outcome a newer collector invents still lands in a fixed label set
# Build durations, seconds: from a no-op rebuild to a long release build.
BUCKETS = (1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0)
ALERT_KINDS = frozenset({"build", "target"})
ALERT_DIRECTIONS = frozenset({"regression", "improvement"})


def result_of(outcome: str) -> str:
    return RESULTS.get(outcome, UNKNOWN_RESULT)


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))  # the last: +Inf
    total: float = 0.0

    def observe(self, value: float) -> None:
        i = next((i for i, le in enumerate(BUCKETS) if value <= le), len(BUCKETS))
        self.counts[i] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out, acc = [], 0
        for le, n in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            acc += n
            out.append((le, float(acc)))
        return out


@dataclass
class TenantFigures:
    """One tenant's figures, fed by its feed (one per tenant, however many SSE clients)."""

    durations: dict[str, _Histogram] = field(default_factory=dict)  # by result
    runs: dict[str, int] = field(default_factory=dict)  # by result
    cache_hits: int = 0
    cache_lookups: int = 0
    alerts: dict[tuple[str, str], int] = field(default_factory=dict)  # (kind, direction)
    started: int = 0

    def finished(self, outcome: str, duration_s: float, cache_hits: int, cache_misses: int) -> None:
        result = result_of(outcome)
        self.durations.setdefault(result, _Histogram()).observe(max(0.0, duration_s))
        self.runs[result] = self.runs.get(result, 0) + 1
        self.cache_hits += cache_hits
        self.cache_lookups += cache_hits + cache_misses

    def alert(self, kind: str, direction: str) -> None:
        key = (kind if kind in ALERT_KINDS else "other", direction if direction in ALERT_DIRECTIONS else "other")
        self.alerts[key] = self.alerts.get(key, 0) + 1


def families(figures: dict[str, TenantFigures], active: dict[str, float]) -> Iterator[Metric]:
    """The Prometheus families of ``figures`` (tenant -> figures) and ``active`` (tenant -> builds
    running now, NaN when Redis did not answer)."""
    dur = HistogramMetricFamily("cicd_pipeline_run_duration_seconds",
                                "Duration of finished builds (OTel cicd.pipeline.run.duration).",
                                labels=["tenant", "cicd_pipeline_result"])
    runs = CounterMetricFamily("cicd_pipeline_runs", "Builds finished, by result.",
                               labels=["tenant", "cicd_pipeline_result"])
    hits = CounterMetricFamily("buildtel_cache_hits", "Targets of finished builds that were cache hits "
                               "(local or remote).", labels=["tenant"])
    lookups = CounterMetricFamily("buildtel_cache_lookups", "Targets of finished builds that were cache hits "
                                  "or misses (uncacheable ones excluded).", labels=["tenant"])
    alerts = CounterMetricFamily("buildtel_build_alerts", "Regression and improvement alerts published.",
                                 labels=["tenant", "kind", "direction"])
    act = GaugeMetricFamily("cicd_pipeline_run_active", "Builds running now: the collector's active sessions "
                            "(OTel cicd.pipeline.run.active).", labels=["tenant"])
    for tenant, f in sorted(figures.items()):
        for result in sorted(set(RESULTS.values())):
            h = f.durations.get(result) or _Histogram()
            dur.add_metric([tenant, result], h.buckets(), h.total)
            runs.add_metric([tenant, result], float(f.runs.get(result, 0)))
        hits.add_metric([tenant], float(f.cache_hits))
        lookups.add_metric([tenant], float(f.cache_lookups))
        for (kind, direction), n in sorted(f.alerts.items()):
            alerts.add_metric([tenant, kind, direction], float(n))
    for tenant, running in sorted(active.items()):
        act.add_metric([tenant], running)
    yield from (dur, runs, hits, lookups, alerts, act)
