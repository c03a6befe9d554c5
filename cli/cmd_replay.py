"""``buildtel replay``, ``buildtel diff`` and ``buildtel recordings``: use what the recorder kept.

``replay ID`` alone describes a recording and runs nothing.  ``--execute``
first checks that the manifest is the one written at record time (refused
otherwise, nothing runs: ``shared/recording/trust.py``), prints the exact
command, working directory and environment it will run (on stderr with
``--json``), then re-runs it in a fresh sandbox and compares outputs (exit 0
reproducible, 1 not);
``--step N`` / ``--at S`` show the build's state at that point of its event
stream, ``-i`` steps through it interactively; ``--republish`` sends the stream
to the bus as a new session.  ``diff A B`` compares two recordings, or stored
sessions fetched from the storage service.  IDs follow the CLI's one grammar
(cli/ids.py): 32 hex digits, a unique prefix of at least 6, ``last`` or
``last~N``.  For ``replay`` a prefix names a local recording and ``last`` the newest
one on this machine; for ``diff`` a full id or prefix names a local recording when
one matches, else a stored session, and ``last``/``last~N`` name stored sessions
(``buildtel diff last~1 last``), compared from their local recording when there is one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from typing import Any, TextIO

import msgspec

from buildtel.cli.errors import CLIError
from buildtel.cli.ids import (
    GRAMMAR,
    IdRef,
    local_recording,
    parse_id,
    resolve_recording,
    resolve_session_id,
)
from buildtel.cli.textsafe import safe, safe_block
from buildtel.shared.recording import diff as diffmod
from buildtel.shared.recording.manifest import RecordingManifest
from buildtel.shared.recording.replay import ReplayEngine, ReplayError, ReplayPlan, cleanup
from buildtel.shared.recording.store import RecordingNotFound, RecordingStore
from buildtel.shared.recording.timetravel import Timeline, render, republish
from buildtel.shared.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("replay", help="replay, inspect or republish a recorded build",
                       description="Describe a recording; with --execute re-run it in a sandbox and check that "
                                   "its outputs are reproduced; with --step/--at/-i travel through its events; "
                                   "with --republish publish its events again as a new session.")
    p.add_argument("id", help=f"recording id: {GRAMMAR} ('last': the newest on this machine)")
    p.add_argument("--execute", action="store_true", help="re-run the recorded command in a fresh sandbox")
    p.add_argument("--keep", action="store_true", help="keep the sandbox after --execute (its path is printed)")
    p.add_argument("--sandbox-dir", help="create the sandbox under this directory (default: the temp dir)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before the replayed command is killed")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--step", type=int, help="show the build's state after N events")
    where.add_argument("--at", type=float, metavar="SECONDS", help="show the build's state SECONDS after it began")
    p.add_argument("-i", "--interactive", action="store_true", help="step with n/p/<number>/q (needs a terminal)")
    p.add_argument("--republish", action="store_true", help="publish the event stream again as a new session")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_replay, quiet_logs=True)

    d = sub.add_parser("diff", help="compare two recordings or two stored sessions")
    d.add_argument("a", help=f"recording or session: {GRAMMAR}")
    d.add_argument("b", help="the other side, same grammar")
    d.add_argument("--min-delta", type=float, default=0.05, help="smallest timing change reported, seconds")
    d.add_argument("--min-ratio", type=float, default=0.10, help="smallest timing change reported, fraction")
    d.add_argument("--json", action="store_true", help="one JSON document")
    d.set_defaults(func=cmd_diff, quiet_logs=True)

    r = sub.add_parser("recordings", help="list local recordings")
    r.add_argument("--gc", action="store_true", help="apply retention and the size cap now")
    r.add_argument("--json", action="store_true")
    r.set_defaults(func=cmd_recordings, quiet_logs=True)


def _dump(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def resolve_id(store: RecordingStore, ident: str) -> str:
    """A full local recording id from any id word (cli/ids.py)."""
    return resolve_recording(store, ident)


def _describe(m: RecordingManifest | None, rid: str, events: int) -> str:
    if m is None:
        return f"recorded session {rid}: {events} events (event stream only, no files)"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created))
    # Everything below comes from a manifest file: escaped (cli/textsafe.py).
    lines = [f"recording {safe(m.id)}  {when}  exit code {m.exit_code}",
             f"command   {safe(shlex.join(m.command))}", f"cwd       {safe(m.cwd)}",
             f"inputs    {len(m.inputs)} (from {m.input_method}), {len(m.external_inputs)} outside the tree",
             f"outputs   {len(m.outputs)}, removed {len(m.removed)}",
             f"events    {events}" + (f" (session {safe(m.session_id)})" if m.session_id else "")]
    lines += [f"note      {safe(n)}" for n in m.notes] + [f"refused   {safe(r)}" for r in m.refused[:20]]
    return "\n".join(lines)


async def cmd_replay(args: argparse.Namespace, settings: Settings) -> int:
    store = RecordingStore.from_settings(settings)
    engine = ReplayEngine(store=store)
    rid = resolve_id(store, args.id)
    manifest = store.load_manifest(rid) if store.has_manifest(rid) else None
    events = engine.events(rid)
    if manifest is None and not events:
        raise CLIError(str(RecordingNotFound(rid)))
    code = 0
    if args.execute:
        code = _execute(engine, rid, manifest, args)
    if args.step is not None or args.at is not None or args.interactive:
        if not events:
            raise CLIError(f"no event stream was kept for {rid} (was the recorder service running?)")
        tl = Timeline(events)
        step = args.step if args.step is not None else tl.step_at(args.at) if args.at is not None else 0
        if args.step is not None and not 0 <= args.step <= len(tl):
            raise CLIError(f"--step must be between 0 and {len(tl)}")
        if args.interactive:
            if not sys.stdin.isatty():
                raise CLIError("interactive mode needs a terminal; use --step N or --at SECONDS")
            interactive(tl, step, sys.stdin, sys.stdout)
        elif args.json:
            _dump(tl.state(step).to_dict())
        else:
            print(safe_block(render(tl.state(step))))
    if args.republish:
        if not events:
            raise CLIError(f"no event stream was kept for {rid}")
        from buildtel.cli.common import open_bus
        from buildtel.shared.bus import ensure_streams

        async with open_bus(settings, autostart=False, name="buildtel-replay", role="operator") as bus:
            await ensure_streams(bus.js, bus.subjects, replicas=settings.replicas)
            new_sid, sent = await republish(bus.js, bus.subjects, events, source=rid)
        if args.json:
            _dump({"republished_from": rid, "session_id": new_sid, "events": sent})
        else:
            print(f"republished {sent} events of {safe(rid)} as session {safe(new_sid)}")
    if not (args.execute or args.republish or args.step is not None or args.at is not None or args.interactive):
        if args.json:
            _dump({"manifest": msgspec.to_builtins(manifest) if manifest else None, "events": len(events)})
        else:
            print(_describe(manifest, rid, len(events)))
            print("(nothing was run: add --execute to replay it, --step N to inspect its events)")
    return code


def _execute(engine: ReplayEngine, rid: str, manifest: RecordingManifest | None, args: argparse.Namespace) -> int:
    from pathlib import Path

    if manifest is None:
        raise CLIError(f"{rid} is an event stream only: there are no files or command to replay")
    try:
        plan = engine.plan(rid, sandbox_root=Path(args.sandbox_dir) if args.sandbox_dir else None)
    except ReplayError as exc:
        raise CLIError(str(exc)) from None
    try:
        # What will run, before it runs; with --json on stderr so stdout stays one document.
        print(describe_plan(plan), file=sys.stderr if args.json else sys.stdout, flush=True)
    except BaseException:
        cleanup(plan.base)
        raise
    try:
        result = engine.run(plan, keep=args.keep, timeout=args.timeout)
    except ReplayError as exc:
        raise CLIError(str(exc)) from None
    if args.json:
        _dump({**dataclasses.asdict(result), "status": result.status, "command": plan.command, "env": plan.env,
               "manifest_sha256": plan.manifest_sha256})
    else:
        print(f"replay of {rid}: {result.status} ({result.outputs_checked} outputs checked, "
              f"exit code {result.exit_code}, recorded {result.recorded_exit_code}, {result.duration_s:.2f}s)")
        for d in result.differing:
            print(f"  {d.reason:<8} {safe(d.path)}")
        if result.extra:
            print(f"  {len(result.extra)} file(s) produced now but not recorded, e.g. {safe(result.extra[0])}")
        if result.not_restored_env:
            print(f"  not restored (redacted): {safe(', '.join(result.not_restored_env))}")
        if result.sandbox:
            print(f"  sandbox kept at {result.sandbox}")
    return 0 if result.reproducible else 1


def describe_plan(plan: ReplayPlan) -> str:
    """The exact command, directory and environment :meth:`ReplayEngine.run` will use.
    Variables whose recorded value was redacted are listed as not set (their secret was
    never stored, so they cannot be); values are shown as run, escaped for the terminal."""
    m = plan.manifest
    lines = [f"manifest  {m.id} verified (sha256 {plan.manifest_sha256}, as recorded)",
             f"will run  {safe(shlex.join(plan.command))}",
             f"in        {plan.workdir} (a new sandbox holding the {len(m.inputs)} recorded inputs)",
             f"env       {len(plan.env)} variables, nothing else:"]
    lines += [f"  {safe(k)}={safe(v)}" for k, v in sorted(plan.env.items())]
    if plan.not_restored_env:
        lines.append(f"not set   (recorded value redacted) {safe(', '.join(plan.not_restored_env))}")
    return "\n".join(lines)


def interactive(tl: Timeline, step: int, stdin: TextIO, stdout: TextIO) -> int:
    """n / p (optionally with a count), a step number, or q; returns the last step shown."""
    while True:
        stdout.write(safe_block(render(tl.state(step))) + "\n[n]ext [p]rev <step> [q]uit > ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            return step
        cmd = line.strip().lower()
        if cmd in {"q", "quit", "exit"}:
            return step
        count = int(cmd[1:]) if len(cmd) > 1 and cmd[1:].isdigit() else 1
        if cmd.startswith("n") or cmd == "":
            step = min(len(tl), step + count)
        elif cmd.startswith("p"):
            step = max(0, step - count)
        elif cmd.isdigit():
            step = min(len(tl), int(cmd))
        else:
            stdout.write("?\n")


async def _side(store: RecordingStore, ref: IdRef, client: Any) -> diffmod.Side:
    """A local recording when one matches ``ref``, else the stored session it names."""
    from buildtel.services.storage.api import StorageError

    rid = local_recording(store, ref)  # an ambiguous local prefix is refused here, with candidates
    if rid is not None:
        return diffmod.side_from_store(store, rid)  # type: ignore[return-value]
    if client is None:
        raise CLIError(f"no local recording matches {ref.text!r}")
    sid = await resolve_session_id(client, ref)
    local = diffmod.side_from_store(store, sid) if ref.kind == "last" else None
    if local is not None:
        return local
    try:
        return diffmod.side_from_session(await client.get(sid))
    except StorageError as exc:
        if exc.not_found:
            where = "stored session or local recording" if ref.kind == "full" else "stored session"
            raise CLIError(f"no {where} has id {sid}") from None
        raise CLIError(str(exc)) from None


async def cmd_diff(args: argparse.Namespace, settings: Settings) -> int:
    store = RecordingStore.from_settings(settings)
    refs = [parse_id(args.a), parse_id(args.b)]
    if all(local_recording(store, r) is not None for r in refs):
        sides = [await _side(store, r, None) for r in refs]
    else:
        try:
            from buildtel.services.storage.api import StorageClient
        except ImportError:
            raise CLIError("comparing sessions needs the storage service, which is not installed") from None
        from buildtel.cli.common import open_bus

        async with open_bus(settings, autostart=False, name="buildtel-diff") as bus:
            client = StorageClient(bus.nc, bus.subjects)
            sides = [await _side(store, r, client) for r in refs]
    result = diffmod.diff(sides[0], sides[1], min_delta_s=args.min_delta, min_ratio=args.min_ratio)
    if args.json:
        _dump(result)
    else:
        print(safe_block(diffmod.render(result)))  # target names and commands come from publishers
    return 0


def cmd_recordings(args: argparse.Namespace, settings: Settings) -> int:
    store = RecordingStore.from_settings(settings)
    if args.gc:
        print(f"gc: {store.gc()}", file=sys.stderr)
    manifests = store.list_manifests()
    linked = {m.session_id for m in manifests}
    streams = [s for s in store.event_sessions() if s not in linked]
    if args.json:
        _dump({"recordings": [msgspec.to_builtins(m) for m in manifests], "event_streams": streams,
               "disk_bytes": store.disk_bytes()})
        return 0
    for m in manifests:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(m.created))
        print(f"{safe(m.id)}  {when}  exit {m.exit_code!s:<4} {len(m.inputs):5d} in {len(m.outputs):5d} out  "
              f"{safe(' '.join(m.command))[:60]}")
    for sid in streams:
        print(f"{sid}  (event stream only)")
    if not manifests and not streams:
        print("no recordings yet (buildtel run --record -- CMD)", file=sys.stderr)
    return 0
