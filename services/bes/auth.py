"""Who streams to the BES endpoint, for which tenant (docs/bazel.md#auth-and-tenants).

Bazel sends ``--bes_header=Authorization=Bearer <key>`` as gRPC metadata (``authorization``);
other clients may send ``x-buildtel-api-key: <key>``.  The key is one of the project's API keys
(``buildtel keys create --scope ingest``, ``shared/apikeys.py``): a live key of scope ``ingest``
(or ``admin``) maps the invocation to the key's tenant, whose namespace the events go to — the
stack's own or one of ``BUILDER_TELEMETRY_TENANTS``.  The service's token
(``BUILDER_TELEMETRY_HTTP_TOKEN``) is the stack's own namespace.  As the web API: with no key
and no token at all, a loopback endpoint is open (its own namespace); anything else without a
live key is refused with ``UNAUTHENTICATED``, and a non-loopback endpoint with neither keys nor a
token refuses to start (:class:`InsecureBind`).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from typing import Any

import grpc

from buildtel.shared import apikeys
from buildtel.shared.auth import is_loopback
from buildtel.shared.keys import Keys

HEADERS = ("authorization", "x-buildtel-api-key")


class InsecureBind(ValueError):
    """Refusing to take builds beyond loopback from anyone (no API key, no token)."""


class Refused(Exception):
    """A call this endpoint does not take: its gRPC status code and a message that says why."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message




def presented(metadata: Iterable[tuple[str, Any]] | None) -> str:
    """The key a call carries (``authorization: Bearer K`` or ``x-buildtel-api-key: K``), or ""."""
    for name, value in metadata or ():
        text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        if name.lower() == "authorization" and text[:7].lower() == "bearer ":
            return text[7:].strip()
        if name.lower() == "x-buildtel-api-key":
            return text.strip()
    return ""


class Gate:
    """Decides each call's tenant from its metadata (API keys in Redis, read on every call so a
    revoked key stops working at once)."""

    def __init__(self, redis: Any, keys: Keys, *, namespace: str, tenants: Iterable[str], host: str,
                 token: str = "") -> None:
        self.redis, self.keys, self.namespace, self.host, self.token = redis, keys, namespace, host, token
        self.served = frozenset([namespace, *tenants])

    async def check_bind(self) -> None:
        """Refuse to listen beyond loopback when nothing could authenticate a caller."""
        if is_loopback(self.host) or self.token or await apikeys.any_keys(self.redis, self.keys):
            return
        raise InsecureBind(
            f"the BES endpoint would listen on {self.host} with no API key and no token: anyone reaching it could "
            "write builds. Create a key ('buildtel keys create --scope ingest') or set BUILDER_TELEMETRY_HTTP_TOKEN, "
            "or bind loopback (BUILDER_TELEMETRY_HTTP_HOST=127.0.0.1)")

    async def tenant(self, metadata: Iterable[tuple[str, Any]] | None) -> str:
        """The namespace the call's events go to; raises :class:`Refused`."""
        given = presented(metadata)
        if self.token and given and hmac.compare_digest(given.encode(), self.token.encode()):
            return self.namespace
        try:
            keyed = await apikeys.any_keys(self.redis, self.keys)
            record = await apikeys.verify(self.redis, self.keys, given) if keyed and given else None
        except Exception as exc:  # noqa: BLE001 - Redis away: refuse (never open), say why; Bazel retries
            raise Refused(grpc.StatusCode.UNAVAILABLE, f"API keys cannot be checked: {type(exc).__name__}") from None
        if not keyed and not self.token and is_loopback(self.host):
            return self.namespace  # open on loopback while no key exists, as the web API
        if record is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED,
                          "missing, unknown or revoked API key (Bazel: --bes_header=Authorization=Bearer <key>)")
        if not apikeys.allows(record.scope, "ingest"):
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"key {record.id} has scope {record.scope!r}; streaming builds needs 'ingest' or 'admin'")
        if record.tenant not in self.served:
            raise Refused(grpc.StatusCode.PERMISSION_DENIED,
                          f"key {record.id} is for tenant {record.tenant!r}, which this stack does not serve "
                          "(BUILDER_TELEMETRY_TENANTS)")
        return record.tenant
