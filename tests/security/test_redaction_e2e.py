"""End to end: generated secrets in a build's environment, command line and make variables never
reach the bus (everything on ``>``) nor any file under the cache directory; and what an agent that
does not redact publishes is redacted by the collector and the recorder before it is stored."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from buildtel.shared.codec import encode
from buildtel.shared.protocol import (
    BuildEnvironment,
    BuildFinished,
    BuildStarted,
    EventBatch,
    TargetFinished,
    VcsInfo,
    new_session_id,
)
from buildtel.shared.redaction import REDACTED
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects
from tests.cli.test_run import bus_env  # noqa: F401 - fixture: the test stack's variables for `buildtel run`

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]
SECRET = st.from_regex(r"[A-Za-z0-9]{4}[A-Za-z0-9._~-]{8,24}", fullmatch=True)
SLOTS = 20
MAKEFILE = "all: a.out b.out\n%.out:\n\t@echo built > $@\n"
# Few examples, each with a secret in every position; no shrinking (each example runs a build).
HYPO = hsettings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck),
                 phases=[Phase.explicit, Phase.reuse, Phase.generate])


class _Bus:
    """Every message seen on ``>`` (subject, headers and payload as one byte string)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []

    async def cb(self, msg: Any) -> None:
        head = b"".join(f"{k}:{v}\n".encode() for k, v in (msg.headers or {}).items())
        self.seen.append((msg.subject, msg.subject.encode() + b"\n" + head + msg.data))

    def leaks(self, secret: str, *, skip_subject: str | None = None) -> list[str]:
        return [subj for subj, raw in self.seen if subj != skip_subject and secret.encode() in raw]


def _files_holding(root: Path, secrets: list[str]) -> list[str]:
    found = []
    for p in root.rglob("*"):
        if p.is_file() and not p.is_symlink():
            data = p.read_bytes()
            found += [f"{p.relative_to(root)}: {s}" for s in secrets if s.encode() in data or s in p.name]
    return found


def _placements(s: list[str]) -> tuple[list[str], dict[str, str]]:
    """make variables and environment variables carrying the secrets, one position each."""
    make_vars = [
        f"DB_PASSWORD={s[0]}",
        f"REPO=https://:{s[1]}@git.example.com/r.git",
        f"MIRROR=https://deploy:{s[2]}@git.example.com/m.git",
        f"ORIGIN=https://{s[3]}@github.com/o/r.git",
        f"SLACK=https://hooks.slack.com/services/T0A/B0B/{s[4]}",
        f"DISCORD=https://discord.com/api/webhooks/123/{s[5]}",
        f"TRIGGER=https://gitlab.example.com/api/v4/projects/7/trigger/pipeline?ref=main&token={s[6]}",
        f"JENKINS=https://ci.example.com/job/app/build?token={s[7]}",
        f"DEPLOY_ARGS=--token {s[8]} --password={s[9]}",
        f"CURL_HDR=Authorization: Bearer {s[10]}",
    ]
    env = {
        "MY_SERVICE_PASSWORD": s[11],
        "PIP_INDEX_URL": f"https://user:{s[12]}@pypi.example.com/simple",
        "TEAMS_HOOK": f"https://acme.webhook.office.com/webhookb2/{s[13]}@tenant/IncomingWebhook/a/b",
        "MATTERMOST_HOOK": f"https://mm.example.com/hooks/{s[14]}",
        "MAKEFLAGS": f"-k -- NPM_TOKEN={s[15]}",
        "BUILD_CMD": f"deploy --api-key {s[16]} https://x.example.com/?sig={s[17]}",
        "CALLBACK": f"https://app.example.com/cb#access_token={s[18]}",
        "HTTPS_PROXY": f"http://{s[19]}@proxy.example.com:3128",
    }
    return make_vars, env


