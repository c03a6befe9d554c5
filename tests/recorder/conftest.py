"""Recorder tests call ``buildtel.cli.main.main`` in-process under ``capsys``: keep structlog
writing to whatever ``sys.stderr`` is *now*, not to the capture buffer that was current when
``main`` first configured logging (it is closed once that test ends, and services stopped in
a later fixture teardown would log into it)."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import structlog

from buildtel.shared import logs
from tests.recorder.recordings import recorder  # noqa: F401 - a fixture: the recorder service


class _CurrentStderr:
    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


@pytest.fixture(autouse=True)
def _logs_follow_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    original = logs.configure

    def configure(level: str = "info", fmt: str = "auto", **_: Any) -> None:
        original(level, fmt, force=True)
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()))  # type: ignore[arg-type]

    monkeypatch.setattr(logs, "configure", configure)
    configure("info", "json")
