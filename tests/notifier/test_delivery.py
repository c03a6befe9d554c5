"""The notifier delivers each alert to the subscriptions that want it: signed webhooks a receiver
can verify (and tell a replay by), Slack messages, NATS republishing, routing rules, mutes and
acknowledgements, retries through a receiver outage, dead letters past the retry budget."""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from buildtel.shared import alertstate
from buildtel.shared.bus import dead_letter_decoder
from buildtel.shared.keys import Keys
from buildtel.shared.subjects import Subjects
from tests.notifier.conftest import SECRET, eventually, make_alert, publish, webhook, write_config

ROOT = Path(__file__).resolve().parents[2]


def documented_verify() -> Any:
    """The Python snippet of docs/alerts.md "Verifying a delivery", as a receiver would paste it."""
    doc = (ROOT / "docs" / "alerts.md").read_text()
    section = doc.split("## Verifying a delivery", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]
    scope: dict[str, Any] = {}
    exec(code, scope)
    return scope["verify"]


def documented_shell() -> str:
    section = (ROOT / "docs" / "alerts.md").read_text().split("## Verifying a delivery", 1)[1]
    return re.search(r"```sh\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


async def test_signed_deliveries_verify_and_a_replay_is_detectable(tmp_path, nc, settings, receiver,
                                                                   notifier) -> None:
    await notifier(write_config(tmp_path, webhook("hook", receiver)))
    alerts = [make_alert(target=f"//app:t{i}") for i in range(3)]
    await publish(nc, settings.namespace, alerts)
    await eventually(lambda: len(receiver.got) == 3, what="three deliveries")
    verify = documented_verify()
    ids = set()
    for got in receiver.got:
        assert verify(SECRET.encode(), got.headers, got.body)
        body = json.loads(got.body)
        assert body["type"] == "alert" and body["subscription"] == "hook" and body["tenant"] == settings.namespace
        assert body["delivery"] == got.headers["X-Buildtel-Delivery"]
        assert body["alerts"][0]["state"]["status"] == "open"
        ids.add(body["alerts"][0]["alert"]["id"])
        # A replay: the same signed bytes an hour later fail the documented freshness check.
        assert not verify(SECRET.encode(), got.headers, got.body, now=int(got.headers["X-Buildtel-Timestamp"]) + 3600)
        # Tampered body or wrong secret: refused.
        assert not verify(SECRET.encode(), got.headers, got.body.replace(b"regression", b"improvement"))
        assert not verify(b"other", got.headers, got.body)
    assert ids == {a.id for a in alerts}
    assert len({g.headers["X-Buildtel-Delivery"] for g in receiver.got}) == 3
    if shutil.which("openssl"):  # the shell snippet gives the same signature
        got = receiver.got[0]
        (tmp_path / "body.json").write_bytes(got.body)
        out = subprocess.run(["bash", "-c", documented_shell()], cwd=tmp_path, capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "TS": got.headers["X-Buildtel-Timestamp"],
                                  "SECRET": SECRET}, check=True).stdout.strip()
        assert out == got.headers["X-Buildtel-Signature"]


async def test_routing_rules_select_the_subscriptions(tmp_path, nc, settings, receiver, notifier,
                                                      redis_client) -> None:
    subs = (webhook("rel", receiver, 'branches = ["release/*"]')
            + webhook("app", receiver, 'targets = ["//app/*"]\nkinds = ["target"]')
            + webhook("big-builds", receiver, 'kinds = ["build", "host"]\nmin_change_pct = 20')
            + webhook("wins", receiver, 'direction = "improvement"\nmin_confidence = 0.9')
            + webhook("elsewhere", receiver, 'tenants = ["another-tenant"]'))
    svc = await notifier(write_config(tmp_path, subs))
    a1 = make_alert(target="//app/x:lib")
    a2 = make_alert(kind="build", branch="release/1.0", pct=30)
    a3 = make_alert(kind="build", branch="main", pct=10)
    a4 = make_alert(target="//lib:x", branch="release/2", direction="improvement", pct=-50, confidence=0.95)
    a5 = make_alert(target="//app/y:bin", branch="dev", direction="improvement", pct=-30, confidence=0.5)
    await publish(nc, settings.namespace, [a1, a2, a3, a4, a5])
    keys = Keys(settings.namespace)
    await eventually(lambda: svc.routed == 5, what="all alerts routed")
    await eventually(lambda: len(receiver.got) == 6, what="six deliveries")
    await eventually(_empty(redis_client, keys), what="queue drained")
    got = {(g.path, json.loads(g.body)["alerts"][0]["alert"]["id"]) for g in receiver.got}
    assert got == {("app", a1.id), ("rel", a2.id), ("big-builds", a2.id), ("rel", a4.id), ("wins", a4.id),
                   ("app", a5.id)}
    assert len(receiver.got) == 6


