"""Alert subscriptions over HTTP (``/api/v1/subscriptions``): list (read scope), create and delete
(admin scope), for the caller's tenant.

Made ones are kept in the tenant's Redis (``services/notifier/stored.py``), where every notifier
replica picks them up within its ``poll_s``; the list also shows the subscriptions file's
(``BUILDER_TELEMETRY_ALERTS_CONFIG``, ``source: "file"``) when this process can read it.  A webhook's
secret is in the answer to its ``POST`` only when the service made it up, and never after: lists show
its last four characters.  An open API (loopback, no key yet) makes no subscriptions, as it makes no
keys: a subscription sends alert data to a URL of the caller's choice.
"""

from __future__ import annotations

import time
from typing import Any

import msgspec
from aiohttp import web

from buildtel.services.notifier import stored
from buildtel.services.notifier.config import ConfigError, Subscription, load
from buildtel.services.web.base import BACKEND, CALLER, Conflict, Forbidden, NotFound, Unavailable, json_response
from buildtel.services.web.query import BadInput, parse_body
from buildtel.services.web.schema import CreatedSubscription, SubscriptionInfo, SubscriptionList
from buildtel.shared.keys import Keys


def _file(svc: Any, tenant: str) -> tuple[list[SubscriptionInfo], set[str], list[str]]:
    """The subscriptions file's entries for ``tenant``, all its ids, and a note when it cannot be read."""
    path = svc.settings.alerts_config
    if path is None:
        return [], set(), []
    try:
        loaded = load(path)
    except ConfigError as exc:
        return [], set(), [f"the subscriptions file cannot be read here: {exc}"]
    ids = {s.id for s in loaded.subscriptions}
    mine = {s.id for s in loaded.for_tenant(tenant)}
    rows = [msgspec.convert({**d, "source": "file"}, SubscriptionInfo) for d in loaded.describe() if d["id"] in mine]
    return rows, ids, []


async def list_subscriptions(request: web.Request) -> web.Response:
    svc, tenant = request.app[BACKEND], request[CALLER].tenant
    rows, taken, notes = _file(svc, tenant)
    found, bad = await svc.redis_call(stored.load_all(svc.redis, Keys(tenant)))  # type: ignore[attr-defined]
    notes += [f"a stored subscription cannot be read and is not used: {b[:200]}" for b in bad]
    rows += [msgspec.convert(stored.describe(st, shadowed=st.subscription.id in taken), SubscriptionInfo)
             for st in found]
    return json_response(SubscriptionList(subscriptions=rows, notes=notes))


async def create_subscription(request: web.Request) -> web.Response:
    svc, caller = request.app[BACKEND], request[CALLER]
    if caller.who == "open":
        raise Forbidden("subscriptions are made with an admin key (the first one: "
                        "'buildtel keys create --scope admin'), or in the subscriptions file")
    body = parse_body(await request.read(), Subscription)
    _, taken, _ = _file(svc, caller.tenant)
    if body.id in taken:
        raise Conflict(f"the subscriptions file has a subscription {body.id!r}: choose another id")
    try:
        sub, made = stored.prepare(body, caller.tenant)
        await stored.add(svc.redis, Keys(caller.tenant), sub, by=caller.who, now=time.time())  # type: ignore[attr-defined]
    except stored.StoreError as exc:
        raise (Conflict if exc.status == 409 else BadInput)(str(exc)) from None
    except Exception as exc:  # noqa: BLE001 - Redis away: the client learns it, the service goes on
        raise Unavailable(f"Redis did not answer: {type(exc).__name__}") from None
    svc.log.info("web.subscription_created", tenant=caller.tenant, subscription=sub.id, kind=sub.kind,  # type: ignore[attr-defined]
                 by=caller.who)
    st = stored.Stored(subscription=sub, created_at=time.time(), created_by=caller.who)
    info = msgspec.convert(stored.describe(st), SubscriptionInfo)
    return json_response(CreatedSubscription(subscription=info, secret=made), status=201)


async def delete_subscription(request: web.Request) -> web.Response:
    svc, caller = request.app[BACKEND], request[CALLER]
    sub_id = request.match_info["id"]
    if not await svc.redis_call(stored.remove(svc.redis, Keys(caller.tenant), sub_id)):  # type: ignore[attr-defined]
        raise NotFound(f"tenant {caller.tenant!r} has no subscription {sub_id[:64]!r} made over the API "
                       "(file subscriptions are removed from the file)")
    svc.log.info("web.subscription_deleted", tenant=caller.tenant, subscription=sub_id, by=caller.who)  # type: ignore[attr-defined]
    return web.Response(status=204)


def register(app: web.Application) -> None:
    app.router.add_get("/api/v1/subscriptions", list_subscriptions)
    app.router.add_post("/api/v1/subscriptions", create_subscription)
    app.router.add_delete("/api/v1/subscriptions/{id}", delete_subscription)
