"""``buildtel import``: turn existing build-tool output into stored sessions.

``buildtel import ninja FILE… [--start ISO] [--last-build]``, ``buildtel import bep FILE…``,
``buildtel import chrome-trace FILE… [--start ISO] [--merge]`` and ``buildtel import junit FILE…
[--commit SHA] [--name NAME]`` (all its files: one session of test results, docs/tests.md)
parse every file first
(all or nothing: one bad file and nothing is published), then publish each
BuildSession to the completed-sessions subject — the same path the collector
uses, a session over one message through the object store — with ``Nats-Msg-Id`` =
session id, so re-importing a file within the stream's duplicate window is a no-op and
ids stay stable beyond it.
How a build ended is taken only from evidence: ``import ninja`` takes ninja's console output
(``--output FILE``) and/or exit code (``--exit-code N``) of the run that wrote the log's last
build, ``import chrome-trace`` an exit code, ``import bep`` its ``buildFinished`` event; without
evidence the outcome is ``unknown``, never ``success`` (docs/importers.md, "Outcome").
``--dry-run`` prints what would be stored and publishes nothing.  Both first ask the storage
service how many stored sessions the import would evict (BUILDER_TELEMETRY_MAX_SESSIONS) and say
so (docs/importers.md, "Retention, said first").  ``--json`` prints one JSON document instead
(docs/importers.md), warnings and retention included.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from buildtel.cli.errors import CLIError
from buildtel.cli.import_retention import ASK_TIMEOUT_S, Eviction, eviction
from buildtel.shared.importers.common import ImportFormatError, ImportResult, iso, parse_time

MAX_WARNINGS_SHOWN = 20


def _ninja(data: bytes, args: argparse.Namespace, mtime: float, path: str) -> ImportResult:
    from buildtel.shared.importers.ninja import parse_ninja_log

    return parse_ninja_log(data, base_time=args.base_time_s, file_mtime=mtime, source=path,
                           output=args.output_data, exit_code=args.exit_code,
                           last_build=getattr(args, "last_build", False))


def _bep(data: bytes, args: argparse.Namespace, mtime: float, path: str) -> ImportResult:
    from buildtel.shared.importers.bep import parse_bep

    return parse_bep(data, source=path)


def _trace(data: bytes, args: argparse.Namespace, mtime: float, path: str) -> ImportResult:
    from buildtel.shared.importers.chrome_trace import parse_chrome_trace

    return parse_chrome_trace(data, base_time=args.base_time_s, file_mtime=mtime, source=path,
                              exit_code=args.exit_code)


def _junit(data: bytes, args: argparse.Namespace, mtime: float, path: str) -> ImportResult:
    from buildtel.shared.importers.junit import parse_junit_file

    return parse_junit_file(data, source=path, file_mtime=mtime)


PARSERS: dict[str, tuple[Callable[..., ImportResult], str, bool]] = {
    "ninja": (_ninja, "a .ninja_log (v5-v7); one session per build it holds", True),
    "bep": (_bep, "a Bazel --build_event_json_file stream", False),
    "chrome-trace": (_trace, "a Trace Event Format file: Bazel --profile, clang -ftime-trace, "
                             "CMake --profiling-output", True),
    "junit": (_junit, "JUnit XML test reports (pytest, ctest, Gradle, Maven, gotestsum, Jest): "
                      "one session holding their test cases", False),
}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("import", help="import ninja logs, Bazel BEP streams, Chrome traces or JUnit XML test "
                                              "reports as sessions",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="import_format", metavar="FORMAT", required=True)
    for fmt, (_, text, timed) in PARSERS.items():
        q = sub.add_parser(fmt, help=text, description=f"Import {text}.")
        q.add_argument("files", nargs="+", metavar="FILE", help="file to import (gzip is detected)")
        if timed:
            q.add_argument("--start", "--base-time", metavar="ISO", dest="base_time",
                           help="wall-clock start (ISO-8601 or Unix seconds) of the first build imported / the "
                                "trace; default: the clock recorded in the file, else its modification time (a "
                                "CMake profile has no clock of its own: a warning says which was used)")
        if fmt == "ninja":
            q.add_argument("--last-build", action="store_true",
                           help="import only the newest build of an appended log (builds are told apart as "
                                "without it: docs/importers.md); same session id as in a whole-log import")
        if fmt == "chrome-trace":
            q.add_argument("--merge", action="store_true",
                           help="clang -ftime-trace files of one build as ONE session, a target per compile, so "
                                "'buildtel show ID --headers/--templates' adds their costs up across files")
            q.add_argument("--name", default="", help="with --merge: the session's name "
                                                      "(default: clang build (N compiles))")
        if fmt == "ninja":
            q.add_argument("--output", metavar="FILE",
                           help="ninja's console output (stdout and stderr) of the run that wrote the log's last "
                                "build: its FAILED: edges become failed targets with their error text, and "
                                "'interrupted by user' makes the build cancelled")
        if fmt == "ninja":
            q.add_argument("--exit-code", metavar="N", type=int,
                           help="ninja's exit code of that run: 0 success; 129, 130, 143 (SIGHUP, SIGINT, SIGTERM "
                                "to ninja) cancelled, unless --output says another reason ninja stopped; any "
                                "other failed (ninja 1.13 exits with a failed edge's code: 137 is an edge killed "
                                "by SIGKILL); without it and --output the outcome is unknown")
        elif fmt == "chrome-trace":  # BEP carries its own exit code; a JUnit session is its test results
            q.add_argument("--exit-code", metavar="N", type=int,
                           help="exit code of the traced run: 0 success; 129, 130, 143 (SIGHUP, SIGINT, SIGTERM; "
                                "or -1, -2, -15) cancelled; any other failed (137: a step killed by SIGKILL); "
                                "without it the outcome is unknown")
        if fmt == "junit":
            q.add_argument("--commit", metavar="SHA",
                           help="commit the tests ran on (flaky tests are found per commit); default: the "
                                "checkout of the current directory, if any")
            q.add_argument("--name", default="", help="session name (default: junit FIRST-FILE)")
        q.add_argument("--dry-run", action="store_true",
                       help="parse and print a summary, and how many stored sessions the import would evict "
                            "(storage is asked); publish nothing")
        q.add_argument("--json", action="store_true",
                       help="one JSON document on stdout: per file its figures, warnings and sessions "
                            "(each with state stored / already stored / parsed), and the retention figures")
        q.set_defaults(func=run_import, importer=fmt)


def load(args: argparse.Namespace) -> list[tuple[str, ImportResult]]:
    """Parse every file before anything is published; the first bad file aborts the import."""
    parser = PARSERS[args.importer][0]
    args.base_time_s = None
    args.exit_code = getattr(args, "exit_code", None)
    args.output_data = None
    if getattr(args, "output", None):
        if len(args.files) != 1:  # evidence of one run: which log it belongs to must not be guessed
            raise CLIError("--output and --exit-code describe one ninja run: give exactly one log with them")
        try:
            args.output_data = Path(args.output).read_bytes()
        except OSError as exc:
            raise CLIError(f"cannot read --output {args.output}: {exc.strerror or exc}") from None
    if args.exit_code is not None and len(args.files) != 1:
        raise CLIError("--exit-code describes one run: give exactly one file with it")
    if args.importer == "chrome-trace" and args.merge and args.exit_code is not None:
        raise CLIError("--exit-code describes one trace's run, not a merged build: leave one of them out")
    if args.importer == "chrome-trace" and args.name and not args.merge:
        raise CLIError("--name names the merged session: give it with --merge")
    if getattr(args, "base_time", None):
        try:
            args.base_time_s = parse_time(args.base_time)
        except ValueError as exc:
            raise CLIError(f"--start: {exc}") from None
    out = []
    for name in args.files:
        path = Path(name)
        try:
            data, mtime = path.read_bytes(), path.stat().st_mtime
        except OSError as exc:
            raise CLIError(f"cannot read {name}: {exc.strerror or exc}") from None
        try:
            out.append((name, parser(data, args, mtime, name)))
        except ImportFormatError as exc:
            raise CLIError(f"{name}: {exc} (nothing was imported)") from None
    if args.importer == "junit":
        _junit_session(out, args)
    if getattr(args, "merge", False):
        _merge_traces(out, args.name)
    return out


def _merge_traces(out: list[tuple[str, ImportResult]], name: str) -> None:
    """``--merge``: every file's compiles as one session, listed with the first file."""
    from buildtel.shared.importers.trace_targets import merge_compiles

    not_clang = [path for path, r in out if getattr(r, "producer", "") != "clang"]
    if not_clang:
        raise CLIError(f"--merge takes clang -ftime-trace files only; {not_clang[0]} is not one "
                       "(nothing was imported)")
    merged = merge_compiles([s for _, r in out for s in r.sessions], name)
    for _, r in out:
        r.sessions = []
    out[0][1].sessions.append(merged)