def _empty(redis_client: Any, keys: Keys) -> Any:
    async def check() -> bool:
        return not await redis_client.zcard(keys.notifier_due) and not await redis_client.hlen(keys.notifier_jobs)
    return check


async def test_muted_and_acknowledged_alerts_are_not_delivered(tmp_path, nc, settings, receiver, notifier,
                                                               redis_client) -> None:
    keys = Keys(settings.namespace)
    muted, acked, control = make_alert(target="//m:x"), make_alert(target="//a:x"), make_alert(target="//c:x")
    await alertstate.mute(redis_client, keys, alertstate.series_key("target", "main", "//m:x"), seconds=3600, by="t")
    await alertstate.acknowledge(redis_client, keys, acked.id, by="t")
    svc = await notifier(write_config(tmp_path, webhook("hook", receiver)))
    await publish(nc, settings.namespace, [muted, acked, control])
    await eventually(lambda: svc.results["suppressed"] == 2 and len(receiver.got) == 1, what="two suppressed")
    await eventually(_empty(redis_client, keys), what="queue drained")
    assert json.loads(receiver.got[0].body)["alerts"][0]["alert"]["id"] == control.id
    assert (await svc.metrics())["deliveries_suppressed_total"] == 2


async def test_a_receiver_down_for_a_while_gets_each_alert_once(tmp_path, nc, settings, receiver, notifier,
                                                                redis_client) -> None:
    receiver.mode = "503"
    svc = await notifier(write_config(tmp_path, webhook("hook", receiver)))
    alerts = [make_alert(target=f"//down:t{i}") for i in range(10)]
    await publish(nc, settings.namespace, alerts)
    await eventually(lambda: receiver.refused >= 20, what="503s answered")
    await receiver.stop()  # now connections are refused
    failed = svc.results["failed"]
    await eventually(lambda: svc.results["failed"] >= failed + 20, what="refused connections retried")
    receiver.mode = "up"
    await receiver.start()
    await eventually(lambda: len(receiver.got) == 10, what="every alert delivered")
    await eventually(_empty(redis_client, Keys(settings.namespace)), what="queue drained")
    assert sorted(json.loads(g.body)["alerts"][0]["alert"]["id"] for g in receiver.got) == sorted(a.id for a in alerts)
    assert len(receiver.got) == 10 and svc.retries >= 20 and svc.results["dead"] == 0


