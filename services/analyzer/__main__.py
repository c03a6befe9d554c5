"""``python -m buildtel.services.analyzer``: run one analyzer replica until SIGTERM/SIGINT (URLs from the
environment)."""

import sys

from buildtel.services.registry import main_for

if __name__ == "__main__":
    sys.exit(main_for("analyzer"))
