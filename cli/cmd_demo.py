"""``buildtel demo``: the stack plus a realistic simulated farm, ending in a report of what was stored.

Uses the configured NATS/Redis, else a stack already running on this machine,
else starts the embedded stack in this process (announced in ``stack.json`` while
it runs, so other commands use it, and stopped at the end).  Each run publishes
on a branch of its own (``demo-<hex>``): its analyzer report and regression series
cover exactly its builds, however much history the data directory holds.  The
report is printed only once the analyzer has taken in every build (bounded wait).
Service log lines go to ``<data dir>/demo.log``, never into the demo's output.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

from buildtel.cli.cmd_sessions import session_line
from buildtel.cli.cmd_stack import LocalStack, stack_record, stack_running
from buildtel.cli.common import (
    data_dir,
    open_bus,
    process_record,
    read_stack,
    stack_file,
)
from buildtel.cli.errors import CLIError
from buildtel.services.analyzer.alerts import Alert
from buildtel.services.analyzer.api import AnalyzerClient, read_alerts
from buildtel.services.analyzer.export import summary
from buildtel.services.storage.api import StorageClient, StorageError
from buildtel.shared.demo.farm import FarmPlan, run_farm
from buildtel.shared.engines import public_url
from buildtel.shared.files import open_private, write_private
from buildtel.shared.protocol import BuildSession
from buildtel.shared.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run a simulated build farm against the stack and report what was stored")
    p.add_argument("--agents", type=int, default=4, help="build agents (default 4)")
    p.add_argument("--builds", type=int, default=24, help="builds to run (default 24)")
    p.add_argument("--targets", type=int, default=300, help="targets per build (default 300)")
    p.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    p.add_argument("--serve", action="store_true",
                   help="when the demo starts its own stack, keep it (and the dashboard) running after the report "
                        "until Ctrl-C")
    p.set_defaults(func=cmd_demo, quiet_logs=True)


def _progress(done: int, total: int) -> None:
    if sys.stderr.isatty():
        bar = "#" * (30 * done // total)
        print(f"\r  builds published {done:3d}/{total}  [{bar:<30}]", end="" if done < total else "\n",
              file=sys.stderr, flush=True)
    elif done == total or done % 10 == 0:
        print(f"  builds published {done}/{total}", file=sys.stderr, flush=True)


ANALYZER_WAIT_S = 60.0


def _logs_to_file(settings: Settings) -> Path:
    """Service and library log lines of this process go to ``<data dir>/demo.log`` (0600)."""
    import structlog

    from buildtel.shared import logs

    path = data_dir(settings) / "demo.log"
    out = open_private(path, "a")
    logs.configure(settings.log_level, "json", force=True)
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=out))
    handler = logging.StreamHandler(out)  # nats-py, asyncio: the stdlib loggers too
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return path


async def cmd_demo(args: argparse.Namespace, settings: Settings) -> int:
    if args.agents < 3 or args.builds < 3 or args.targets < 10:
        raise CLIError("the demo needs at least 3 agents, 3 builds and 10 targets")
    log_path = _logs_to_file(settings)
    stack: LocalStack | None = None
    announced: Path | None = None
    running = read_stack(settings)
    web_url = running.get("web_url") if running else None
    if not (settings.nats_url and settings.redis_url) and running is None:
        if stack_running(settings) is not None:
            raise CLIError(f"a stack for {settings.cache_dir} is still starting (see {stack_file(settings)}): "
                           "try again in a moment, or stop it with 'buildtel down'")
        print("buildtel demo: starting the embedded stack (NATS + Redis + services)…", file=sys.stderr, flush=True)
        stack = LocalStack(settings)
        await stack.__aenter__()
        settings = stack.service_settings
        web_url = next((svc.url for svc in stack.services if getattr(svc, "name", "") == "web"), None)
        announced = _announce(stack, web_url)
    try:
        async with open_bus(settings) as bus:
            print(f"buildtel demo: NATS {public_url(bus.nats_url)}, Redis {public_url(bus.redis_url)}",
                  file=sys.stderr)
            t0 = time.monotonic()
            branch = f"demo-{secrets.token_hex(4)}"
            plan = await run_farm(bus.settings, bus.nats_url, agents=args.agents, builds=args.builds,
                                  targets=args.targets, seed=args.seed, progress=_progress, branch=branch)
            sessions = await _wait_stored(StorageClient(bus.nc, bus.subjects), plan, timeout=60)
            alerts = await _wait_alert(bus, plan, timeout=30)
            print(report(plan, sessions, time.monotonic() - t0))
            text, complete = await _analytics(bus, plan, timeout=ANALYZER_WAIT_S)
            print(text)
            print(_alerts_text(plan, alerts))
            print(f"buildtel demo: service logs in {log_path}", file=sys.stderr)
            if web_url:
                print(f"Dashboard: {web_url}/?branch={branch}  (this demo's builds; all builds: {web_url}/)")
            missing = len(plan.session_ids) - len(sessions)
            if stack is not None and web_url:
                if args.serve:
                    print("buildtel demo: serving the dashboard; Ctrl-C stops the stack", file=sys.stderr, flush=True)
                    await _until_signal()
                else:
                    print("buildtel demo: the demo's own stack stops now; 'buildtel demo --serve' keeps it (and the "
                          "dashboard) running, or start one with 'buildtel up'", file=sys.stderr)
            return 0 if missing == 0 and complete else 1
    finally:
        if stack is not None:
            with contextlib.suppress(Exception):
                await stack.__aexit__(None, None, None)
        if announced is not None:
            with contextlib.suppress(OSError, ValueError):
                if json.loads(announced.read_text()).get("pid") == os.getpid():
                    announced.unlink()


async def _until_signal() -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _announce(stack: LocalStack, web_url: str | None) -> Path:
    """``stack.json`` for the demo's own stack while it runs: a ``buildtel run`` meanwhile joins it
    instead of starting a second stack on the same data, and ``down`` can stop it."""
    me = process_record(os.getpid())
    path = stack_file(stack.settings)
    info: dict[str, Any] = {"pid": me["pid"], "pid_created": me["created"], "state": "running",
                            "namespace": stack.settings.namespace, "services": stack.names, "started": time.time(),
                            "demo": True, **stack_record(stack)}
    if web_url:
        info["web_url"] = web_url
    write_private(path, json.dumps(info, indent=2))
    return path


async def _wait_stored(client: StorageClient, plan: FarmPlan, timeout: float) -> list[BuildSession]:
    wanted = set(plan.session_ids)
    found: dict[str, BuildSession] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(found) < len(wanted):
        with contextlib.suppress(StorageError):
            for s in await client.recent(len(wanted) + 50):
                if s.id in wanted:
                    found[s.id] = s
        if len(found) < len(wanted):
            await asyncio.sleep(0.2)
    return sorted(found.values(), key=lambda s: s.start)


async def _wait_alert(bus: object, plan: FarmPlan, timeout: float) -> list[Alert]:
    """Every alert the analyzer published for the demo's sessions, once the injected one is in."""
    ours = set(plan.session_ids)
    deadline = time.monotonic() + timeout
    alerts: list[Alert] = []
    while time.monotonic() < deadline:
        alerts = [a for a in await read_alerts(bus.js, bus.settings.namespace, idle=0.3)  # type: ignore[attr-defined]
                  if a.detected_session_id in ours]
        if any(a.target == plan.regression_target and a.direction == "regression" for a in alerts):
            break
        await asyncio.sleep(0.5)
    return alerts


