"""Agent ids that name machines, and stay exact where several processes share a session.

The collector's idempotency is per session, agent id and seq (``seq`` counts from 0 in
each client), so two clients that publish into one session under one agent id would
overwrite each other's events as "duplicates".  The rules:

- A client that makes its own session (no ``session_id`` given; ``buildtel run``,
  which passes its id explicitly) is the session's only sender from this machine: its
  agent id is the machine, ``BUILDER_TELEMETRY_AGENT_ID`` or else the hostname, stable
  from run to run so ``--agent`` selects a machine.
- A client given a ``session_id`` joins a session others publish into (a tool inside
  ``buildtel run`` reads ``BUILDER_TELEMETRY_SESSION_ID``; a distributed build shares
  one id), possibly from this same machine: its agent id is ``<machine>/<sub-id>``, the
  sub-id being ``<pid>.<start>`` with ``start`` this client's creation time in
  milliseconds, base 36, made strictly increasing within the process.  No two clients
  get the same pair: a pid is reused only after its process exited, and a millisecond later.
- An ``agent_id`` passed to the client is used as given (the caller keeps it unique).
"""

from __future__ import annotations

import os
import socket
import threading
import time

MAX_AGENT_ID = 200  # buildtel.shared.sanitize cuts agent ids here
_lock = threading.Lock()
_last_ms = 0


def machine_id(configured: str | None = None) -> str:
    """This machine's agent id: ``configured`` (``BUILDER_TELEMETRY_AGENT_ID``) or the hostname."""
    return configured or socket.gethostname() or "agent"


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if n == 0:
            return out


def sub_id() -> str:
    """``<pid>.<start>``: unique among the clients of this machine (see the module docstring)."""
    global _last_ms
    with _lock:
        _last_ms = max(time.time_ns() // 1_000_000, _last_ms + 1)
        ms = _last_ms
    return f"{os.getpid()}.{_base36(ms)}"


def default_agent_id(configured: str | None, *, joining: bool) -> str:
    """The agent id of a client that was not given one; ``joining``: it was given a session id."""
    machine = machine_id(configured)
    if not joining:
        return machine
    sub = sub_id()
    return f"{machine[:MAX_AGENT_ID - len(sub) - 1]}/{sub}"  # the sub-id survives the length cap
