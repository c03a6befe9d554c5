"""``buildtel up | down | serve``: run the stack on this machine, or one service of a farm.

``up`` with no ``BUILDER_TELEMETRY_NATS_URL``/``_REDIS_URL`` starts the embedded
nats-server and redis-server (data under ``<cache_dir>/engines``) on free
loopback ports, then every service in this one process, and writes
``<cache_dir>/stack.json`` so other commands on this machine find it: first in
state ``starting`` with its own and the engines' pids (so ``down`` can stop a
stack that never got ready), then ``running``.  SIGTERM stops it at any point,
engines included; ``down`` also stops engines a SIGKILLed stack left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from buildtel.cli.common import (
    _same_process,
    data_dir,
    process_record,
    read_stack,
    read_stack_file,
    resolve,
    stack_file,
    stop_stack,
)
from buildtel.cli.errors import CLIError
from buildtel.services import registry
from buildtel.shared.auth import ROLES, StackAuth
from buildtel.shared.engines import NatsEngine, RedisEngine, public_url
from buildtel.shared.files import private_dir, tighten_tree, write_private
from buildtel.shared.natscluster import NatsCluster
from buildtel.shared.rediscluster import cluster_record, start_cluster
from buildtel.shared.runner import run_until_signal
from buildtel.shared.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    up = sub.add_parser("up", help="run all services in one process (embedded NATS and Redis unless configured)")
    up.add_argument("--quiet", action="store_true", help="do not print where the stack listens")
    up.add_argument("--redis-cluster", type=int, default=0, metavar="N",
                    help="embedded Redis as a Redis Cluster of N masters (docs/scaling.md), not one redis-server")
    up.add_argument("--nats-cluster", type=int, default=0, metavar="N",
                    help="start N embedded nats-server nodes as one JetStream cluster on loopback (streams with "
                         "N replicas unless BUILDER_TELEMETRY_REPLICAS says otherwise; 1-5) instead of one server")
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop the stack 'buildtel up' started on this machine")
    down.set_defaults(func=cmd_down)
    creds = sub.add_parser(
        "credentials",
        help="write a role's credentials of the local stack to a file for another machine or tool",
        description="Write the NATS URL and one role's password of the stack 'buildtel up' runs here to a "
                    "0600 file. Hand 'agent' credentials to build machines: there, set "
                    "BUILDER_TELEMETRY_STACK_CREDENTIALS=FILE (the URL must be reachable from them: start the "
                    "stack's NATS beyond loopback or use a farm's NATS). Roles: " + ", ".join(ROLES) + ".")
    creds.add_argument("role", choices=ROLES, help="which role (agent: publish builds only; reader: queries only)")
    creds.add_argument("-o", "--output", required=True, help="file to write (created with mode 0600)")
    creds.set_defaults(func=cmd_credentials)
    serve = sub.add_parser("serve", help="run one service against the configured NATS and Redis")
    serve.add_argument("service", choices=sorted(registry.SERVICES), help="which service")
    registry.add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)


class LocalStack:
    """Engines (when not configured) plus services, started and stopped as one unit."""

    def __init__(self, settings: Settings, services: list[str] | None = None, *, redis_cluster: int = 0,
                 nats_cluster: int = 0) -> None:
        self.settings = settings
        self.redis_cluster = redis_cluster  # masters of an embedded Redis Cluster; 0: one redis-server
        self.nats_cluster = nats_cluster  # >0: that many embedded nodes (shared/natscluster.py)
        self.cluster: NatsCluster | None = None
        self.names = services or list(registry.SERVICES)
        self.engines: list[Any] = []
        self.services: list[Any] = []
        self.nats_url = settings.nats_url or ""
        self.redis_url = settings.redis_url or ""
        # Fresh credentials for every stack: one NATS password per role, one Redis password.
        self.auth = StackAuth.generate()

    @property
    def embedded_nats(self) -> bool:
        return any(isinstance(e, NatsEngine) for e in self.engines)

    @property
    def service_settings(self) -> Settings:
        """What the services (and the commands of this stack) connect with: the generated role
        credentials when NATS is embedded, the configured ones otherwise."""
        s = self.settings.with_(nats_url=self.nats_url, redis_url=self.redis_url)
        if self.cluster is not None and s.replicas is None:
            s = s.with_(replicas=self.cluster.size)  # one copy of every stream on each node
        return s.with_(stack_auth=self.auth) if self.embedded_nats else s

    def start_engines(self) -> None:
        engines_dir = private_dir(self.settings.engines_dir)
        if self.nats_cluster and self.nats_url:
            raise CLIError("--nats-cluster starts embedded NATS servers, but BUILDER_TELEMETRY_NATS_URL names a "
                           "NATS to join: use one or the other")
        if self.nats_cluster:
            self.cluster = NatsCluster(engines_dir / "nats-cluster", self.nats_cluster, auth=self.auth,
                                       namespace=self.namespaces).start()
            self.engines += self.cluster.nodes
            self.nats_url = self.cluster.url
        elif not self.nats_url:
            eng = NatsEngine(engines_dir / "nats", auth=self.auth, namespace=self.namespaces).start()
            self.engines.append(eng)
            self.nats_url = eng.url
        if not self.redis_url and self.redis_cluster:
            self.redis_url = start_cluster(engines_dir / "redis-cluster", self.redis_cluster, self.auth, self.engines)
        if not self.redis_url:
            eng = RedisEngine(engines_dir / "redis", auth=self.auth).start()
            self.engines.append(eng)
            self.redis_url = eng.url

    @property
    def namespaces(self) -> list[str]:
        """The stack's own namespace, then its further tenants (``BUILDER_TELEMETRY_TENANTS``)."""
        return [self.settings.namespace, *self.settings.tenant_list]

    def create_services(self) -> list[Any]:
        """Every service for the stack's namespace; for each further tenant every service but the
        web API (one web service serves all tenants, by the tenant its keys name) and the BES
        endpoint (one port; Bazel builds land in the stack's own namespace)."""
        s = self.service_settings
        self.services = [svc for n in self.names for svc in self._create(n, s)]
        for tenant in self.settings.tenant_list:
            ts = s.for_tenant(tenant)
            private_dir(ts.cache_dir)
            # A tenant's tracer takes OTLP on a port of its own (any free one: stack.json's
            # tenant_otlp), not the stack's 4318, which the stack's own tracer holds.
            self.services += [svc for n in self.names if n not in ("web", "bes")
                              for svc in self._create(n, ts, **({"otlp_port": 0} if n == "tracer" else {}))]
        return self.services

    def _create(self, name: str, s: Settings, **options: Any) -> list[Any]:
        """One service, or P storage instances, one per partition (docs/scaling.md, Partitions)."""
        if name == "storage" and s.storage_partitions > 1:
            return [registry.create(name, s, self.nats_url, self.redis_url, partition=k, **options)
                    for k in range(s.storage_partitions)]
        return [registry.create(name, s, self.nats_url, self.redis_url, **options)]

    async def __aenter__(self) -> LocalStack:
        await asyncio.to_thread(self.start_engines)
        started = []
        try:
            for svc in self.create_services():
                await svc.start()
                started.append(svc)
        except BaseException:
            for svc in reversed(started):
                with contextlib.suppress(Exception):
                    await svc.stop()
            self.stop_engines()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for svc in reversed(self.services):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(svc.stop(), 10)
        self.stop_engines()

    def stop_engines(self) -> None:
        for eng in reversed(self.engines):
            eng.stop()
        self.engines.clear()