async def _analytics(bus: Any, plan: FarmPlan, timeout: float) -> tuple[str, bool]:
    """The analyzer's report over this demo's builds (its branch), once it has taken in all of them;
    after ``timeout`` the report it has, saying how many builds it is missing.  (text, complete)"""
    client = AnalyzerClient(bus.nc, bus.settings.namespace, timeout=20)
    want = len(plan.session_ids)
    deadline = time.monotonic() + timeout
    rep = None
    while True:
        try:
            rep = await client.report(branch=plan.branch)
        except Exception as exc:  # noqa: BLE001 - the demo still reports what storage holds
            if time.monotonic() >= deadline:
                return f"(analyzer report unavailable: {exc})", False
        if (rep is not None and rep.sessions >= want) or time.monotonic() >= deadline:
            break
        await asyncio.sleep(0.5)
    if rep is None:
        return "(analyzer report unavailable)", False
    head = f"== Analyzer report (this demo's {want} builds, branch {plan.branch}) =="
    if rep.sessions < want:
        head += (f"\nINCOMPLETE: the analyzer had taken in {rep.sessions} of the {want} builds after "
                 f"{timeout:.0f} s; see the service log")
    return f"{head}\n\n{summary(rep, top=8)}", rep.sessions >= want


def _alerts_text(plan: FarmPlan, alerts: list[Alert]) -> str:
    lines = ["== Regression alerts (subject <ns>.alerts.>) =="]
    if not alerts:
        lines.append("none arrived")
    for a in alerts:
        what = a.target or "whole build"
        lines.append(f"  {a.direction:<11} {what}  {a.before_median_s:.2f} s -> {a.after_median_s:.2f} s "
                     f"({a.change_pct:+.0f}%, confidence {a.confidence:.2f}) from session {a.first_session_id[:12]}"
                     f"{'  commits ' + a.commit_range if a.commit_range else ''}")
    caught = any(a.target == plan.regression_target and a.direction == "regression" for a in alerts)
    lines.append(f"injected regression {'caught' if caught else 'NOT caught'}: {plan.regression_target} "
                 f"×{plan.regression_factor} from build {plan.regression_from_build + 1}")
    return "\n".join(lines)


