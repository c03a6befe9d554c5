"""The web service's serve options: its flags and the ``WebService`` keyword arguments they give
(``buildtel serve web``, ``python -m buildtel.services.web``).  Light: imports no bus client."""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_WEB_PORT = 8480


def add_serve_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--web-port", type=int, default=None, metavar="PORT",
                        help="port of the HTTP API on BUILDER_TELEMETRY_HTTP_HOST (default: "
                             f"BUILDER_TELEMETRY_WEB_PORT, else {DEFAULT_WEB_PORT}; 0 = any free port)")


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """A serving web service listens on a known port: the flag, the setting, else the default."""
    port = getattr(args, "web_port", None)
    return {"port": port} if port is not None else {"default_port": DEFAULT_WEB_PORT}