def make_private(settings: Settings) -> None:
    """The stack's files are its owner's alone: umask 077 for this process and what it starts, and
    an existing cache directory an older version left readable to others tightened, with a log line."""
    os.umask(0o077)
    if settings.cache_dir.exists():
        changed = tighten_tree(settings.cache_dir)
        if changed:
            print(f"buildtel: removed group/other access from {changed} entries under {settings.cache_dir}",
                  file=sys.stderr, flush=True)
    data_dir(settings)


def stack_record(stack: LocalStack) -> dict[str, Any]:
    """What ``stack.json`` says of a stack whose engines run: URLs, engines (pid + start time, for
    ``down``) and, for embedded NATS, the role credentials (the file is 0600)."""
    info: dict[str, Any] = {"nats_url": stack.nats_url, "redis_url": stack.redis_url,
                            "embedded": [e.name for e in stack.engines],
                            "engines": [{"name": e.name, **process_record(e.pid)} for e in stack.engines if e.pid],
                            **cluster_record(stack.engines)}
    if stack.embedded_nats:
        info["auth"] = stack.auth.to_json()
    if stack.cluster is not None:  # each node's pid and URL; nats_url lists them all
        info["nats_nodes"] = stack.cluster.describe()
    return info


def stack_running(settings: Settings) -> dict[str, Any] | None:
    """``stack.json`` when its process is alive (starting or running), else None."""
    info = read_stack_file(settings)
    if info is None:
        return None
    if "pid_created" not in info:  # written by an older version: trust it only when it answers
        return read_stack(settings)
    return info if _same_process({"pid": info.get("pid", 0), "created": info["pid_created"]}) else None


