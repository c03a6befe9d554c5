"""``buildtel watch [SESSION]``: the builds running across the farm, live in the terminal.

Every ``buildtel run`` (and any SDK user calling ``health()``) publishes its
health checkpoints on core NATS, ``<ns>.health.<session>``, best effort.  This
command subscribes to ``<ns>.health.*`` (or one session's subject) and shows the
latest checkpoint of each (session, agent):

* on a terminal, a table redrawn in place once a second (cursor moved up over the
  previous table, so the scrollback above is kept);
* otherwise (a pipe, a CI log) one line per checkpoint as it arrives;
* ``--json``: one JSON object per line instead (each checkpoint, every field stated);
* ``--once`` listens for ``--duration`` seconds (default 6: longer than the default
  5 s checkpoint interval, so every running build is heard from), prints the table
  once without escape codes and exits; ``--duration S`` alone watches for S seconds.

Ctrl-C exits with status 0.  A session unheard of for ``STALE_S`` is shown as stale
and dropped after ``DROP_S`` (a build that finished stops sending; the last
checkpoint is stored with the session, see ``buildtel sessions``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from typing import Any, TextIO

from buildtel.cli.common import connect_cli, resolve
from buildtel.cli.errors import CLIError
from buildtel.cli.jsonout import emit
from buildtel.cli.textsafe import safe
from buildtel.shared.engines import public_url
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects

STALE_S = 15.0
DROP_S = 120.0
REFRESH_S = 1.0
ONCE_DEFAULT_S = 6.0
COLUMNS = ("SESSION", "AGENT", "STATUS", "DONE", "FAIL", "RUN", "PEND", "WORKERS", "UTIL", "VEL/s", "THR/s",
           "MEM", "ETA", "SEEN", "REASONS")


def register(sub: Any) -> None:
    p = sub.add_parser("watch", help="show running builds live (health checkpoints)",
                       description="Show the health of running builds across the farm, live.")
    p.add_argument("session", nargs="?", default=None,
                   help="only this session (full id, or a prefix of one)")
    p.add_argument("--once", action="store_true", help=f"listen --duration seconds (default {ONCE_DEFAULT_S:g}), "
                                                        "print the table once, exit")
    p.add_argument("--duration", type=float, default=None, metavar="S", help="stop after S seconds")
    p.add_argument("--plain", action="store_true", help="one line per checkpoint even on a terminal")
    p.add_argument("--json", action="store_true",
                   help="one JSON object per line: each checkpoint as it arrives (with --once: the latest "
                        "checkpoint of each running build, at the end)")
    p.set_defaults(func=cmd_watch, quiet_logs=True)


class Board:
    """The latest checkpoint per (session, agent), with when it was received."""

    def __init__(self, session_filter: str | None = None) -> None:
        self.filter = session_filter
        self.rows: dict[tuple[str, str], tuple[Any, float]] = {}
        self.received = 0
        self.bad = 0

    def add(self, data: bytes, now: float | None = None) -> Any | None:
        from buildtel.shared.codec import event_decoder
        from buildtel.shared.protocol import HealthCheckpoint

        try:
            ev = event_decoder.decode(data)
        except Exception:  # noqa: BLE001 - someone else's bytes on our subject: skip them
            self.bad += 1
            return None
        if not isinstance(ev, HealthCheckpoint):
            self.bad += 1
            return None
        if self.filter and not ev.session_id.startswith(self.filter):
            return None
        self.received += 1
        key = (ev.session_id, ev.agent_id)
        prev = self.rows.get(key)
        if prev is None or ev.ts >= prev[0].ts:  # core NATS may reorder; keep the newest
            self.rows[key] = (ev, time.monotonic() if now is None else now)
        return ev

    def prune(self, now: float) -> None:
        for key, (_, seen) in list(self.rows.items()):
            if now - seen > DROP_S:
                del self.rows[key]


def _mem(n: int) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if n < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _eta(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def row_cells(cp: Any, age: float) -> list[str]:
    # Ids, status and reasons come from publishers: escaped (cli/textsafe.py).
    status = safe(cp.status) if age <= STALE_S else f"stale({safe(cp.status)})"
    return [safe(cp.session_id)[:12], safe(cp.agent_id)[:24], status, str(cp.completed_tasks), str(cp.failed_tasks),
            str(cp.active_tasks), str(cp.pending_tasks) if cp.pending_tasks or cp.eta_s is not None else "?",
            f"{cp.active_workers}/{cp.worker_count or '?'}", f"{cp.utilisation * 100:.0f}%",
            f"{cp.velocity:.1f}", f"{cp.throughput:.1f}", _mem(cp.memory_bytes), _eta(cp.eta_s),
            f"{age:.0f}s", safe("; ".join(cp.reasons))[:60]]


def render_table(board: Board, now: float) -> list[str]:
    """The table as lines (no escape codes), worst status first, then newest session."""
    rank = {"critical": 0, "degraded": 1, "healthy": 2}
    items = sorted(board.rows.values(), key=lambda r: (rank.get(r[0].status, 3), -r[0].ts))
    body = [row_cells(cp, now - seen) for cp, seen in items]
    widths = [max(len(c), *(len(r[i]) for r in body)) if body else len(c) for i, c in enumerate(COLUMNS)]

    def fmt(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    lines = [fmt(list(COLUMNS)), *(fmt(r) for r in body)]
    if not body:
        lines.append("(no running builds heard from yet)")
    return lines


def plain_line(cp: Any) -> str:
    eta = f" eta={_eta(cp.eta_s)}" if cp.eta_s is not None else ""
    why = f" reasons={safe(repr('; '.join(cp.reasons)))}" if cp.reasons else ""
    return (f"{time.strftime('%H:%M:%S', time.localtime(cp.ts))} {safe(cp.session_id)} {safe(cp.agent_id)} "
            f"{safe(cp.status)} "
            f"done={cp.completed_tasks} failed={cp.failed_tasks} active={cp.active_tasks} "
            f"pending={cp.pending_tasks} workers={cp.active_workers}/{cp.worker_count} "
            f"util={cp.utilisation:.2f} velocity={cp.velocity:.2f}/s throughput={cp.throughput:.2f}/s "
            f"mem={_mem(cp.memory_bytes)} host_mem={cp.memory_percent:.0f}%{eta}{why}")


def _connect_settings(settings: Settings) -> Settings:
    """Where NATS is and, for the local stack, the reader role's password (never starts a stack)."""
    return resolve(settings, autostart=False, need_redis=False)


