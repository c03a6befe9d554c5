"""The local stack file: where ``buildtel up`` on this machine says its stack is.

``buildtel up`` writes ``<cache_dir>/stack.json`` (mode 0600: URLs and role credentials);
the CLI, the SDK (:mod:`buildtel.shared.client`) and the tracing API
(:mod:`buildtel.services.tracer.api`) read it to find a stack nobody configured.  It lives in
``shared/`` because all three need it and nothing in ``shared/`` or ``services/`` may import
the CLI (docs/architecture.md).  Reading it never starts anything: starting and stopping a
stack stays in ``cli/common.py``.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from buildtel.shared.auth import StackAuth
from buildtel.shared.settings import Settings

STACK_FILE = "stack.json"


def stack_file(settings: Settings) -> Path:
    return settings.cache_dir / STACK_FILE


def _reachable(url: str) -> bool:
    """Whether any server of ``url`` (comma-separated: a cluster) answers; one node down is not a
    stack down."""
    for one in url.split(","):
        u = urlparse(one.strip())
        try:
            with socket.create_connection((u.hostname or "127.0.0.1", u.port or 4222), timeout=0.5):
                return True
        except OSError:
            continue
    return False


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_stack_file(settings: Settings) -> dict[str, Any] | None:
    """``stack.json`` as written, whatever state the stack is in (``down`` uses it)."""
    try:
        info = json.loads(stack_file(settings).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def read_stack(settings: Settings) -> dict[str, Any] | None:
    """The local stack's description, when it is running and ready for commands."""
    info = read_stack_file(settings)
    if info is None or info.get("state", "running") != "running":
        return None
    if not _pid_alive(int(info.get("pid", 0))) or not _reachable(info.get("nats_url", "")):
        return None
    return info


def session_url(settings: Settings, session_id: str) -> str | None:
    """A session's link: under ``BUILDER_TELEMETRY_WEB_URL`` (the external base URL behind a
    proxy), else under the web service of the local stack (``web_url`` in stack.json); None when
    neither exists (docs/api.md)."""
    base = settings.web_url
    if not base:
        info = read_stack_file(settings)
        base = str(info.get("web_url") or "") if info else ""
    return f"{base.rstrip('/')}/sessions/{session_id}" if base else None


def stack_auth_of(settings: Settings) -> StackAuth | None:
    """The local stack's credentials when the NATS URL comes from it (for the SDK's resolver)."""
    if settings.nats_url:
        return settings.stack_auth
    info = read_stack(settings)
    return StackAuth.from_json(info["auth"]) if info and info.get("auth") else None
