"""``python -m buildtel.services.bes``: run the Build Event Service endpoint until SIGTERM/SIGINT,
joining the stack named by ``BUILDER_TELEMETRY_NATS_URL``/``_REDIS_URL``."""

import sys

from buildtel.services.registry import main_for

if __name__ == "__main__":
    sys.exit(main_for("bes"))
