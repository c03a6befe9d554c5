"""The tracer's serve options: its command-line flags and the ``TracerService`` keyword
arguments they give.  The public home of what ``buildtel serve tracer`` (through
``services/registry.py``) and ``python -m buildtel.services.tracer`` add to their parsers, so the
CLI never reaches into ``service.py``.  Light on purpose: building a parser imports no bus client.
"""

from __future__ import annotations

import argparse
from typing import Any

from buildtel.services.tracer.store import DEFAULT_MAX_BYTES, DEFAULT_MAX_TRACES

DEFAULT_OTLP_PORT = 4318


def add_serve_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """Flags of the tracer service (``buildtel serve tracer``, ``python -m buildtel.services.tracer``)."""
    parser.add_argument("--otlp-port", type=int, default=None,
                        help=f"OTLP/HTTP port on BUILDER_TELEMETRY_HTTP_HOST (default {DEFAULT_OTLP_PORT}, skipped "
                             "with an error logged if taken; an explicit port must bind; 0 = any free port)")
    parser.add_argument("--forward-otlp", action="append", default=[], metavar="URL",
                        help="also send every span to this OTLP/HTTP endpoint (repeatable), e.g. http://jaeger:4318")
    parser.add_argument("--forward-otlp-protocol", choices=("protobuf", "json"), default="protobuf",
                        help="encoding for --forward-otlp (default protobuf)")
    parser.add_argument("--forward-zipkin", action="append", default=[], metavar="URL",
                        help="also send every span to this Zipkin endpoint (repeatable), e.g. http://zipkin:9411")
    parser.add_argument("--max-trace-bytes", type=int, default=DEFAULT_MAX_BYTES, metavar="BYTES",
                        help=f"trace store size cap, oldest segments dropped first (default {DEFAULT_MAX_BYTES})")
    parser.add_argument("--max-traces", type=int, default=DEFAULT_MAX_TRACES, metavar="N",
                        help=f"traces the store keeps at most (default {DEFAULT_MAX_TRACES})")


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``TracerService`` keyword arguments from parsed :func:`add_serve_arguments` flags."""
    return {"otlp_port": getattr(args, "otlp_port", None), "forward_otlp": args.forward_otlp or (),
            "forward_otlp_protocol": args.forward_otlp_protocol, "forward_zipkin": args.forward_zipkin or (),
            "max_bytes": getattr(args, "max_trace_bytes", DEFAULT_MAX_BYTES),
            "max_traces": getattr(args, "max_traces", DEFAULT_MAX_TRACES)}
