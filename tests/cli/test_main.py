"""The CLI's command map matches what the command modules register, and --help lists them all
from its static table without importing a command module."""

from __future__ import annotations

import argparse
import importlib

import pytest

from buildtel.cli import main as cli


def _registered(module: str) -> set[str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    importlib.import_module(module).register(sub)
    return set(sub.choices)


def _listed(parser: argparse.ArgumentParser) -> list[tuple[str, str | None]]:
    """(command, help line) as the parser's help lists them, in order."""
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return [(a.dest, a.help) for a in sub._choices_actions]


def test_every_command_is_mapped_to_the_module_that_registers_it() -> None:
    for module in cli.COMMAND_MODULES:
        assert _registered(module) == {c for c, m in cli.COMMANDS.items() if m == module}, module


def test_the_static_help_table_says_what_the_modules_register() -> None:
    # --help lists COMMAND_HELP without importing the modules: it must be what they register,
    # command for command, help line for help line, in the same order.
    real = _listed(cli.build_parser())
    assert real == list(cli.COMMAND_HELP.items())
    assert [c for c, _ in real] == list(cli.COMMANDS)
    assert _listed(cli.build_parser(None, listing=True)) == real


def test_help_imports_no_command_module() -> None:
    import subprocess
    import sys

    code = ("import sys\nfrom buildtel.cli import main\ntry:\n    main.main(['--help'])\nexcept SystemExit:\n"
            "    pass\nprint(sorted(m for m in sys.modules if m.startswith(('buildtel.cli.cmd_', 'buildtel.services',"
            " 'nats', 'aiohttp', 'numpy', 'redis', 'msgspec', 'asyncio'))), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert "flamegraph" in done.stdout and "BUILDER_TELEMETRY_MAX_SESSIONS" in done.stdout
    assert done.stderr.strip() == "[]"


def test_a_command_the_quick_scan_misses_still_parses_with_its_module() -> None:
    # _command_of picks the command out of argv before parsing; if it ever misses one, the
    # listing parser's stand-in names it and main parses again with the real module.
    args, _ = cli.build_parser(None, listing=True).parse_known_args(["sessions", "--limit", "3"])
    assert args._stand_in == "sessions" and not hasattr(args, "func")
    args = cli.build_parser(args._stand_in).parse_args(["sessions", "--limit", "3"])
    assert args.limit == 3 and args.func


def test_unknown_arguments_are_refused_as_before(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--bogus"])
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["sessions", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_full_help_lists_every_command_and_every_setting() -> None:
    parser = cli.build_parser()
    text = parser.format_help()
    for command in cli.COMMANDS:
        assert command in text
    assert "BUILDER_TELEMETRY_MAX_SESSIONS" in text and "[default: 1000]" in text


def test_a_command_parses_with_only_its_own_module() -> None:
    parser = cli.build_parser("sessions")
    args = parser.parse_args(["--namespace", "x", "sessions", "--limit", "3"])
    assert args.limit == 3 and args.namespace == "x"
    assert cli._command_of(["--cache-dir", "d", "run", "--", "make"]) == "run"


def test_w3c_testpoint_command_propagates_context(tmp_path) -> None:
    import json
    import os
    import socket
    import subprocess
    import sys
    import threading
    import time
    import urllib.request
    from http.server import BaseHTTPRequestHandler, HTTPServer

    seen: list[str] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.headers.get("traceparent", ""))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    receiver = HTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "buildtel.cli.main", "w3c-testpoint", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ))
    try:
        body = json.dumps([{"url": f"http://127.0.0.1:{receiver.server_port}/", "arguments": []}]).encode()
        incoming = "00-" + "12" * 16 + "-" + "34" * 8 + "-01"
        for _ in range(100):
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/test", data=body, method="POST",
                                             headers={"traceparent": incoming, "Content-Type": "application/json"})
                urllib.request.urlopen(req, timeout=5).close()
                break
            except OSError:
                time.sleep(0.1)
        assert len(seen) == 1
        version, trace_id, parent, _ = seen[0].split("-")
        assert trace_id == "12" * 16 and parent != "34" * 8 and version == "00"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        receiver.shutdown()
        receiver.server_close()
