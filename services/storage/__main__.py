"""``python -m buildtel.services.storage [--ack-wait-s S] [--batch-size N]``: run the storage service
until SIGINT/SIGTERM, joining the stack named by ``BUILDER_TELEMETRY_NATS_URL``/``_REDIS_URL``.
Exit codes: 0 after a signal, 1 when start-up fails, 2 on bad configuration
(:func:`buildtel.services.registry.main_for`)."""

import sys

from buildtel.services.registry import main_for

if __name__ == "__main__":
    sys.exit(main_for("storage"))
