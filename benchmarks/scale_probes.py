"""What ``bench_scale`` measures, one probe each: the store in its own process, the storage service's
start and requests, appends through the service, and the trivial NATS responder of the baseline.

    python -m benchmarks.scale_probes store DIR N TAIL SAMPLES   # prints one JSON line
    python -m benchmarks.scale_probes echo                       # BENCH_NATS_URL in the environment
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import nats

from benchmarks import scale_gen as gen
from benchmarks import scale_procs as procs
from buildtel.services.storage.api import StorageClient, StorageError
from buildtel.shared.subjects import Subjects

ROOT = Path(__file__).resolve().parent.parent
NS = "benchscale"
ECHO = f"{NS}.bench.echo"
FILTERS: dict[str, dict[str, str]] = {
    "branch_rare": {"branch": gen.RARE_BRANCH}, "agent": {"agent": "agent-042"},
    "target_rare": {"target": gen.RARE_TARGET}, "failed": {"outcome": "failed"},
    "branch_absent": {"branch": "no/such-branch"},
}


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else float("nan")


def dir_bytes(d: Path) -> tuple[int, int]:
    """(apparent, allocated) bytes of every file under ``d``."""
    apparent = allocated = 0
    for p in d.rglob("*"):
        if p.is_file():
            st = p.stat()
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


# -- children -----------------------------------------------------------------------------------------

async def child_store(root: str, n: int, tail: int, samples: int) -> dict[str, Any]:
    """Open the store, sample ids, append ``tail`` sessions as the service would; figures as JSON."""
    from buildtel.services.storage.store import TelemetryStorage

    meta = gen.read_meta(Path(root))
    assert meta is not None
    rss0 = procs.rss_mb(os.getpid())
    store = TelemetryStorage(Path(root) / "telemetry", max_sessions=n, retention_s=gen.RETENTION_S, fsync=True)
    t = time.perf_counter()
    await store.open()
    open_s = time.perf_counter() - t
    rss1, hwm1 = procs.rss_mb(os.getpid()), procs.hwm_mb(os.getpid())
    count, st = await store.count(), store.stats()
    rng = random.Random(7)
    assert st.oldest is not None and st.newest is not None
    # New sessions after everything stored, built before the clock starts.
    shape = gen.HistoryShape(sessions=tail, targets=meta.shape.targets, seed=0x7A000000 + rng.randrange(1 << 24),
                             t_end=max(time.time(), st.newest + tail * gen.SPACING_S) + 1)
    fac = gen.Factory(shape)
    payloads = [fac.encoded(k) for k in range(tail)]
    append_s = retention_s = 0.0
    for lo in range(0, tail, 32):
        t0 = time.perf_counter()
        await store.append_encoded(payloads[lo:lo + 32])
        t1 = time.perf_counter()
        await store.enforce_retention()
        append_s += t1 - t0
        retention_s += time.perf_counter() - t1
    after = await store.count()
    st2 = store.stats()  # ids to get: uniform over what is stored now (the tail dropped the oldest)
    assert st2.oldest is not None and st2.newest is not None
    ids = []
    for _ in range(samples):
        at = st2.oldest + rng.random() * (st2.newest - st2.oldest)
        ids += [s.id for s in await store.range(at, st2.newest + 1, limit=1)]
    await store.close()
    raw = Path(root) / "raw-write-baseline.tmp"
    fd = os.open(raw, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    t = time.perf_counter()
    for lo in range(0, tail, 32):
        for p in payloads[lo:lo + 32]:
            os.write(fd, p)
        os.fsync(fd)
    raw_s = time.perf_counter() - t
    os.close(fd)
    raw.unlink()
    return {"open_s": open_s, "rss_before_mb": rss0, "rss_open_mb": rss1, "hwm_open_mb": hwm1, "count": count,
            "count_after_tail": after, "segments": st.segments, "ids": ids, "tail": tail, "tail_append_s": append_s,
            "tail_retention_s": retention_s, "raw_write_s": raw_s}


async def child_echo(url: str) -> None:
    """The baseline's trivial responder: replies ``ok`` to every request."""
    nc = await nats.connect(url)

    async def cb(msg: Any) -> None:
        await msg.respond(b"ok")

    await nc.subscribe(ECHO, cb=cb)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()


def run_child(argv: list[str]) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "benchmarks.scale_probes", *argv], cwd=ROOT,
                          stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"child {argv[0]} failed ({done.returncode})")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


# -- the services -------------------------------------------------------------------------------------

