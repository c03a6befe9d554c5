"""What the BES endpoint keeps beyond targets (docs/bazel.md): test attempts as test cases that
``buildtel tests --flaky`` finds, and failed actions' output read only where Bazel keeps it."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from buildtel.services.bes.service import BesService
from buildtel.services.collector.service import CollectorService
from buildtel.services.storage.api import StorageClient
from buildtel.services.storage.service import StorageService
from buildtel.shared.importers.bep import parse_bep
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.bes.client import read_bep_json, replay
from tests.bes.test_replay import KAHLYS
from tests.junit.stack import cli, eventually
from tests.util import running


@pytest.fixture
async def stack(bes_settings: Settings, nc: Any, redis_client: Any) -> AsyncIterator[tuple[Settings, BesService]]:
    quick = bes_settings.with_(fsync=False)
    urls = (quick.nats_url or "", quick.redis_url or "")
    bes = BesService(quick, *urls, port=0)
    async with running(StorageService(quick, *urls), CollectorService(quick, *urls), bes):
        yield quick, bes


async def test_replayed_bazel_test_stream_shows_its_flaky_test(stack: tuple[Settings, BesService], nc: Any) -> None:
    settings, bes = stack
    events = read_bep_json(KAHLYS)
    await replay(bes.url.removeprefix("grpc://"), events, events[0].started.uuid)
    client = StorageClient(nc, Subjects(settings.namespace))

    async def stored() -> Any:
        return await client.summaries(limit=10)

    [summary] = await eventually(stored)
    live = await client.get(summary.id)
    assert live.tests == parse_bep(KAHLYS.read_bytes()).sessions[0].tests  # as `buildtel import bep` of the file

    code, out, err = await cli(settings, "tests", "--flaky", "--json")
    assert code == 0, err
    reply = json.loads(out)
    # --runs_per_test=2: geninter_test failed its first run and passed its second (Bazel's FLAKY).
    [flaky] = reply["tests"]
    assert flaky["test"] == "//go/cmd/geninter::geninter_test"
    assert (flaky["runs"], flaky["passed"], flaky["failed"]) == (2, 1, 1)
    code, out, _ = await cli(settings, "tests")
    assert code == 0 and "//go/pkg/alfred::alfred_test" in out and "//go/cmd/geninter::geninter_test" in out


def _stream(exec_root: str, stdout: dict[str, Any], stderr: dict[str, Any]) -> bytes:
    events = [
        {"id": {"started": {}}, "started": {"uuid": "6f1c2d3e-0000-4000-8000-000000000001", "command": "build",
                                            "startTimeMillis": "1700000000000"}},
        {"id": {"workspace": {}}, "workspaceInfo": {"localExecRoot": exec_root}},
        {"id": {"actionCompleted": {"primaryOutput": "bazel-out/bin/x.txt", "label": "//:x"}},
         "action": {"exitCode": 3, "type": "Genrule", "label": "//:x", "stdout": stdout, "stderr": stderr}},
        {"id": {"targetCompleted": {"label": "//:x"}}, "completed": {"success": False}},
        {"id": {"buildFinished": {}}, "finished": {"finishTimeMillis": "1700000001000",
                                                   "exitCode": {"name": "BUILD_FAILURE", "code": 1}},
         "lastMessage": True},
    ]
    return "\n".join(json.dumps(e) for e in events).encode()


def _output_base(tmp_path: Path) -> tuple[Path, Path]:
    base = tmp_path / "outbase"
    actions = base / "execroot" / "_main" / "bazel-out" / "_tmp" / "actions"
    actions.mkdir(parents=True)
    (base / "DO_NOT_BUILD_HERE").write_text("/ws")
    return base, actions


def test_failed_action_output_is_read_under_the_output_base_only(tmp_path: Path) -> None:
    base, actions = _output_base(tmp_path)
    exec_root = str(base / "execroot" / "_main")
    (actions / "stdout-1").write_text("compiling x\n")
    (actions / "stderr-1").write_text("x.c:1: error: boom\napi_key=sk_live_abcdefghijklmnop1234\n")
    [s] = parse_bep(_stream(exec_root, {"name": "stdout", "uri": (actions / "stdout-1").as_uri()},
                            {"name": "stderr", "uri": (actions / "stderr-1").as_uri()})).sessions
    f = next(f for f in s.failures if f.target == "//:x")
    assert f.output[:2] == ["compiling x", "x.c:1: error: boom"]
    assert "sk_live_abcdefghijklmnop1234" not in " ".join(f.output)  # redacted as buildtel run's failures
    assert f.errors == ["x.c:1: error: boom"]

    # Paths a message names outside the output base are never opened: absolute, "..", a symlink out.
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret\n")
    (actions / "link").symlink_to(secret)
    for uri in (secret.as_uri(), f"file://{actions}/../../../../../../secret.txt", (actions / "link").as_uri()):
        [s] = parse_bep(_stream(exec_root, {"name": "stdout", "uri": uri}, {})).sessions
        f = s.failures[-1]
        assert f.output == [] and "outside the invocation's output base" in f.note, (uri, f)

    # A directory without Bazel's marker is no output base, whatever the message says.
    (base / "DO_NOT_BUILD_HERE").unlink()
    [s] = parse_bep(_stream(exec_root, {"name": "stderr", "uri": (actions / "stderr-1").as_uri()}, {})).sessions
    assert s.failures[-1].output == [] and "no Bazel output base" in s.failures[-1].note

    # Inline contents are kept as sent; a URI on another machine is named, not fetched.
    inline = {"name": "stderr", "contents": base64.b64encode(b"inline error: bad\n").decode()}
    [s] = parse_bep(_stream(exec_root, {"name": "stdout", "uri": "bytestream://cas/abc"}, inline)).sessions
    assert s.failures[-1].output == ["inline error: bad"] and "bytestream://" in s.failures[-1].note


def test_failed_action_output_keeps_its_last_kib(tmp_path: Path) -> None:
    base, actions = _output_base(tmp_path)
    (actions / "stderr-1").write_text("".join(f"line {i}\n" for i in range(10_000)))  # ~89 KB
    [s] = parse_bep(_stream(str(base / "execroot" / "_main"), {},
                            {"name": "stderr", "uri": (actions / "stderr-1").as_uri()})).sessions
    f = s.failures[-1]
    assert f.target == "//:x" and f.output[-1] == "line 9999" and f.output_cut_bytes > 70_000
    assert sum(len(x) + 1 for x in f.output) <= 16 * 1024


async def test_live_failed_action_output_shows_in_buildtel_show_and_log(stack: tuple[Settings, BesService], nc: Any,
                                                                         tmp_path: Path) -> None:
    settings, bes = stack
    base, actions = _output_base(tmp_path)
    (actions / "stderr-1").write_text("x.c:1: error: boom\n")
    recorded = tmp_path / "bep.json"
    recorded.write_bytes(_stream(str(base / "execroot" / "_main"), {},
                                 {"name": "stderr", "uri": (actions / "stderr-1").as_uri()}))
    events = read_bep_json(recorded)
    await replay(bes.url.removeprefix("grpc://"), events, events[0].started.uuid)
    client = StorageClient(nc, Subjects(settings.namespace))

    async def stored() -> Any:
        return await client.summaries(limit=10)

    [summary] = await eventually(stored)
    code, out, err = await cli(settings, "show", summary.id, "--failures", "--json")
    assert code == 0, err
    # The label keeps the output; the action (named by its output) points there.
    label, action = sorted(json.loads(out)["failures"], key=lambda f: f["target"] != "//:x")
    assert label["target"] == "//:x" and label["output"] == ["x.c:1: error: boom"]
    assert action["target"] == "bazel-out/bin/x.txt" and action["note"] == "its output is kept with //:x"
    assert action["kept_with"] == "//:x"
    code, out, err = await cli(settings, "log", summary.id, "//:x")
    assert code == 0 and "x.c:1: error: boom" in out, (out, err)
    # One failure, one group: the action's pointer is not counted as a second failure.
    code, out, err = await cli(settings, "failures", "--json")
    assert code == 0, err
    [group] = json.loads(out)["groups"]
    assert (group["count"], group["targets"]) == (1, ["//:x"]), group
    # What Bazel does not report is said so, not shown as zero.
    code, out, err = await cli(settings, "show", summary.id)
    assert code == 0, err
    assert "CPUs unknown" in out and "0 CPUs" not in out, out
    assert "no cache lookups recorded" in out and "(0.0%)" not in out, out
