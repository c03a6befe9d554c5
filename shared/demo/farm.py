"""A simulated build farm for ``buildtel demo``: realistic builds published through the real SDK.

The repository is a fixed DAG of a few hundred targets in a package hierarchy
(``//src/net/http:client``), each with a typical duration (log-normal: many
small compiles, a few long links and tests).  Agents build it on a list
scheduler over their workers, honouring dependencies; a remote cache serves most
unchanged targets; a few builds fail; commits advance along ``main``.  From a
chosen build on, one target becomes slower (an injected regression the analyzer
should catch).  One build is distributed over three agents at once.  Time is
simulated (builds spread over the past days), so the demo takes seconds.
"""

from __future__ import annotations

import hashlib
import heapq
import random
import time
from dataclasses import dataclass, field
from typing import Any

from buildtel.shared.client import TelemetryClient
from buildtel.shared.protocol import BuildEnvironment, Phase, VcsInfo, new_session_id
from buildtel.shared.settings import Settings

PACKAGES = ["base", "base/strings", "net", "net/http", "net/dns", "storage", "storage/index", "ui",
            "ui/widgets", "compiler/parse", "compiler/codegen", "tools"]
KINDS = [("lib", 0.55), ("test", 0.25), ("bin", 0.1), ("proto", 0.1)]


@dataclass(frozen=True)
class Target:
    name: str
    kind: str
    base_s: float
    deps: tuple[str, ...]


@dataclass
class FarmPlan:
    """What the demo will do, so its report can say what to expect."""

    agents: list[str]
    builds: int
    targets: int
    regression_target: str
    regression_from_build: int
    regression_factor: float
    distributed_build: int
    branch: str = "main"  # the demo gives each run its own branch: a report and detector of its own
    session_ids: list[str] = field(default_factory=list)
    expected_failures: int = 0


def make_repo(n_targets: int, rng: random.Random) -> list[Target]:
    targets: list[Target] = []
    for i in range(n_targets):
        pkg = PACKAGES[i % len(PACKAGES)]
        kind = rng.choices([k for k, _ in KINDS], [w for _, w in KINDS])[0]
        base = {"lib": 2.0, "test": 4.0, "bin": 9.0, "proto": 0.8}[kind] * rng.lognormvariate(0, 0.6)
        # Dependencies only on earlier targets: a DAG by construction.
        deps = tuple(sorted({targets[j].name for j in rng.sample(range(i), min(i, rng.randint(0, 3)))})) if i else ()
        targets.append(Target(f"//src/{pkg}:{kind}{i}", kind, round(base, 3), deps))
    return targets


def _env(agent: str, commit: str, cpus: int, branch: str = "main") -> BuildEnvironment:
    return BuildEnvironment(os="Linux", arch="x86_64", cpus=cpus, memory_bytes=64 << 30, hostname=agent,
                            user="ci", cwd="/work/repo", tool_versions={"clang": "clang version 17.0.6",
                                                                        "ninja": "1.11.1"},
                            vcs=VcsInfo(commit=commit, branch=branch, dirty=False),
                            env={"CI": "true", "CC": "clang", "BUILD_TOKEN": "[REDACTED]"})


def schedule(targets: list[Target], durations: dict[str, float], workers: int, t0: float
             ) -> list[tuple[Target, float, float, int]]:
    """List scheduling of the DAG over ``workers`` lanes: (target, start, end, lane)."""
    done_at: dict[str, float] = {}
    lanes = [(t0, w) for w in range(workers)]
    heapq.heapify(lanes)
    out = []
    for t in targets:  # already topologically ordered
        free_at, lane = heapq.heappop(lanes)
        start = max([free_at] + [done_at[d] for d in t.deps])
        end = start + durations[t.name]
        done_at[t.name] = end
        heapq.heappush(lanes, (end, lane))
        out.append((t, start, end, lane))
    return out


