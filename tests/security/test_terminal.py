"""Terminal safety: what publishers put on the bus cannot drive the terminal of whoever runs the CLI.

Property tests for cli/textsafe.py, the CLI's text renderers fed hostile names, and
an end-to-end run of ``buildtel sessions``/``show`` (subprocesses, real storage on the test's
NATS/Redis) over a stored session whose names carry escape sequences.
"""

from __future__ import annotations

import asyncio
import json
import time
import unicodedata
from typing import Any

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from buildtel.cli.cmd_analyze import alert_line
from buildtel.cli.cmd_sessions import session_line
from buildtel.cli.cmd_watch import plain_line, row_cells
from buildtel.cli.textsafe import UNSAFE, json_safe, safe, safe_block
from buildtel.services.analyzer.alerts import Alert
from buildtel.services.storage.api import StorageClient, StorageError
from buildtel.shared.codec import encode
from buildtel.shared.protocol import (
    BuildEnvironment,
    BuildSession,
    HealthCheckpoint,
    TargetMetrics,
    VcsInfo,
    new_session_id,
)
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import run_cli as cli

EVIL = "\x1b]0;pwned\x07\x1b[2J"
BIDI = "\u202e\u2066"
C1 = "\x9b31m\x9d0;x\x9c"


def is_dangerous(ch: str) -> bool:
    """Independent of the implementation: the character classes the module promises to escape."""
    cat = unicodedata.category(ch)
    bidi = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    return cat in ("Cc", "Zl", "Zp", "Cs") or ch in bidi


def unescape(text: str) -> str:
    """Undo safe(): \\xNN and \\uNNNN back to characters (backslashes themselves are not escaped,
    so this is only exact for inputs without a literal backslash followed by x/u)."""
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


@given(st.text())
def test_safe_output_has_no_dangerous_character(text: str) -> None:
    out = safe(text)
    assert not any(is_dangerous(ch) for ch in out)
    assert "\x1b" not in out and "\n" not in out


@given(st.text(alphabet=st.characters(exclude_characters="\\", exclude_categories=("Cs",))))
def test_safe_loses_nothing(text: str) -> None:
    assert unescape(safe(text)) == text


@given(st.text(alphabet=st.characters(exclude_categories=("Cc", "Zl", "Zp", "Cs", "Cf"))))
def test_ordinary_text_is_printed_unchanged(text: str) -> None:
    assert safe(text) == text == safe_block(text)


@given(st.lists(st.text(), max_size=5))
def test_safe_block_keeps_only_its_line_breaks(lines: list[str]) -> None:
    block = "\n".join(safe(line) for line in lines)
    assert safe_block(block) == block
    raw = safe_block("\n".join(lines))
    assert not any(is_dangerous(ch) for ch in raw.replace("\n", ""))


@given(st.recursive(st.text() | st.integers() | st.none(),
                    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(), kids, max_size=3),
                    max_leaves=12))
def test_json_output_is_the_same_data_and_inert(value: Any) -> None:
    for raw in (msgspec.json.encode(value).decode(), json.dumps(value, ensure_ascii=False)):
        out = json_safe(raw)
        assert json.loads(out) == value
        assert not UNSAFE.search(out.replace("\n", ""))


def test_the_renderers_escape_every_bus_string() -> None:
    now = time.time()
    session = BuildSession(id="a" * 32, name=EVIL, outcome="success", start=now, finish=now + 1,
                           environment=BuildEnvironment(vcs=VcsInfo(branch=BIDI + "main")))
    cp = HealthCheckpoint(session_id="b" * 32, agent_id=EVIL, seq=0, ts=now, status="healthy", reasons=[C1, EVIL])
    alert = Alert(id="x", kind="target", direction="regression", series="s", branch=BIDI, target=EVIL,
                  cache="miss",
                  before_median_s=1.0, after_median_s=2.0, change_pct=100.0, confidence=0.9, p_value=None,
                  first_session_id=C1, first_session_start=now, last_good_session_id=None, last_good_commit=None,
                  first_bad_commit=None, commit_range=EVIL, detected_session_id="c" * 32, detected_at=now,
                  points_before=5, points_after=5)
    for line in [session_line(session), plain_line(cp), *row_cells(cp, 0.0), alert_line(alert)]:
        assert not UNSAFE.search(line), line
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in session_line(session)
    assert "\\u202e\\u2066main" in session_line(session)


def strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else []
    return [s for v in items for s in strings(v)]


# -- end to end --------------------------------------------------------------------------------




async def test_cli_prints_a_hostile_session_without_raw_escapes(storage: Settings, nc: Any) -> None:
    t0 = time.time() - 60
    sid = new_session_id()
    session = BuildSession(
        id=sid, name=f"nightly{EVIL}", start=t0, finish=t0 + 5, duration_s=5.0, exit_code=0,
        command=["make", EVIL], agents=[f"agent{C1}"],
        environment=BuildEnvironment(hostname=f"host{BIDI}", vcs=VcsInfo(branch=f"main{EVIL}")),
        targets=[TargetMetrics(name=f"//app:{EVIL}", start=t0, end=t0 + 2, duration_s=2.0, worker="w1")])
    js = nc.jetstream()
    subjects = Subjects(storage.namespace)
    await js.publish(subjects.sessions_completed, encode(session), headers={"Nats-Msg-Id": sid})
    client = StorageClient(nc, subjects)
    deadline = time.monotonic() + 30
    while True:
        try:
            stored = await client.get(sid)
            break
        except StorageError as exc:
            if not exc.not_found or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    assert EVIL in stored.targets[0].name  # the hostile name really is in the store

    code, shown, err = await cli(storage, "show", sid)
    assert code == 0, err
    code, listed, err = await cli(storage, "sessions")
    assert code == 0, err
    for out in (shown, listed):
        assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out and "\u202e" not in out
        assert not UNSAFE.search(out.replace("\n", ""))
    assert f"//app:{safe(EVIL)}" in shown and "\\x1b]0;pwned\\x07\\x1b[2J" in listed
    assert f"agent{safe(C1)}" in shown and f"host{safe(BIDI)}" in shown

    # --json keeps the exact data, and is inert too.
    code, as_json, err = await cli(storage, "show", sid, "--json")
    assert code == 0, err
    assert "\x1b" not in as_json and "\u202e" not in as_json and "\x9b" not in as_json
    assert f"//app:{EVIL}" in strings(json.loads(as_json)["targets"])  # exactly, once decoded
