"""Subscriptions made over the web API (kept in Redis, ``services/notifier/stored.py``) are used by a
running notifier beside the file's, without a restart: signed with their own secret, dropped when
deleted, never shadowing a file subscription of the same id; ``buildtel alerts subscriptions`` lists
both sources and no secret."""

from __future__ import annotations

import json
import time

import pytest

from buildtel.services.notifier import stored
from buildtel.services.notifier.config import Subscription
from buildtel.shared.keys import Keys
from tests.notifier.conftest import SECRET, eventually, make_alert, publish, webhook, write_config
from tests.notifier.test_cli import _cli
from tests.notifier.test_delivery import documented_verify

API_SECRET = "api-secret-for-tests-0123"


async def _add(redis, ns: str, sub: Subscription) -> str | None:
    prepared, made = stored.prepare(sub, ns)
    await stored.add(redis, Keys(ns), prepared, by="test", now=time.time())
    return made


async def test_an_api_subscription_is_used_without_a_restart_and_dropped_when_deleted(
        tmp_path, nc, settings, receiver, notifier, redis_client) -> None:
    svc = await notifier(write_config(tmp_path, webhook("filehook", receiver)))
    assert [s.id for s in svc.subscriptions] == ["filehook"]
    await _add(redis_client, settings.namespace, Subscription(id="apihook", kind="webhook", url=receiver.url("apihook"),
                                                              secret=API_SECRET, direction="regression"))
    await eventually(lambda: [s.id for s in svc.subscriptions] == ["filehook", "apihook"], what="reloaded")
    first = make_alert(target="//app:one")
    await publish(nc, settings.namespace, [first, make_alert(target="//app:two", direction="improvement")])
    await eventually(lambda: len(receiver.paths("filehook")) == 2 and len(receiver.paths("apihook")) == 1,
                     what="deliveries to both sources")
    verify = documented_verify()
    [got] = receiver.paths("apihook")
    assert verify(API_SECRET.encode(), got.headers, got.body) and not verify(SECRET.encode(), got.headers, got.body)
    assert json.loads(got.body)["alerts"][0]["alert"]["id"] == first.id  # its routing rule held

    assert await stored.remove(redis_client, Keys(settings.namespace), "apihook")
    await eventually(lambda: [s.id for s in svc.subscriptions] == ["filehook"], what="deletion picked up")
    await publish(nc, settings.namespace, [make_alert(target="//app:three")])
    await eventually(lambda: len(receiver.paths("filehook")) == 3, what="the file's delivery")
    assert len(receiver.paths("apihook")) == 1


async def test_a_file_subscription_wins_over_an_api_one_of_the_same_id(tmp_path, nc, settings, receiver, notifier,
                                                                      redis_client) -> None:
    svc = await notifier(write_config(tmp_path, webhook("hook", receiver)))
    await _add(redis_client, settings.namespace, Subscription(id="hook", kind="webhook", url=receiver.url("elsewhere"),
                                                              secret=API_SECRET))
    await eventually(lambda: svc.api_subs, what="reloaded")
    await publish(nc, settings.namespace, [make_alert()])
    await eventually(lambda: len(receiver.paths("hook")) == 1, what="the file's delivery")
    assert documented_verify()(SECRET.encode(), receiver.got[0].headers, receiver.got[0].body)
    assert not receiver.paths("elsewhere")


def test_api_subscriptions_are_checked_like_file_ones_and_scoped_to_the_tenant() -> None:
    sub, made = stored.prepare(Subscription(id="h", kind="webhook", url="https://ci.example.com/x"), "team")
    assert made and len(made) >= 40 and sub.secret == made and sub.tenants == ["team"]
    for bad, why in ((Subscription(id="h", kind="webhook", url="ftp://x", secret="s"), "url"),
                     (Subscription(id="h", kind="webhook", url="https://x", secret_env="HOME"), "secret_env"),
                     (Subscription(id="h", kind="nats", subject="a.*"), "subject"),
                     (Subscription(id="h", kind="slack", url="https://x", tenants=["other"]), "tenants"),
                     (Subscription(id="h h", kind="slack", url="https://x"), "id"),
                     (Subscription(id="h", kind="slack", url="https://x", min_confidence=2), "min_confidence")):
        with pytest.raises(stored.StoreError, match=why):
            stored.prepare(bad, "team")


async def test_cli_lists_both_sources_and_no_secret(tmp_path, settings, redis_client) -> None:
    config = write_config(tmp_path, f'[[subscription]]\nid = "filehook"\nkind = "webhook"\n'
                                    f'url = "https://ci.example.com/h"\nsecret = "{SECRET}"\n')
    await _add(redis_client, settings.namespace, Subscription(id="apihook", kind="webhook",
                                                              url="https://hooks.example.org/p?token=tok",
                                                              secret=API_SECRET))
    await _add(redis_client, settings.namespace, Subscription(id="filehook", kind="nats", subject="x"))
    rc, out, err = await _cli(settings, "alerts", "subscriptions", config=config)
    assert rc == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["ID", "KIND", "DESTINATION"] and "SOURCE" in lines[0]
    rows = {(line.split()[0], line.split()[7]) for line in lines[1:]}
    assert rows == {("filehook", "file"), ("apihook", "api"), ("filehook", "api(shadowed)")}
    rc, js, _ = await _cli(settings, "alerts", "subscriptions", "--json", config=config)
    api = next(json.loads(x) for x in js.splitlines() if json.loads(x)["id"] == "apihook")
    assert api["source"] == "api" and api["secret_hint"] == "…" + API_SECRET[-4:] and api["created_by"] == "test"
    for text in (out, err, js):
        assert SECRET not in text and API_SECRET not in text and "tok" not in text
    # Without a file, the API's are still listed.
    rc, out, err = await _cli(settings, "alerts", "subscriptions")
    assert rc == 0 and "apihook" in out and "filehook" in out