async def run_farm(settings: Settings, nats_url: str, *, agents: int = 4, builds: int = 24, targets: int = 300,
                   seed: int = 7, progress: Any = None, branch: str = "main") -> FarmPlan:
    rng = random.Random(seed)
    repo = make_repo(targets, rng)
    names = [f"agent-{i + 1:02d}" for i in range(agents)]
    victim = max((t for t in repo if t.kind == "lib"), key=lambda t: t.base_s).name
    plan = FarmPlan(agents=names, builds=builds, targets=targets, regression_target=victim,
                    regression_from_build=builds * 2 // 3, regression_factor=1.6, distributed_build=builds // 2,
                    branch=branch)
    t_base = time.time() - builds * 3600.0
    for b in range(builds):
        commit = hashlib.sha1(f"commit-{b}".encode()).hexdigest()
        t0 = t_base + b * 3600.0
        slow = plan.regression_factor if b >= plan.regression_from_build else 1.0
        fail = rng.random() < 0.08
        plan.expected_failures += fail
        durations = {t.name: round(t.base_s * rng.lognormvariate(0, 0.08) * (slow if t.name == victim else 1.0), 4)
                     for t in repo}
        # The victim always misses the cache: a changed target must be rebuilt (that is what slows it).
        cached = {t.name: (t.name != victim and rng.random() < 0.7) for t in repo}
        for name in durations:
            if cached[name]:
                durations[name] = round(0.02 + rng.random() * 0.05, 4)
        sid = new_session_id()
        plan.session_ids.append(sid)
        build_agents = names[:3] if b == plan.distributed_build else [names[b % len(names)]]
        await _publish_build(settings, nats_url, sid, b, build_agents, repo, durations, cached, t0, commit, fail, rng,
                             branch)
        if progress:
            progress(b + 1, builds)
    return plan


async def _publish_build(settings: Settings, nats_url: str, sid: str, b: int, agents: list[str],
                         repo: list[Target], durations: dict[str, float], cached: dict[str, bool], t0: float,
                         commit: str, fail: bool, rng: random.Random, branch: str = "main") -> None:
    clients = [TelemetryClient(settings, nats_url=nats_url, session_id=sid, agent_id=a) for a in agents]
    for c in clients:
        await c.start()
    owner = clients[0]
    workers_per_agent = 8
    owner.build_started(name=f"ci-main #{b + 1}", command=["ninja", "-j", str(8 * len(agents)), "all"],
                        environment=_env(agents[0], commit, 16, branch),
                        labels={"pipeline": "ci-main", "build": str(b + 1)}, ts=t0)
    plan = schedule(repo, durations, workers_per_agent * len(agents), t0)
    failing = rng.choice([t.name for t in repo if t.kind == "test"]) if fail else None
    for t, start, end, lane in plan:
        client = clients[lane // workers_per_agent]
        worker = f"{agents[lane // workers_per_agent]}/w{lane % workers_per_agent}"
        hit = cached[t.name]
        phases = [] if hit else [Phase("parse", round((end - start) * 0.3, 4)),
                                 Phase("codegen", round((end - start) * 0.7, 4))]
        client.target_finished(t.name, start=start, duration_s=round(end - start, 4),
                               status="failed" if t.name == failing else "success",
                               cache=("remote_hit" if hit else "miss") if t.kind != "test" or hit else "miss",
                               worker=worker, exit_code=1 if t.name == failing else 0, kind=t.kind,
                               mnemonic={"lib": "CppCompile", "test": "TestRunner", "bin": "CppLink",
                                         "proto": "GenProto"}[t.kind],
                               cpu_s=round((end - start) * 0.92, 4), deps=list(t.deps), phases=phases, ts=end)
    finish = max(end for _, _, end, _ in plan)
    owner.health(completed_tasks=len(plan), failed_tasks=int(fail), worker_count=8 * len(agents), ts=finish)
    # Other agents flush first so the owner can tell the collector exactly how many events to expect.
    for c in clients[1:]:
        await c.close()
    expected = {c.agent_id: c.events_emitted for c in clients[1:]}
    expected[owner.agent_id] = owner.events_emitted + 1
    owner.build_finished(exit_code=1 if fail else 0, expected_events=expected if len(clients) > 1 else None,
                         ts=finish)
    await owner.close()
