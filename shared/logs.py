"""structlog configuration, done once per process.

contextvars first (so ``bind_contextvars(session_id=…)`` tags every line), the
current OpenTelemetry trace/span id when one is active, then JSON when stderr is
not a TTY and a console renderer when it is.  Event names are dotted
(``"session.stored"``) with key-values.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from structlog.typing import EventDict, WrappedLogger

_configured = False


def _add_otel_ids(_: WrappedLogger, __: str, event: EventDict) -> EventDict:
    try:
        from opentelemetry import trace
    except ImportError:  # pragma: no cover - opentelemetry is a dependency of record
        return event
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event.setdefault("trace_id", format(ctx.trace_id, "032x"))
        event.setdefault("span_id", format(ctx.span_id, "016x"))
    return event


def _stderr_logger(*_args: Any) -> structlog.PrintLogger:
    return structlog.PrintLogger(file=sys.stderr)


def configure(level: str = "info", fmt: str = "auto", *, force: bool = False) -> None:
    global _configured
    if _configured and not force:
        return
    json_out = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if json_out else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_otel_ids,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper(), logging.INFO)),
        # sys.stderr as it is when a line is written, not when logging was configured: a process
        # (or a test run) may replace it later, and the old one may be closed by then.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """A logger whose lines say where they come from: ``name``'s first part is bound as ``service``
    (``"tracer.http"`` -> ``service="tracer"``, ``logger="tracer.http"``).  structlog's print
    logger factory drops the name argument, so it is bound rather than passed."""
    if name:
        initial = {"service": name.split(".", 1)[0], **({"logger": name} if "." in name else {}), **initial}
    log = structlog.get_logger()
    return log.bind(**initial) if initial else log