async def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    if stack_running(settings) is not None:
        raise CLIError(f"a stack is already running for {settings.cache_dir} (see {stack_file(settings)}); "
                       "stop it with 'buildtel down'")
    make_private(settings)
    # SIGTERM/SIGINT from here on stop the stack cleanly, even while engines or services start.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    if args.redis_cluster and (settings.redis_url or not 1 <= args.redis_cluster <= 16):
        raise CLIError("--redis-cluster N starts an embedded cluster of 1 to 16 masters; it cannot be combined with "
                       "BUILDER_TELEMETRY_REDIS_URL (point that at your cluster: redis+cluster://…, docs/scaling.md)")
    if not 0 <= args.nats_cluster <= 5:
        raise CLIError(f"--nats-cluster {args.nats_cluster}: 1 to 5 nodes (JetStream keeps at most 5 replicas)")
    stack = LocalStack(settings, redis_cluster=args.redis_cluster, nats_cluster=args.nats_cluster)
    path = stack_file(settings)
    me = process_record(os.getpid())
    info: dict[str, Any] = {"pid": me["pid"], "pid_created": me["created"], "state": "starting",
                            "namespace": settings.namespace, "tenants": settings.tenant_list,
                            "services": stack.names, "started": time.time(),
                            "engines": []}
    write_private(path, json.dumps(info, indent=2))
    try:
        await asyncio.to_thread(stack.start_engines)
        info.update(stack_record(stack))
        write_private(path, json.dumps(info, indent=2))
        if stop.is_set():
            return 0
        services = stack.create_services()

        def announce() -> None:
            info["state"] = "running"
            web = next((s for s in services if getattr(s, "name", "") == "web"), None)
            if web is not None:  # where `buildtel run` links sessions to (docs/api.md)
                info["web_url"] = web.url
            bes = next((s for s in services if getattr(s, "name", "") == "bes"), None)
            if bes is not None:  # where Bazel streams to (docs/bazel.md)
                info["bes_url"] = bes.url
            if settings.tenant_list:  # each further tenant's OTLP/HTTP endpoint (its tracer's own port)
                info["tenant_otlp"] = {t.settings.namespace: t.otlp_url for t in services
                                       if getattr(t, "name", "") == "tracer" and t.receiver is not None
                                       and t.settings.namespace != settings.namespace}
            write_private(path, json.dumps(info, indent=2))
            if not args.quiet:
                where = "embedded" if stack.engines else "configured"
                tenants = f"; tenants: {', '.join(stack.namespaces)}" if settings.tenant_list else ""
                print(f"buildtel: stack up ({where}) — NATS {public_url(stack.nats_url)}, "
                      f"Redis {public_url(stack.redis_url)}; services: {', '.join(stack.names)}{tenants}; "
                      f"data in {settings.cache_dir}", file=sys.stderr, flush=True)
                if web is not None:
                    open_note = "" if settings.http_token or web.keyed else \
                        " (open: no API key or token set, loopback only)"
                    print(f"buildtel: dashboard {web.url}/ · web API {web.url}/api/v1/{open_note}", file=sys.stderr,
                          flush=True)
                if bes is not None:
                    base = settings.web_url or (web.url if web is not None else None)  # as `buildtel run` links
                    results = f" --bes_results_url={base.rstrip('/')}/sessions/" if base else ""
                    print(f"buildtel: Bazel: --bes_backend={bes.url}{results}", file=sys.stderr, flush=True)
                if stack.embedded_nats:
                    print("buildtel: engines require credentials (in stack.json, mode 0600); for a build machine: "
                          "'buildtel credentials agent -o agent.creds'", file=sys.stderr, flush=True)

        await run_until_signal(services, stop_event=stop, on_started=announce)
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        stack.stop_engines()
    return 0


def cmd_credentials(args: argparse.Namespace, settings: Settings) -> int:
    info = read_stack(settings)
    if info is None:
        raise CLIError("no stack is running here: start one with 'buildtel up'")
    if not info.get("auth"):
        raise CLIError("this stack joined a configured NATS: its credentials are the ones you configured")
    auth = StackAuth.from_json(info["auth"]).only(args.role)
    out = Path(args.output)
    write_private(out, json.dumps({"nats_url": info["nats_url"], "namespace": info.get("namespace"),
                                   **auth.to_json()}, indent=2))
    print(f"buildtel: wrote {args.role} credentials to {out} (mode 0600)", file=sys.stderr)
    return 0


def cmd_down(args: argparse.Namespace, settings: Settings) -> int:
    path = stack_file(settings)
    info = read_stack_file(settings)
    if info is None or ("pid_created" not in info and read_stack(settings) is None):
        if info is not None:  # an older version's file whose stack is gone
            path.unlink(missing_ok=True)
        print(f"buildtel: no stack is running (data directory {settings.cache_dir})", file=sys.stderr)
        return 0
    # Whatever the stack's state (starting, running, SIGKILLed with engines left): stop all of it.
    done = stop_stack(info, path=path)
    if not done:
        path.unlink(missing_ok=True)
        print(f"buildtel: no stack is running (removed the stale {path})", file=sys.stderr)
    for line in done:
        print(f"buildtel: {line}", file=sys.stderr)
    return 0


async def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    nats_url, redis_url = settings.nats_url, settings.redis_url
    if not (nats_url and redis_url):
        info = read_stack(settings)
        if info is None:
            raise CLIError("serve needs BUILDER_TELEMETRY_NATS_URL and BUILDER_TELEMETRY_REDIS_URL "
                           "(or a local stack from 'buildtel up')")
        nats_url, redis_url = nats_url or info["nats_url"], redis_url or info["redis_url"]
        settings = resolve(settings, autostart=False)
    os.umask(0o077)
    svc = registry.create_from_args(args.service, args, settings, nats_url, redis_url)
    print(f"buildtel: serving {args.service} on {public_url(nats_url)}", file=sys.stderr, flush=True)
    await run_until_signal([svc])
    return 0
