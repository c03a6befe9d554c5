"""Reference sessions for benchmarks: 200 targets and 40 environment variables each, realistic values."""

from __future__ import annotations

import random

from buildtel.shared.protocol import BuildEnvironment, BuildSession, Phase, SessionTotals, TargetMetrics, VcsInfo

CACHES = ["local_hit", "remote_hit", "miss", "miss", "uncacheable"]


def reference_session(i: int, targets: int = 200, env_vars: int = 40, seed: int = 0) -> BuildSession:
    rng = random.Random(seed * 1_000_003 + i)
    t0 = 1_760_000_000.0 + i * 600
    metrics = []
    for j in range(targets):
        start = t0 + rng.uniform(0, 200)
        dur = rng.lognormvariate(0.5, 0.9)
        metrics.append(TargetMetrics(
            name=f"//src/pkg{j % 17}/module{j % 5}:target_{j}", start=start, end=start + dur, duration_s=dur,
            status="failed" if rng.random() < 0.02 else "success", cache=rng.choice(CACHES),  # type: ignore[arg-type]
            worker=f"agent-{i % 8}/w{j % 16}", agent_id=f"agent-{i % 8}", exit_code=0,
            kind="lib", mnemonic="CppCompile", cpu_s=dur * 0.9, peak_rss_bytes=rng.randint(50, 900) << 20,
            deps=[f"//src/pkg{(j + 1) % 17}/module0:target_{max(0, j - 3)}"] if j else [],
            phases=[Phase("parse", dur * 0.3), Phase("codegen", dur * 0.7)],
        ))
    env = {f"VAR_{k}": f"value-{k}-{rng.randint(0, 10**9)}" for k in range(env_vars - 4)}
    env.update(PATH="/usr/local/bin:/usr/bin:/bin", HOME="/home/ci", CC="clang", CI="true")
    hits = sum(m.cache in ("local_hit", "remote_hit") for m in metrics)
    misses = sum(m.cache == "miss" for m in metrics)
    return BuildSession(
        id=f"{i:032x}", name=f"ci #{i}", start=t0, finish=t0 + 240, duration_s=240.0, outcome="success",
        exit_code=0, command=["ninja", "-j16", "all"], labels={"pipeline": "ci"},
        agents=[f"agent-{i % 8}"],
        environment=BuildEnvironment(os="Linux", os_release="6.8.0", arch="x86_64", cpus=16, memory_bytes=64 << 30,
                                     hostname=f"agent-{i % 8}", user="ci", cwd="/work/repo", python="3.11.7",
                                     tool_versions={"clang": "clang version 17.0.6", "ninja": "1.11.1"},
                                     vcs=VcsInfo(commit=f"{rng.getrandbits(160):040x}", branch="main"), env=env),
        targets=metrics, cache_hits=hits, cache_misses=misses, cache_hit_rate=hits / max(1, hits + misses),
        totals=SessionTotals(targets=targets, succeeded=targets, target_time_s=sum(m.duration_s for m in metrics),
                             events=2 * targets + 2),
    )
