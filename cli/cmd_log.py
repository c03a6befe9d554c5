"""``buildtel log ID [TARGET]``: a build's console log, or what one failed target printed
(``docs/failures.md``).  The log is read from the logs bucket, the target's output from the
stored session (through the storage service).  On a terminal control characters are shown
escaped (``cli/textsafe.py``); into a file or a pipe the log's bytes are written as stored."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from buildtel.cli.common import open_bus
from buildtel.cli.errors import CLIError
from buildtel.cli.ids import GRAMMAR, parse_id, resolve_session
from buildtel.cli.jsonout import dumps
from buildtel.cli.textsafe import safe, safe_block
from buildtel.services.storage.api import StorageClient
from buildtel.shared.failrecord import failed_targets
from buildtel.shared.protocol import BuildSession
from buildtel.shared.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("log", help="print a build's console log, or one failed target's output")
    p.add_argument("id", help=GRAMMAR)
    p.add_argument("target", nargs="?", help="a failed target: print only its output")
    p.add_argument("--json", action="store_true",
                   help="one JSON object: {session_id, log, text} (the log's record and its text), or with "
                        "TARGET that target's failure record")
    p.set_defaults(func=cmd_log, quiet_logs=True)


def failure_of(s: BuildSession, target: str) -> dict[str, Any]:
    """``target``'s failure record as ``buildtel show --failures`` gives it (``failrecord.failed_targets``:
    classified, and converted for a session stored by an older version or an importer)."""
    for row in failed_targets(s):
        if row["target"] == target:
            return row
    failed = [m.name for m in s.targets if m.status == "failed"]
    hint = f" (failed targets: {', '.join(failed[:10])})" if failed else " (it has no failed targets)"
    raise CLIError(f"session {s.id} has no failed target {target!r}{hint}")


async def cmd_log(args: argparse.Namespace, settings: Settings) -> int:
    ref = parse_id(args.id)
    async with open_bus(settings) as bus:
        s = await resolve_session(StorageClient(bus.nc, bus.subjects), ref)
        if args.target:
            f = failure_of(s, args.target)
            tty = sys.stdout.isatty()
            if args.json:
                sys.stdout.write(dumps({"session_id": s.id, **f}) + "\n")
            else:
                if not f["attributed"] or not f["output"]:
                    print(f"buildtel: {f['note']}", file=sys.stderr)
                elif f["output_cut_bytes"]:
                    print(f"buildtel: its first {f['output_cut_bytes']} bytes are not kept", file=sys.stderr)
                for line in f["output"]:
                    print(safe(line) if tty else line)
            return 0
        if s.log is None or not s.log.object:
            why = s.log.error if s.log is not None and s.log.error else "it was not captured (buildtel run --no-log, " \
                                                                      "another agent, or an older version)"
            raise CLIError(f"session {s.id} has no build log: {why}")
        from buildtel.shared.buildlog import decompress
        from buildtel.shared.logstore import get_log

        data = await get_log(bus.js, bus.subjects, s.log.object)
    if data is None:
        raise CLIError(f"session {s.id}: its build log is no longer stored (deleted or expired)")
    text = decompress(data)
    if args.json:
        sys.stdout.write(dumps({"session_id": s.id, "log": s.log, "text": text.decode("utf-8", "replace")}) + "\n")
    elif sys.stdout.isatty():  # from the bus: control sequences made visible (cli/textsafe.py)
        sys.stdout.write(safe_block(text.decode("utf-8", "replace")))
    else:  # into a file or a pipe: the log's bytes as stored
        sys.stdout.buffer.write(text)
        sys.stdout.flush()
    return 0

