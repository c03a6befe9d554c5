"""The tracing API of Builder Telemetry, a thin layer over the OpenTelemetry SDK.

    from buildtel.services.tracer import api

    with api.start_trace("build", session_id=sid, target_count=12):
        with api.start_span("compile //app:lib") as span:
            span.set_attribute("build.cache", "miss")
            subprocess.run(cmd, env=api.child_env())   # the child joins this trace
        api.add_event("cache.uploaded", bytes=1234)

Spans are real SDK spans (``opentelemetry.trace.Span``): instrumentation
libraries, ``trace.get_current_span()`` and structlog's trace ids all see
them.  :func:`configure_tracing` installs one process-wide ``TracerProvider``
with a ``BatchSpanProcessor`` around :class:`BusSpanExporter`, so finished
spans reach the tracer service over NATS; :func:`get_tracer` configures from
the environment (``BUILDER_TELEMETRY_*``) on first use.

Trace context crosses processes as W3C ``traceparent``/``tracestate``
(``propagation.py``): :func:`child_env` for subprocesses, :func:`inject_headers`
and :func:`extract_headers` for NATS/HTTP headers.  :func:`start_trace` picks
its parent in this order: the build session (``session_id=``: the agent's
spans hang under the session span the tracer synthesizes when the session
completes), the current span, ``TRACEPARENT`` in the environment (a build step
started by a traced parent), else a new trace.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Mapping, MutableMapping
from types import TracebackType
from typing import Any, Literal, Self

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
)

from buildtel.services.tracer import propagation
from buildtel.shared.logs import get_logger
from buildtel.shared.settings import Settings
from buildtel.shared.tracemodel import SESSION_ATTR, session_span_id

__all__ = [
    "SpanHandle",
    "SpanKind",
    "add_event",
    "child_env",
    "configure_tracing",
    "current_span",
    "extract_headers",
    "finish_span",
    "get_tracer",
    "inject_headers",
    "record_exception",
    "session_parent",
    "set_attribute",
    "set_attributes",
    "set_status",
    "shutdown_tracing",
    "start_span",
    "start_trace",
]

log = get_logger("tracer.api")
TRACER_NAME = "builder_telemetry"
_lock = threading.Lock()
_provider: TracerProvider | None = None
# Open handles by span, so finish_span(span) and finish_span() also restore the parent context.
_open: weakref.WeakValueDictionary[int, SpanHandle] = weakref.WeakValueDictionary()


# -- setup -----------------------------------------------------------------------------------

def _nats_url(settings: Settings) -> str | None:
    if settings.nats_url:
        return settings.nats_url
    try:  # a local stack started by `buildtel up`
        from buildtel.shared.stackfile import read_stack

        info = read_stack(settings)
    except Exception:  # noqa: BLE001 - no stack file, unreadable: run without export
        return None
    return info.get("nats_url") if info else None


def configure_tracing(settings: Settings | None = None, *, nats_url: str | None = None,
                      service_name: str | None = None, exporter: SpanExporter | None = None,
                      resource_attributes: Mapping[str, Any] | None = None) -> TracerProvider:
    """Install the process-wide provider (first call wins) and return it.

    ``exporter`` defaults to :class:`BusSpanExporter` when a NATS URL is known
    (argument, ``BUILDER_TELEMETRY_NATS_URL`` or the local stack); without one
    spans are recorded but not exported.  ``service_name`` defaults to
    ``OTEL_SERVICE_NAME``, then ``"buildtel"``.  If the application already set
    an SDK provider, the exporter is added to it instead of replacing it.
    """
    global _provider
    with _lock:
        if _provider is not None:
            return _provider
        settings = settings or Settings.from_env()
        if exporter is None and settings.enabled:
            url = nats_url or _nats_url(settings)
            if url:
                from buildtel.services.tracer.bus_exporter import BusSpanExporter

                exporter = BusSpanExporter(settings, url)
        existing = trace.get_tracer_provider()
        if isinstance(existing, TracerProvider):
            provider = existing
        else:
            attrs = {"service.name": service_name or os.environ.get("OTEL_SERVICE_NAME") or "buildtel",
                     "process.pid": os.getpid(), **dict(resource_attributes or {})}
            # Resource.create also merges OTEL_RESOURCE_ATTRIBUTES and the SDK's own attributes.
            provider = TracerProvider(resource=Resource.create(attrs))
            trace.set_tracer_provider(provider)
        if exporter is not None:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        _provider = provider
        return provider


def shutdown_tracing() -> None:
    """Flush and export every finished span, then stop exporting (also runs at interpreter exit)."""
    if _provider is not None:
        _provider.force_flush()
        _provider.shutdown()


def get_tracer(name: str = TRACER_NAME) -> trace.Tracer:
    """The tracer of the process-wide provider (configured from the environment on first use)."""
    return configure_tracing().get_tracer(name)


# -- spans -----------------------------------------------------------------------------------

class SpanHandle:
    """A started span that is the *current* span until finished.

    Use it as a context manager (an exception escaping the block is recorded
    and sets ERROR status), or call :meth:`finish` / :func:`finish_span`.
    ``.span`` is the underlying OpenTelemetry span.
    """

    __slots__ = ("__weakref__", "_finished", "_token", "span")

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self._token: object | None = otel_context.attach(trace.set_span_in_context(span))
        self._finished = False
        _open[id(span)] = self

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    @property
    def span_id(self) -> str:
        return format(self.span.get_span_context().span_id, "016x")

    @property
    def traceparent(self) -> str:
        return propagation.format_traceparent(self.span.get_span_context())

    def set_attribute(self, key: str, value: Any) -> SpanHandle:
        self.span.set_attribute(key, value)
        return self

    def add_event(self, name: str, **attributes: Any) -> SpanHandle:
        self.span.add_event(name, attributes)
        return self

    def record_exception(self, exc: BaseException, **attributes: Any) -> SpanHandle:
        self.span.record_exception(exc, attributes or None)
        return self

    def set_status(self, status: Literal["ok", "error", "unset"] | StatusCode,
                   description: str | None = None) -> SpanHandle:
        set_status(status, description, span=self.span)
        return self

    def finish(self, end_time_ns: int | None = None) -> None:
        """End the span and restore the previous current span. Idempotent."""
        if self._finished:
            return
        self._finished = True
        _open.pop(id(self.span), None)
        self.span.end(end_time_ns)
        token, self._token = self._token, None
        if token is not None:
            otel_context.detach(token)  # type: ignore[arg-type]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None and not isinstance(exc, GeneratorExit):
            self.span.record_exception(exc, escaped=True)
            self.span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))
        self.finish()


def session_parent(session_id: str, trace_id: str | None = None) -> Context:
    """A context whose parent is the span the tracer synthesizes for ``session_id``.

    ``trace_id`` is the session's trace: ``TRACEPARENT``'s trace id when this
    process was handed one (the collector records it from ``BuildStarted``),
    else the session id.
    """
    if trace_id is None:
        env_parent = trace.get_current_span(propagation.extract_env()).get_span_context()
        trace_id = format(env_parent.trace_id, "032x") if env_parent.is_valid else session_id
    ctx = SpanContext(int(trace_id, 16), int(session_span_id(session_id, trace_id), 16), is_remote=True,
                      trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(ctx), Context())


def start_trace(name: str, *, session_id: str | None = None, trace_id: str | None = None,
                new_trace: bool = False, kind: SpanKind = SpanKind.INTERNAL,
                attributes: Mapping[str, Any] | None = None, **attrs: Any) -> SpanHandle:
    """Start the top span of this process's work (parent rules in the module docstring).

    ``session_id`` ties the trace to a build session (trace id = session id,
    or ``trace_id``/``TRACEPARENT``'s); ``new_trace=True`` ignores every parent.
    Keyword ``attrs`` become attributes (``attributes=`` takes dotted keys).
    """
    all_attrs = {**dict(attributes or {}), **attrs}
    if session_id:
        ctx: Context | None = session_parent(session_id, trace_id)
        all_attrs.setdefault(SESSION_ATTR, session_id)
    elif new_trace:
        ctx = Context()
    elif trace.get_current_span().get_span_context().is_valid:
        ctx = None
    else:
        ctx = propagation.extract_env()  # an empty Context (new trace) when TRACEPARENT is absent/invalid
    span = get_tracer().start_span(name, context=ctx, kind=kind, attributes=all_attrs or None)
    return SpanHandle(span)


def start_span(name: str, *, kind: SpanKind = SpanKind.INTERNAL,
               parent: SpanHandle | trace.Span | Context | None = None, links: list[trace.Link] | None = None,
               attributes: Mapping[str, Any] | None = None,
               **attrs: Any) -> SpanHandle:
    """Start a child of the current span (or of ``parent``) and make it current."""
    if isinstance(parent, SpanHandle):
        parent = parent.span
    ctx = trace.set_span_in_context(parent) if isinstance(parent, trace.Span) else parent
    all_attrs = {**dict(attributes or {}), **attrs}
    span = get_tracer().start_span(name, context=ctx, kind=kind, attributes=all_attrs or None, links=links)
    return SpanHandle(span)


def current_span() -> trace.Span:
    return trace.get_current_span()


def _target(span: SpanHandle | trace.Span | None) -> trace.Span:
    if isinstance(span, SpanHandle):
        return span.span
    return span if span is not None else trace.get_current_span()


def set_attribute(key: str, value: Any, *, span: SpanHandle | trace.Span | None = None) -> None:
    """Set one attribute (str, bool, int, float or a homogeneous list of them) on the current span."""
    _target(span).set_attribute(key, value)


def set_attributes(attributes: Mapping[str, Any], *, span: SpanHandle | trace.Span | None = None) -> None:
    _target(span).set_attributes(dict(attributes))


def add_event(name: str, *, span: SpanHandle | trace.Span | None = None, timestamp_ns: int | None = None,
              **attributes: Any) -> None:
    """Add a timestamped event (a log line inside the span)."""
    _target(span).add_event(name, attributes, timestamp_ns)


def record_exception(exc: BaseException, *, span: SpanHandle | trace.Span | None = None, escaped: bool = False,
                     **attributes: Any) -> None:
    """Record ``exc`` as an ``exception`` event (type, message, stack trace); status is left alone."""
    _target(span).record_exception(exc, attributes or None, escaped=escaped)


def set_status(status: Literal["ok", "error", "unset"] | StatusCode, description: str | None = None, *,
               span: SpanHandle | trace.Span | None = None) -> None:
    """Set the span's status; ``description`` is kept only with ``"error"`` (OpenTelemetry's rule)."""
    code = status if isinstance(status, StatusCode) else {"ok": StatusCode.OK, "error": StatusCode.ERROR,
                                                          "unset": StatusCode.UNSET}[status]
    _target(span).set_status(Status(code, description if code is StatusCode.ERROR else None))


def finish_span(span: SpanHandle | trace.Span | None = None, *, end_time_ns: int | None = None) -> None:
    """End ``span`` (default: the current one) and, for a :class:`SpanHandle`, restore its parent."""
    target = _target(span)
    handle = span if isinstance(span, SpanHandle) else _open.get(id(target))
    if handle is not None:
        handle.finish(end_time_ns)
    else:
        target.end(end_time_ns)


# -- propagation -----------------------------------------------------------------------------

def child_env(env: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Environment for a subprocess with ``TRACEPARENT``/``TRACESTATE`` of the current span."""
    return propagation.inject_env(env)


def inject_headers(headers: MutableMapping[str, Any] | None = None) -> MutableMapping[str, Any]:
    """NATS/HTTP headers carrying the current trace context (``nc.publish(..., headers=...)``)."""
    return propagation.inject_headers(headers)


def extract_headers(headers: Any) -> Context:
    """A context to pass as ``parent=`` for work triggered by a message with these headers."""
    return propagation.extract_headers(headers)