async def test_past_the_retry_budget_a_dead_letter_says_why(tmp_path, nc, settings, receiver, notifier,
                                                            redis_client) -> None:
    letters: list[Any] = []
    sub = await nc.subscribe(Subjects(settings.namespace).dead_letter("notifier"),
                             cb=functools.partial(_append, letters))
    receiver.mode = "503"
    config = write_config(tmp_path, webhook("down", receiver), retry_for_s=1.0)
    svc = await notifier(config)
    alert = make_alert()
    await publish(nc, settings.namespace, [alert])
    await eventually(lambda: letters, what="a dead letter")
    letter = dead_letter_decoder.decode(letters[0].data)
    assert letter.service == "notifier" and "HTTP 503" in letter.reason and "retry_for_s" in letter.reason
    assert letter.headers["Buildtel-Reason-Code"] == "retries_exhausted"
    assert letter.headers["Buildtel-Subscription"] == "down"
    assert [a["id"] for a in msgspec.json.decode(letter.data)] == [alert.id]
    assert receiver.url("down") not in letter.reason and SECRET not in letter.reason
    assert receiver.refused >= 2 and svc.results["dead"] == 1
    # A 4xx is final at once: dead-lettered without waiting out the budget.
    receiver.mode = "400"
    await publish(nc, settings.namespace, [make_alert(target="//other:x")])
    await eventually(lambda: len(letters) == 2, what="a second dead letter")
    second = dead_letter_decoder.decode(letters[1].data)
    assert second.headers["Buildtel-Reason-Code"] == "refused" and "HTTP 400" in second.reason
    assert int(await redis_client.get(Keys(settings.namespace).dead_letters("notifier"))) == 2
    assert (await svc.metrics())["dead_letters_total"] == 2
    await sub.unsubscribe()


async def _append(out: list[Any], msg: Any) -> None:
    out.append(msg)


async def test_slack_message_shape(tmp_path, nc, settings, receiver, notifier) -> None:
    config = write_config(tmp_path, f'[[subscription]]\nid = "chat"\nkind = "slack"\nurl = "{receiver.url("chat")}"\n')
    await notifier(config, settings={"web_url": "https://dash.example/"})
    alert = make_alert(target="//app:<weird>&")
    await publish(nc, settings.namespace, [alert])
    await eventually(lambda: receiver.got, what="a Slack message")
    msg = json.loads(receiver.got[0].body)
    assert "X-Buildtel-Signature" not in receiver.got[0].headers  # no secret set: unsigned
    assert msg["text"].startswith("Regression: target //app:&lt;weird&gt;&amp; (miss) on branch main")
    assert "+40.0%" in msg["text"]
    sections = [b["text"]["text"] for b in msg["blocks"] if b["type"] == "section"]
    assert len(sections) == 1
    compare = f"https://dash.example/compare/{alert.last_good_session_id}/{alert.first_session_id}"
    assert f"<{compare}|compare the builds>" in sections[0]
    assert "<https://dash.example/alerts?target=%2F%2Fapp%3A%3Cweird%3E%26|alerts>" in sections[0]
    assert "commits `a1b2c3..d4e5f6`" in sections[0] and "confidence 0.99" in sections[0]
    assert msg["blocks"][-1]["type"] == "context"
    assert msg["attachments"][0]["color"] == "#d33" and msg["attachments"][0]["fallback"] == msg["text"]


async def test_nats_subscription_republishes_under_the_namespace(tmp_path, nc, settings, notifier) -> None:
    got: list[Any] = []
    sub = await nc.subscribe(Subjects(settings.namespace).notify("farm.alerts"), cb=functools.partial(_append, got))
    config = write_config(tmp_path, f'[[subscription]]\nid = "bus"\nkind = "nats"\nsubject = "farm.alerts"\n'
                                    f'secret = "{SECRET}"\n')
    await notifier(config)
    alert = make_alert()
    await publish(nc, settings.namespace, [alert])
    await eventually(lambda: got, what="a republished alert")
    body = json.loads(got[0].data)
    assert body["alerts"][0]["alert"]["id"] == alert.id
    headers = dict(got[0].headers)
    assert headers["X-Buildtel-Delivery"] == body["delivery"]
    assert documented_verify()(SECRET.encode(), headers, got[0].data, now=time.time())
    await sub.unsubscribe()


@pytest.mark.parametrize("age_s", [2 * 86_400.0])
async def test_alerts_older_than_max_age_are_not_delivered(tmp_path, nc, settings, receiver, notifier,
                                                           age_s) -> None:
    svc = await notifier(write_config(tmp_path, webhook("hook", receiver)))
    await publish(nc, settings.namespace, [make_alert(detected_at=time.time() - age_s), make_alert(target="//n:x")])
    await eventually(lambda: svc.stale == 1 and len(receiver.got) == 1, what="one stale, one delivered")
