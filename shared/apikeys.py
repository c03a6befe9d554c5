"""API keys of the web API: created, listed and revoked by ``buildtel keys``, checked by the web
service on every request (``docs/api.md``).

A key is ``btk_<id>_<secret>``: ``id`` (12 hex digits) names it in lists and revocations, the
secret is 32 random bytes (``secrets.token_urlsafe``).  Redis keeps only the SHA-256 digest of the
whole key (a slow password hash buys nothing against 256 bits of entropy), its tenant (a namespace)
and scope; the key itself is shown once, at creation, and never logged.  A presented key is found
by its id and its digest compared in constant time.  The records live under the namespace of the
stack that serves the API (``Keys.api_key``), whatever tenant a key is for.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from typing import Any, Literal

import msgspec

from buildtel.shared.keys import Keys

Scope = Literal["read", "write", "ingest", "admin"]
SCOPES: tuple[str, ...] = ("read", "write", "ingest", "admin")
PREFIX = "btk_"
_FORM = re.compile(r"btk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
_TENANT = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ApiKey(msgspec.Struct, kw_only=True):
    """What is known of a key (never the key itself)."""

    id: str
    tenant: str
    scope: Scope
    name: str = ""
    created: float = 0.0


class ApiKeyError(ValueError):
    """A key request that cannot be done (bad tenant or scope, unknown id)."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def allows(scope: str, needed: Scope) -> bool:
    """``admin`` may do everything; ``write`` reads and changes what people decide about the data
    (acknowledge and mute alerts); ``read`` and ``ingest`` only what they name."""
    return scope == "admin" or scope == needed or (scope == "write" and needed == "read")


async def create(redis: Any, keys: Keys, *, tenant: str, scope: str, name: str = "") -> tuple[str, ApiKey]:
    """A new key for ``tenant`` with ``scope``: (the key, to show once; its record)."""
    if not _TENANT.fullmatch(tenant):
        raise ApiKeyError(f"tenant {tenant!r} is not a namespace (letters, digits, '-' and '_')")
    if scope not in SCOPES:
        raise ApiKeyError(f"scope {scope!r}: choose from {', '.join(SCOPES)}")
    key_id = secrets.token_hex(6)
    key = f"{PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    record = ApiKey(id=key_id, tenant=tenant, scope=scope, name=name[:200], created=time.time())  # type: ignore[arg-type]
    # Two keys in two slots on a Redis Cluster, so no MULTI: the record first, then its listing.  A
    # failure between leaves a record nobody was given the key of (create raised), never a listed
    # id without its record.
    await redis.hset(keys.api_key(key_id), mapping={"digest": digest(key), "tenant": tenant, "scope": scope,
                                                     "name": record.name, "created": repr(record.created)})
    await redis.sadd(keys.api_key_ids, key_id)
    return key, record


def _record(key_id: str, raw: dict[bytes, bytes]) -> ApiKey:
    return ApiKey(id=key_id, tenant=raw[b"tenant"].decode(), scope=raw[b"scope"].decode(),  # type: ignore[arg-type]
                  name=raw.get(b"name", b"").decode(), created=float(raw.get(b"created", b"0")))


async def list_keys(redis: Any, keys: Keys) -> list[ApiKey]:
    out = []
    for raw_id in sorted(await redis.smembers(keys.api_key_ids)):
        key_id = raw_id.decode()
        raw = await redis.hgetall(keys.api_key(key_id))
        if raw:
            out.append(_record(key_id, raw))
    return sorted(out, key=lambda k: k.created)


async def revoke(redis: Any, keys: Keys, key_id: str) -> bool:
    """Remove the key; False when no key has that id."""
    # The record first (no MULTI: two slots on a Redis Cluster): once it is gone the key no longer
    # verifies, whatever happens to the listing after.
    deleted = await redis.delete(keys.api_key(key_id))
    await redis.srem(keys.api_key_ids, key_id)
    return bool(deleted)


async def any_keys(redis: Any, keys: Keys) -> bool:
    return bool(await redis.scard(keys.api_key_ids))


async def verify(redis: Any, keys: Keys, presented: str) -> ApiKey | None:
    """The record of ``presented`` when it is a live key, else None (malformed, unknown, revoked)."""
    m = _FORM.fullmatch(presented)
    if m is None:
        return None
    raw = await redis.hgetall(keys.api_key(m.group(1)))
    stored = raw.get(b"digest", b"").decode() if raw else ""
    # Constant time: how long the comparison takes says nothing about the stored digest.
    if not stored or not hmac.compare_digest(stored, digest(presented)):
        return None
    return _record(m.group(1), raw)


async def over_limit(redis: Any, keys: Keys, key_id: str, per_minute: int, now: float | None = None) -> float | None:
    """Count one request of ``key_id``; seconds until it may ask again when past ``per_minute``
    in this minute (a fixed window, shared by every web replica through Redis), else None."""
    now = time.time() if now is None else now
    window = int(now // 60)
    counter = keys.api_key_rate(key_id, window)
    async with redis.pipeline(transaction=True) as pipe:
        pipe.incr(counter)
        pipe.expire(counter, 120)
        count, _ = await pipe.execute()
    if int(count) <= per_minute:
        return None
    return max(1.0, (window + 1) * 60 - now)