async def cmd_watch(args: argparse.Namespace, settings: Settings, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    duration = args.duration if args.duration is not None else (ONCE_DEFAULT_S if args.once else None)
    as_json = getattr(args, "json", False)
    live_table = not args.once and not args.plain and not as_json and out.isatty()
    subjects = Subjects(settings.namespace)
    sid = args.session
    subject = subjects.health(sid) if sid and len(sid) == 32 else subjects.health_all
    board = Board(sid)
    settings = _connect_settings(settings)
    lost = asyncio.Event()

    async def on_closed() -> None:
        lost.set()  # reconnects used up (the stack went away): say so instead of watching silence

    # Bounded, and the error names the URL (cli/common.py); a restart is waited out.
    nc = await connect_cli(settings, settings.nats_url or "", name="buildtel-watch", role="reader",
                           max_reconnect_attempts=20, reconnect_time_wait=0.5, closed_cb=on_closed)

    async def on_msg(msg: Any) -> None:
        cp = board.add(msg.data)
        if cp is not None and not live_table and not args.once:
            if as_json:
                emit(cp, out)  # one object per line, every field stated (cli/jsonout.py)
            else:
                print(plain_line(cp), file=out, flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    drawn = 0
    try:
        sub = await nc.subscribe(subject, cb=on_msg)
        deadline = None if duration is None else loop.time() + duration
        while not stop.is_set():
            timeout = REFRESH_S if deadline is None else min(REFRESH_S, max(deadline - loop.time(), 0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout)
            if lost.is_set():
                raise CLIError(f"lost the connection to NATS at {public_url(settings.nats_url or '')}")
            now = time.monotonic()
            board.prune(now)
            if live_table:
                lines = render_table(board, now)
                # Up over the previous table and clear below: redrawn in place, scrollback kept.
                out.write((f"\x1b[{drawn}F" if drawn else "") + "\x1b[J" + "\n".join(lines) + "\n")
                out.flush()
                drawn = len(lines)
            if deadline is not None and loop.time() >= deadline:
                break
        if args.once and as_json:
            for cp, _seen in sorted(board.rows.values(), key=lambda r: (r[0].session_id, r[0].agent_id)):
                emit(cp, out)
        elif args.once:
            print("\n".join(render_table(board, time.monotonic())), file=out, flush=True)
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
    finally:
        for sig in handled:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
        with contextlib.suppress(Exception):
            await nc.close()
    return 0
