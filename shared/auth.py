"""Credentials and least-privilege roles on the bus.

Every process that talks to NATS does so as one **role** — ``agent``, one per
service, ``reader`` or ``operator`` — and each role may publish and subscribe only
to the subjects it needs (the table is :func:`role_permissions`, documented in
``docs/protocol.md``).  The embedded stack generates a fresh password per role
(:meth:`StackAuth.generate`) and a Redis password; they live in ``stack.json``
(mode 0600) and in the engines' 0600 configuration files, never in process
arguments.  Clients find them where they find the URLs: ``read_stack``.

A farm that runs its own NATS uses the same roles: :func:`nats_authorization`
renders the ``authorization`` block of a nats-server configuration for them.

Each role also has its own reply-inbox prefix (``_INBOX.<role>``), so that a role
allowed to receive replies can receive only its own: an agent cannot read the
replies storage sends to a dashboard.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

ROLES: tuple[str, ...] = ("agent", "collector", "storage", "analyzer", "tracer", "recorder", "notifier", "web",
                          "reader", "operator", "bes")
SERVICE_ROLES: tuple[str, ...] = ("collector", "storage", "analyzer", "tracer", "recorder", "notifier", "web", "bes")


class AuthError(ValueError):
    """A role or credential could not be used; the message says which."""


def inbox_prefix(role: str) -> str:
    """Where replies to ``role`` arrive; each role may subscribe only to its own."""
    return f"_INBOX.{role}"


@dataclass(frozen=True, slots=True)
class StackAuth:
    """One password per NATS role (user name = role name) and the Redis password of one stack."""

    nats: tuple[tuple[str, str], ...]
    redis_password: str = ""

    @classmethod
    def generate(cls) -> StackAuth:
        return cls(nats=tuple((role, secrets.token_urlsafe(24)) for role in ROLES),
                   redis_password=secrets.token_urlsafe(24))

    def password(self, role: str) -> str:
        for name, pw in self.nats:
            if name == role:
                return pw
        raise AuthError(f"no NATS credentials for role {role!r} (roles: {', '.join(n for n, _ in self.nats)})")

    def only(self, *roles: str) -> StackAuth:
        """The same stack's credentials for fewer roles (what an agent machine is handed)."""
        return StackAuth(nats=tuple((n, p) for n, p in self.nats if n in roles), redis_password="")

    def to_json(self) -> dict[str, object]:
        return {"nats": dict(self.nats), "redis_password": self.redis_password}

    @classmethod
    def from_json(cls, data: object) -> StackAuth:
        if not isinstance(data, dict) or not isinstance(data.get("nats"), dict):
            raise AuthError("credentials: expected {'nats': {role: password}, 'redis_password': ...}")
        nats = tuple((str(k), str(v)) for k, v in data["nats"].items())
        return cls(nats=nats, redis_password=str(data.get("redis_password") or ""))


def _stream(ns: str, suffix: str) -> str:
    # The one stream-name rule; "*" (any namespace) stays a one-token wildcard.
    from buildtel.shared.subjects import stream_name

    return stream_name(ns, suffix)


def _declare(stream: str) -> list[str]:
    return [f"$JS.API.STREAM.CREATE.{stream}", f"$JS.API.STREAM.UPDATE.{stream}", f"$JS.API.STREAM.INFO.{stream}"]


def _consume(stream: str) -> list[str]:
    """Publish rights to read a stream through consumers: create/inspect them, fetch, ack, and
    fetch one message by sequence (the poison-message dead letter)."""
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.API.CONSUMER.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.>",
        f"$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
        f"$JS.API.CONSUMER.DELETE.{stream}.>",
        f"$JS.API.STREAM.MSG.GET.{stream}",
        f"$JS.ACK.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def _follow(stream: str) -> list[str]:
    """Publish rights to follow a stream through ordered consumers only: create ephemeral ones
    (the one create subject that names no consumer, so no durable of another service can be
    created, changed or deleted), inspect them and answer flow control.  No acks, no fetches:
    nothing another service's consumer relies on can be touched."""
    return [
        f"$JS.API.STREAM.INFO.{stream}",
        f"$JS.API.CONSUMER.INFO.{stream}.>",
        f"$JS.API.CONSUMER.CREATE.{stream}",
        f"$JS.FC.{stream}.>",
    ]


