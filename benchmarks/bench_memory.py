"""RSS growth of the storage service per 1000 retained reference sessions (goal: <= 10 MB).

A reference session has 200 targets and 40 environment variables (~45 KB of
msgpack).  Every measurement runs in a fresh subprocess so nothing the parent
allocated is counted:

* ``service``: a real StorageService (embedded nats-server + redis-server), the
  parent publishes N sessions to JetStream, the child reports its RSS once all
  are stored (after start-up vs. after ingest);
* ``store``: TelemetryStorage alone, sessions appended in batches of 32;
* ``reopen``: a fresh process opening a store of N sessions (the index rebuilt from disk).

Each is run with N = 1000 and N = 2000 (``max_sessions = N``): the first figure
includes one-off costs (thread pool, caches), the difference is the marginal
cost.  Usage::

    .venv/bin/python benchmarks/bench_memory.py [--sessions 1000]

The last line is JSON: ``{"mb_per_1000_sessions": <service, first 1000>, ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

MB = 1024 * 1024
GOAL_MB = 10.0


def reference_session(i: int):
    from buildtel.shared.protocol import (
        BuildEnvironment,
        BuildSession,
        Phase,
        SessionTotals,
        TargetMetrics,
        VcsInfo,
        new_session_id,
    )

    finish = time.time() - 3600 + i
    start = finish - 600
    targets = [
        TargetMetrics(name=f"//services/component{j // 10}:target_{j}", start=start + j, end=start + j + 2.5,
                      duration_s=2.5, status="success", cache="remote_hit" if j % 4 == 0 else "miss",
                      worker=f"worker-{j % 16}", agent_id="agent-1", exit_code=0, kind="cc_library",
                      mnemonic="CppCompile", cpu_s=2.1, peak_rss_bytes=180_000_000,
                      deps=[f"//services/component{j // 10}:target_{k}" for k in range(max(0, j - 3), j)],
                      phases=[Phase("compile", 2.0), Phase("link", 0.5)])
        for j in range(200)
    ]
    env = BuildEnvironment(os="linux", os_release="6.1.0", arch="x86_64", cpus=32, memory_bytes=128 << 30,
                           hostname=f"builder-{i % 20}", user="ci", cwd="/builds/repo", python="3.11.7",
                           tool_versions={"gcc": "13.2.0", "make": "4.3", "cmake": "3.28"},
                           vcs=VcsInfo(commit=f"{i:040x}", branch="main", remote="https://git.example/repo.git"),
                           env={f"ENV_VARIABLE_{k}": f"/opt/toolchain/{k}/bin:/usr/local/bin" for k in range(40)})
    return BuildSession(id=new_session_id(), name=f"ci build {i}", start=start, finish=finish, duration_s=600.0,
                        outcome="success", exit_code=0, command=["make", "-j32", "all"],
                        labels={"pipeline": "main", "job": str(i)}, agents=["agent-1", "agent-2"], environment=env,
                        targets=targets, cache_hits=50, cache_misses=150, cache_hit_rate=0.25,
                        totals=SessionTotals(targets=200, succeeded=200, target_time_s=500.0, cpu_s=420.0,
                                             events=402), cpu_s=420.0, peak_rss_bytes=180_000_000)


def rss() -> int:
    gc.collect()
    return psutil.Process().memory_info().rss


# -- children ---------------------------------------------------------------------------------

async def child_store(n: int, directory: str) -> dict:
    import msgspec

    from buildtel.services.storage.store import TelemetryStorage
    from buildtel.shared.protocol import new_session_id

    store = TelemetryStorage(directory, max_sessions=n)
    await store.open()
    # Sessions are copies of one template (own id, times): what is measured is the store, not
    # the garbage of building 200 fresh TargetMetrics objects per session in this process.
    template = reference_session(0)
    base = rss()
    for start in range(0, n, 32):
        await store.append_many([msgspec.structs.replace(template, id=new_session_id(), finish=template.finish + i,
                                                         labels={"job": str(i)})
                                 for i in range(start, min(n, start + 32))])
    await store.enforce_retention()
    assert await store.count() == n
    after = rss()
    await store.close()
    return {"base": base, "after": after}


async def child_reopen(n: int, directory: str) -> dict:
    from buildtel.services.storage.store import TelemetryStorage

    store = TelemetryStorage(directory, max_sessions=n)
    base = rss()
    await store.open()
    assert await store.count() == n, await store.count()
    after = rss()
    await store.close()
    return {"base": base, "after": after}


async def child_service(n: int, namespace: str, cache_dir: str) -> dict:
    from buildtel.services.storage.service import StorageService
    from buildtel.shared.settings import Settings

    nats_url, redis_url = os.environ["BENCH_NATS_URL"], os.environ["BENCH_REDIS_URL"]

    settings = Settings(cache_dir=Path(cache_dir), namespace=namespace, max_sessions=n, log_level="warning")
    svc = StorageService(settings, nats_url, redis_url)
    await svc.start()
    base = rss()
    print(json.dumps({"ready": True}), flush=True)
    deadline = time.monotonic() + 120
    while svc.stored < n and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert svc.store is not None and await svc.store.count() == n
    after = rss()
    await svc.stop()
    return {"base": base, "after": after}


def run_child(args: list[str], *, on_ready=None) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    result = None
    for line in proc.stdout:
        if not line.startswith("{"):
            continue
        msg = json.loads(line)
        if msg.get("ready") and on_ready is not None:
            on_ready()
        elif "after" in msg:
            result = msg
    if proc.wait() != 0 or result is None:
        raise SystemExit(f"child {args} failed with code {proc.returncode}")
    return result


# -- parent -----------------------------------------------------------------------------------

def publish(nats_url: str, namespace: str, n: int) -> None:
    async def go() -> None:
        import nats

        from buildtel.shared.codec import encode
        from buildtel.shared.subjects import Subjects

        nc = await nats.connect(nats_url)
        js = nc.jetstream()
        subject = Subjects(namespace).sessions_completed
        for i in range(n):
            s = reference_session(i)
            await js.publish(subject, encode(s), headers={"Nats-Msg-Id": s.id})
        await nc.close()

    asyncio.run(go())


def measure(n: int, work: Path, engines: tuple[str, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    d = work / f"store-{n}"
    r = run_child(["store", str(n), str(d)])
    out["store"] = (r["after"] - r["base"]) / MB
    r = run_child(["reopen", str(n), str(d)])
    out["reopen"] = (r["after"] - r["base"]) / MB
    nats_url, redis_url = engines
    ns = f"bench{os.getpid()}n{n}"
    # The URLs carry credentials: handed over in the environment, not on a command line.
    os.environ["BENCH_NATS_URL"], os.environ["BENCH_REDIS_URL"] = nats_url, redis_url
    r = run_child(["service", str(n), ns, str(work / f"svc-{n}")],
                  on_ready=lambda: publish(nats_url, ns, n))
    out["service"] = (r["after"] - r["base"]) / MB
    return out


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        from buildtel.shared.logs import configure

        configure("warning", "json")  # logs to stderr; stdout carries the results
        mode, n, *rest = sys.argv[2:]
        fn = {"store": child_store, "reopen": child_reopen, "service": child_service}[mode]
        print(json.dumps(asyncio.run(fn(int(n), *rest))), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1000, help="N (also measured at 2N for the slope)")
    args = parser.parse_args()
    from buildtel.shared.codec import encode
    from buildtel.shared.engines import NatsEngine, RedisEngine

    n = args.sessions
    print(f"reference session: 200 targets, 40 env vars, {len(encode(reference_session(0))) / 1024:.1f} KiB msgpack")
    with tempfile.TemporaryDirectory() as tmp, NatsEngine(Path(tmp) / "nats") as ne, \
            RedisEngine(Path(tmp) / "redis") as re_:
        first = measure(n, Path(tmp), (ne.url_for("operator"), re_.url))
        second = measure(2 * n, Path(tmp), (ne.url_for("operator"), re_.url))
    scale = 1000 / n
    rows = {}
    for mode in ("service", "store", "reopen"):
        per_first = first[mode] * scale
        marginal = (second[mode] - first[mode]) * scale
        rows[mode] = (per_first, marginal)
        print(f"{mode:8s} RSS growth: {first[mode]:7.2f} MB for {n} sessions, {second[mode]:7.2f} MB for {2 * n}"
              f"  -> {per_first:5.2f} MB/1000 incl. one-off costs, {marginal:5.2f} MB/1000 marginal")
    headline = rows["service"][0]
    print(f"goal <= {GOAL_MB:.0f} MB per 1000 sessions: {'met' if headline <= GOAL_MB else 'NOT met'}")
    print(json.dumps({"mb_per_1000_sessions": round(headline, 2),
                      "marginal_mb_per_1000_sessions": round(rows["service"][1], 2),
                      "store_mb_per_1000_sessions": round(rows["store"][0], 2),
                      "reopen_mb_per_1000_sessions": round(rows["reopen"][0], 2),
                      "goal_mb": GOAL_MB}))


if __name__ == "__main__":
    main()
