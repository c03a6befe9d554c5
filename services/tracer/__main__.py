"""``python -m buildtel.services.tracer [--otlp-port N] [--forward-otlp URL] [--forward-zipkin URL]``:
run one tracer until SIGTERM/SIGINT (bus URLs from the environment)."""

import argparse
import asyncio
import sys

from buildtel.services.tracer.options import add_serve_arguments, options_from_args
from buildtel.services.tracer.service import TracerService
from buildtel.shared.logs import configure
from buildtel.shared.runner import run_until_signal
from buildtel.shared.settings import Settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m buildtel.services.tracer", description=__doc__)
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    settings = Settings.from_env()
    configure(settings.log_level, settings.log_format)
    if not (settings.nats_url and settings.redis_url):
        print("tracer: BUILDER_TELEMETRY_NATS_URL and BUILDER_TELEMETRY_REDIS_URL must be set", file=sys.stderr)
        return 2
    service = TracerService(settings, settings.nats_url, settings.redis_url, **options_from_args(args))
    asyncio.run(run_until_signal([service]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