def _bucket(ns: str) -> tuple[str, str]:
    """(bucket, its stream) of the sessions over one message (shared/bigmsg.py); ``*`` for any namespace."""
    if ns == "*":
        return "*", "*"
    bucket = _stream(ns, "SESSION_OBJECTS")
    return bucket, f"OBJ_{bucket}"


def _object_read(ns: str) -> list[str]:
    """Read objects of the bucket: direct gets only (its meta by subject, its chunks by sequence)."""
    stream = _bucket(ns)[1]
    return [f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>"]


def _object_write(ns: str) -> list[str]:
    """Write objects: publish chunks and meta, and read (an object already there is not rewritten)."""
    bucket = _bucket(ns)[0]
    return [f"$O.{bucket}.C.>", f"$O.{bucket}.M.>", *_object_read(ns)]


def _logs(ns: str) -> tuple[str, str]:
    """(bucket, its stream) of the builds' console logs (shared/logstore.py)."""
    if ns == "*":
        return "*", "*"
    bucket = _stream(ns, "BUILD_LOGS")
    return bucket, f"OBJ_{bucket}"


def _log_read(ns: str) -> list[str]:
    stream = _logs(ns)[1]
    return [f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>"]


def _log_write(ns: str) -> list[str]:
    """An agent writes its build's log: chunks and meta, publish only."""
    bucket = _logs(ns)[0]
    return [f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"]


def _advisories(stream: str) -> list[str]:
    return [f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{stream}.>"]


def role_permissions(role: str, ns: str) -> dict[str, object]:
    """``{"publish": [...], "subscribe": [...], "allow_responses": bool}`` of ``role`` in namespace
    ``ns`` (``"*"``: every namespace, for a shared test server)."""
    ev, se, dl, al, sp = (_stream(ns, s) for s in ("EVENTS", "SESSIONS", "DEADLETTER", "ALERTS", "SPANS"))
    base_streams = [ev, se, dl, _bucket(ns)[1], _logs(ns)[1]]  # every service declares them (shared/bus.py)
    lookup = ["$JS.API.INFO", "$JS.API.STREAM.NAMES"]
    inbox = [f"{inbox_prefix(role)}.>"]
    storage_q, analyzer_q, traces_q = f"{ns}.storage.>", f"{ns}.analyzer.>", f"{ns}.traces.>"
    # The recorder's read endpoints one by one (services/recorder/api.py ENDPOINTS), not its whole
    # prefix: a later endpoint that changes recordings is not granted by this.
    recorder_q = [f"{ns}.recorder.{ep}" for ep in ("list", "get", "events", "diff")]
    micro_sub = ["$SRV.>"]

    def service(own: list[str], declare: list[str], consume: list[str], sub: list[str]) -> dict[str, object]:
        pub = [*own, f"{ns}.deadletter.{role}", *lookup]
        for s in declare:
            pub += _declare(s)
        subs = inbox + sub
        for s in consume:
            pub += _consume(s)
            subs += _advisories(s)
        return {"publish": _dedupe(pub), "subscribe": _dedupe(subs), "allow_responses": True}

    match role:
        case "agent":
            # Publish events, live health and tool spans; JetStream's publish acks come back to the
            # agent's own inbox.  No stream management, no reading.
            return {"publish": [f"{ns}.events.>", f"{ns}.health.>", f"{ns}.spans", *_log_write(ns)],
                    "subscribe": inbox, "allow_responses": False}
        case "collector":
            # sessions.completed.<id>: the partitioned form (storage partitions, shared/partitions.py).
            return service([f"{ns}.sessions.completed", f"{ns}.sessions.completed.*", f"{ns}.sessions.started",
                            *_object_write(ns)], base_streams, [ev], [])
        case "storage":
            # Retention deletes a dropped session's log (a purge of its subjects).  A partition asks
            # the other partitions (<ns>.storage.p<k>.*) to answer a query for all of them.
            return service([*_object_read(ns), *_log_read(ns), f"$JS.API.STREAM.PURGE.{_logs(ns)[1]}",
                            f"{ns}.storage.*.>"],
                           base_streams, [se], [storage_q, *micro_sub])
        case "analyzer":
            # The recorder's diff alone: an alert between two recorded builds names the input files
            # that changed (explainer.py).
            return service([f"{ns}.alerts.>", storage_q, f"{ns}.recorder.diff", *_object_read(ns)],
                           [*base_streams, al], [se],
                           [analyzer_q, *micro_sub])
        case "tracer":
            return service([storage_q, *_object_read(ns)], [*base_streams, sp], [se, sp], [traces_q, *micro_sub])
        case "recorder":
            return service([storage_q], base_streams, [ev], [f"{ns}.recorder.>", *micro_sub])
        case "notifier":
            # Delivers alerts: one durable consumer on the alerts stream (declared too, so it may start
            # before the analyzer), its dead letters, and republishing under NS.notify.> (a
            # subscription of kind nats).  It reads no sessions and asks no service.
            return service([f"{ns}.notify.>"], [*base_streams, al], [al], [])
        case "web":
            # The HTTP API: query requests (storage, analyzer, traces, the recorder's reads), reading
            # alerts and following sessions (ordered consumers on the alerts and sessions streams: the
            # live stream and the build metrics), and fetching the objects of sessions over one
            # message; like a reader, nothing that changes history; it declares the shared streams as
            # every service does.
            return service([storage_q, analyzer_q, traces_q, *recorder_q, "$SRV.>", *_consume(al), *_follow(se),
                            *_object_read(ns), *_log_read(ns)], base_streams, [], [])
        case "bes":
            # The Build Event Service endpoint publishes build events as an agent does (and declares
            # the shared streams as every service does); it reads nothing.
            return service([f"{ns}.events.>"], base_streams, [], [])
        case "reader":
            # Query requests, micro discovery, following alerts (an ephemeral consumer on the alerts
            # stream) and live health.  Nothing it sends can change history.
            pub = [storage_q, analyzer_q, traces_q, "$SRV.>", *lookup, *_consume(al), *_log_read(ns)]
            return {"publish": _dedupe(pub), "subscribe": [*inbox, f"{ns}.health.>"], "allow_responses": False}
        case "operator":
            # The stack's owner: imports, republishing recordings, stream maintenance.
            return {"publish": [">"], "subscribe": [">"], "allow_responses": True}
    raise AuthError(f"unknown role {role!r}; roles: {', '.join(ROLES)}")


def _dedupe(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def password_variable(role: str) -> str:
    """The environment variable a deployment's nats-server configuration takes ``role``'s password from."""
    return f"BUILDTEL_NATS_{role.upper()}_PASSWORD"


def merged_permissions(role: str, namespaces: Iterable[str]) -> dict[str, object]:
    """``role``'s permissions in every namespace of ``namespaces`` (a stack serving several tenants)."""
    pub: list[str] = []
    sub: list[str] = []
    responses = False
    for ns in namespaces:
        perm = role_permissions(role, ns)
        pub += perm["publish"]  # type: ignore[arg-type]
        sub += perm["subscribe"]  # type: ignore[arg-type]
        responses = responses or bool(perm["allow_responses"])
    return {"publish": _dedupe(pub), "subscribe": _dedupe(sub), "allow_responses": responses}


def nats_authorization(auth: StackAuth | None, namespace: str | Iterable[str]) -> str:
    """The ``authorization { users = [...] }`` block of a nats-server configuration giving each
    role in ``auth`` its permissions in ``namespace`` (``"*"`` for any namespace; several
    namespaces: the stack's tenants, each role in each).

    With ``auth=None`` every role is listed and its password is a reference to the environment
    variable :func:`password_variable` names (nats-server resolves ``$VAR``), for deployments whose
    secrets come from the environment (``deploy/nats.conf``)."""
    users = []
    pairs = auth.nats if auth is not None else tuple((r, f"${password_variable(r)}") for r in ROLES)
    namespaces = [namespace] if isinstance(namespace, str) else list(namespace)
    for role, password in pairs:
        perm = merged_permissions(role, namespaces)
        entry = {"user": role, "password": password,
                 "permissions": {"publish": {"allow": perm["publish"]},
                                 "subscribe": {"allow": perm["subscribe"]}}}
        if perm["allow_responses"]:
            entry["permissions"]["allow_responses"] = True  # type: ignore[index]
        users.append(entry)
    # The nats-server configuration format accepts JSON values; a variable reference is unquoted.
    text = json.dumps(users, indent=2)
    if auth is None:
        for role in ROLES:
            text = text.replace(f'"${password_variable(role)}"', f"${password_variable(role)}")
    return "authorization {\n  users = " + text + "\n}\n"


def is_loopback(host: str) -> bool:
    """Whether a service bound to ``host`` is reachable from this machine only: what decides that
    an API with no key yet may answer (the web API, the BES endpoint).  A host name may resolve
    beyond this machine, so only ``localhost`` and loopback addresses count."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
