"""What the CLI may use of the notifier: its subscriptions (the file's and those made over the web
API) and its shared delivery counts.

All are read where the notifier reads them (the file named by ``BUILDER_TELEMETRY_ALERTS_CONFIG``,
the stack's Redis), so ``buildtel alerts subscriptions`` shows what the service works with.
"""

from __future__ import annotations

from typing import Any

from buildtel.services.notifier.config import ConfigError, Loaded, load
from buildtel.services.notifier.stored import describe as describe_stored
from buildtel.services.notifier.stored import load_all as load_stored
from buildtel.shared.keys import Keys

__all__ = ["ConfigError", "Loaded", "delivery_counts", "describe_stored", "load", "load_stored"]


async def delivery_counts(redis: Any, keys: Keys) -> dict[str, dict[str, int]]:
    """Deliveries by subscription id and result (``done``, ``dead``, ``suppressed``, ``retried``),
    counted by every replica of the namespace's notifier."""
    out: dict[str, dict[str, int]] = {}
    for field, n in (await redis.hgetall(keys.notifier_counts)).items():
        sub, _, how = field.decode().partition("|")
        out.setdefault(sub, {})[how] = int(n)
    return out
