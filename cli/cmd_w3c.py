"""``buildtel w3c-testpoint``: the HTTP endpoint the official W3C Trace Context test suite drives.

``POST /test`` with ``[{"url": …, "arguments": […]}, …]``: for each item the
endpoint POSTs ``arguments`` to ``url``, propagating its own context derived
from the incoming ``traceparent``/``tracestate`` (docs/tracing-context.md).
"""

from __future__ import annotations

import argparse

from buildtel.shared.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("w3c-testpoint", help="serve POST /test for the W3C Trace Context test suite")
    p.add_argument("--port", type=int, default=5000, help="port to listen on (default 5000; 0 = any free port)")
    p.add_argument("--host", default=None, help="address to bind (default BUILDER_TELEMETRY_HTTP_HOST, loopback)")
    p.add_argument("--allow-remote-targets", action="store_true",
                   help="also POST to non-loopback URLs the suite names (off: the endpoint is an open relay)")
    p.set_defaults(func=cmd_w3c_testpoint)


def cmd_w3c_testpoint(args: argparse.Namespace, settings: Settings) -> int:
    from buildtel.services.tracer.testpoint import run_testpoint

    return run_testpoint(args.port, args.host or settings.http_host, allow_remote_targets=args.allow_remote_targets)
