"""Two notifier replicas (``python -m buildtel.services.notifier``), one SIGKILLed mid-burst: the
receiver gets every alert, each under one delivery id, signed; nothing is left in the queue."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter

from buildtel.services.notifier.service import CONCURRENCY
from buildtel.shared.keys import Keys
from buildtel.shared.settings import Settings
from tests.notifier.conftest import SECRET, eventually, make_alert, publish, webhook, write_config
from tests.notifier.test_delivery import documented_verify
from tests.util import stack_env

ALERTS = 60


def _spawn(settings: Settings, config: str) -> subprocess.Popen[bytes]:
    env = dict(os.environ, **stack_env(settings), BUILDER_TELEMETRY_ALERTS_CONFIG=config,
               BUILDER_TELEMETRY_LOG_FORMAT="json")
    return subprocess.Popen([sys.executable, "-m", "buildtel.services.notifier"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def test_two_replicas_one_killed_mid_burst_each_alert_once(tmp_path, nc, settings, receiver,
                                                                 redis_client) -> None:
    receiver.delay_s = 0.05  # deliveries are in flight when the replica dies
    config = write_config(tmp_path, webhook("hook", receiver))
    procs = [_spawn(settings, str(config)), _spawn(settings, str(config))]
    try:
        alerts = [make_alert(target=f"//burst:t{i}") for i in range(ALERTS)]
        await publish(nc, settings.namespace, alerts)
        await eventually(lambda: len(receiver.got) >= ALERTS // 4, timeout=60, what="a quarter delivered")
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        keys = Keys(settings.namespace)
        await eventually(lambda: len({g.headers["X-Buildtel-Delivery"] for g in receiver.got}) == ALERTS,
                         timeout=60, what="every alert delivered")

        async def drained() -> bool:
            return not await redis_client.zcard(keys.notifier_due) and not await redis_client.hlen(keys.notifier_jobs)

        await eventually(drained, timeout=30, what="queue drained")
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(20)
    verify = documented_verify()
    by_delivery: dict[str, set[str]] = {}
    for g in receiver.got:
        assert verify(SECRET.encode(), g.headers, g.body)
        alert_id = json.loads(g.body)["alerts"][0]["alert"]["id"]
        by_delivery.setdefault(g.headers["X-Buildtel-Delivery"], set()).add(alert_id)
    # One delivery id per alert, one alert per delivery id.
    assert all(len(ids) == 1 for ids in by_delivery.values())
    assert sorted(next(iter(ids)) for ids in by_delivery.values()) == sorted(a.id for a in alerts)
    # A copy twice only if the killed replica had it answered but not yet marked done; the
    # receiver de-duplicates those by X-Buildtel-Delivery (docs/alerts.md, "Exactly once").
    copies = Counter(g.headers["X-Buildtel-Delivery"] for g in receiver.got)
    assert sum(copies.values()) - ALERTS <= CONCURRENCY, copies.most_common(3)
