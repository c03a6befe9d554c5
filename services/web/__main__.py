"""``python -m buildtel.services.web [--web-port N]``: run one web service until SIGTERM/SIGINT,
joining the stack named by ``BUILDER_TELEMETRY_NATS_URL``/``_REDIS_URL``
(:func:`buildtel.services.registry.main_for`)."""

import sys

from buildtel.services.registry import main_for

if __name__ == "__main__":
    sys.exit(main_for("web"))