async def _until(pred, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


@HYPO
@given(secrets=st.lists(SECRET, min_size=SLOTS, max_size=SLOTS, unique=True))
async def test_buildtel_run_of_make_publishes_and_stores_no_secret(bus_env, settings, nc, tmp_path, secrets) -> None:  # noqa: F811 - bus_env: the imported fixture, by name
    bus = _Bus()
    sub = await nc.subscribe(">", cb=bus.cb)
    proj = Path(tempfile.mkdtemp(dir=tmp_path, prefix="proj-"))
    (proj / "Makefile").write_text(MAKEFILE)
    cache = Path(tempfile.mkdtemp(dir=tmp_path, prefix="cache-"))
    make_vars, extra_env = _placements(secrets)
    env = dict(bus_env, **extra_env, BUILDER_TELEMETRY_CACHE_DIR=str(cache),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        res = await asyncio.to_thread(
            subprocess.run, [PY, "-m", "buildtel.cli.main", "run", "--record", "--", "make", "-s", *make_vars],
            env=env, cwd=proj, capture_output=True, text=True, timeout=90, check=False)
        assert res.returncode == 0, res.stderr
        assert (proj / "a.out").exists() and (proj / "b.out").exists()

        await _until(lambda: any(b"build_finished" in raw for _, raw in bus.seen))
    finally:
        await sub.unsubscribe()
    leaks = {s: bus.leaks(s) for s in secrets if bus.leaks(s)}
    assert not leaks, f"secrets reached the bus on {leaks}"
    assert not _files_holding(cache, secrets)
    # The build was reported, with the secret positions redacted rather than the data dropped.
    raw_started = next(raw for _, raw in bus.seen if b"build_started" in raw)
    assert raw_started.count(REDACTED.encode()) >= SLOTS
    assert b"hooks.slack.com/services/" in raw_started and b"git.example.com/r.git" in raw_started
    assert list(cache.rglob("manifest*")) or list(cache.rglob("*.json")), "the recording was written"


@pytest.fixture
async def services(settings: Settings, nc: object, redis_client: object) -> AsyncIterator[dict[str, Any]]:
    from buildtel.services.collector.service import CollectorService
    from buildtel.services.recorder.service import RecorderService
    from buildtel.services.storage.service import StorageService

    svcs = {"collector": CollectorService(settings, settings.nats_url or "", settings.redis_url or ""),
            "recorder": RecorderService(settings, settings.nats_url or "", settings.redis_url or "", hold_s=2.0),
            "storage": StorageService(settings, settings.nats_url or "", settings.redis_url or "")}
    for svc in svcs.values():
        await svc.start()
    yield svcs
    for svc in svcs.values():
        await svc.stop()


async def _redis_values(r: Any, namespace: str) -> bytes:
    out = bytearray()
    async for key in r.scan_iter(match=f"{namespace}:*", count=1000):
        kind = (await r.type(key)).decode()
        if kind == "string":
            out += await r.get(key) or b""
        elif kind == "hash":
            for k, v in (await r.hgetall(key)).items():
                out += k + b"=" + v + b"\n"
        elif kind == "list":
            out += b"\n".join(await r.lrange(key, 0, -1))
        elif kind == "set":
            out += b"\n".join(await r.smembers(key))
        elif kind == "zset":
            out += b"\n".join(await r.zrange(key, 0, -1))
        elif kind == "stream":
            for _, fields in await r.xrange(key):
                out += b"\n".join(k + b"=" + v for k, v in fields.items())
    return bytes(out)


@HYPO
@given(secrets=st.lists(SECRET, min_size=8, max_size=8, unique=True))
async def test_a_foreign_agents_unredacted_build_is_redacted_before_it_is_stored(
        settings, nc, redis_client, services, secrets) -> None:
    """An agent in another language publishes secrets as they are: nothing stored, and nothing the
    services publish, carries them."""
    s = secrets
    sid, agent, t0 = new_session_id(), "foreign-agent", time.time() - 5
    events = [
        BuildStarted(session_id=sid, agent_id=agent, seq=0, ts=t0, name="deploy", record=True,
                     command=["deploy", "--token", s[0], f"--password={s[1]}", f"DB_PASSWORD={s[2]}",
                              f"https://:{s[3]}@git.example.com/r.git"],
                     environment=BuildEnvironment(
                         os="Linux", env={"API_TOKEN": s[4], "PATH": "/usr/bin",
                                          "SLACK": f"https://hooks.slack.com/services/T0/B0/{s[5]}",
                                          "MAKEFLAGS": f"-j4 -- NPM_TOKEN={s[6]}"},
                         vcs=VcsInfo(commit="a" * 40, remote=f"https://ci:{s[7]}@git.example.com/r.git"))),
        TargetFinished(session_id=sid, agent_id=agent, seq=1, ts=t0 + 1, target="app", start=t0, duration_s=1.0),
        BuildFinished(session_id=sid, agent_id=agent, seq=2, ts=t0 + 2, exit_code=0),
    ]
    subjects = Subjects(settings.namespace)
    bus = _Bus()
    sub = await nc.subscribe(">", cb=bus.cb)
    js = nc.jetstream()
    try:
        await js.publish(subjects.events(sid), encode(EventBatch(session_id=sid, agent_id=agent, events=events)),
                         headers={"Nats-Msg-Id": f"{sid}:{agent}:0"})
        storage, recorder = services["storage"], services["recorder"]
        stored_before = storage.stored
        await _until(lambda: storage.stored > stored_before and recorder.events_persisted >= 3)
    finally:
        await sub.unsubscribe()
    # The foreign agent's own message carries its secrets; nothing after it may.
    events = subjects.events(sid)
    leaks = {x: bus.leaks(x, skip_subject=events) for x in s if bus.leaks(x, skip_subject=events)}
    assert not leaks, f"secrets republished on {leaks}"
    assert not _files_holding(settings.cache_dir, s)
    stored = await _redis_values(redis_client, settings.namespace)
    assert not [x for x in s if x.encode() in stored]
    # Redacted, not dropped: the completed session still says what ran, where.
    completed = [raw for subj, raw in bus.seen if subj == subjects.sessions_completed]
    assert completed and b"deploy" in completed[0] and REDACTED.encode() in completed[0]
    assert b"git.example.com/r.git" in completed[0] and b"hooks.slack.com/services/" in completed[0]
