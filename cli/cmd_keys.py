"""``buildtel keys create | list | revoke``: the web API's keys (``shared/apikeys.py``, docs/api.md).

Keys live in the stack's Redis (only their SHA-256 digests); ``create`` prints the key once, on
stdout, so it can be captured (``KEY=$(buildtel keys create …)``), and never again.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from buildtel.cli.common import resolve
from buildtel.cli.errors import CLIError
from buildtel.shared import apikeys
from buildtel.shared.keys import Keys
from buildtel.shared.settings import Settings


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    keys = sub.add_parser("keys", help="create, list or revoke API keys of the web API",
                          description="API keys of the web API (docs/api.md). A key reads one tenant (a namespace); "
                                      "once any key exists, every API request (but /healthz and "
                                      "/api/v1/openapi.json) needs one.")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="{create,list,revoke}")
    create = ksub.add_parser("create", help="create a key and print it once (stdout)")
    create.add_argument("--tenant", default=None,
                        help="namespace the key may read (default: BUILDER_TELEMETRY_NAMESPACE)")
    create.add_argument("--scope", choices=apikeys.SCOPES, default="read",
                        help="read: query the API; write: read, and acknowledge and mute alerts; ingest: send "
                             "builds (no HTTP ingest yet); admin: everything (default read)")
    create.add_argument("--name", default="", help="what the key is for (shown by 'keys list')")
    create.set_defaults(func=cmd_create)
    listing = ksub.add_parser("list", help="list keys: id, tenant, scope, created, name (never the key)")
    listing.add_argument("--json", action="store_true", help="one JSON object per key")
    listing.set_defaults(func=cmd_list)
    revoke = ksub.add_parser("revoke", help="revoke a key by its id; it stops working at once")
    revoke.add_argument("id", help="the key's id (from 'keys list', or the 12 hex digits after btk_)")
    revoke.set_defaults(func=cmd_revoke)


async def _with_redis(settings: Settings, fn: Any) -> Any:
    from buildtel.shared.bus import connect_redis

    settings = resolve(settings, autostart=False)
    r = connect_redis(settings.redis_url or "")
    try:
        return await fn(r, Keys(settings.namespace))
    except OSError as exc:
        raise CLIError(f"cannot reach Redis: {exc}") from None
    finally:
        await r.aclose()


async def cmd_create(args: argparse.Namespace, settings: Settings) -> int:
    tenant = args.tenant or settings.namespace
    try:
        key, record = await _with_redis(settings, lambda r, k: apikeys.create(r, k, tenant=tenant, scope=args.scope,
                                                                             name=args.name))
    except apikeys.ApiKeyError as exc:
        raise CLIError(str(exc)) from None
    print(key)
    print(f"buildtel: created key {record.id} ({record.scope}) for tenant {record.tenant}; it is shown only "
          "now. Send it as 'Authorization: Bearer <key>'.", file=sys.stderr)
    return 0


async def cmd_list(args: argparse.Namespace, settings: Settings) -> int:
    found = await _with_redis(settings, apikeys.list_keys)
    if args.json:
        from buildtel.cli.jsonout import emit

        for rec in found:
            emit(rec)
        return 0
    if not found:
        print("buildtel: no API keys: the web API is open on loopback only", file=sys.stderr)
        return 0
    print(f"{'ID':<12}  {'TENANT':<20}  {'SCOPE':<6}  {'CREATED':<16}  NAME")
    for rec in found:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(rec.created))
        print(f"{rec.id:<12}  {rec.tenant:<20}  {rec.scope:<6}  {when:<16}  {rec.name}")
    return 0


async def cmd_revoke(args: argparse.Namespace, settings: Settings) -> int:
    key_id = args.id.removeprefix(apikeys.PREFIX)[:12].lower()
    if not await _with_redis(settings, lambda r, k: apikeys.revoke(r, k, key_id)):
        raise CLIError(f"no API key has id {key_id!r} (see 'buildtel keys list')")
    print(f"buildtel: revoked key {key_id}", file=sys.stderr)
    return 0
