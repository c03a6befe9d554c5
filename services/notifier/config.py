"""The notifier's subscriptions: who gets which alerts, and how (``BUILDER_TELEMETRY_ALERTS_CONFIG``).

A TOML file (stdlib ``tomllib``) decoded into the :class:`AlertsConfig` struct, so a wrong type or
an unknown key fails with the key's path (``$.subscription[1].url``) and a TOML syntax error with
its line; docs/alerts.md documents the format.  A subscription is a destination (``webhook``,
``slack``, ``nats``) plus routing rules; :meth:`Subscription.matches` is the one place an alert is
tested against them.

Secrets (a webhook's HMAC key; a Slack incoming-webhook URL is one too) are taken out of the
structs into :class:`Loaded` at load time and never logged or shown: :meth:`Loaded.describe` is
what the CLI lists.
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import msgspec

from buildtel.services.analyzer.alerts import Alert

ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
# A nats subscription's subject under <ns>.notify.: plain tokens, no wildcards.
SUBJECT = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


class ConfigError(ValueError):
    """The subscriptions file cannot be used; the message names the file and the key or line."""


class Delivery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How hard the notifier tries (``[delivery]``; the defaults suit a farm)."""

    retry_for_s: float = 600.0  # then the delivery is dead-lettered
    backoff_initial_s: float = 1.0  # exponential backoff with full jitter: uniform(0, min(max, initial * 2^n))
    backoff_max_s: float = 60.0
    timeout_s: float = 10.0  # one HTTP attempt
    lease_s: float = 60.0  # a claim outlives one attempt; a replica that dies leaves it to expire
    poll_s: float = 1.0  # how often each replica looks for due deliveries and digests
    max_alert_age_s: float = 86_400.0  # older alerts (a new consumer replaying history) are not delivered
    digest_hour: int = 8  # UTC hour daily digests are sent, unless a subscription says otherwise


class Subscription(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One destination and the alerts it wants (every rule left out matches everything)."""

    id: str
    kind: Literal["webhook", "slack", "nats"]
    url: str | None = None  # webhook, slack: http(s) only
    secret: str | None = None  # webhook: HMAC-SHA256 key (or secret_env)
    secret_env: str | None = None  # the environment variable holding the secret instead
    subject: str | None = None  # nats: published on <ns>.notify.<subject>
    tenants: list[str] = []  # namespaces; empty: every tenant the stack serves
    branches: list[str] = []  # globs (fnmatch), e.g. "release/*"
    targets: list[str] = []  # globs; a target rule never matches a whole-build alert
    kinds: list[Literal["build", "target", "host"]] = []
    direction: Literal["regression", "improvement", "any"] = "any"
    min_change_pct: float = 0.0  # |change_pct| at least this
    min_confidence: float = 0.0
    digest: Literal["none", "daily"] = "none"
    digest_hour: int | None = None  # UTC; default [delivery] digest_hour

    def matches(self, alert: Alert, tenant: str) -> bool:
        if self.tenants and tenant not in self.tenants:
            return False
        if self.kinds and alert.kind not in self.kinds:
            return False
        if self.direction != "any" and alert.direction != self.direction:
            return False
        if abs(alert.change_pct) < self.min_change_pct or alert.confidence < self.min_confidence:
            return False
        if self.branches and not any(fnmatch.fnmatchcase(alert.branch or "", g) for g in self.branches):
            return False
        return not self.targets or (alert.target is not None and
                                    any(fnmatch.fnmatchcase(alert.target, g) for g in self.targets))


class AlertsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    delivery: Delivery = msgspec.field(default_factory=Delivery)
    subscription: list[Subscription] = []


@dataclass(frozen=True)
class Loaded:
    """Subscriptions ready to use: the structs without their secrets, the secrets apart."""

    delivery: Delivery = field(default_factory=Delivery)
    subscriptions: tuple[Subscription, ...] = ()
    secrets: dict[str, bytes] = field(default_factory=dict, repr=False)
    warnings: tuple[str, ...] = ()

    def for_tenant(self, tenant: str) -> list[Subscription]:
        return [s for s in self.subscriptions if not s.tenants or tenant in s.tenants]

    def describe(self) -> list[dict[str, Any]]:
        """Each subscription as the CLI lists it: rules and destination kind, never a secret or a
        Slack URL (its path is the credential); a webhook's scheme and host only."""
        out = []
        for s in self.subscriptions:
            d = msgspec.to_builtins(s)
            d.pop("secret", None)
            d.pop("secret_env", None)
            d["url"] = _public_url(s.url) if s.kind == "webhook" else ("(hidden)" if s.url else None)
            out.append(d)
        return out


def _public_url(url: str | None) -> str | None:
    if not url:
        return None
    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname}{f':{u.port}' if u.port else ''}/…"


