"""Client SDK: emit build events from an agent without ever slowing or breaking the build.

The public names, in one place (``docs/sdk.md``): :class:`TelemetryClient` for asyncio code
(``shared/client_async.py``: batching, publishing, reconnecting), :class:`SyncTelemetryClient`
for everything else (``shared/client_sync.py``: the async client on a private loop in a
daemon thread), and :class:`ClientStats`.  The event buffer and emit methods they share are
``shared/emitter.py``.  This module only gathers them, so the implementation modules import one
way (``client_sync -> client_async -> emitter``) and none imports this one.
"""

from __future__ import annotations

from buildtel.shared.client_async import TelemetryClient, UrlSource
from buildtel.shared.client_sync import SyncTelemetryClient
from buildtel.shared.emitter import ClientStats

__all__ = ["ClientStats", "SyncTelemetryClient", "TelemetryClient", "UrlSource"]
