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
(128+n for signal n).  A command stopped by ^C (SIGINT reaches it and us), SIGTERM or SIGHUP
is stored as ``cancelled``, not ``failed`` (``run_process.run_outcome``).  No bus, no stack, a
broken configuration: the command still runs and its code still passes through; one warning line says why the
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
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from buildtel.cli.run_process import SignalGuard, TreeSampler, run_outcome, wait_child
from buildtel.cli.run_telemetry import Telemetry, snapshot_of
from buildtel.shared.protocol import new_session_id
from buildtel.shared.settings import Settings
from buildtel.shared.tracemodel import session_span_id

if TYPE_CHECKING:  # annotations only: `run` imports the capture package when it is used
    from buildtel.shared.capture.source import TargetSource

ENV_SESSION_ID = "BUILDER_TELEMETRY_SESSION_ID"


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
    snapshot = snapshot_of(user_env) if settings.enabled else None

    # The console, passed on unchanged and kept (shared/capture/runlog.py, docs/failures.md).
    from buildtel.shared.capture.runlog import RunLog

    console = RunLog(settings, json_out=json_out, enabled=log and settings.enabled)
    rusage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0, m0 = time.time(), time.monotonic()
    guard = SignalGuard()
    try:
        # Its stdout and stderr through the console's pipes (with --json its stdout goes to our stderr:
        # stdout is the JSON object's); same process group, so ^C reaches it.
        proc = subprocess.Popen(argv, env=env, **console.popen_kwargs())  # type: ignore[call-overload]
    except OSError as exc:
        guard.restore()
        console.abandon()
        print(f"buildtel: error: cannot run {argv[0]!r}: {exc.strerror or exc}", file=sys.stderr)
        if snapshot is not None:
            snapshot.close()
        return 127 if isinstance(exc, FileNotFoundError) else 126
    console.spawned()
    guard.pid = proc.pid
    for src in sources:  # optional hook: sources that sample the build's process tree
        getattr(src, "spawned", lambda _pid: None)(proc.pid)

    run = Telemetry(settings, session_id, url_resolver) if settings.enabled else None
    sampler = TreeSampler(proc.pid)
    sampler.start()
    if run is not None:
        run.begin(name=name or Path(command[0]).name, command=command, labels=dict(labels or {}), record=record,
                  traceparent=traceparent, ts=t0, env=user_env, sources=sources, nice=lower_priority,
                  snapshot=snapshot)

    code, usage = wait_child(proc)
    wall = time.monotonic() - m0
    console.drain()
    guard.restore()
    outcome = run_outcome(code, guard.received)  # ^C'd: cancelled, not failed
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
        # The build's test reports, sent before build_finished once the build's targets are known
        # (shared/junit_capture.py).
        run.finish(exit_code=code, cpu_s=cpu, peak_rss_bytes=peak, console=console, outcome=outcome,
                   junit=_junit_sender(run, junit, t0, quiet) if junit else None)
    if capture is not None:
        from buildtel.shared.recording.capture import finish_run_capture
        finish_run_capture(capture, code, quiet=quiet)
    if not quiet:
        if console.warning():
            print(f"buildtel: {console.warning()}", file=sys.stderr)
        for src in sources:  # what per-target capture saw, or why it saw nothing (docs/live-capture.md)
            line = getattr(src, "end_line", lambda _code: "")(code)
            if line and console.failed_edges and " targets captured (" in line:
                # ninja logs only the edges that succeeded: its failed ones were read from the console
                line += f"; {console.failed_edges} failed ninja edge(s) read from the console"
            if line:
                print(f"buildtel: {line}", file=sys.stderr)
        # The link ends the last line; the line keeps its shape ("buildtel: session ID …"),
        # which scripts read the id from.
        url = _session_url(settings, session_id) if _recorded(run) else None
        link = f" — {url}" if url else ""
        print(f"buildtel: session {session_id} {outcome} in {wall:.2f}s{link}", file=sys.stderr)
    if json_out:
        from buildtel.cli.jsonout import emit

        emit(run_summary(session_id, trace_id, code, wall, run, settings, outcome=outcome))
    return code


def _junit_sender(run: Any, patterns: Sequence[str], t0: float, quiet: bool) -> Callable[[Any], None]:
    def send(targets: Any) -> None:
        from buildtel.shared.junit_capture import send_reports

        send_reports(run.client, patterns, since=t0, quiet=quiet, targets=targets)

    return send


def _session_url(settings: Settings, session_id: str) -> str | None:
    from buildtel.shared.stackfile import session_url  # after the build: not on its start-up path

    return session_url(settings, session_id)


def _recorded(run: Any) -> bool:
    client = getattr(run, "client", None)
    return bool(client is not None and getattr(client, "reached_bus", False))


def run_summary(session_id: str, trace_id: str, code: int, wall_s: float, run: Any,
                settings: Settings | None = None, outcome: str | None = None) -> dict[str, Any]:
    """``run --json``: the session and how to see it (docs/cli.md).  ``url`` is its link when a web
    service is known (``stackfile.session_url``) and the session was recorded, else null; ``show`` is
    the command that shows it."""
    recorded = _recorded(run)
    url = _session_url(settings, session_id) if settings is not None and recorded else None
    outcome = outcome or ("success" if code == 0 else "failed")
    return {"session_id": session_id, "trace_id": trace_id, "outcome": outcome,
            "exit_code": code, "duration_s": round(wall_s, 3), "recorded": recorded,
            "show": f"buildtel show {session_id}", "url": url}
