"""What the CLI may use of the notifier: its subscriptions file and its shared delivery counts.

Both are read where the notifier reads them (the file named by ``BUILDER_TELEMETRY_ALERTS_CONFIG``,
the stack's Redis), so ``buildtel alerts subscriptions`` shows what the service works with.
"""

from __future__ import annotations

from typing import Any

from buildtel.services.notifier.config import ConfigError, Loaded, load
from buildtel.shared.keys import Keys

__all__ = ["ConfigError", "Loaded", "delivery_counts", "load"]


async def delivery_counts(redis: Any, keys: Keys) -> dict[str, dict[str, int]]:
    """Deliveries by subscription id and result (``done``, ``dead``, ``suppressed``, ``retried``),
    counted by every replica of the namespace's notifier."""
    out: dict[str, dict[str, int]] = {}
    for field, n in (await redis.hgetall(keys.notifier_counts)).items():
        sub, _, how = field.decode().partition("|")
        out.setdefault(sub, {})[how] = int(n)
    return out
