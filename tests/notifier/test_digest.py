"""A daily digest: the day's alerts held until the subscription's UTC hour, then one signed message
with them (a muted one left out).  The notifier's clock is moved to the hour, never waited for."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from buildtel.services.notifier.queue import digest_period
from buildtel.shared import alertstate
from buildtel.shared.keys import Keys
from tests.notifier.conftest import SECRET, eventually, make_alert, publish, webhook, write_config
from tests.notifier.test_delivery import documented_verify


def test_digest_period_is_the_next_send_hour() -> None:
    t = datetime(2026, 12, 7, 7, 59, tzinfo=UTC).timestamp()
    assert digest_period(t, 8) == ("2026-12-07", datetime(2026, 12, 7, 8, tzinfo=UTC).timestamp())
    assert digest_period(t + 60, 8) == ("2026-12-08", datetime(2026, 12, 8, 8, tzinfo=UTC).timestamp())


async def test_daily_digest_is_one_message_with_the_days_alerts(tmp_path, nc, settings, receiver, notifier,
                                                                redis_client) -> None:
    offset = [0.0]
    hour = (datetime.now(UTC).hour + 2) % 24
    config = write_config(tmp_path, webhook("daily", receiver, f'digest = "daily"\ndigest_hour = {hour}')
                          + webhook("each", receiver))
    svc = await notifier(config, clock=lambda: time.time() + offset[0])
    alerts = [make_alert(target=f"//d:t{i}") for i in range(3)]
    await publish(nc, settings.namespace, alerts)
    keys = Keys(settings.namespace)
    period, send_at = digest_period(time.time(), hour)
    await eventually(lambda: svc.routed == 3 and len(receiver.paths("each")) == 3, what="alerts routed")
    assert await redis_client.hlen(keys.notifier_digest("daily", period)) == 3
    assert receiver.paths("daily") == []  # held for the digest
    await alertstate.mute(redis_client, keys, alertstate.series_key("target", "main", "//d:t1"), seconds=3600,
                          by="t")
    offset[0] = send_at - time.time() + 1  # the digest hour has come
    await eventually(lambda: receiver.paths("daily"), what="the digest")
    [got] = receiver.paths("daily")
    body = json.loads(got.body)
    assert body["type"] == "digest" and body["period"] == period
    assert [i["alert"]["id"] for i in body["alerts"]] == [alerts[0].id, alerts[2].id]
    assert documented_verify()(SECRET.encode(), got.headers, got.body, now=int(got.headers["X-Buildtel-Timestamp"]))

    async def sent() -> bool:
        return not await redis_client.exists(keys.notifier_digest("daily", period)) and \
            not await redis_client.zcard(keys.notifier_digests) and not await redis_client.zcard(keys.notifier_due)

    await eventually(sent, what="digest sent and forgotten")
    assert len(receiver.paths("daily")) == 1
