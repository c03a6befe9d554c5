"""An embedded NATS JetStream cluster: N real ``nats-server`` processes on loopback.

``buildtel up --nats-cluster 3`` and the cluster tests start one.  Each node is a
:class:`~buildtel.shared.engines.NatsEngine` (the same users, roles and permissions as the
single embedded server) with its own name, client port, JetStream store directory (0700 under
the data directory) and a ``cluster`` block routing to every other node on free loopback
ports.  Routes authenticate with a password generated for the cluster (in each node's 0600
configuration file, never on a command line).  :meth:`NatsCluster.start` returns once the
JetStream meta group has a leader and every node is a peer, so streams with one replica per
node can be created right away.  A node killed (:meth:`NatsCluster.kill`) can be started
again on the same ports and store (:meth:`NatsCluster.restart`) and catches up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import secrets
import time
import uuid
from pathlib import Path
from typing import Any

from buildtel.shared.auth import StackAuth
from buildtel.shared.engines import EngineError, NatsEngine, free_port
from buildtel.shared.files import private_dir

READY_TIMEOUT_S = 60.0
RESTART_TIMEOUT_S = 30.0
ROUTE_USER = "route"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(x) for x in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; other systems: IANA's is 49152-65535, above this


def stable_port(host: str = "127.0.0.1") -> int:
    """A free port below the kernel's ephemeral range.  A node's ports must stay its own while it
    is down (a restarted node listens on them again and its peers' routes name them); a port of
    the ephemeral range is soon taken by some outgoing connection, a port below it is not."""
    import random
    import socket

    low, _high = _ephemeral_range()
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
            return port
    return free_port(host)  # a crowded range: any free port (a restart may then need a retry)


class NatsClusterNode(NatsEngine):
    """One node: a NatsEngine whose configuration names it and routes to its peers."""

    def __init__(self, data_dir: Path, *, server_name: str, cluster_name: str, cluster_port: int,
                 peer_cluster_ports: list[int], route_password: str, port: int, host: str,
                 auth: StackAuth, namespace: str | list[str]) -> None:
        super().__init__(data_dir, port=port, host=host, auth=auth, namespace=namespace)
        self.server_name = server_name
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.peer_cluster_ports = peer_cluster_ports
        self.route_password = route_password

    def extra_conf(self, port: int) -> str:
        routes = [f"nats-route://{ROUTE_USER}:{self.route_password}@{self.host}:{p}" for p in self.peer_cluster_ports]
        return (f"server_name: {json.dumps(self.server_name)}\n"
                "cluster {\n"
                f"  name: {json.dumps(self.cluster_name)}\n"
                f"  listen: {json.dumps(f'{self.host}:{self.cluster_port}')}\n"
                f"  authorization {{ user: {ROUTE_USER}, password: {json.dumps(self.route_password)} }}\n"
                f"  routes: {json.dumps(routes)}\n"
                "}\n")


class NatsCluster:
    """``size`` nodes started and stopped as one; ``url`` lists every node (comma-separated)."""

    name = "nats-cluster"

    def __init__(self, data_dir: Path, size: int = 3, host: str = "127.0.0.1", auth: StackAuth | None = None,
                 namespace: str | list[str] = "buildtel", cluster_name: str = "buildtel") -> None:
        if not 1 <= size <= 5:
            raise EngineError(f"a NATS cluster of {size} nodes: 1 to 5 are supported (JetStream replicas ≤ 5)")
        self.data_dir = Path(data_dir)
        self.size = size
        self.host = host
        self.auth = auth if auth is not None else StackAuth.generate()
        self.namespace = namespace
        self.cluster_name = cluster_name
        self.route_password = secrets.token_hex(24)
        self.nodes: list[NatsClusterNode] = []

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def url_for(self, role: str) -> str:
        return ",".join(n.url_for(role) for n in self.nodes)

    def node(self, server_name: str) -> NatsClusterNode:
        for n in self.nodes:
            if n.server_name == server_name:
                return n
        raise KeyError(f"no node {server_name!r} in this cluster ({', '.join(n.server_name for n in self.nodes)})")

    def _make_nodes(self) -> list[NatsClusterNode]:
        client_ports = [stable_port(self.host) for _ in range(self.size)]
        cluster_ports = [stable_port(self.host) for _ in range(self.size)]
        nodes = []
        for i in range(self.size):
            name = f"n{i + 1}"
            nodes.append(NatsClusterNode(
                private_dir(self.data_dir / name), server_name=name, cluster_name=self.cluster_name,
                cluster_port=cluster_ports[i], peer_cluster_ports=[p for j, p in enumerate(cluster_ports) if j != i],
                route_password=self.route_password, port=client_ports[i], host=self.host, auth=self.auth,
                namespace=self.namespace))
        return nodes

    def start(self) -> NatsCluster:
        private_dir(self.data_dir)
        last: Exception | None = None
        # Ports picked free can be taken before a node binds them: start the whole cluster again
        # on fresh ports (each node's routes name all the others, so one cannot move alone).
        for _ in range(3):
            self.nodes = self._make_nodes()
            try:
                for n in self.nodes:
                    n.start()
                self.wait_ready()
                return self
            except EngineError as exc:
                last = exc
                self.stop()
        raise last or EngineError("the NATS cluster failed to start")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S, nodes: int | None = None) -> None:
        """Return once JetStream has a meta leader and ``nodes`` (default: all) servers as peers:
        a probe stream with that many replicas is created and deleted.  Runs its own event loop
        in a worker thread, so it may be called from sync code and from inside a running loop."""
        want = nodes or self.size
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, self._probe(want, timeout)).result()

    async def _probe(self, replicas: int, timeout: float) -> None:
        import nats
        from nats.js.api import StorageType, StreamConfig

        deadline = time.monotonic() + timeout
        last: object = None
        nc = await nats.connect(servers=[n.url for n in self.nodes if n.pid], user="operator",
                                password=self.auth.password("operator"), max_reconnect_attempts=-1,
                                reconnect_time_wait=0.2, connect_timeout=5)
        try:
            js = nc.jetstream(timeout=5)
            name = f"BUILDTEL_CLUSTER_PROBE_{uuid.uuid4().hex[:8].upper()}"
            while time.monotonic() < deadline:
                try:
                    await js.add_stream(StreamConfig(name=name, subjects=[f"_buildtel.probe.{name}"],
                                                     storage=StorageType.MEMORY, num_replicas=replicas))
                    await js.delete_stream(name)
                    return
                except Exception as exc:  # noqa: BLE001 - no meta leader / too few peers yet: wait
                    last = exc
                    await asyncio.sleep(0.25)
            raise EngineError(f"the NATS cluster had no JetStream meta leader with {replicas} peers within "
                              f"{timeout:.0f}s (last answer: {last!r}); logs: {self.data_dir}/n*/nats-server.log")
        finally:
            await nc.close()

    def kill(self, server_name: str) -> NatsClusterNode:
        """SIGKILL one node (fault tests, benchmarks)."""
        node = self.node(server_name)
        node.kill()
        return node

    def restart(self, server_name: str) -> NatsClusterNode:
        """Start a stopped node again on its ports and store; it rejoins and catches up."""
        node = self.node(server_name)
        deadline = time.monotonic() + RESTART_TIMEOUT_S
        while node.pid is None:
            try:
                node.start()
            except EngineError:
                # Its port briefly held by another socket: try again, on the same ports.
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        return node

    def stop(self) -> None:
        """Stop every node. Idempotent."""
        for n in reversed(self.nodes):
            n.stop()

    def describe(self) -> list[dict[str, Any]]:
        """Each node's name, pid and URL (stack.json's ``nats_nodes``)."""
        return [{"name": n.server_name, "pid": n.pid, "url": n.url} for n in self.nodes]

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