def _junit_session(out: list[tuple[str, ImportResult]], args: argparse.Namespace) -> None:
    """All the files' cases as one session, listed with the first file."""
    import os

    from buildtel.shared.importers.junit import junit_session
    from buildtel.shared.protocol import VcsInfo

    if args.commit:
        vcs: VcsInfo | None = VcsInfo(commit=args.commit)
    else:
        from buildtel.shared.environment import vcs_info

        vcs = vcs_info(os.getcwd())
    try:
        out[0][1].sessions.append(junit_session(out, vcs=vcs, name=args.name))  # type: ignore[arg-type]
    except ImportFormatError as exc:
        raise CLIError(f"{exc.reason} (nothing was imported)") from None


def summary(path: str, result: ImportResult) -> list[str]:
    d = result.details
    figures = {
        "ninja": lambda: f"ninja log v{'/'.join(map(str, d['versions'])) or '?'}: {d['builds']} build(s), "
                         f"{d['entries']} entries, {d['edges']} edges",
        "bep": lambda: f"BEP: {d['events']} events, {d['target_completed']} targetCompleted, "
                       f"{d['test_results']} testResult, {d['actions']} actions",
        "junit": lambda: f"JUnit XML: {d['suites']} suite(s), {d['cases']} test case(s): {d['passed']} passed, "
                         f"{d['failed']} failed, {d['error']} error(s), {d['skipped']} skipped",
        "chrome-trace": lambda: f"trace ({getattr(result, 'producer', '?')}): {d['events']} events, "
                                f"{d['x_events']} X, {d['be_pairs']} B/E pairs, {d['spans']} spans",
    }[result.format]()
    if d.get("builds_skipped") is not None:  # ninja --last-build
        figures += (f" (--last-build: importing the newest only, {d['builds_skipped']} earlier build(s) with "
                    f"{d['entries_skipped']} entries left out)")
    lines = [f"{path}: {figures}, {len(result.warnings)} warning(s)"]
    for s in result.sessions:
        t = s.totals
        if s.tests:
            lines.append(f"  {s.id}  {s.name}: {len(s.tests)} test case(s), {s.outcome}, start {iso(s.start)}")
            continue
        lines.append(f"  {s.id}  {s.name}: {t.targets} targets ({t.succeeded} ok, {t.failed} failed, "
                     f"{t.skipped + t.cancelled} not run), duration {s.duration_s:.3f}s, "
                     f"target time {t.target_time_s:.3f}s, {s.outcome}, start {iso(s.start)}")
        if "start_from" in s.labels:  # a trace: where its start came from (CMake's has no clock of its own)
            lines.append(f"    start taken from {s.labels['start_from']}")
    for w in result.warnings[:MAX_WARNINGS_SHOWN]:
        lines.append(f"  warning: {w}")
    if len(result.warnings) > MAX_WARNINGS_SHOWN:
        lines.append(f"  … {len(result.warnings) - MAX_WARNINGS_SHOWN} more warning(s)")
    return lines


