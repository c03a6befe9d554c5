"""Subscriptions made over the web API (``/api/v1/subscriptions``), kept in the tenant's Redis beside
the file ones (``BUILDER_TELEMETRY_ALERTS_CONFIG``).

One hash per namespace (``Keys.notifier_subscriptions``: id -> JSON of a :class:`Stored`) and a
version counter every change bumps; each notifier replica polls the counter and reloads the hash
when it moved, so a subscription made or deleted over the API is used within ``poll_s`` without a
restart.  The webhook secret is stored so the notifier can sign; :func:`describe` is what the API
and the CLI show of it (its last four characters), never the secret itself.

The same checks as a file subscription (``config.py``) apply; ``secret_env`` is refused (the web
service cannot see the notifier's environment).  A file subscription with the same id wins: the
API one is then listed as ``shadowed`` and not used.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import msgspec

from buildtel.services.notifier.config import ID, ConfigError, Subscription, check_subscription
from buildtel.shared.keys import Keys

MAX_SUBSCRIPTIONS = 200  # per tenant: each one is tested against every alert


class Stored(msgspec.Struct, kw_only=True):
    """A subscription as Redis keeps it: the struct with its secret, who made it and when."""

    subscription: Subscription
    created_at: float
    created_by: str


_dec = msgspec.json.Decoder(Stored)


class StoreError(ValueError):
    """A subscription the API cannot take; ``status`` 400 (bad field) or 409 (the id is taken)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def prepare(sub: Subscription, tenant: str) -> tuple[Subscription, str | None]:
    """``sub`` checked as a file subscription is, scoped to ``tenant``; a webhook without a secret gets a
    new random one.  Returns the subscription (secret in it) and the secret the caller sees once, if new."""
    if not ID.match(sub.id):
        raise StoreError(f"id: {sub.id!r}: 1-64 letters, digits, '_' or '-'")
    if sub.secret_env:
        raise StoreError("secret_env: only a subscriptions file may name an environment variable; give secret, or "
                         "leave it out to get a new one")
    if sub.tenants and sub.tenants != [tenant]:
        raise StoreError(f"tenants: a subscription made with a key of tenant {tenant!r} is for that tenant only")
    made = None
    if sub.kind == "webhook" and not sub.secret:
        made = secrets.token_urlsafe(32)
        sub = msgspec.structs.replace(sub, secret=made)
    try:
        check_subscription(f"subscription {sub.id!r}", sub, {})
    except ConfigError as exc:
        raise StoreError(str(exc)) from None
    return msgspec.structs.replace(sub, tenants=[tenant]), made


async def add(redis: Any, keys: Keys, sub: Subscription, *, by: str, now: float) -> None:
    """Store ``sub`` (already :func:`prepare`-d); a taken id is a :class:`StoreError` with status 409."""
    if await redis.hlen(keys.notifier_subscriptions) >= MAX_SUBSCRIPTIONS:
        raise StoreError(f"the tenant has {MAX_SUBSCRIPTIONS} subscriptions already: delete one first", 409)
    data = msgspec.json.encode(Stored(subscription=sub, created_at=now, created_by=by))
    if not await redis.hsetnx(keys.notifier_subscriptions, sub.id, data):
        raise StoreError(f"a subscription {sub.id!r} exists already: delete it first", 409)
    await redis.incr(keys.notifier_subscriptions_version)


async def remove(redis: Any, keys: Keys, sub_id: str) -> bool:
    gone = bool(await redis.hdel(keys.notifier_subscriptions, sub_id))
    if gone:
        await redis.incr(keys.notifier_subscriptions_version)
    return gone


async def version(redis: Any, keys: Keys) -> int:
    return int(await redis.get(keys.notifier_subscriptions_version) or 0)


async def load_all(redis: Any, keys: Keys) -> tuple[list[Stored], list[str]]:
    """Every stored subscription, by id; an entry that no longer decodes is skipped and named in the
    second list (never a silent loss)."""
    out, bad = [], []
    for raw_id, raw in sorted((await redis.hgetall(keys.notifier_subscriptions)).items()):
        try:
            out.append(_dec.decode(raw))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            bad.append(f"{raw_id.decode(errors='replace')}: {exc}")
    return out, bad


def describe(st: Stored, *, shadowed: bool = False) -> dict[str, Any]:
    """What the API and the CLI show: the rules, the destination as a file subscription shows it, the
    secret's last four characters; never the secret or a Slack URL."""
    from buildtel.services.notifier.config import Loaded

    sub = st.subscription
    [d] = Loaded(subscriptions=(sub,)).describe()
    return {**d, "source": "api", "secret_hint": f"…{sub.secret[-4:]}" if sub.secret else None,
            "created_at": st.created_at, "created_by": st.created_by, "shadowed": shadowed}


def file_ids(path: Path | None) -> set[str]:
    """The ids of the subscriptions file, when this process can read it (else none)."""
    from buildtel.services.notifier.config import load

    try:
        return {s.id for s in load(path).subscriptions}
    except ConfigError:
        return set()
