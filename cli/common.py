"""How CLI commands reach the stack: configured URLs, the local stack file, or a new local stack.

Resolution order: ``BUILDER_TELEMETRY_NATS_URL``/``_REDIS_URL`` (a farm's
cluster); else the stack that ``buildtel up`` on this machine wrote to
``<cache_dir>/stack.json`` (by default one per user and machine, see
``Settings.cache_dir``).  Only ``buildtel up``, ``buildtel run`` and
``buildtel demo`` start a local stack; read commands (``sessions``, ``show``,
``report``, ``watch``…) never do: after ``buildtel down`` they say that no stack
is running.  A connection that cannot be made within ``CONNECT_DEADLINE_S`` fails
with the URL it tried, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from buildtel.cli.errors import CLIError
from buildtel.shared.auth import StackAuth
from buildtel.shared.engines import public_url
from buildtel.shared.files import open_private, private_dir, write_private
from buildtel.shared.keys import Keys
from buildtel.shared.settings import Settings

# Reading stack.json is shared with the SDK and the tracing API (shared/stackfile.py); the names
# stay importable from here for the commands ("x as x": an explicit re-export).
from buildtel.shared.stackfile import STACK_FILE as STACK_FILE
from buildtel.shared.stackfile import read_stack as read_stack
from buildtel.shared.stackfile import read_stack_file as read_stack_file
from buildtel.shared.stackfile import stack_auth_of as stack_auth_of
from buildtel.shared.stackfile import stack_file as stack_file
from buildtel.shared.subjects import Subjects

AUTOSTART_TIMEOUT_S = 30.0
# A CLI connection: each try waits CONNECT_TIMEOUT_S for the server; CONNECT_DEADLINE_S bounds
# all of them, so an unreachable (silently dropping) address fails in seconds, not half a minute.
CONNECT_TIMEOUT_S = 2.0
CONNECT_DEADLINE_S = 5.0
STOP_TIMEOUT_S = 20.0


class StackUnavailable(CLIError):
    pass


def data_dir(settings: Settings) -> Path:
    """The data directory, created 0700; a ``.gitignore`` of ``*`` keeps a per-project one out of commits."""
    d = private_dir(settings.cache_dir)
    ignore = d / ".gitignore"
    if not ignore.exists():
        with contextlib.suppress(OSError):
            write_private(ignore, "# Builder Telemetry data: never commit it\n*\n")
    return d


def no_stack_message(settings: Settings) -> str:
    return (f"no Builder Telemetry stack is running (data directory {settings.cache_dir}): start one with "
            "'buildtel up' (or run a build with 'buildtel run'), or set BUILDER_TELEMETRY_NATS_URL")


def resolve_urls(settings: Settings, *, autostart: bool) -> tuple[str, str]:
    s = resolve(settings, autostart=autostart)
    return s.nats_url or "", s.redis_url or ""


def resolve(settings: Settings, *, autostart: bool, need_redis: bool = True) -> Settings:
    """``settings`` completed with where the stack is and, for a local stack, its role credentials
    (``stack.json``, mode 0600).  Configured URLs keep their own credentials.  Commands that only
    talk to NATS (``run``, queries) pass ``need_redis=False``: a configured NATS URL is then enough,
    and no local stack is looked for or started.  ``autostart`` is for ``run`` only."""
    if settings.nats_url and (settings.redis_url or not need_redis):
        return settings
    info = read_stack(settings)
    if info is None and autostart:
        info = start_background_stack(settings)
    if info is None:
        raise StackUnavailable(no_stack_message(settings))
    auth = settings.stack_auth
    if auth is None and not settings.nats_url and info.get("auth"):
        auth = StackAuth.from_json(info["auth"])
    return settings.with_(nats_url=settings.nats_url or info["nats_url"],
                          redis_url=settings.redis_url or info["redis_url"], stack_auth=auth)


def _live_stack_file(settings: Settings) -> dict[str, Any] | None:
    """``stack.json`` of a stack whose process is alive, whether still starting or running."""
    raw = read_stack_file(settings)
    if raw is None or "pid_created" not in raw:
        return None
    return raw if _same_process({"pid": raw.get("pid", 0), "created": raw["pid_created"]}) else None


def start_background_stack(settings: Settings) -> dict[str, Any]:
    """Start ``buildtel up`` detached (it outlives this command) and wait until it is ready; a stack
    another command is already starting is waited for instead.  A stack this call started that is
    not ready in time is stopped again, engines included: nothing is left behind."""
    data_dir(settings)
    log_path = settings.cache_dir / "stack.log"
    proc: subprocess.Popen[bytes] | None = None
    if _live_stack_file(settings) is None:
        log = open_private(log_path, "ab")  # handed to the child
        env = dict(os.environ)
        env["BUILDER_TELEMETRY_CACHE_DIR"] = str(settings.cache_dir)
        env["BUILDER_TELEMETRY_NAMESPACE"] = settings.namespace
        proc = subprocess.Popen(
            [sys.executable, "-m", "buildtel.cli.main", "up"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env=env,
        )
        log.close()
    deadline = time.monotonic() + AUTOSTART_TIMEOUT_S
    while time.monotonic() < deadline:
        info = read_stack(settings)
        if info is not None:
            return info
        if proc is not None and proc.poll() is not None:
            if _live_stack_file(settings) is None:
                tail = _tail(log_path)
                raise StackUnavailable(f"the local stack exited with code {proc.returncode} while starting"
                                       f"{': ' + tail if tail else ''} (log: {log_path})")
            proc = None  # another command started one at the same moment: wait for that one
        elif proc is None and _live_stack_file(settings) is None:
            raise StackUnavailable(f"the local stack being started for {settings.cache_dir} exited; "
                                   f"see {log_path}")
        time.sleep(0.1)
    if proc is None:
        raise StackUnavailable(f"the local stack for {settings.cache_dir} has been starting for over "
                               f"{AUTOSTART_TIMEOUT_S:.0f}s; see {log_path}, or stop it with 'buildtel down'")
    raw = read_stack_file(settings)
    stop_stack(raw if raw is not None and raw.get("pid") == proc.pid else {"pid": proc.pid},
               path=stack_file(settings), proc=proc)
    raise StackUnavailable(f"the local stack did not start within {AUTOSTART_TIMEOUT_S:.0f}s and was stopped "
                           f"again; see {log_path}")


def _tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1][:300] if lines else ""


# -- stopping a stack ------------------------------------------------------------------------

def process_record(pid: int) -> dict[str, Any]:
    """What ``stack.json`` keeps of a process: its pid and start time, so that ``down`` never
    signals an unrelated process that got the same pid later."""
    import psutil

    try:
        return {"pid": pid, "created": psutil.Process(pid).create_time()}
    except psutil.Error:
        return {"pid": pid, "created": None}


def _same_process(rec: dict[str, Any]) -> Any | None:
    """The live psutil.Process of ``rec`` (same pid and start time, not a zombie), else None."""
    import psutil

    try:
        p = psutil.Process(int(rec["pid"]))
        if rec.get("created") is not None and abs(p.create_time() - float(rec["created"])) > 1.0:
            return None
        return None if p.status() == psutil.STATUS_ZOMBIE else p
    except (psutil.Error, KeyError, ValueError, TypeError):
        return None


def stop_stack(info: dict[str, Any], *, path: Path | None = None, proc: subprocess.Popen[bytes] | None = None,
               timeout: float = STOP_TIMEOUT_S) -> list[str]:
    """SIGTERM the stack process, wait, SIGKILL it if it would not stop; then stop every engine
    it recorded that outlived it (a SIGKILLed stack cannot stop its own), and remove ``path`` (its
    ``stack.json``) if it still describes this stack.  Returns what was done, one line per process."""
    import psutil

    done: list[str] = []
    main = _same_process({"pid": info.get("pid", 0), "created": info.get("pid_created")})
    if main is not None:
        with contextlib.suppress(psutil.Error):
            main.send_signal(signal.SIGTERM)
        if not _wait_gone(main, proc, timeout):
            with contextlib.suppress(psutil.Error):
                main.kill()
            _wait_gone(main, proc, 5.0)
            done.append(f"stack (pid {main.pid}) did not stop within {timeout:.0f} s of SIGTERM: killed")
        else:
            done.append(f"stack (pid {main.pid}) stopped")
    for rec in info.get("engines", []) if isinstance(info.get("engines"), list) else []:
        p = _same_process(rec)
        if p is None:
            continue
        with contextlib.suppress(psutil.Error):
            p.terminate()
        how = "stopped"
        if not _wait_gone(p, None, 5.0):
            with contextlib.suppress(psutil.Error):
                p.kill()
            _wait_gone(p, None, 5.0)
            how = "killed"
        done.append(f"{rec.get('name', 'engine')} (pid {p.pid}) outlived the stack: {how}")
    if path is not None and read_json(path).get("pid") == info.get("pid"):
        with contextlib.suppress(OSError):
            path.unlink()
    return done


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _wait_gone(p: Any, proc: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()  # our own child: reap it, or it stays a zombie
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.05)
    return False


# -- connecting ------------------------------------------------------------------------------

async def connect_cli(settings: Settings, url: str, *, name: str, role: str, **extra: Any) -> Any:
    """A CLI command's NATS connection: fails within ``CONNECT_DEADLINE_S`` with the URL (without
    its password) and where it came from, instead of retrying for half a minute.  ``extra`` goes to
    ``nats.connect`` (a long-lived command may allow more reconnects; the deadline still holds)."""
    from buildtel.shared.bus import connect_nats

    where = f"the local stack in {settings.cache_dir}" if _from_stack(settings, url) else "BUILDER_TELEMETRY_NATS_URL"
    try:
        async with asyncio.timeout(CONNECT_DEADLINE_S):
            return await connect_nats(settings, url, name=name, role=role, **{
                "connect_timeout": CONNECT_TIMEOUT_S, "max_reconnect_attempts": 1, "reconnect_time_wait": 0.2,
                **extra})
    except TimeoutError:
        why = f"no answer within {CONNECT_DEADLINE_S:.0f} s"
    except Exception as exc:  # noqa: BLE001 - one clear line
        why = f"{type(exc).__name__}: {exc}"
    raise StackUnavailable(f"cannot reach NATS at {public_url(url)} ({where}): {why}")


def _from_stack(settings: Settings, url: str) -> bool:
    info = read_stack_file(settings)
    return bool(info and info.get("nats_url") == url)


@dataclass
class Bus:
    settings: Settings
    nats_url: str
    redis_url: str
    nc: Any
    js: Any
    redis: Any
    subjects: Subjects
    keys: Keys


@contextlib.asynccontextmanager
async def open_bus(settings: Settings, *, autostart: bool = False, name: str = "buildtel-cli",
                   role: str = "reader") -> AsyncIterator[Bus]:
    """A connection to the stack as ``role``: ``reader`` (queries) unless the command writes.
    ``autostart`` is accepted for older callers and ignored: only run/demo/up start a stack."""
    from buildtel.shared.bus import close_nats, connect_redis  # nats + redis: imported when used

    del autostart
    settings = resolve(settings, autostart=False, need_redis=False)
    nats_url, redis_url = settings.nats_url or "", settings.redis_url or ""
    nc = await connect_cli(settings, nats_url, name=name, role=role)
    r = connect_redis(redis_url) if redis_url else None  # CLI commands ask services, not Redis
    try:
        yield Bus(settings, nats_url, redis_url, nc, nc.jetstream(), r,
                  Subjects(settings.namespace), Keys(settings.namespace))
    finally:
        await close_nats(nc)
        if r is not None:
            await r.aclose()
