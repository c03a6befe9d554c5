"""Distributed tracing for Builder Telemetry (see ``docs/tracing.md``).

* ``api``: the tracing API over the OpenTelemetry SDK; ``bus_exporter``: its
  ``SpanExporter`` publishing span batches on JetStream.
* ``propagation``: W3C Trace Context Level 2 across HTTP, NATS and child
  processes; ``testpoint``: the endpoint the W3C conformance suite drives
  (``docs/tracing-context.md``).
* ``service``: the tracer service (OTLP/HTTP receiver ``http``, bus and
  session consumers, ``store``/``segments`` on disk, ``query`` over NATS);
  ``sessions`` turns completed builds into spans; ``otlp``/``otlp_json``
  translate OTLP; ``exporters``/``formats`` send to OTLP, Zipkin and Jaeger.
"""
