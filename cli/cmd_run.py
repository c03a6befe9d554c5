"""``buildtel run -- CMD…``: run any build command as one telemetry session.

The command is spawned *first*, its stdout and stderr passed on unchanged and kept as the build's
log (``shared/capture/runlog.py``; ``--no-log``: inherited stdio), with two extra variables
(``BUILDER_TELEMETRY_SESSION_ID`` so nested tools can report into the session,
``TRACEPARENT`` so traced tools join the trace).  Everything telemetry does
happens while it runs: importing the client, resolving/auto-starting the stack,
capturing the environment (in a thread at a lowered CPU priority), sampling the
process tree's memory.  When the command exits we publish ``BuildFinished``
with its exit code, CPU time (``wait4`` rusage of the child, which includes every
descendant it waited for) and peak RSS, and exit with the command's own code
(128+n for signal n).  No bus, no stack, a broken configuration: the command
still runs and its code still passes through; one warning line says why the
session was not recorded.

Per-target capture plugs in as a :class:`~buildtel.shared.capture.TargetSource`: ``shared/capture`` (make recipes,
ninja edges, health checkpoints; ``docs/live-capture.md``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from buildtel.shared.protocol import new_session_id
from buildtel.shared.settings import Settings
from buildtel.shared.tracemodel import session_span_id

if TYPE_CHECKING:  # annotations only: `run` imports the capture package when it is used
    from buildtel.shared.capture.source import TargetSource

ENV_SESSION_ID = "BUILDER_TELEMETRY_SESSION_ID"
SAMPLE_INTERVAL_S = 0.25  # process-tree memory sampling; a /proc walk of the tree costs ~30 µs
ENVIRONMENT_WAIT_S = 2.0  # after the command exits, how long BuildStarted waits for the env snapshot
SOURCE_DRAIN_S = 5.0
NICENESS = 10  # the environment probes yield CPU to the build they describe
_SOURCE_EMITS = frozenset({"target_started", "target_finished", "health"})


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "run", help="run a build command as one telemetry session",
        description="Run CMD as one build session: environment, command, wall and CPU time, peak "
                    "memory and exit status are published; CMD's exit code is passed through.",
        usage="buildtel run [--name NAME] [--label K=V]... [--record] [--quiet] -- CMD [ARG...]",
    )
    p.add_argument("--name", default="", help="build name for history and regressions (default: CMD's name)")
    p.add_argument("--label", action="append", default=[], type=_label, metavar="K=V",
                   help="attach a label to the session (repeatable)")
    p.add_argument("--record", action="store_true", help="ask the recorder to keep this session's events")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary line at the end")
    p.add_argument("--json", action="store_true",
                   help="print the session (id, outcome, exit code, how to show it) as one JSON object on "
                        "stdout; CMD's own stdout goes to stderr so stdout holds only that object")
    p.add_argument("--no-capture", action="store_true",
                   help="no per-target capture of make/ninja (docs/live-capture.md)")
    p.add_argument("--no-log", action="store_true",
                   help="leave CMD's stdout and stderr on the terminal: no build log, no output of failed targets "
                        "(docs/failures.md)")
    p.add_argument("--junit", action="append", default=[], metavar="GLOB",
                   help="JUnit XML reports the build writes ('build/**/*.xml'; repeatable): those modified "
                        "after the build started are read when it exits and kept with the session (docs/tests.md)")
    p.add_argument("--health-interval", type=float, default=5.0, metavar="S", help="seconds between health checkpoints")
    p.add_argument("argv", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=run_command)


def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected K=V, got {text!r}")
    return key.strip(), value


def run_command(args: argparse.Namespace, settings: Settings) -> int:
    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("buildtel: error: run: no command given (usage: buildtel run -- CMD [ARG...])", file=sys.stderr)
        return 2
    # Per-target capture (make/ninja) and health checkpoints: shared/capture.
    from buildtel.shared.capture import live_sources

    sources = live_sources(argv, settings.cache_dir, capture=not args.no_capture,
                           health_interval_s=max(args.health_interval, 0.1))
    code = run_build(argv, settings, name=args.name, labels=dict(args.label), record=args.record, quiet=args.quiet,
                     sources=sources, json_out=getattr(args, "json", False), log=not args.no_log, junit=args.junit)
    if _is_cli_process():
        # The session is flushed and the exit code known: skip the interpreter's teardown of
        # everything the CLI imported (0.1-0.3 s, and it sits on the build's critical path).
        # Never when the CLI is called in-process by another program (or a test).
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)
    return code


def _is_cli_process() -> bool:
    prog = sys.argv[0].replace("\\", "/") if sys.argv else ""
    return threading.current_thread() is threading.main_thread() and (
        Path(prog).name in ("buildtel", "buildtel.exe") or prog.endswith("cli/main.py"))


_TRACEPARENT_RE = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


def run_build(argv: list[str], settings: Settings, *, name: str = "", labels: Mapping[str, str] | None = None,
              record: bool = False, quiet: bool = False, sources: Sequence[TargetSource] = (),
              url_resolver: Callable[[], str] | None = None, lower_priority: bool = True,
              json_out: bool = False, log: bool = True, junit: Sequence[str] = ()) -> int:
    """Run ``argv`` as one session and return its exit code (128+n when killed by signal n).

    ``lower_priority=False`` keeps the environment probes at normal priority."""
    session_id = new_session_id()
    env = dict(os.environ)
    # Started under a traced job: the build joins that trace, under the caller's span.
    incoming = env.get("TRACEPARENT", "").strip().lower()
    traceparent = incoming if _TRACEPARENT_RE.fullmatch(incoming) and "0" * 32 not in incoming else None
    trace_id = traceparent.split("-")[1] if traceparent else session_id
    env[ENV_SESSION_ID] = session_id
    # Tools the build runs parent their spans under the session span the tracer derives.
    env["TRACEPARENT"] = f"00-{trace_id}-{session_span_id(session_id, trace_id)}-01"
    if traceparent is None:
        env.pop("TRACESTATE", None)  # a stray tracestate without its traceparent means nothing
    # As given: what the session and a recording keep (sources may rewrite argv and add variables).
    command, user_env = list(argv), dict(env)
    for src in sources:
        argv = src.prepare(argv, env)
    capture = None
    if record:  # files read and written, for `buildtel replay` (shared/recording/capture.py)
        from buildtel.shared.recording.capture import start_run_capture
        capture = start_run_capture(settings, command, user_env, session_id)
    # Machine and checkout (commit, branch, remote) are read now, before the build starts and at
    # any load: a few small file reads, under 1 ms with starting `git status` (docs/sdk.md).  Only the
    # slow probes (tool versions) wait for the thread that runs at a lowered priority.
    snapshot = _snapshot(user_env) if settings.enabled else None

    # The console, passed on unchanged and kept (shared/capture/runlog.py, docs/failures.md).
    from buildtel.shared.capture.runlog import RunLog

    console = RunLog(settings, json_out=json_out, enabled=log and settings.enabled)
    rusage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0, m0 = time.time(), time.monotonic()
    try:
        # Its stdout and stderr through the console's pipes (with --json its stdout goes to our stderr:
        # stdout is the JSON object's); same process group, so ^C reaches it.
        proc = subprocess.Popen(argv, env=env, **console.popen_kwargs())  # type: ignore[call-overload]
    except OSError as exc:
        console.abandon()
        print(f"buildtel: error: cannot run {argv[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        if snapshot is not None:
            snapshot.close()
        return 127 if isinstance(exc, FileNotFoundError) else 126
    console.spawned()
    restore = _forward_signals(proc.pid)
    for src in sources:  # optional hook: sources that sample the build's process tree
        getattr(src, "spawned", lambda _pid: None)(proc.pid)

    run = _Telemetry(settings, session_id, url_resolver) if settings.enabled else None
    sampler = _TreeSampler(proc.pid)
    sampler.start()
    if run is not None:
        run.begin(name=name or Path(command[0]).name, command=command, labels=dict(labels or {}), record=record,
                  traceparent=traceparent, ts=t0, env=user_env, sources=sources, nice=lower_priority,
                  snapshot=snapshot)

    code, usage = _wait(proc)
    wall = time.monotonic() - m0
    console.drain()
    restore()
    sampler.stop()
    if usage is None:  # no wait4: what all our waited-for children used since the spawn
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - rusage_before.ru_utime) + (after.ru_stime - rusage_before.ru_stime)
        maxrss = after.ru_maxrss
    else:
        cpu, maxrss = usage.ru_utime + usage.ru_stime, usage.ru_maxrss
    # ru_maxrss is the largest single process (KiB on Linux, bytes on macOS); the sampler sees
    # the tree's sum, but only at its interval.
    peak = max(sampler.peak_rss, maxrss * (1 if sys.platform == "darwin" else 1024))

    if run is not None:
        if junit:  # the build's test reports, before build_finished (shared/junit_capture.py)
            from buildtel.shared.junit_capture import send_reports
            send_reports(run.client, junit, since=t0, quiet=quiet)
        run.finish(exit_code=code, cpu_s=cpu, peak_rss_bytes=peak, console=console)
    if capture is not None:
        from buildtel.shared.recording.capture import finish_run_capture
        finish_run_capture(capture, code, quiet=quiet)
    if not quiet:
        if console.warning():
            print(f"buildtel: {console.warning()}", file=sys.stderr)
        for src in sources:  # what per-target capture saw, or why it saw nothing (docs/live-capture.md)
            line = getattr(src, "end_line", lambda _code: "")(code)
            if line:
                print(f"buildtel: {line}", file=sys.stderr)
        outcome = "success" if code == 0 else "failed"
        # The link ends the last line; the line keeps its shape ("buildtel: session ID …"),
        # which scripts read the id from.
        url = _session_url(settings, session_id) if _recorded(run) else None
        link = f" — {url}" if url else ""
        print(f"buildtel: session {session_id} {outcome} in {wall:.2f}s{link}", file=sys.stderr)
    if json_out:
        from buildtel.cli.jsonout import emit

        emit(run_summary(session_id, trace_id, code, wall, run, settings))
    return code


def _session_url(settings: Settings, session_id: str) -> str | None:
    from buildtel.shared.stackfile import session_url  # after the build: not on its start-up path

    return session_url(settings, session_id)


def _recorded(run: Any) -> bool:
    client = getattr(run, "client", None)
    return bool(client is not None and getattr(client, "reached_bus", False))


def run_summary(session_id: str, trace_id: str, code: int, wall_s: float, run: Any,
                settings: Settings | None = None) -> dict[str, Any]:
    """``run --json``: the session and how to see it (docs/cli.md).  ``url`` is its link when a web
    service is known (``stackfile.session_url``) and the session was recorded, else null; ``show`` is
    the command that shows it."""
    recorded = _recorded(run)
    url = _session_url(settings, session_id) if settings is not None and recorded else None
    return {"session_id": session_id, "trace_id": trace_id, "outcome": "success" if code == 0 else "failed",
            "exit_code": code, "duration_s": round(wall_s, 3), "recorded": recorded,
            "show": f"buildtel show {session_id}", "url": url}


class _Telemetry:
    """The session's client plus the threads that feed it while the command runs."""

    def __init__(self, settings: Settings, session_id: str, url_resolver: Callable[[], str] | None) -> None:
        self.settings = settings
        self.session_id = session_id
        self.resolver = url_resolver or _resolver(settings)
        self.client: Any = None
        self.started = threading.Event()  # BuildStarted emitted (exactly once; see _announce)
        self.done = threading.Event()
        self._start_lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def begin(self, *, name: str, command: list[str], labels: dict[str, str], record: bool,
              traceparent: str | None, ts: float, env: dict[str, str], sources: Sequence[TargetSource],
              nice: bool = True, snapshot: Any = None) -> None:
        self.snapshot = snapshot
        try:
            # Imported only now, while the command already runs: nats costs ~150 ms to import.
            from buildtel.shared.client_sync import SyncTelemetryClient
            from buildtel.shared.identity import machine_id

            # This process made the session: its agent id is the machine, no per-process sub-id
            # (tools inside the build that join the session get one: shared/identity.py).
            self.client = SyncTelemetryClient(self.settings, nats_url=self.resolver, session_id=self.session_id,
                                              agent_id=machine_id(self.settings.agent_id), name="buildtel-run")
            self.client.start()
        except Exception as exc:  # noqa: BLE001 - telemetry never stops the build
            self.client, self.error = None, f"{type(exc).__name__}: {exc}"
            if snapshot is not None:
                snapshot.close()
            return
        self._started_args = {"name": name, "command": command, "labels": labels, "record": record,
                              "traceparent": traceparent, "ts": ts}
        self._spawn(self._announce, env, None, nice)
        self._sources = list(sources)
        for src in sources:
            self._spawn(self._follow, src)

    def _up_to_date(self, exit_code: int) -> int | None:
        """Avoided work as the capture counted it (docs/live-capture.md); None when not known."""
        if exit_code != 0:
            return None
        for src in getattr(self, "_sources", ()):
            summary = getattr(src, "summary", None)
            if isinstance(summary, dict) and isinstance(summary.get("up_to_date"), int):
                return int(summary["up_to_date"])
        return None

    def _spawn(self, fn: Callable[..., None], *args: Any) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True, name=f"buildtel-{fn.__name__.strip('_')}")
        t.start()
        self._threads.append(t)

    def _announce(self, env: dict[str, str] | None, environment: Any = None, nice: bool = False,
                  pending: str | None = None) -> None:
        """Send BuildStarted.  From the probe thread (``pending`` None): after the slow probes.
        From ``finish`` (``pending``: why the probes are late): with what is known now."""
        if nice:
            _lower_thread_priority()
        snap = getattr(self, "snapshot", None)
        if environment is None and snap is not None:
            try:
                if pending is None:
                    snap.probe(stop=self.started)  # no use probing once BuildStarted is sent
                environment = snap.result(pending or "not probed")
            except Exception:  # noqa: BLE001 - environment None: the whole snapshot is missing
                environment = None
        elif environment is None and env is not None:
            try:
                from buildtel.shared.environment import capture

                environment = capture(environ=env)  # redacted by capture (and again by the client)
            except Exception:  # noqa: BLE001 - the environment is optional; the build runs without it
                environment = None
        with self._start_lock:  # exactly one BuildStarted, whoever gets here first
            if not self.started.is_set():
                self.client.build_started(environment=environment, **self._started_args)
                self.started.set()

    def _follow(self, src: TargetSource) -> None:
        # No wait for BuildStarted: it waits for the niced environment probes, which on a loaded
        # node take seconds, and live health and targets would be held back that long (a 3 s build
        # under a CPU hog published no checkpoint while it ran).  The collector and recorder take
        # a session's events in any order, so BuildStarted need not have the lowest seq.
        try:
            for rec in src.targets(self.done):
                # A record names its emit method under "event" (default: target_finished).
                # A copy: the source's mapping is its own (the Protocol promises no mutable dict).
                kwargs = dict(rec)
                emit = kwargs.pop("event", "target_finished")
                getattr(self.client, emit if emit in _SOURCE_EMITS else "target_finished")(**kwargs)
        except Exception:  # noqa: BLE001 - a broken source loses its targets, not the build
            pass

    def finish(self, *, exit_code: int, cpu_s: float, peak_rss_bytes: int, console: Any = None) -> None:
        client = self.client
        if client is None:
            print(f"buildtel: warning: telemetry unavailable ({getattr(self, 'error', '?')}); "
                  f"session {self.session_id} was not recorded", file=sys.stderr)
            return
        if not self.started.wait(ENVIRONMENT_WAIT_S):
            # The slow probes are late: go on with what is known; each late probe is listed in
            # missing_probes with this reason.
            self._announce(None, pending=f"not finished {ENVIRONMENT_WAIT_S:.0f} s after the command exited")
        self.done.set()
        deadline = time.monotonic() + SOURCE_DRAIN_S
        for t in self._threads:
            t.join(max(deadline - time.monotonic(), 0))
        kept = console.conclude(client, getattr(self, "_sources", ()), self.session_id) if console is not None else {}
        client.build_finished(exit_code=exit_code, cpu_s=cpu_s, peak_rss_bytes=peak_rss_bytes,
                              up_to_date=self._up_to_date(exit_code), **kept)
        # Connected: a flush takes milliseconds.  Never reached: close returns at once.
        # Still resolving or connecting (a stack being auto-started): bounded wait.
        timeout = 5.0 if client.connected else 2.0
        starting = getattr(self.resolver, "autostarting", None)
        if not client.connected and starting is not None and starting.is_set():
            from buildtel.cli.common import AUTOSTART_TIMEOUT_S

            print("buildtel: waiting for the local stack to start (first run on this machine)…", file=sys.stderr)
            timeout = AUTOSTART_TIMEOUT_S + 5.0
        stats = client.close(timeout=timeout, warn=False)
        if not client.reached_bus:
            print(f"buildtel: warning: telemetry bus unreachable ({client.last_error or 'not connected'}); "
                  f"session {self.session_id} was not recorded", file=sys.stderr)
        elif stats.dropped:
            print(f"buildtel: warning: {stats.dropped} of {client.events_emitted + stats.dropped} telemetry "
                  f"events of session {self.session_id} were not delivered ({client.last_error})", file=sys.stderr)


