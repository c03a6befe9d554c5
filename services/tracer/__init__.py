"""Distributed tracing for Builder Telemetry.

``services.tracer.propagation`` carries W3C Trace Context (Level 2) across HTTP,
NATS and child processes on top of OpenTelemetry; ``services.tracer.testpoint``
is the HTTP endpoint that the official W3C conformance suite drives.  See
``docs/tracing-context.md``.
"""