def report(loaded: list[tuple[str, ImportResult]], states: dict[str, str]) -> dict[str, Any]:
    """``import --json``: every file with its figures, all its warnings and its sessions."""
    return {"files": [
        {"path": path, "format": r.format, "details": r.details, "warnings": list(r.warnings),
         "sessions": [{"id": s.id, "name": s.name, "state": states.get(s.id, "parsed"), "outcome": s.outcome,
                       "start": s.start, "duration_s": s.duration_s, "targets": s.totals.targets,
                       "tests": len(s.tests),
                       "show": f"buildtel show {s.id}"} for s in r.sessions]}
        for path, r in loaded]}


def run_import(args: argparse.Namespace, settings: Any) -> int | Coroutine[Any, Any, int]:
    from buildtel.shared.failrecord import unify

    loaded = load(args)
    rules = settings.failure_rule_table()  # the farm's failure-class rules first (docs/failures.md)
    for _, result in loaded:  # one classified failure record per failed target
        result.sessions = [unify(s, rules) for s in result.sessions]
    if args.dry_run:
        return _dry_run(loaded, settings, as_json=getattr(args, "json", False))
    for path, result in loaded:
        for w in result.warnings[:MAX_WARNINGS_SHOWN]:
            print(f"buildtel: warning: {path}: {w}", file=sys.stderr)
        for s in result.sessions:
            if s.labels.get("time_source") == "base_time":  # the file's own clock was overridden: say so
                print(f"buildtel: {path}: start {iso(s.start)} taken from {s.labels.get('start_from', '--start')}",
                      file=sys.stderr)
    return publish(loaded, settings, as_json=getattr(args, "json", False))