def _snapshot(env: dict[str, str]) -> Any:
    """The environment's fast stage (shared/environment.py); None if even that fails."""
    try:
        from buildtel.shared.environment import EnvironmentSnapshot

        return EnvironmentSnapshot(environ=env)
    except Exception:  # noqa: BLE001 - telemetry never stops the build; BuildStarted then has no environment
        return None


class _Resolver:
    """Finds the bus; notes when that means starting the local stack (the first run on a
    machine), so the end of the run can wait for it instead of losing the session."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.autostarting = threading.Event()

    def __call__(self) -> tuple[str, Any]:
        from buildtel.cli.common import read_stack, resolve

        if not self.settings.nats_url and read_stack(self.settings) is None:
            self.autostarting.set()
        s = resolve(self.settings, autostart=True, need_redis=False)
        return s.nats_url or "", s.stack_auth  # the agent role's credentials of a local stack


def _resolver(settings: Settings) -> Callable[[], tuple[str, Any]]:
    return _Resolver(settings)


class _TreeSampler(threading.Thread):
    """Peak RSS of the command's process tree, summed over its processes, sampled."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True, name="buildtel-sampler")
        self.pid = pid
        self.peak_rss = 0
        self._stop_ev = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._fast = os.path.exists(f"/proc/{pid}/task/{pid}/children")

    def run(self) -> None:
        interval = 0.05  # the first samples come quickly, so short commands get one too
        while not self._stop_ev.wait(interval):
            try:
                rss = self._sample_proc() if self._fast else self._sample_psutil()
            except Exception:  # noqa: BLE001 - the tree changes under us; next time
                rss = 0
            self.peak_rss = max(self.peak_rss, rss)
            interval = min(interval * 2, SAMPLE_INTERVAL_S)

    def stop(self) -> None:
        self._stop_ev.set()
        self.join(1.0)

    def _sample_proc(self) -> int:
        # Linux: walk only our tree via /proc/<pid>/task/<tid>/children; psutil's
        # children() scans every process on the host, which costs more on a busy farm node.
        total, stack = 0, [self.pid]
        while stack:
            pid = stack.pop()
            try:
                with open(f"/proc/{pid}/statm", "rb") as f:
                    total += int(f.read().split()[1]) * self._page
                for tid in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                        stack.extend(int(c) for c in f.read().split())
            except (OSError, ValueError, IndexError):
                continue  # exited between the listing and the read
        return total

    def _sample_psutil(self) -> int:
        import psutil

        root = psutil.Process(self.pid)
        total = 0
        for p in [root, *root.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                continue
        return total


def _wait(proc: subprocess.Popen[bytes]) -> tuple[int, Any]:
    """Wait for the child: (exit code, 128+n for signal n; its rusage or None without wait4).

    wait4's rusage covers the child and every descendant it reaped, and nothing else
    this process ran (RUSAGE_CHILDREN would also count the environment probes).
    """
    if hasattr(os, "wait4"):
        _, status, usage = os.wait4(proc.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        proc.returncode = code  # so Popen never waits for it again
    else:  # pragma: no cover - not POSIX
        code, usage = proc.wait(), None
    return (128 - code if code < 0 else code), usage


def _forward_signals(pid: int) -> Callable[[], None]:
    """While the command runs: ^C reaches it directly (same process group), so we ignore
    SIGINT rather than die first; SIGTERM/SIGHUP sent to us are passed on."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def forward(signum: int, _frame: Any) -> None:
        try:
            os.kill(pid, signum)
        except OSError:
            pass

    previous = {}
    for sig, handler in ((signal.SIGINT, lambda *_: None), (signal.SIGTERM, forward), (signal.SIGHUP, forward)):
        try:
            previous[sig] = signal.signal(sig, handler)
        except (ValueError, OSError, AttributeError):
            continue

    def restore() -> None:
        for sig, old in previous.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError):
                pass

    return restore


def _lower_thread_priority() -> None:
    # Linux applies setpriority to a single thread (and the processes it spawns): the
    # environment probes (git, cc --version, ...) run while the build does, so they give way
    # to it.  Only this thread: the rest of the wrapper must not be starved on a loaded node
    # when the build ends and the session is flushed.
    if sys.platform != "linux":
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
    except (OSError, AttributeError):
        pass
