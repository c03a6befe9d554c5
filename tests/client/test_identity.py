"""Agent ids name machines: the same every run, overridable, and exact when several clients of
one machine publish into one session (the collector de-duplicates by session, agent and seq)."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

from buildtel.shared.client import TelemetryClient
from buildtel.shared.protocol import new_session_id
from buildtel.shared.settings import Settings

HOST = socket.gethostname()
S = Settings(nats_url="nats://127.0.0.1:1")  # never started


def test_a_client_with_its_own_session_is_the_machine() -> None:
    assert TelemetryClient(S).agent_id == HOST
    assert TelemetryClient(S.with_(agent_id="build-07")).agent_id == "build-07"
    assert TelemetryClient(S, agent_id="given:as|is").agent_id == "given_as_is"  # only made key-safe


def test_another_process_on_the_machine_gets_the_same_id() -> None:
    code = "from buildtel.shared.client import TelemetryClient; from buildtel.shared.settings import Settings; " \
           "print(TelemetryClient(Settings(nats_url='nats://127.0.0.1:1')).agent_id)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2]).stdout.strip()
    assert out == HOST


def test_clients_joining_one_session_never_share_an_id() -> None:
    sid = new_session_id()
    ids = [TelemetryClient(S, session_id=sid).agent_id for _ in range(2000)]  # same process, same ms
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(rf"{re.escape(HOST)}/\d+\.[0-9a-z]+", a) for a in ids)
    overridden = TelemetryClient(S.with_(agent_id="m" * 300), session_id=sid).agent_id
    assert len(overridden) == 200 and re.search(r"/\d+\.[0-9a-z]+$", overridden)  # the sub-id survives the cap
