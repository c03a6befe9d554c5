"""Build health: live checkpoints (``monitor.py``), what they sample (``sampler.py``) and
health across builds for reports (``trends.py``).  Rules: ``docs/health.md``."""

from buildtel.shared.health.monitor import (
           DEFAULT_INTERVAL_S,
           HealthMonitor,
           HealthRules,
           HealthStatus,
           evaluate,
)
from buildtel.shared.health.trends import HealthTrends, health_trends

__all__ = ["DEFAULT_INTERVAL_S", "HealthMonitor", "HealthRules", "HealthStatus", "HealthTrends", "evaluate",
           "health_trends"]
