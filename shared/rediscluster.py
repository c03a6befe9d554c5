"""Redis Cluster: the cluster URL, the client, and an embedded cluster of ``redis-server`` nodes.

URL form (docs/scaling.md "Redis Cluster"): ``redis+cluster://[user:password@]host:port[,host:port…]``
(``rediss+cluster://`` for TLS).  The first address carries the credentials, which every node
shares; the others are further start-up nodes (any one reachable is enough, the client learns
the rest of the cluster from it).  A plain ``redis://`` URL keeps the single-server client.

The keys (shared/keys.py) are hash-tagged so that every Lua script and MULTI touches one slot;
reads that span sessions (the recorder's flags, alert acknowledgements) go through
:func:`mget_any`, which splits them per slot on a cluster.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from buildtel.shared.auth import StackAuth
from buildtel.shared.engines import EngineError, RedisEngine

SCHEMES = ("redis+cluster", "rediss+cluster")
SLOTS = 16384
CLUSTER_TIMEOUT_S = 30.0


def is_cluster_url(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SCHEMES


def parse_cluster_url(url: str) -> dict[str, Any]:
    """``redis+cluster://…`` -> keyword arguments of :class:`redis.asyncio.cluster.RedisCluster`
    (``startup_nodes``, credentials, ``ssl``); ValueError naming what is wrong."""
    from redis.asyncio.cluster import ClusterNode

    first, *rest = [p.strip() for p in url.split(",")]
    parts = urlsplit(first)
    if parts.scheme.lower() not in SCHEMES:
        raise ValueError(f"a Redis Cluster URL starts with {' or '.join(s + '://' for s in SCHEMES)}")
    nodes: list[tuple[str, int]] = []
    for i, one in enumerate([first, *rest]):
        p = parts if i == 0 else urlsplit(one if "://" in one else f"//{one}")
        try:
            port = p.port
        except ValueError:
            port = None
        if not p.hostname or not port:
            raise ValueError(f"Redis Cluster URL: node {i + 1} ({one.rsplit('@', 1)[-1]!r}) is not host:port")
        nodes.append((p.hostname, port))
    out: dict[str, Any] = {"startup_nodes": [ClusterNode(h, p) for h, p in nodes],
                           "ssl": parts.scheme.lower().startswith("rediss")}
    if parts.username:
        out["username"] = unquote(parts.username)
    if parts.password is not None:
        out["password"] = unquote(parts.password)
    return out


def connect_cluster(url: str) -> Any:
    """A redis-py cluster client (bytes replies, as the single client of shared/bus.py)."""
    from redis.asyncio.cluster import RedisCluster

    return RedisCluster(**parse_cluster_url(url), decode_responses=False, health_check_interval=30)


def is_cluster(redis: Any) -> bool:
    from redis.asyncio.cluster import RedisCluster

    return isinstance(redis, RedisCluster)


async def mget_any(redis: Any, keys: list[str]) -> list[Any]:
    """MGET of keys that may live in different slots: one MGET on a single Redis, one per slot on
    a cluster (``mget_nonatomic``: the values are read at slightly different moments)."""
    if not keys:
        return []
    if is_cluster(redis):
        return list(await redis.mget_nonatomic(keys))
    return list(await redis.mget(keys))


async def load_scripts(redis: Any, *scripts: Any) -> None:
    """Load Lua scripts on every master of a cluster before they are queued in pipelines: a cluster
    pipeline cannot load a script a node lacks (it fails with NOSCRIPT), while a single-Redis
    pipeline loads them itself.  Called again after a NOSCRIPT (a node restarted empty)."""
    if not is_cluster(redis):
        return
    for s in scripts:
        s.sha = await redis.script_load(s.script)


def is_noscript(exc: BaseException) -> bool:
    from redis.exceptions import NoScriptError

    return isinstance(exc, NoScriptError)


# -- an embedded cluster (buildtel up --redis-cluster N, the tests' cluster pass) -------------------
def _cluster_port(host: str) -> int:
    """A free port whose cluster-bus port (port + 10000) is free too; redis-server wants both, so
    the port is at most 55535."""
    for _ in range(200):
        port = random.randint(20_000, 55_535)
        with contextlib.ExitStack() as held:
            try:
                for p in (port, port + 10_000):
                    s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    s.bind((host, p))
            except OSError:
                continue
            return port
    raise EngineError(f"no free port pair (port, port + 10000) on {host} for a Redis Cluster node")


class RedisClusterNode(RedisEngine):
    """One cluster-enabled master: the single engine's password and command limits."""

    name = "redis-cluster-node"

    def start(self) -> RedisClusterNode:
        last: EngineError | None = None
        for _ in range(5):  # a pair picked free can be taken before the server binds it
            self.requested_port = _cluster_port(self.host)
            try:
                super().start()
                return self
            except EngineError as exc:
                last = exc
        raise last or EngineError("a Redis Cluster node failed to start")

    def _argv(self, port: int) -> list[str]:
        # The node's cluster state is about ports picked at start: a fresh node every start.
        (self.data_dir / "nodes.conf").unlink(missing_ok=True)
        return [*super()._argv(port), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "5000", "--cluster-require-full-coverage", "yes"]


