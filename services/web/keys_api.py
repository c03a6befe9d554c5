"""API keys over HTTP, for a tenant's admins: list, create, revoke (``/api/v1/keys``, admin scope).

The same records as ``buildtel keys`` (``shared/apikeys.py``: digests in Redis, never the key), but
seen from one tenant: an admin key of tenant T lists and revokes T's keys only, and creates keys for
T only; another tenant's key id answers 404, as its sessions do.  A new key is in the answer to its
``POST`` and nowhere else, ever.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from buildtel.services.web.base import BACKEND, CALLER, Forbidden, NotFound, json_response
from buildtel.services.web.query import BadInput, parse_body
from buildtel.services.web.schema import CreatedKey, KeyList, NewKey
from buildtel.shared import apikeys


def _service(request: web.Request) -> Any:
    if request[CALLER].who == "open":
        # An open API answers anyone on this machine: it must not hand out keys.  The first key
        # comes from `buildtel keys create`, which needs the stack's Redis password.
        raise Forbidden("keys are managed with an admin key (the first one: 'buildtel keys create --scope admin')")
    return request.app[BACKEND]


async def list_keys(request: web.Request) -> web.Response:
    svc, tenant = _service(request), request[CALLER].tenant
    found = await svc.redis_call(apikeys.list_keys(svc.redis, svc.keys))
    return json_response(KeyList(keys=[k for k in found if k.tenant == tenant]))


async def create_key(request: web.Request) -> web.Response:
    svc, caller = _service(request), request[CALLER]
    body = parse_body(await request.read(), NewKey)
    if body.tenant is not None and body.tenant != caller.tenant:
        raise Forbidden(f"an admin key of tenant {caller.tenant!r} creates keys for that tenant only")
    try:
        key, record = await apikeys.create(svc.redis, svc.keys, tenant=caller.tenant, scope=body.scope,
                                           name=body.name)
    except apikeys.ApiKeyError as exc:
        raise BadInput(str(exc)) from None
    svc.log.info("web.key_created", tenant=caller.tenant, key_id=record.id, scope=record.scope, by=caller.who)
    return json_response(CreatedKey(key=key, record=record), status=201)


async def revoke_key(request: web.Request) -> web.Response:
    svc, caller = _service(request), request[CALLER]
    key_id = request.match_info["id"]
    mine = {k.id for k in await svc.redis_call(apikeys.list_keys(svc.redis, svc.keys)) if k.tenant == caller.tenant}
    if key_id not in mine or not await svc.redis_call(apikeys.revoke(svc.redis, svc.keys, key_id)):
        raise NotFound(f"tenant {caller.tenant!r} has no key {key_id[:40]!r}")
    svc.log.info("web.key_revoked", tenant=caller.tenant, key_id=key_id, by=caller.who)
    return web.Response(status=204)


def register(app: web.Application) -> None:
    app.router.add_get("/api/v1/keys", list_keys)
    app.router.add_post("/api/v1/keys", create_key)
    app.router.add_delete("/api/v1/keys/{id}", revoke_key)