def report(plan: FarmPlan, sessions: list[BuildSession], elapsed: float) -> str:
    lines = ["", "== Builder Telemetry demo: what was stored ==", ""]
    lines.append(f"builds published {len(plan.session_ids)}, sessions stored {len(sessions)} "
                 f"({elapsed:.1f} s); agents {', '.join(plan.agents)}")
    if not sessions:
        return "\n".join([*lines, "nothing was stored — see the stack's log"])
    events = sum(s.totals.events for s in sessions)
    ok = sum(s.outcome == "success" for s in sessions)
    durs = sorted(s.duration_s for s in sessions)
    hits = sum(s.cache_hits for s in sessions)
    misses = sum(s.cache_misses for s in sessions)
    lines.append(f"events folded {events}; outcomes: {ok} success, {len(sessions) - ok} failed")
    lines.append(f"build time: median {durs[len(durs) // 2]:.1f} s, min {durs[0]:.1f} s, max {durs[-1]:.1f} s; "
                 f"cache hit rate {hits / max(1, hits + misses):.1%}")
    multi = [s for s in sessions if len(s.agents) > 1]
    for s in multi:
        lines.append(f"distributed build {s.id[:12]}: {len(s.agents)} agents ({', '.join(s.agents)}), "
                     f"{len(s.targets)} targets, {s.totals.events} events")
    per_target: dict[str, list[float]] = {}
    for s in sessions:
        for t in s.targets:
            per_target.setdefault(t.name, []).append(t.duration_s)
    top = sorted(per_target.items(), key=lambda kv: -sum(kv[1]))[:5]
    lines.append("")
    lines.append("targets that cost the most (total over all builds):")
    for name, ds in top:
        lines.append(f"  {sum(ds):9.1f} s  {len(ds):3d} runs  {name}")
    lines.append("")
    lines.append("latest sessions:")
    for s in sessions[-5:]:
        lines.append("  " + session_line(s))
    return "\n".join(lines)
