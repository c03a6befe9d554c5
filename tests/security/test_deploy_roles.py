"""The roles of a deployment: deploy/nats.conf and docker-compose.yml use the same table as the
embedded stack, ship no secret, and the documented table matches the code."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
from pathlib import Path

import nats
import pytest
import yaml

from buildtel.shared.auth import ROLES, SERVICE_ROLES, inbox_prefix, password_variable, role_permissions
from buildtel.shared.engines import _wait_tcp, find_nats_server, free_port

ROOT = Path(__file__).resolve().parents[2]


def _render() -> str:
    import importlib.util

    spec = importlib.util.spec_from_file_location("render_nats_conf", ROOT / "deploy" / "render_nats_conf.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return str(mod.render())


def test_deploy_nats_conf_is_generated_from_the_role_table() -> None:
    assert (ROOT / "deploy" / "nats.conf").read_text() == _render(), \
        "deploy/nats.conf is stale: run python deploy/render_nats_conf.py"


def test_the_documented_roles_table_names_what_each_role_may_publish_and_subscribe() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    for role in ROLES:
        row = next((line for line in doc.splitlines() if line.startswith(f"| `{role}`")), None)
        assert row is not None, f"docs/protocol.md has no row for role {role}"
        perms = role_permissions(role, "NS")
        for subject in [*perms["publish"], *perms["subscribe"]]:  # type: ignore[misc]
            if subject.startswith(("$JS.", "_INBOX.")) or subject == "$SRV.>":
                continue
            assert f"`{subject}`" in row, f"docs/protocol.md: role {role} should list {subject}"


def test_compose_ships_no_secret_and_refuses_to_start_without_each() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    compose = yaml.safe_load(text)
    # Every secret is required with a message naming it; none has a default.
    required = set(re.findall(r"\$\{([A-Z_]+):\?set \1 ", text))
    expected = {password_variable(r) for r in ROLES} | {"BUILDTEL_REDIS_PASSWORD", "BUILDER_TELEMETRY_HTTP_TOKEN",
                                                        "BUILDTEL_NATS_ROUTE_PASSWORD"}
    assert expected <= required
    assert not re.search(r"\$\{[A-Z_]*(PASSWORD|TOKEN)[A-Z_]*:-", text), "a secret with a default value"
    assert "change-me" not in text
    for name in SERVICE_ROLES:
        # storage runs one container per partition, storage-<k>: each connects as the storage role.
        containers = [c for c in compose["services"] if c == name or re.fullmatch(rf"{name}-\d+", c)]
        assert containers, f"compose runs no {name}"
        for container in containers:
            env = compose["services"][container]["environment"]
            assert env["BUILDER_TELEMETRY_NATS_USER"] == name, f"{container} connects as its own role"
            assert password_variable(name) in env["BUILDER_TELEMETRY_NATS_PASSWORD"]
            assert env["BUILDER_TELEMETRY_REDIS_URL"].startswith("redis://:${BUILDTEL_REDIS_PASSWORD:?")
    for node in ("nats-1", "nats-2", "nats-3"):  # the cluster's nodes: role passwords, routes, its name
        nats_env = compose["services"][node]["environment"]
        assert set(nats_env) == {password_variable(r) for r in ROLES} | {
            "BUILDTEL_NATS_ROUTE_PASSWORD", "NATS_ROUTES", "NATS_SERVER_NAME"}
        assert nats_env["NATS_SERVER_NAME"] == node
    assert "--requirepass" not in text, "a Redis password on the command line is visible to every user"


async def test_nats_server_runs_the_deploy_config_with_its_roles(tmp_path: Path) -> None:
    passwords = {r: f"pw-{r}-{os.urandom(6).hex()}" for r in ROLES}
    env = {**os.environ, **{password_variable(r): pw for r, pw in passwords.items()}}
    port = free_port()
    log = tmp_path / "nats.log"
    # The deploy file as it is, but for where this test may write and listen.
    conf = tmp_path / "nats.conf"
    text = (ROOT / "deploy" / "nats.conf").read_text()
    conf.write_text(text.replace('store_dir: "/data"', f'store_dir: "{tmp_path / "js"}"')
                    .replace("http_port: 8222", f"http_port: {free_port()}").replace("port: 4222", f"port: {port}"))
    with open(log, "wb") as out:
        proc = subprocess.Popen([find_nats_server(), "-c", str(conf), "-a", "127.0.0.1"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        await asyncio.to_thread(_wait_tcp, "127.0.0.1", port, proc, "nats-server", log)
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(str(exc))

        url = f"nats://127.0.0.1:{port}"
        agent = await nats.connect(url, user="agent", password=passwords["agent"], error_cb=on_error,
                                   inbox_prefix=inbox_prefix("agent"), allow_reconnect=False)
        collector = await nats.connect(url, user="collector", password=passwords["collector"],
                                       inbox_prefix=inbox_prefix("collector"), allow_reconnect=False)
        try:
            await agent.publish("buildtel.sessions.completed", b"forged")
            await agent.flush()
            for _ in range(200):
                if any("permissions violation" in e.lower() for e in errors):
                    break
                await asyncio.sleep(0.025)
            assert any('publish to "buildtel.sessions.completed"' in e.lower() for e in errors)
        finally:
            await agent.close()
            await collector.close()
        with pytest.raises(Exception, match="Authorization Violation"):
            nc = nats.NATS()
            try:
                await nc.connect(url, user="agent", password="not-it", allow_reconnect=False,
                                 max_reconnect_attempts=0)
            finally:
                await nc.close()
    finally:
        proc.terminate()
        proc.wait(10)