def load(path: Path | None, environ: dict[str, str] | None = None) -> Loaded:
    """The subscriptions of ``path`` (None: none at all).  A file others may read loads with a
    warning in :attr:`Loaded.warnings` (subscription secrets belong in a 0600 file)."""
    if path is None:
        return Loaded()
    try:
        st = path.stat()
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the alerts config: {exc.strerror or exc}") from None
    warnings = []
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.append(f"{path} is readable by others (mode {stat.S_IMODE(st.st_mode):04o}); it holds "
                        "subscription secrets: chmod 600 it")
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None  # tomllib names the line and column
    try:
        cfg = msgspec.convert(doc, AlertsConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from None  # "... - at `$.subscription[0].url`"
    return _check(path, cfg, os.environ if environ is None else environ, tuple(warnings))


def _check(path: Path, cfg: AlertsConfig, environ: Any, warnings: tuple[str, ...]) -> Loaded:
    d = cfg.delivery
    for name, ok in (("retry_for_s", d.retry_for_s > 0), ("backoff_initial_s", d.backoff_initial_s > 0),
                     ("backoff_max_s", d.backoff_max_s >= d.backoff_initial_s), ("timeout_s", d.timeout_s > 0),
                     ("lease_s", d.lease_s > d.timeout_s), ("poll_s", d.poll_s > 0),
                     ("max_alert_age_s", d.max_alert_age_s > 0), ("digest_hour", 0 <= d.digest_hour <= 23)):
        if not ok:
            raise ConfigError(f"{path}: delivery.{name}: invalid value {getattr(d, name)!r}"
                              + (" (must exceed timeout_s)" if name == "lease_s" else ""))
    secrets: dict[str, bytes] = {}
    subs: list[Subscription] = []
    for i, s in enumerate(cfg.subscription):
        where = f"{path}: subscription[{i}]"
        if not ID.match(s.id):
            raise ConfigError(f"{where}.id: {s.id!r}: 1-64 letters, digits, '_' or '-'")
        if any(o.id == s.id for o in subs):
            raise ConfigError(f"{where}.id: {s.id!r} is used twice")
        secret = check_subscription(f"{path}: subscription {s.id!r}", s, environ)
        if secret:
            secrets[s.id] = secret.encode()
        subs.append(msgspec.structs.replace(s, secret=None))
    return Loaded(delivery=d, subscriptions=tuple(subs), secrets=secrets, warnings=warnings)


def check_subscription(where: str, s: Subscription, environ: Any) -> str | None:
    """The subscription's secret, once its fields are checked (ConfigError names the bad one)."""

    def bad(key: str, why: str) -> ConfigError:
        return ConfigError(f"{where}.{key}: {why}")

    if s.kind in ("webhook", "slack"):
        u = urlsplit(s.url or "")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise bad("url", "an http:// or https:// URL is required")
    if s.kind == "nats" and not (s.subject and SUBJECT.match(s.subject)):
        raise bad("subject", "dot-separated tokens of letters, digits, '_' or '-' (no wildcards) are required")
    if s.secret and s.secret_env:
        raise bad("secret", "give secret or secret_env, not both")
    secret = s.secret
    if s.secret_env:
        secret = environ.get(s.secret_env)
        if not secret:
            raise bad("secret_env", f"the variable {s.secret_env} is not set")
    if s.kind == "webhook" and not secret:
        raise bad("secret", "a webhook is signed: set secret or secret_env")
    if not 0 <= s.min_confidence <= 1:
        raise bad("min_confidence", "between 0 and 1")
    if s.min_change_pct < 0:
        raise bad("min_change_pct", "0 or more")
    if s.digest_hour is not None and not 0 <= s.digest_hour <= 23:
        raise bad("digest_hour", "an hour 0-23 (UTC)")
    return secret
