"""Entry point of ``buildtel``: builds the parser from the command modules and runs one.

Each command module exposes ``register(subparsers)``, which adds its sub-commands
and sets ``func`` (sync or async, taking the parsed args and the Settings).
Errors reach the user as one clear line on stderr and exit code 2, never a
traceback (``BUILDTEL_DEBUG=1`` shows the traceback).  A reader that closes the pipe
early (``buildtel sessions | head``) ends the command quietly with exit code 141.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import types
from typing import Any

from buildtel.cli.errors import CLIError
from buildtel.shared.settings import Settings, SettingsError, describe

__all__ = ["CLIError", "build_parser", "main"]

# Command -> module that registers it.  ``buildtel CMD`` imports only CMD's module, so a quick
# command (``run`` on a build's critical path) does not pay for every other command's imports.
# Listed in the order --help shows them (each module's registration order).
COMMANDS: dict[str, str] = {
    "up": "buildtel.cli.cmd_stack",
    "down": "buildtel.cli.cmd_stack",
    "credentials": "buildtel.cli.cmd_stack",
    "serve": "buildtel.cli.cmd_stack",
    "demo": "buildtel.cli.cmd_demo",
    "sessions": "buildtel.cli.cmd_sessions",
    "show": "buildtel.cli.cmd_sessions",
    "log": "buildtel.cli.cmd_log",
    "import": "buildtel.cli.cmd_import",
    "run": "buildtel.cli.cmd_run",
    "replay": "buildtel.cli.cmd_replay",
    "diff": "buildtel.cli.cmd_replay",
    "recordings": "buildtel.cli.cmd_replay",
    "trace": "buildtel.cli.cmd_trace",
    "w3c-testpoint": "buildtel.cli.cmd_w3c",
    "report": "buildtel.cli.cmd_analyze",
    "export": "buildtel.cli.cmd_analyze",
    "alerts": "buildtel.cli.cmd_analyze",
    "watch": "buildtel.cli.cmd_watch",
    "flamegraph": "buildtel.cli.cmd_flamegraph",
    "keys": "buildtel.cli.cmd_keys",
    "tests": "buildtel.cli.cmd_tests",
    "storage": "buildtel.cli.cmd_storage",
    "failures": "buildtel.cli.cmd_failures",
}
# Command -> its one-line help, as its module registers it.  ``buildtel --help`` lists every command
# from this table instead of importing every module: those pull in nats, aiohttp, numpy and the
# services (~0.5-1.5 s), where the listing needs none of it.  tests/cli/test_main.py checks that
# this table says exactly what the modules register.
COMMAND_HELP: dict[str, str] = {
    "up": "run all services in one process (embedded NATS and Redis unless configured)",
    "down": "stop the stack 'buildtel up' started on this machine",
    "credentials": "write a role's credentials of the local stack to a file for another machine or tool",
    "serve": "run one service against the configured NATS and Redis",
    "demo": "run a simulated build farm against the stack and report what was stored",
    "sessions": "list stored build sessions, newest first",
    "show": "show one stored session with its targets",
    "log": "print a build's console log, or one failed target's output",
    "import": "import ninja logs, Bazel BEP streams, Chrome traces or JUnit XML test reports as sessions",
    "run": "run a build command as one telemetry session",
    "replay": "replay, inspect or republish a recorded build",
    "diff": "compare two recordings or two stored sessions",
    "recordings": "list local recordings",
    "trace": "show a build's trace (span tree with timings), or export it",
    "w3c-testpoint": "serve POST /test for the W3C Trace Context test suite",
    "report": "build analytics: build times, trends, targets, flakiness, bottlenecks, and the alerts that began in "
              "the window (open, acknowledged, muted)",
    "export": "write a report to a file: json, csv (sessions + targets files) or summary",
    "alerts": "regression alerts (build and target durations, host slowdowns), explained; ack, mute, unmute, "
              "subscriptions",
    "watch": "show running builds live (health checkpoints)",
    "flamegraph": "flame graph SVG of a session, the last N sessions, a trace or a folded file",
    "keys": "create, list or revoke API keys of the web API",
    "tests": "test results across stored builds: flaky, slowest, failing tests",
    "storage": "storage maintenance: change the number of partitions",
    "failures": "failed targets across stored builds, grouped by signature and class",
}
COMMAND_MODULES = list(dict.fromkeys(COMMANDS.values()))
_GLOBAL_WITH_VALUE = {"--nats-url", "--redis-url", "--cache-dir", "--namespace"}


def _command_of(argv: list[str]) -> str | None:
    """The sub-command named in ``argv`` (after global options), if any."""
    it = iter(argv)
    for tok in it:
        if tok in _GLOBAL_WITH_VALUE:
            next(it, None)
        elif not tok.startswith("-"):
            return tok
    return None


def _epilog() -> str:
    lines = ["configuration (environment variables):"]
    for var, default, text in describe():
        lines.append(f"  {var:<40} {text}" + (f" [default: {default}]" if default else ""))
    return "\n".join(lines)


def build_parser(only: str | None = None, *, listing: bool = False) -> argparse.ArgumentParser:
    """The parser with ``only``'s module registered (None: every module).  ``listing`` (no command
    named: ``buildtel --help``, a typo) imports no command module: each command is a stand-in
    with its help line from :data:`COMMAND_HELP`, which :func:`main` swaps for the real one if a
    command is parsed after all."""
    parser = argparse.ArgumentParser(
        prog="buildtel",
        description="Builder Telemetry: build observability for distributed build farms.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nats-url", help="join this NATS cluster (overrides BUILDER_TELEMETRY_NATS_URL)")
    parser.add_argument("--redis-url", help="use this Redis (overrides BUILDER_TELEMETRY_REDIS_URL)")
    parser.add_argument("--cache-dir", help="data directory (overrides BUILDER_TELEMETRY_CACHE_DIR)")
    parser.add_argument("--namespace", help="subject/stream/key prefix (overrides BUILDER_TELEMETRY_NAMESPACE)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    if listing and only not in COMMANDS:
        for command, text in COMMAND_HELP.items():
            sub.add_parser(command, help=text, add_help=False).set_defaults(_stand_in=command)
        return parser
    modules = [COMMANDS[only]] if only in COMMANDS and COMMANDS[only] in COMMAND_MODULES else COMMAND_MODULES
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    from pathlib import Path

    return Settings.from_env(
        nats_url=args.nats_url,
        redis_url=args.redis_url,
        cache_dir=Path(args.cache_dir) if args.cache_dir else None,
        namespace=args.namespace,
    )


EXIT_CLOSED_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool that stopped at a closed pipe


def _closed_pipe() -> int:
    """The reader went away (``buildtel sessions | head``): stop quietly, as a C tool killed by
    SIGPIPE would: no traceback, no 'error:' line.  Whatever is still buffered for stdout can
    never be delivered, so stdout is pointed at /dev/null to keep the interpreter's own final
    flush from complaining on stderr."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout without a file descriptor (captured in-process)
        pass
    return EXIT_CLOSED_PIPE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_command_of(argv), listing=True)
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "_stand_in", None):  # a command _command_of did not spot: parse with its module
        parser = build_parser(args._stand_in)
        args = parser.parse_args(argv)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")  # parse_args' own words
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        settings = settings_from_args(args)
        from buildtel.shared import logs

        # Interactive commands keep service chatter down to warnings unless a level is asked for.
        level = settings.log_level
        if getattr(args, "quiet_logs", False) and "BUILDER_TELEMETRY_LOG_LEVEL" not in os.environ:
            level = "warning"
        logs.configure(level, settings.log_format)
        result: Any = args.func(args, settings)
        if isinstance(result, types.CoroutineType):  # an async command (asyncio loads only for those)
            import asyncio

            result = asyncio.run(result)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's teardown
        return int(result or 0)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _closed_pipe()
    except (CLIError, SettingsError) as exc:
        print(f"buildtel: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if os.environ.get("BUILDTEL_DEBUG"):
            raise
        print(f"buildtel: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
