"""Entry point of ``buildtel``: builds the parser from the command modules and runs one.

Each command module exposes ``register(subparsers)``, which adds its sub-commands
and sets ``func`` (sync or async, taking the parsed args and the Settings).
Errors reach the user as one clear line on stderr and exit code 2, never a
traceback (``BUILDTEL_DEBUG=1`` shows the traceback).  A reader that closes the pipe
early (``buildtel sessions | head``) ends the command quietly with exit code 141.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import inspect
import os
import sys
from typing import Any

from buildtel.cli.errors import CLIError
from buildtel.shared.settings import Settings, SettingsError, describe

__all__ = ["CLIError", "build_parser", "main"]

# Command -> module that registers it.  ``buildtel CMD`` imports only CMD's module, so a quick
# command (``run`` on a build's critical path) does not pay for every other command's imports.
COMMANDS: dict[str, str] = {
    "up": "buildtel.cli.cmd_stack",
    "down": "buildtel.cli.cmd_stack",
    "serve": "buildtel.cli.cmd_stack",
    "credentials": "buildtel.cli.cmd_stack",
    "demo": "buildtel.cli.cmd_demo",
    "sessions": "buildtel.cli.cmd_sessions",
    "show": "buildtel.cli.cmd_sessions",
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


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
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
    parser = build_parser(_command_of(argv))
    args = parser.parse_args(argv)
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
        if inspect.iscoroutine(result):
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
    except Exception as exc:  # noqa: BLE001 - one clear line, never a traceback
        if os.environ.get("BUILDTEL_DEBUG"):
            raise
        print(f"buildtel: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
