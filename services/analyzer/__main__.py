"""``python -m services.analyzer``: run one analyzer replica until SIGTERM/SIGINT (URLs from the environment)."""

import asyncio
import sys

from services.analyzer.service import AnalyzerService
from shared.logs import configure
from shared.runner import run_until_signal
from shared.settings import Settings


def main() -> int:
    settings = Settings.from_env()
    configure(settings.log_level, settings.log_format)
    if not (settings.nats_url and settings.redis_url):
        print("analyzer: BUILDER_TELEMETRY_NATS_URL and BUILDER_TELEMETRY_REDIS_URL must be set", file=sys.stderr)
        return 2
    asyncio.run(run_until_signal([AnalyzerService(settings, settings.nats_url, settings.redis_url)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
