"""The :class:`TargetSource` protocol: how per-target capture plugs into ``buildtel run``.

Defined here, next to its implementations (:mod:`buildtel.shared.capture.live`), rather than in
the CLI command that drives it, so that the dependency points from the CLI to the library
(docs/architecture.md).  A new capture method implements this protocol in ``shared/capture``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any, Protocol


class TargetSource(Protocol):
    """Per-target events of one run, e.g. make recipes or ninja edges (``shared/capture``)."""

    def prepare(self, argv: list[str], env: dict[str, str]) -> list[str]:
        """Before spawning: may edit ``env`` in place and return a rewritten argv."""
        ...

    def targets(self, done: threading.Event) -> Iterable[Mapping[str, Any]]:
        """Yield keyword arguments of ``target_finished`` (or of ``target_started``/``health``,
        named under ``"event"``) while the command runs; finish soon after ``done`` is set
        (the command has exited).  A source may also have ``spawned(pid)``, called after the spawn."""
        ...
