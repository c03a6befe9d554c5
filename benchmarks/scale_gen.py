"""Farm-shaped session history for ``bench_scale``: deterministic, varied, written through the store API.

Session ``k`` of a history is always the same bytes (id ``<seed:08x><k:024x>``, finish time
``t_end - (n - k) * spacing``), so an interrupted generation resumes where it stopped (the store
is idempotent by id) and a cached store can be rebuilt exactly.  Variety, so filters have
something to select and reports something to compute:

* 100 agents (``agent-000``..), one in ten builds spread over two;
* branches: ``main`` 60 %, four ``release/2026.N`` 15 %, 500 ``feat/...`` 24.9 %, and
  ``hotfix/rare`` 0.1 % (every 1000th build), the selective branch filter;
* outcomes: ~3 % failed (one failing target), ~0.3 % abandoned;
* labels ``pipeline`` (ci / nightly / pr) and ``team``; 24 CI environment variables;
* targets: each pipeline builds the same ``T`` targets (deps, phases, CPU, RSS, worker lanes),
  ~60 % cache hits; every 1000th build (offset 500) also runs ``//tools/rare:codegen``, the
  selective target filter.

The spacing defaults to 8.64 s: 10,000 builds a day, the farm of issue 14.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from pathlib import Path

import msgspec

from buildtel.shared.protocol import (
    BuildEnvironment,
    BuildSession,
    Phase,
    SessionTotals,
    TargetMetrics,
    VcsInfo,
)

SPACING_S = 86400 / 10_000
RARE_BRANCH = "hotfix/rare"
RARE_TARGET = "//tools/rare:codegen"
AGENTS = [f"agent-{a:03d}" for a in range(100)]
PIPELINES = ("ci", "nightly", "pr")
CACHES = ("remote_hit", "local_hit", "remote_hit", "miss", "miss")  # ~60 % hits
_encoder = msgspec.msgpack.Encoder()


class HistoryShape(msgspec.Struct, kw_only=True):
    """What identifies a generated history (kept next to the store as ``scale-meta.json``)."""

    sessions: int
    targets: int
    seed: int
    t_end: float
    spacing_s: float = SPACING_S


class Factory:
    """``encoded(k)``: the msgpack bytes of session ``k`` of the history ``shape``."""

    def __init__(self, shape: HistoryShape) -> None:
        self.shape = shape
        rng = random.Random(shape.seed)
        t = shape.targets
        self.names = [f"//src/pkg{j % 23}/mod{j % 7}:target_{j}" for j in range(t)]
        self.deps = [[self.names[rng.randrange(j)] for _ in range(min(j, rng.randint(0, 3)))] for j in range(t)]
        self.base = [rng.lognormvariate(2.0, 1.0) for _ in range(t)]  # median 7 s
        self.kinds = [rng.choice(("cc_library", "cc_binary", "cc_test", "genrule")) for _ in range(t)]
        self.env = {f"CI_VAR_{i}": f"/opt/ci/tool{i}/bin:{rng.getrandbits(64):016x}" for i in range(20)}
        self.env.update(PATH="/usr/local/bin:/usr/bin:/bin", HOME="/home/ci", CC="clang", CI="true")

    def session_id(self, k: int) -> str:
        return f"{self.shape.seed:08x}{k:024x}"

    def session(self, k: int) -> BuildSession:
        sh = self.shape
        rng = random.Random(sh.seed * 1_000_003 + k)
        finish = sh.t_end - (sh.sessions - k) * sh.spacing_s
        r = rng.random()
        if k % 1000 == 7:
            branch = RARE_BRANCH
        elif r < 0.60:
            branch = "main"
        elif r < 0.75:
            branch = f"release/2026.{k % 4}"
        else:
            branch = f"feat/topic-{(k // 50) % 500}"
        agent = AGENTS[rng.randrange(len(AGENTS))]
        agents = [agent] if rng.random() >= 0.1 else sorted({agent, AGENTS[rng.randrange(len(AGENTS))]})
        abandoned = rng.random() < 0.003
        failing = -1 if abandoned or rng.random() >= 0.03 else rng.randrange(sh.targets)
        speed = rng.uniform(0.8, 1.25)  # a faster or slower machine
        names = self.names if k % 1000 != 500 else [*self.names, RARE_TARGET]
        caches = [CACHES[rng.randrange(5)] for _ in names]
        durs = [self.base[min(j, sh.targets - 1)] * speed * (0.04 if c != "miss" else rng.uniform(0.9, 1.1))
                for j, c in enumerate(caches)]
        # Each target starts 1/8 of its predecessor's time after it (8-way parallel, roughly); the
        # build ends half a second after the target that ends last.
        offset = span = 0.0
        for d in durs:
            span = max(span, offset + d)
            offset += d / 8
        start = finish - span - 0.5
        t = start
        metrics: list[TargetMetrics] = []
        hits = misses = 0
        for j, name in enumerate(names):
            jj = min(j, sh.targets - 1)
            cache, dur = caches[j], durs[j]
            hits += cache != "miss"
            misses += cache == "miss"
            metrics.append(TargetMetrics(
                name=name, start=t, end=t + dur, duration_s=dur, status="failed" if j == failing else "success",
                cache=cache, worker=f"{agents[j % len(agents)]}/w{j % 16}",  # type: ignore[arg-type]
                agent_id=agents[j % len(agents)], exit_code=1 if j == failing else 0, kind=self.kinds[jj],
                mnemonic="CppCompile", cpu_s=dur * 0.9, peak_rss_bytes=(60 + (j * 37) % 800) << 20,
                deps=self.deps[jj], phases=[Phase("parse", dur * 0.3), Phase("codegen", dur * 0.7)]))
            t += dur / 8
        failed = int(failing >= 0)
        outcome = "abandoned" if abandoned else ("failed" if failed else "success")
        return BuildSession(
            id=self.session_id(k), name=f"{PIPELINES[k % 3]} #{k}", start=start, finish=finish,
            duration_s=finish - start, outcome=outcome, exit_code=None if abandoned else failed,  # type: ignore[arg-type]
            command=["ninja", "-j16", "all"], labels={"pipeline": PIPELINES[k % 3], "team": f"team-{k % 12}"},
            agents=agents,
            environment=BuildEnvironment(os="Linux", os_release="6.8.0", arch="x86_64", cpus=16,
                                         memory_bytes=64 << 30, hostname=agent, user="ci", cwd="/work/repo",
                                         python="3.11.9", tool_versions={"clang": "17.0.6", "ninja": "1.11.1"},
                                         vcs=VcsInfo(commit=f"{rng.getrandbits(160):040x}", branch=branch),
                                         env=self.env),
            targets=metrics, cache_hits=hits, cache_misses=misses, cache_hit_rate=hits / max(1, hits + misses),
            totals=SessionTotals(targets=len(metrics), succeeded=len(metrics) - failed, failed=failed,
                                 target_time_s=sum(m.duration_s for m in metrics), events=2 * len(metrics) + 2))

    def encoded(self, k: int) -> bytes:
        return _encoder.encode(self.session(k))


# -- building (or resuming) the cached store ----------------------------------------------------------

RETENTION_S = 3650 * 86400.0  # age retention out of the way: a cached store must stay whole for later runs
META = "scale-meta.json"


class BuildFigures(msgspec.Struct, kw_only=True):
    """How the cached store was built (kept in ``scale-meta.json``; reprinted on ``--reuse``)."""

    shape: HistoryShape
    complete: bool = False
    built_at: float = 0.0
    batch: int = 0
    generate_s: float = 0.0  # building and encoding sessions (this benchmark's cost, not the store's)
    append_s: float = 0.0  # inside append_encoded
    appended: int = 0
    append_per_s_first: float = 0.0  # bulk rate over the first tenth of the history
    append_per_s_last: float = 0.0  # ... and over the last tenth (the index is then ~full size)
    mean_payload_bytes: float = 0.0


def read_meta(root: Path) -> BuildFigures | None:
    path = root / META
    return msgspec.json.decode(path.read_bytes(), type=BuildFigures) if path.exists() else None


def write_meta(root: Path, fig: BuildFigures) -> None:
    tmp = root / (META + ".tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(fig)))
    tmp.replace(root / META)


async def build(root: Path, fig: BuildFigures, *, batch: int, progress: Callable[[str], None]) -> BuildFigures:
    """Append sessions ``count()..n-1`` of ``fig.shape`` to the store under ``root/telemetry`` in
    batches of ``batch`` (fsync off: the OS flushes; resumable: the store is idempotent by id)."""
    from buildtel.services.storage.store import TelemetryStorage

    n = fig.shape.sessions
    store = TelemetryStorage(root / "telemetry", max_sessions=n, retention_s=RETENTION_S, fsync=False)
    await store.open()
    have = await store.count()
    if have:
        progress(f"resuming a partial store: {have:,} of {n:,} sessions there")
    factory = Factory(fig.shape)
    fig.batch = batch
    tenth = max(1, n // 10)
    first = [0, 0.0]
    last = [0, 0.0]
    payload_bytes = 0
    shown = time.monotonic()
    try:
        for lo in range(have, n, batch):
            hi = min(n, lo + batch)
            t0 = time.perf_counter()
            payloads = [factory.encoded(k) for k in range(lo, hi)]
            t1 = time.perf_counter()
            await store.append_encoded(payloads)
            t2 = time.perf_counter()
            fig.generate_s += t1 - t0
            fig.append_s += t2 - t1
            fig.appended += hi - lo
            payload_bytes += sum(map(len, payloads))
            for acc, inside in ((first, lo < tenth), (last, hi > n - tenth)):  # batches touching each end
                if inside:
                    acc[0] += hi - lo
                    acc[1] += t2 - t1
            if time.monotonic() - shown > 15 or hi == n:
                shown = time.monotonic()
                done = hi - have
                eta = (fig.generate_s + fig.append_s) / done * (n - hi)
                progress(f"  {hi:>10,} / {n:,} sessions: generating {done / fig.generate_s:,.0f}/s, "
                         f"appending {done / fig.append_s:,.0f}/s, ETA {eta / 60:.1f} min")
    finally:
        await store.close()
    fig.append_per_s_first = first[0] / first[1] if first[1] else 0.0
    fig.append_per_s_last = last[0] / last[1] if last[1] else 0.0
    if fig.appended:
        fig.mean_payload_bytes = payload_bytes / (n - have) if n > have else 0.0
    fig.complete = True
    fig.built_at = time.time()
    return fig
