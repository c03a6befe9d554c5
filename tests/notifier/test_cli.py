"""``buildtel alerts ack|mute|unmute|subscriptions`` and ``alerts --status`` as a user runs them
(subprocesses) against the test stack: the state lands where the web API and the notifier read it."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from buildtel.shared import alertstate
from buildtel.shared.keys import Keys
from buildtel.shared.settings import Settings
from tests.notifier.conftest import SECRET, make_alert, publish, write_config
from tests.util import stack_env


async def _cli(settings: Settings, *args: str, config: Path | None = None) -> tuple[int, str, str]:
    env = dict(os.environ, **stack_env(settings))
    env.pop("BUILDTEL_DEBUG", None)
    if config is not None:
        env["BUILDER_TELEMETRY_ALERTS_CONFIG"] = str(config)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "buildtel.cli.main", "--nats-url", settings.nats_url or "", "--redis-url",
        settings.redis_url or "", "--namespace", settings.namespace, "--cache-dir", str(settings.cache_dir), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


def _ids(out: str) -> list[str]:
    return [json.loads(line)["id"] for line in out.splitlines() if line.strip()]


async def test_ack_mute_unmute_and_status(settings, nc, redis_client) -> None:
    a, b, c = make_alert(target="//x:a"), make_alert(target="//x:b"), make_alert(target="//x:c")
    await publish(nc, settings.namespace, [a, b, c])
    keys = Keys(settings.namespace)
    rc, _, err = await _cli(settings, "alerts", "ack", a.id[:8], "--note", "known: new compiler")
    assert rc == 0 and "acknowledged alert " + a.id in err
    [state] = await alertstate.states(redis_client, keys, [(a.id, alertstate.series_key("target", "main", "//x:a"),
                                                            a.detected_at)])
    assert state.status == "acknowledged" and state.acknowledged and state.acknowledged.note == "known: new compiler"
    assert state.acknowledged.by.startswith("cli")
    rc, _, err = await _cli(settings, "alerts", "mute", b.id, "--for", "24h")
    assert rc == 0 and "muted series target|main|//x:b until" in err
    for status, want in (("acknowledged", [a.id]), ("muted", [b.id]), ("open", [c.id])):
        rc, out, _ = await _cli(settings, "alerts", "--status", status, "--json")
        assert rc == 0 and _ids(out) == want, status
    rc, _, err = await _cli(settings, "alerts", "unmute", b.id)
    assert rc == 0 and "unmuted" in err
    rc, out, _ = await _cli(settings, "alerts", "--status", "open", "--json")
    assert sorted(_ids(out)) == sorted([b.id, c.id])
    rc, _, err = await _cli(settings, "alerts", "unmute", b.id)
    assert rc == 2 and "is not muted" in err
    rc, _, err = await _cli(settings, "alerts", "mute", c.id, "--for", "forever")
    assert rc == 2 and "as a duration" in err
    rc, _, err = await _cli(settings, "alerts", "ack", "ffffffffff")
    assert rc == 2 and "no alert has id" in err


async def test_ack_with_redis_away_is_a_clear_error_not_a_traceback(settings, nc) -> None:
    a = make_alert(target="//x:away")
    await publish(nc, settings.namespace, [a])
    from buildtel.shared.engines import free_port

    away = settings.with_(redis_url=f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    rc, _, err = await _cli(away, "alerts", "ack", a.id)
    assert rc != 0 and "cannot reach Redis" in err and "Traceback" not in err, err


async def test_subscriptions_lists_counts_and_never_a_secret(settings, redis_client, tmp_path) -> None:
    config = write_config(tmp_path, f'[[subscription]]\nid = "hook"\nkind = "webhook"\n'
                                    f'url = "https://ci.example.com/h?token=tok"\nsecret = "{SECRET}"\n'
                                    'branches = ["main"]\ndirection = "regression"\n'
                                    '[[subscription]]\nid = "chat"\nkind = "slack"\n'
                                    'url = "https://hooks.slack.com/services/T/B/SLACKSECRET"\ndigest = "daily"\n')
    await redis_client.hincrby(Keys(settings.namespace).notifier_counts, "hook|done", 7)
    await redis_client.hincrby(Keys(settings.namespace).notifier_counts, "hook|dead", 1)
    rc, out, err = await _cli(settings, "alerts", "subscriptions", config=config)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "KIND", "DESTINATION"]
    hook = next(line for line in lines if line.startswith("hook"))
    assert hook.split()[2:5] == ["https://ci.example.com/…", "7", "1"]
    assert "branches=main direction=regression" in hook
    assert "digest=daily" in next(line for line in lines if line.startswith("chat"))
    rc, js, _ = await _cli(settings, "alerts", "subscriptions", "--json", config=config)
    assert json.loads(js.splitlines()[0])["deliveries"] == {"done": 7, "dead": 1}
    for text in (out, err, js):
        assert SECRET not in text and "SLACKSECRET" not in text and "tok" not in text
    config.chmod(0o644)
    rc, _, err = await _cli(settings, "alerts", "subscriptions", config=config)
    assert rc == 0 and "readable by others" in err
