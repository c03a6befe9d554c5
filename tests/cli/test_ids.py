"""One id grammar everywhere: full id, unique prefix >= 6 hex digits, last, last~N.

Unit properties of the parser, then end-to-end ``buildtel`` subprocesses against a real
storage service on the test's NATS: show/diff/flamegraph by every id form, the exact
"no match" and "ambiguous" messages, keyed ``show --json``, and a closed stdout pipe.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from buildtel.cli.errors import CLIError
from buildtel.cli.ids import parse_id, pick, resolve_recording
from buildtel.services.storage.api import StorageClient, StorageError
from buildtel.shared.codec import encode
from buildtel.shared.protocol import BuildEnvironment, BuildSession, TargetMetrics, VcsInfo
from buildtel.shared.recording.store import RecordingStore
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.util import run_cli as cli
from tests.util import stack_env, synthetic_build

HEX = "0123456789abcdef"


@given(st.text(HEX, min_size=32, max_size=32))
def test_a_full_id_is_itself_in_any_case(word: str) -> None:
    ref = parse_id(word.upper())
    assert (ref.kind, ref.value) == ("full", word)


@given(st.text(HEX, min_size=6, max_size=31))
def test_six_to_31_hex_digits_are_a_prefix(word: str) -> None:
    assert parse_id(f" {word} ").kind == "prefix"


@given(st.integers(0, 9999))
def test_last_tilde_n(n: int) -> None:
    assert parse_id(f"last~{n}").back == n
    assert parse_id("last").back == 0


@given(st.text(min_size=0, max_size=40).filter(
    lambda w: not (w.strip().lower().startswith("last") or (all(c in HEX for c in w.strip().lower())
                   and 6 <= len(w.strip()) <= 32))))
def test_anything_else_is_refused_with_a_reason(word: str) -> None:
    with pytest.raises(CLIError) as err:
        parse_id(word)
    assert "id" in str(err.value)


def test_short_prefixes_and_ambiguity_say_what_to_do() -> None:
    with pytest.raises(CLIError, match="at least 6 hex digits"):
        parse_id("3f2a9")
    ids = ["3f2a91" + "0" * 26, "3f2a91" + "1" * 26, "aaaaaa" + "0" * 26]
    with pytest.raises(CLIError, match=r"prefix 3f2a91 is ambiguous: 2 session ids start with it: "
                                       r"3f2a91000000…, 3f2a91111111…; give more digits"):
        pick(parse_id("3f2a91"), ids)
    assert pick(parse_id("3f2a911"), ids) == ids[1]
    assert pick(parse_id("3f2a92"), ids) is None


def test_local_recordings_by_prefix_and_last(settings: Settings) -> None:
    store = RecordingStore.from_settings(settings)
    ids = ["abcdef" + "0" * 26, "abcdef" + "1" * 26]
    for i, sid in enumerate(ids):
        _, events, _ = synthetic_build(sid, targets=2)
        store.save_events(sid, events["agent-a"])
        os.utime(store.events / sid, (1000 + i, 1000 + i))  # the second is the newer
    assert resolve_recording(store, "last") == ids[1]
    assert resolve_recording(store, "last~1") == ids[0]
    assert resolve_recording(store, "abcdef1") == ids[1]
    with pytest.raises(CLIError, match="only 2 recordings are on this machine: last~2 needs 3"):
        resolve_recording(store, "last~2")
    with pytest.raises(CLIError, match="prefix abcdef is ambiguous"):
        resolve_recording(store, "ABCDEF")
    with pytest.raises(CLIError, match="no recording id starts with 123456"):
        resolve_recording(store, "123456")


# -- end to end --------------------------------------------------------------------------------



def _env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_TELEMETRY_")}
    env.update(stack_env(settings))
    env.pop("BUILDTEL_DEBUG", None)
    return env


def _argv(settings: Settings, *args: str) -> list[str]:
    return [sys.executable, "-m", "buildtel.cli.main", "--namespace", settings.namespace,
            "--cache-dir", str(settings.cache_dir), *args]




A = "3f2a91" + "0a" * 13
B = "3f2a91" + "0b" * 13
C = "c0ffee" + "0c" * 13


async def _store(nc: Any, settings: Settings) -> list[str]:
    """Three sessions, oldest A, then B, newest C; A and B share the prefix 3f2a91."""
    js = nc.jetstream()
    subjects = Subjects(settings.namespace)
    t0 = time.time() - 600
    for i, sid in enumerate((A, B, C)):
        s = BuildSession(id=sid, name=f"build{i}", start=t0 + i * 60, finish=t0 + i * 60 + 10, duration_s=10.0,
                         outcome="success", environment=BuildEnvironment(vcs=VcsInfo(branch="main")),
                         targets=[TargetMetrics(name="//app:bin", start=t0, end=t0 + 1 + i, duration_s=1.0 + i)])
        await js.publish(subjects.sessions_completed, encode(s), headers={"Nats-Msg-Id": sid})
    client = StorageClient(nc, subjects)
    deadline = time.monotonic() + 30
    while True:  # the storage service stores asynchronously: wait until all three are there
        try:
            if len(await client.recent(10)) == 3:
                return [A, B, C]
        except StorageError:
            pass
        assert time.monotonic() < deadline, "storage did not store the sessions"
        await asyncio.sleep(0.1)


async def test_show_takes_every_id_form_and_says_precisely_why_not(storage: Settings, nc: Any) -> None:
    await _store(nc, storage)
    for word, expected in ((A, A), (B[:8], B), ("C0FFEE", C), ("last", C), ("last~2", A)):
        code, out, err = await cli(storage, "show", word, "--json")
        assert code == 0, (word, err)
        assert json.loads(out)["id"] == expected, word

    code, _, err = await cli(storage, "show", "3f2a91")
    assert code == 2
    assert f"prefix 3f2a91 is ambiguous: 2 session ids start with it: {A[:12]}… (" in err
    assert f"{B[:12]}… (" in err and "build1" in err and "give more digits" in err
    for word, message in (("abcdef", "no session id starts with abcdef"),
                          ("last~5", "only 3 sessions are stored: last~5 needs 6"),
                          ("3f2a", "id prefix '3f2a' is too short: give at least 6 hex digits"),
                          ("d" * 32, f"storage error 404: session {'d' * 32} is not stored")):
        code, out, err = await cli(storage, "show", word)
        assert (code, out) == (2, ""), word
        assert err.strip() == f"buildtel: error: {message}", word


async def test_show_json_states_every_field_with_targets_as_objects(storage: Settings, nc: Any) -> None:
    await _store(nc, storage)
    code, out, err = await cli(storage, "show", "last", "--json")
    assert code == 0, err
    doc = json.loads(out)
    target = doc["targets"][0]
    assert target["name"] == "//app:bin" and target["duration_s"] == 3.0
    assert target["status"] == "success" and target["exit_code"] is None and target["deps"] == []  # defaults too
    assert doc["exit_code"] is None and doc["labels"] == {} and doc["record"] is False
    code, out, err = await cli(storage, "sessions", "--json")
    assert code == 0, err
    assert [s["id"] for s in json.loads(out)] == [C, B, A]
    line = json.loads(out)[0]  # a summary: what a list needs, every field stated
    assert line["targets"] == 1 and line["complete"] is True and line["exit_code"] is None


async def test_an_empty_list_says_whether_filters_or_the_store_are_why(storage: Settings, nc: Any) -> None:
    code, out, err = await cli(storage, "sessions", "--branch", "main")
    assert (code, out, err.strip()) == (0, "", "no sessions stored yet")
    await _store(nc, storage)
    code, out, err = await cli(storage, "sessions", "--branch", "main", "--outcome", "failed")
    assert (code, out, err.strip()) == (0, "", "no session matches --branch main --outcome failed (of 3 stored)")


async def test_diff_of_the_last_two_stored_sessions(storage: Settings, nc: Any) -> None:
    await _store(nc, storage)
    code, out, err = await cli(storage, "diff", "last~1", "last", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert B in json.dumps(doc) and C in json.dumps(doc)
    code, _, err = await cli(storage, "diff", "3f2a91", "last")
    assert code == 2 and "prefix 3f2a91 is ambiguous" in err


async def test_a_closed_pipe_ends_quietly(storage: Settings, nc: Any) -> None:
    await _store(nc, storage)
    r, w = os.pipe()
    os.close(r)  # the reader is gone before buildtel writes a byte: every write meets a closed pipe
    try:
        proc = await asyncio.create_subprocess_exec(*_argv(storage, "sessions"), stdout=w,
                                                    stderr=asyncio.subprocess.PIPE, env=_env(storage))
    finally:
        os.close(w)
    _, err = await asyncio.wait_for(proc.communicate(), 90)
    assert err.decode() == ""  # no traceback, no 'error:' line
    assert proc.returncode == 141
