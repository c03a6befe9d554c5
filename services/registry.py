"""The services of the stack by name, imported lazily so one service's dependencies never
load into another's process.  ``buildtel up`` runs all of them; ``buildtel serve NAME`` one."""

from __future__ import annotations

import importlib
from typing import Any

from shared.settings import Settings

SERVICES: dict[str, str] = {
    "collector": "services.collector.service:CollectorService",
    "storage": "services.storage.service:StorageService",
    "analyzer": "services.analyzer.service:AnalyzerService",
    "tracer": "services.tracer.service:TracerService",
    "recorder": "services.recorder.service:RecorderService",
}


def create(name: str, settings: Settings, nats_url: str, redis_url: str, **options: Any) -> Any:
    try:
        target = SERVICES[name]
    except KeyError:
        raise ValueError(f"unknown service {name!r}; choose from {', '.join(SERVICES)}") from None
    module, _, attr = target.partition(":")
    factory = getattr(importlib.import_module(module), attr)
    return factory(settings, nats_url, redis_url, **options)