class RedisClusterEngine:
    """``masters`` cluster-enabled ``redis-server`` nodes on free loopback ports, every slot assigned
    (CLUSTER ADDSLOTS, even ranges) and joined with CLUSTER MEET through redis-py; started when
    ``cluster_state:ok`` on every node.  Its hot state lives as long as the cluster: each start is
    a new cluster (docs/scaling.md)."""

    name = "redis-cluster"

    def __init__(self, data_dir: Path, masters: int = 3, host: str = "127.0.0.1",
                 auth: StackAuth | None = None) -> None:
        if masters < 1:
            raise EngineError("a Redis Cluster needs at least one master")
        self.data_dir = Path(data_dir)
        self.auth = auth if auth is not None else StackAuth.generate()
        self.host = host
        self.nodes = [RedisClusterNode(self.data_dir / f"node{i}", host=host, auth=self.auth)
                      for i in range(masters)]

    @property
    def url(self) -> str:
        pw = self.auth.redis_password
        first, *rest = self.nodes
        return ",".join([f"redis+cluster://:{pw}@{self.host}:{first.port}"]
                        + [f"{self.host}:{n.port}" for n in rest])

    @property
    def pids(self) -> list[int]:
        return [n.pid for n in self.nodes if n.pid is not None]

    def start(self) -> RedisClusterEngine:
        import redis

        try:
            for n in self.nodes:
                # A previous cluster's data names slots and peers this one does not have.
                shutil.rmtree(n.data_dir, ignore_errors=True)
                n.start()
            clients: list[Any] = [redis.Redis(host=self.host, port=n.port, password=self.auth.redis_password,
                                   socket_timeout=5.0) for n in self.nodes]
            try:
                per = SLOTS // len(clients)
                for i, c in enumerate(clients):
                    lo, hi = i * per, (SLOTS - 1 if i == len(clients) - 1 else (i + 1) * per - 1)
                    # ADDSLOTS, not ADDSLOTSRANGE: the embedded redis-server is 6.2.
                    c.execute_command("CLUSTER", "ADDSLOTS", *range(lo, hi + 1))
                for n in self.nodes[1:]:
                    clients[0].execute_command("CLUSTER", "MEET", self.host, n.port)
                self._wait_ok(clients)
            finally:
                for c in clients:
                    c.close()
        except Exception:
            self.stop()
            raise
        return self

    def _wait_ok(self, clients: list[Any]) -> None:
        deadline = time.monotonic() + CLUSTER_TIMEOUT_S
        state: list[str] = []
        while time.monotonic() < deadline:
            state = []
            for c in clients:
                info = c.execute_command("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
                state.append(f"{fields.get('cluster_state')}/{fields.get('cluster_known_nodes')}")
            if all(s == f"ok/{len(clients)}" for s in state):
                return
            time.sleep(0.05)
        raise EngineError(f"Redis Cluster not ok within {CLUSTER_TIMEOUT_S:.0f}s (state/known nodes: {state})")

    def stop(self, timeout: float = 5.0) -> None:
        for n in self.nodes:
            with contextlib.suppress(Exception):
                n.stop(timeout)

    def __enter__(self) -> RedisClusterEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- hooks of buildtel up (cli/cmd_stack.py) --------------------------------------------------------
def start_cluster(data_dir: Path, masters: int, auth: StackAuth, engines: list[Any]) -> str:
    """Start an embedded cluster for ``buildtel up --redis-cluster N``; its nodes join ``engines``
    (each stopped, and recorded in stack.json with its pid, as any engine).  Returns its URL."""
    cluster = RedisClusterEngine(data_dir, masters=masters, auth=auth)
    try:
        cluster.start()
    finally:
        engines.extend(n for n in cluster.nodes if n.pid is not None)
    return cluster.url


def cluster_record(engines: list[Any]) -> dict[str, Any]:
    """stack.json's ``redis_cluster``: each node's address and pid (none without a cluster)."""
    nodes = [{"url": f"{e.host}:{e.port}", "pid": e.pid} for e in engines if isinstance(e, RedisClusterNode)]
    return {"redis_cluster": nodes} if nodes else {}