async def _dry_run(loaded: list[tuple[str, ImportResult]], settings: Any, *, as_json: bool) -> int:
    """Parse-only; the one question asked of a server is storage's count (what the import would evict)."""
    from buildtel.cli.common import open_bus
    from buildtel.services.storage.api import StorageClient, StorageError

    sessions = [s for _, r in loaded for s in r.sessions]
    try:
        async with open_bus(settings) as bus:
            retention: Any = await eviction(StorageClient(bus.nc, bus.subjects, timeout=ASK_TIMEOUT_S), sessions)
    except (CLIError, StorageError) as exc:
        retention = f"cannot tell how many sessions storing this import would evict: {exc}"
    if as_json:
        from buildtel.cli.jsonout import emit

        emit({"dry_run": True, **report(loaded, {}), "retention": _retention_json(retention)})
        return 0
    for path, result in loaded:
        print("\n".join(summary(path, result)))
    print("\n".join(retention.lines()) if isinstance(retention, Eviction) else f"retention: {retention}")
    print(f"dry run: {len(sessions)} session(s) parsed, nothing published")
    return 0


def _retention_json(retention: Eviction | str) -> dict[str, Any]:
    return retention.as_json() if isinstance(retention, Eviction) else {"unknown": retention}


async def publish(loaded: list[tuple[str, ImportResult]], settings: Any, *, as_json: bool = False) -> int:
    import nats.errors

    from buildtel.cli.common import StackUnavailable, open_bus
    from buildtel.shared import codec
    from buildtel.shared.bigmsg import publish_session
    from buildtel.shared.bus import ensure_streams

    states: dict[str, str] = {}
    try:
        # Imports publish finished sessions straight to history: the stack owner's operator role.
        async with open_bus(settings, role="operator") as bus:
            await ensure_streams(bus.js, bus.subjects, replicas=settings.replicas)
            payloads = [(s, codec.encode(s)) for _, r in loaded for s in r.sessions]
            limit = codec.MAX_SESSION_BYTES
            for s, data in payloads:  # check all before publishing any
                if len(data) > limit:
                    raise CLIError(f"session {s.id} ({s.name}) encodes to {len(data)} bytes, over the "
                                   f"{limit}-byte limit of a session; nothing was imported")
            retention = await _ask_retention(bus, [s for s, _ in payloads])
            if not as_json:  # said before anything is stored (stderr: stdout lists what was stored)
                for line in retention.lines() if isinstance(retention, Eviction) else [f"retention: {retention}"]:
                    print(f"buildtel: {line}", file=sys.stderr)
            for s, data in payloads:
                # Over one message's size, the session goes through the object store (shared/bigmsg.py).
                ack = await publish_session(bus.js, bus.nc, bus.subjects, data, msg_id=s.id, timeout=60.0)
                state = "already stored" if getattr(ack, "duplicate", False) else "stored"
                states[s.id] = state
                if not as_json:
                    what = f"{len(s.tests)} test cases" if s.tests else f"{s.totals.targets} targets"
                    print(f"{state} {s.id} {s.name}: {what}, {s.duration_s:.3f}s")
    except StackUnavailable as exc:
        raise CLIError(str(exc)) from None
    except (nats.errors.Error, TimeoutError, OSError) as exc:
        raise CLIError(f"publishing failed ({type(exc).__name__}: {exc}); re-running the import is safe: "
                       "session ids are stable and duplicates are dropped") from None
    if as_json:
        from buildtel.cli.jsonout import emit

        emit({"dry_run": False, **report(loaded, states), "retention": _retention_json(retention)})
    return 0


async def _ask_retention(bus: Any, sessions: list[Any]) -> Eviction | str:
    from buildtel.services.storage.api import StorageClient, StorageError

    try:
        return await eviction(StorageClient(bus.nc, bus.subjects, timeout=ASK_TIMEOUT_S), sessions)
    except StorageError as exc:  # storage not running: the stream keeps the sessions until it is
        return f"cannot tell how many sessions storing this import will evict: {exc}"

