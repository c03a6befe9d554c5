"""The services of the stack by name, imported lazily so one service's dependencies never
load into another's process.  ``buildtel up`` runs all of them; ``buildtel serve NAME`` one."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from buildtel.shared.settings import Settings

SERVICES: dict[str, str] = {
    "collector": "buildtel.services.collector.service:CollectorService",
    "storage": "buildtel.services.storage.service:StorageService",
    "analyzer": "buildtel.services.analyzer.service:AnalyzerService",
    "tracer": "buildtel.services.tracer.service:TracerService",
    "recorder": "buildtel.services.recorder.service:RecorderService",
    "notifier": "buildtel.services.notifier.service:NotifierService",
    "web": "buildtel.services.web.service:WebService",
    "bes": "buildtel.services.bes.service:BesService",
}

# Services with their own serve options: a module with ``add_serve_arguments(parser)`` and
# ``options_from_args(args) -> dict`` (the service's keyword arguments).
SERVE_OPTIONS: dict[str, str] = {
    "storage": "buildtel.services.storage.options",
    "tracer": "buildtel.services.tracer.options",
    "web": "buildtel.services.web.options",
}


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Each service's serve options, in a group named after it (``buildtel serve``)."""
    for name, module in SERVE_OPTIONS.items():
        group = parser.add_argument_group(f"{name} options (serve {name})")
        importlib.import_module(module).add_serve_arguments(group)


def create_from_args(name: str, args: argparse.Namespace, settings: Settings, nats_url: str, redis_url: str) -> Any:
    """:func:`create` with the service's serve options taken from ``args`` (parsed with
    :func:`add_serve_arguments`)."""
    module = SERVE_OPTIONS.get(name)
    options = importlib.import_module(module).options_from_args(args) if module else {}
    return create(name, settings, nats_url, redis_url, **options)


def create(name: str, settings: Settings, nats_url: str, redis_url: str, **options: Any) -> Any:
    try:
        target = SERVICES[name]
    except KeyError:
        raise ValueError(f"unknown service {name!r}; choose from {', '.join(SERVICES)}") from None
    module, _, attr = target.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    return factory(settings, nats_url, redis_url, **options)


def main_for(name: str, argv: list[str] | None = None) -> int:
    """``python -m buildtel.services.<name> [options]``: run that one service until SIGTERM/SIGINT,
    joining the NATS and Redis named by ``BUILDER_TELEMETRY_NATS_URL``/``_REDIS_URL`` (``buildtel
    serve`` does the same and also finds a local stack).  Exit codes: 0 after a signal, 1 when
    start-up fails (one log line, no traceback), 2 on bad configuration."""
    import asyncio
    import sys

    from buildtel.shared.logs import configure, get_logger
    from buildtel.shared.runner import run_until_signal
    from buildtel.shared.settings import SettingsError

    parser = argparse.ArgumentParser(prog=f"python -m buildtel.services.{name}",
                                     description=f"Run the {name} service until SIGTERM/SIGINT.")
    module = SERVE_OPTIONS.get(name)
    if module:
        importlib.import_module(module).add_serve_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    configure(settings.log_level, settings.log_format)
    if not (settings.nats_url and settings.redis_url):
        print(f"{name}: BUILDER_TELEMETRY_NATS_URL and BUILDER_TELEMETRY_REDIS_URL must be set", file=sys.stderr)
        return 2
    try:
        service = create_from_args(name, args, settings, settings.nats_url, settings.redis_url)
    except ValueError as exc:  # a configuration file it reads (the notifier's subscriptions)
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run_until_signal([service]))
    except Exception as exc:  # noqa: BLE001 - one readable line instead of a traceback
        get_logger(name).error(f"{name}.failed", error=repr(exc))
        return 1
    return 0
