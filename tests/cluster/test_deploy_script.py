"""deploy/nats-cluster.sh (the compose and k8s NATS nodes' start) forms a real JetStream cluster
from deploy/nats.conf: three local nodes started by the script itself give R3 streams."""

from __future__ import annotations

import asyncio
import os
import secrets
import stat
import subprocess
import time
from pathlib import Path

from buildtel.shared.auth import ROLES, StackAuth, password_variable
from buildtel.shared.bus import connect_nats, ensure_streams
from buildtel.shared.engines import find_nats_server
from buildtel.shared.natscluster import stable_port
from buildtel.shared.settings import Settings
from buildtel.shared.subjects import Subjects

ROOT = Path(__file__).resolve().parents[2]


async def test_the_deploy_script_starts_nodes_that_form_a_jetstream_cluster(tmp_path: Path) -> None:
    # As docs/deploy.md generates them: a letter first (nats-server parses a $VARIABLE's value, and
    # one starting with a digit as a number); this also checks "p<hex>" values are taken as strings.
    auth = StackAuth(nats=tuple((r, "p" + secrets.token_hex(16)) for r in ROLES), redis_password="unused")
    route_pw = "p" + secrets.token_hex(16)
    client = [stable_port() for _ in range(3)]
    cluster = [stable_port() for _ in range(3)]
    base = (ROOT / "deploy" / "nats.conf").read_text()
    env = {**os.environ, **{password_variable(r): auth.password(r) for r in ROLES},
           "BUILDTEL_NATS_ROUTE_PASSWORD": route_pw,
           "NATS_ROUTES": ",".join(f"127.0.0.1:{p}" for p in cluster),
           "PATH": str(Path(find_nats_server()).parent) + os.pathsep + os.environ.get("PATH", "")}
    procs = []
    try:
        for i in range(3):
            node = tmp_path / f"nats-{i}"
            node.mkdir(mode=0o700)
            # The deploy file as it is, but for where this test may write and listen.
            (node / "base.conf").write_text(
                base.replace('store_dir: "/data"', f'store_dir: "{node / "js"}"')
                .replace("http_port: 8222", f"http_port: {stable_port()}").replace("port: 4222", f"port: {client[i]}"))
            log = open(node / "nats.log", "wb")  # noqa: SIM115 - closed with the process below
            procs.append((subprocess.Popen(
                ["sh", str(ROOT / "deploy" / "nats-cluster.sh"), "-a", "127.0.0.1"],
                env={**env, "NATS_SERVER_NAME": f"nats-{i}", "NATS_BASE_CONF": str(node / "base.conf"),
                     "NATS_CONF_OUT": str(node / "nats.conf"), "NATS_CLUSTER_LISTEN": f"127.0.0.1:{cluster[i]}"},
                stdout=log, stderr=subprocess.STDOUT), log))
        deadline = time.monotonic() + 60
        for i, (proc, _log) in enumerate(procs):  # each node up, or the test says why not
            text = ""
            while "Listening for client connections" not in text:
                text = (tmp_path / f"nats-{i}" / "nats.log").read_text(errors="replace")
                assert proc.poll() is None, f"node {i} exited: {text[-2000:]}"
                assert time.monotonic() < deadline, f"node {i} did not listen: {text[-2000:]}"
                await asyncio.sleep(0.05)
        url = ",".join(f"nats://127.0.0.1:{p}" for p in client)
        s = Settings(stack_auth=auth, cache_dir=tmp_path, nats_url=url, namespace="buildtel")
        nc = await connect_nats(s, url, name="test", role="operator")
        try:
            js = nc.jetstream()
            await ensure_streams(js, Subjects("buildtel"), replicas=3)  # retried while the cluster forms
            info = await js.stream_info(Subjects("buildtel").events_stream)
            assert info.config.num_replicas == 3 and info.cluster is not None
            assert {info.cluster.leader, *(p.name for p in info.cluster.replicas or [])} == {"nats-0", "nats-1",
                                                                                             "nats-2"}
        finally:
            await nc.close()
        for i in range(3):  # the written configuration holds the route password: private
            conf = tmp_path / f"nats-{i}" / "nats.conf"
            assert stat.S_IMODE(conf.stat().st_mode) == 0o600 and route_pw in conf.read_text()
    finally:
        for proc, log in procs:
            proc.kill()
            proc.wait(30)
            log.close()


def test_the_script_refuses_to_start_without_its_settings(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "BUILDTEL_"))}
    res = subprocess.run(["sh", str(ROOT / "deploy" / "nats-cluster.sh")], env=env, capture_output=True, text=True,
                         timeout=30)
    assert res.returncode != 0 and "NATS_SERVER_NAME" in res.stderr
