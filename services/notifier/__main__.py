"""``python -m buildtel.services.notifier``: run one notifier replica until SIGTERM/SIGINT (URLs and
``BUILDER_TELEMETRY_ALERTS_CONFIG`` from the environment)."""

import sys

from buildtel.services.registry import main_for

if __name__ == "__main__":
    sys.exit(main_for("notifier"))
