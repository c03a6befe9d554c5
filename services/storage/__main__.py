"""``python -m buildtel.services.storage``: run the storage service until SIGINT/SIGTERM.

Configuration comes from ``BUILDER_TELEMETRY_*`` (``Settings.from_env``);
``BUILDER_TELEMETRY_NATS_URL`` and ``BUILDER_TELEMETRY_REDIS_URL`` must be set
(this entry point joins a running stack; ``buildtel up`` starts a local one).
Exit codes: 0 after a signal, 1 when start-up fails, 2 on bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from buildtel.services.storage.service import StorageService
from buildtel.shared.logs import configure, get_logger
from buildtel.shared.runner import run_until_signal
from buildtel.shared.settings import Settings, SettingsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m buildtel.services.storage", description=__doc__.splitlines()[0])
    parser.add_argument("--ack-wait-s", type=float, default=30.0,
                        help="JetStream ack wait of the durable consumer when this run creates it; "
                             "un-acked messages of a crashed instance are redelivered after it (default 30)")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="messages fetched (and fsynced together) per batch; bounds memory in flight")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"storage: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_format)
    if not settings.nats_url or not settings.redis_url:
        print("storage: set BUILDER_TELEMETRY_NATS_URL and BUILDER_TELEMETRY_REDIS_URL", file=sys.stderr)
        return 2
    service = StorageService(settings, settings.nats_url, settings.redis_url, ack_wait_s=args.ack_wait_s,
                             batch_size=args.batch_size)
    try:
        asyncio.run(run_until_signal([service]))
    except Exception as exc:  # noqa: BLE001 - one readable line instead of a traceback
        get_logger("storage").error("storage.failed", error=repr(exc))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
