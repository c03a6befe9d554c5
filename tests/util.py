"""Test helpers: synthetic builds as event lists, raw publishing, reading completed sessions."""

from __future__ import annotations

import random
import time
from typing import Any

from buildtel.shared import bigmsg
from buildtel.shared.codec import decode_session, encode
from buildtel.shared.protocol import (
    BuildFinished,
    BuildSession,
    BuildStarted,
    Event,
    EventBatch,
    TargetFinished,
    TargetStarted,
    new_session_id,
)
from buildtel.shared.subjects import Subjects

CACHES = ["local_hit", "remote_hit", "miss", "uncacheable"]


def synthetic_build(
    sid: str | None = None,
    agents: tuple[str, ...] = ("agent-a",),
    targets: int = 50,
    seed: int = 1,
    finish: bool = True,
    exit_code: int = 0,
) -> tuple[str, dict[str, list[Event]], dict[str, Any]]:
    """A build spread over ``agents``; returns (session id, events per agent, expected figures)."""
    rng = random.Random(seed)
    sid = sid or new_session_id()
    t0 = time.time() - 100
    seqs = dict.fromkeys(agents, 0)
    per_agent: dict[str, list[Event]] = {a: [] for a in agents}

    def nxt(agent: str) -> int:
        seqs[agent] += 1
        return seqs[agent] - 1

    owner = agents[0]
    per_agent[owner].append(BuildStarted(session_id=sid, agent_id=owner, seq=nxt(owner), ts=t0, name="synthetic",
                                         command=["make", "-j8"]))
    hits = misses = failed = 0
    total_time = 0.0
    for i in range(targets):
        agent = agents[i % len(agents)]
        start = t0 + rng.uniform(0, 50)
        dur = round(rng.uniform(0.01, 5.0), 6)
        cache = rng.choice(CACHES)
        status = "failed" if rng.random() < 0.05 else "success"
        hits += cache in ("local_hit", "remote_hit")
        misses += cache == "miss"
        failed += status == "failed"
        total_time += dur
        name = f"//pkg{i % 7}/sub:t{i}"
        per_agent[agent].append(TargetStarted(session_id=sid, agent_id=agent, seq=nxt(agent), ts=start,
                                              target=name, worker=f"{agent}/w{i % 4}"))
        per_agent[agent].append(TargetFinished(session_id=sid, agent_id=agent, seq=nxt(agent), ts=start + dur,
                                               target=name, start=start, duration_s=dur, status=status,
                                               cache=cache, worker=f"{agent}/w{i % 4}"))
    if finish:
        expected_events = {a: seqs[a] for a in agents}
        expected_events[owner] += 1
        per_agent[owner].append(BuildFinished(session_id=sid, agent_id=owner, seq=nxt(owner), ts=t0 + 60,
                                              exit_code=exit_code,
                                              expected_events=expected_events if len(agents) > 1 else None))
    expected = {
        "targets": targets, "hits": hits, "misses": misses, "failed": failed,
        "target_time_s": total_time, "events": sum(seqs.values()),
    }
    return sid, per_agent, expected


def batches(sid: str, agent: str, events: list[Event], size: int = 20) -> list[tuple[int, bytes]]:
    return [(events[i].seq, encode(EventBatch(session_id=sid, agent_id=agent, events=events[i:i + size])))
            for i in range(0, len(events), size)]


async def publish_events(js: Any, subjects: Subjects, sid: str, agent: str, events: list[Event],
                         size: int = 20) -> None:
    for first, data in batches(sid, agent, events, size):
        await js.publish(subjects.events(sid), data, headers={"Nats-Msg-Id": f"{sid}:{agent}:{first}"})


async def completed_sessions(js: Any, subjects: Subjects, count: int, timeout: float = 15.0) -> list[BuildSession]:
    """Read ``count`` sessions from the sessions stream (ephemeral consumer, from the start)."""
    import asyncio

    sub = await js.subscribe(subjects.sessions_completed, ordered_consumer=True)
    out: list[BuildSession] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        while len(out) < count:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            try:
                msg = await sub.next_msg(timeout=left)
            except Exception:  # noqa: BLE001 - timeout: return what arrived
                break
            ref = bigmsg.reference(msg.headers)  # a session over one message: read its object
            data = msg.data if ref is None else await bigmsg.resolve(js, ref, expected_bucket=subjects.sessions_bucket)
            out.append(decode_session(data))
    finally:
        await sub.unsubscribe()
    return out


def stack_env(settings: Any, **extra: str) -> dict[str, str]:
    """``BUILDER_TELEMETRY_*`` variables for a child process (a service, ``buildtel``) joining the
    test stack: its URLs and namespace and, for the embedded engines, a 0600 credentials file with
    every role's password (each process then connects as its own role)."""
    import json

    from buildtel.shared.files import write_private

    env = {"BUILDER_TELEMETRY_NATS_URL": settings.nats_url or "",
           "BUILDER_TELEMETRY_REDIS_URL": settings.redis_url or "",
           "BUILDER_TELEMETRY_NAMESPACE": settings.namespace}
    if settings.stack_auth is not None:
        path = settings.cache_dir.parent / "stack-test.creds"
        if not path.exists():
            write_private(path, json.dumps(settings.stack_auth.to_json()))
        env["BUILDER_TELEMETRY_STACK_CREDENTIALS"] = str(path)
    env.update(extra)
    return env


async def run_cli(settings: Any, *args: str, env_extra: dict[str, str] | None = None, cwd: Any = None,
                  timeout: float = 120.0) -> tuple[int, str, str]:
    """Run ``buildtel ARGS`` as its own process against the test's stack (its URLs, namespace,
    credentials and data directory; none of this shell's ``BUILDER_TELEMETRY_*``):
    (exit code, stdout, stderr).  ``timeout`` bounds a hang, it is not a speed check."""
    import asyncio
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_TELEMETRY_") and k != "BUILDTEL_DEBUG"}
    env.update(stack_env(settings))
    env.update(env_extra or {})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "buildtel.cli.main", "--namespace", settings.namespace, "--cache-dir",
        str(settings.cache_dir), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        cwd=cwd)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


def running(*services: Any) -> Any:
    """``async with running(a, b, c) as (a, b, c)``: each service started in order (services are
    async context managers), all stopped in reverse however the block ends."""
    import contextlib

    @contextlib.asynccontextmanager
    async def _run() -> Any:
        async with contextlib.AsyncExitStack() as stack:
            for svc in services:
                await stack.enter_async_context(svc)
            yield services

    return _run()