def service_env(nats_url: str, redis_url: str, cache: Path, n: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUILDER_TELEMETRY_")}
    env.update(BUILDER_TELEMETRY_NATS_URL=nats_url, BUILDER_TELEMETRY_REDIS_URL=redis_url,
               BUILDER_TELEMETRY_NAMESPACE=NS, BUILDER_TELEMETRY_CACHE_DIR=str(cache),
               BUILDER_TELEMETRY_MAX_SESSIONS=str(n), BUILDER_TELEMETRY_RETENTION_DAYS=str(gen.RETENTION_S / 86400),
               BUILDER_TELEMETRY_LOG_LEVEL="info", BUILDER_TELEMETRY_LOG_FORMAT="json")
    return env


async def start_storage(nc: Any, env: dict[str, str], log: Path, limit_s: float) -> tuple[Any, float]:
    """(process, seconds from its start to its first ``stats`` reply)."""
    client = StorageClient(nc, Subjects(NS), timeout=2.0)
    t = time.perf_counter()
    proc = procs.spawn_service("buildtel.services.storage", env, log)
    while True:
        try:
            await client.stats()
            return proc, time.perf_counter() - t
        except Exception:  # noqa: BLE001 - not up yet (no responders): poll again, bounded below
            if proc.poll() is not None or time.perf_counter() - t > limit_s:
                raise SystemExit(f"storage service did not answer ({proc.poll()}): "
                                 f"{log.read_text(errors='replace')[-800:]}") from None
            await asyncio.sleep(0.02)


async def latencies(nc: Any, ids: list[str], rounds: int, budget_s: float) -> dict[str, list[float]]:
    """Round-robin over every kind of request (a busy neighbour slows them alike); ms each."""
    client = StorageClient(nc, Subjects(NS), timeout=120.0)
    summaries = getattr(client, "summaries", None)
    kinds: dict[str, Callable[[int], Awaitable[Any]]] = {
        "bare_nats": lambda i: nc.request(ECHO, b"x", timeout=10),
        "get": lambda i: client.get(ids[i % len(ids)]),
        "list_recent": lambda i: client.recent(50),
    }
    if summaries is not None:
        # What `buildtel sessions` asks (issue 14 point 3): the newest 50 summaries, and filtered.
        kinds["list_summaries"] = lambda i: summaries(limit=50)
    for name, f in FILTERS.items():
        if summaries is not None:
            kinds[f"filter_{name}"] = lambda i, f=f: summaries(limit=50, **f)
        else:  # the code before summaries: whole sessions
            kinds[f"filter_{name}"] = lambda i, f=f: client.query(limit=50, **f)  # type: ignore[arg-type]
    out: dict[str, list[float]] = {k: [] for k in kinds}
    t_end = time.perf_counter() + budget_s
    for i in range(rounds):
        for name, call in kinds.items():
            t = time.perf_counter()
            await call(i)
            out[name].append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() > t_end and i >= 19:
            break
    return out


def buildtel() -> list[str]:
    script = Path(sys.executable).parent / "buildtel"
    return [str(script)] if script.exists() else [sys.executable, "-m", "buildtel.cli.main"]


async def wait_analyzer(nc: Any, proc: Any, limit_s: float = 60) -> None:
    from buildtel.services.analyzer.api import AnalyzerClient

    client = AnalyzerClient(nc, NS, timeout=2.0, attempts=1)
    t = time.perf_counter()
    while True:
        try:
            await client.stats()
            return
        except Exception:  # noqa: BLE001 - not up yet: poll again, bounded
            if proc.poll() is not None or time.perf_counter() - t > limit_s:
                raise SystemExit("analyzer service did not start") from None
            await asyncio.sleep(0.05)


async def service_append(nc: Any, n: int, tail: int, targets: int, ids: list[str],
                         limit_s: float = 900) -> dict[str, Any]:
    """Publish ``tail`` new sessions on ``sessions.completed``, as the collector does, and time the
    running storage service until it has stored them all and its retention is back to ``n``.
    Meanwhile ``get`` requests of stored ids, one after another: what a reader sees during ingest."""
    client = StorageClient(nc, Subjects(NS), timeout=60.0)
    during: list[float] = []
    ingesting = True

    async def reader() -> None:
        i = 0
        while ingesting:
            t = time.perf_counter()
            try:
                await client.get(ids[i % len(ids)])
            except StorageError as exc:  # retention may drop the oldest sampled ids meanwhile: still a reply
                if not exc.not_found:
                    raise
            during.append((time.perf_counter() - t) * 1e3)
            i += 1

    st = await client.stats()
    newest = st.newest or time.time()
    shape = gen.HistoryShape(sessions=tail, targets=targets, seed=0x7B000000 + random.randrange(1 << 24),
                             t_end=max(time.time(), newest + tail * gen.SPACING_S) + 1)
    fac = gen.Factory(shape)
    payloads = [fac.encoded(k) for k in range(tail)]
    js = nc.jetstream()
    subject = Subjects(NS).sessions_completed
    t0 = time.perf_counter()
    task = asyncio.create_task(reader())
    window: list[Any] = []
    for k, p in enumerate(payloads):
        window.append(await js.publish_async(subject, p, headers={"Nats-Msg-Id": fac.session_id(k)}))
        if len(window) >= 256:
            await asyncio.gather(*window)
            window.clear()
    await asyncio.gather(*window)
    published = time.perf_counter() - t0
    stored_s = settled_s = 0.0
    while time.perf_counter() - t0 < limit_s:
        now = await client.stats()
        if not stored_s and now.stored - st.stored >= tail:
            stored_s = time.perf_counter() - t0
        if stored_s and now.sessions <= n:
            settled_s = time.perf_counter() - t0
            break
        await asyncio.sleep(0.05)
    ingesting = False
    await task
    return {"published_s": published, "stored_s": stored_s, "settled_s": settled_s, "tail": tail,
            "get_during_ms": during}


def main() -> None:
    from buildtel.shared.logs import configure

    configure("warning", "json")  # logs to stderr; stdout carries the result
    if sys.argv[1] == "echo":
        asyncio.run(child_echo(os.environ["BENCH_NATS_URL"]))
        return
    root, n, tail, samples = sys.argv[2:6]
    print(json.dumps(asyncio.run(child_store(root, int(n), int(tail), int(samples)))), flush=True)


if __name__ == "__main__":
    main()
