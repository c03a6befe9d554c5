"""One typed settings object, read from ``BUILDER_TELEMETRY_*`` variables and CLI flags.

Modelled on starlette's ``config.py``: the environment is read here and only
here; a bad value raises :class:`SettingsError` naming the variable.  Everything
deeper in the code receives a :class:`Settings`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from buildtel.shared.auth import StackAuth

PREFIX = "BUILDER_TELEMETRY_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


APP_DIR = "builder-telemetry"
# What --help and the README show as the default (the real one depends on the platform and HOME).
DATA_DIR_DEFAULT_TEXT = ("$XDG_DATA_HOME/builder-telemetry, else ~/.local/share/builder-telemetry "
                         "(macOS: ~/Library/Application Support/builder-telemetry)")


def default_data_dir(environ: Mapping[str, str] | None = None, platform: str | None = None) -> Path:
    """The per-user data directory: one stack and one history for every build of this user on this
    machine, outside any project (so nothing lands in a repository).  XDG Base Directory on Linux and
    other Unix (a relative ``XDG_DATA_HOME`` is ignored, as the spec says), Application Support on
    macOS, ``%LOCALAPPDATA%`` on Windows."""
    env = os.environ if environ is None else environ
    plat = sys.platform if platform is None else platform
    home = Path(env["HOME"]) if env.get("HOME") else Path.home()
    if plat == "darwin":
        return home / "Library" / "Application Support" / APP_DIR
    if plat == "win32":
        base = env.get("LOCALAPPDATA")
        return (Path(base) if base else home / "AppData" / "Local") / APP_DIR
    xdg = env.get("XDG_DATA_HOME", "")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / APP_DIR
    return home / ".local" / "share" / APP_DIR


class SettingsError(ValueError):
    """A configuration value could not be used; the message names the key."""


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True, slots=True)
class Settings:
    enabled: bool = _help("Master switch; false makes the client SDK a no-op.", default=True)
    max_sessions: int = _help("Sessions the store retains (oldest dropped first).", default=1000)
    storage_partitions: int = _help(
        "Storage partitions: completed sessions are spread over this many storage instances by session id "
        "(telemetry/p<k>/ each; 1 keeps the single telemetry/ store). Raise it with 'buildtel storage "
        "rebalance' (docs/scaling.md, Partitions).", default=1)
    retention_days: float = _help("Age after which stored sessions and traces are dropped.", default=90.0)
    cache_dir: Path = _help(  # noqa: RUF009 - _help() is dataclasses.field() plus its help text
        "Data directory (telemetry/, traces/, recordings/, engines/, stack.json). The default is one per user "
        "and machine, shared by all builds; set a directory per project only if you want separate histories.",
        default_factory=default_data_dir)
    namespace: str = _help("Prefix of every subject, stream and Redis key.", default="buildtel")
    tenants: str = _help(
        "Further namespaces (comma-separated) 'buildtel up' serves beside NAMESPACE: each tenant gets its own "
        "services, store (DATA_DIR/tenants/<name>/) and NATS permissions; one web API serves them all.",
        default="")
    nats_url: str | None = _help(
        "Join this NATS cluster instead of starting an embedded server: one URL or every server's, "
        "comma-separated (the client fails over and reconnects among them).", default=None)
    redis_url: str | None = _help("Use this Redis instead of starting an embedded one.", default=None)
    replicas: int | None = _help(
        "JetStream replicas of every stream and durable consumer (1-5; 3 on a 3-node cluster). Set, an existing "
        "stream with another count is updated to it; unset, streams are created with 1 (the size of the "
        "cluster 'buildtel up --nats-cluster N' starts) and an existing stream keeps its count.", default=None)
    nats_creds: Path | None = _help("NATS .creds file (JWT + nkey).", default=None)  # noqa: RUF009 - _help() is dataclasses.field() plus its help text
    nats_user: str | None = _help("NATS user.", default=None)
    nats_password: str | None = _help("NATS password.", default=None)
    nats_token: str | None = _help("NATS auth token.", default=None)
    nats_tls_ca: Path | None = _help("CA bundle to verify the NATS server.", default=None)  # noqa: RUF009 - _help() is dataclasses.field() plus its help text
    nats_tls_cert: Path | None = _help("Client certificate for NATS mutual TLS.", default=None)  # noqa: RUF009 - _help() is dataclasses.field() plus its help text
    nats_tls_key: Path | None = _help("Client key for NATS mutual TLS.", default=None)  # noqa: RUF009 - _help() is dataclasses.field() plus its help text
    http_host: str = _help("Address HTTP endpoints (metrics, OTLP) bind to.", default="127.0.0.1")
    http_token: str | None = _help("Bearer token required by HTTP endpoints when set.", default=None)
    web_port: int | None = _help(
        "Port of the web API (/api/v1) on http_host: 'buildtel serve web' uses 8480 when unset, "
        "'buildtel up' any free port (written to stack.json).", default=None)
    bes_port: int = _help(
        "Port of the Build Event Service endpoint (gRPC, --bes_backend=grpc://HOST:PORT) on http_host; "
        "0: any free port (written to stack.json).", default=0)
    web_url: str | None = _help(
        "External base URL of the web API (behind a proxy), used in the session links 'buildtel run' prints.",
        default=None)
    web_rate_limit: int = _help("Requests per minute one API key may make to the web API (then 429).",
                                default=600)
    alerts_config: Path | None = _help(  # noqa: RUF009 - _help() is dataclasses.field() plus its help text
        "Subscriptions file (TOML, mode 0600) of the notifier: where regression alerts are delivered "
        "(webhook, Slack, NATS), with routing rules, retries and digests (docs/alerts.md).", default=None)
    metrics_port: int | None = _help("Port of the /metrics and /healthz endpoint (0: any free port).", default=None)
    agent_id: str | None = _help(
        "This machine's agent id (default: the hostname; a client joining a given session adds /<pid>.<start>).",
        default=None)
    session_timeout_s: float = _help("Inactivity after which a session completes as abandoned.", default=300.0)
    finish_grace_s: float = _help("Wait after BuildFinished for other agents' in-flight events.", default=2.0)
    gap_wait_s: float = _help("Wait after the last event for a finished session's missing events "
                              "(a seq gap, counts not reached) before it completes as incomplete.", default=30.0)
    batch_size: int = _help("Events per batch the SDK publishes.", default=500)
    flush_interval_s: float = _help("Longest time the SDK holds an event before publishing.", default=0.2)
    buffer_limit: int = _help("Events the SDK buffers while the bus is away, then drops (counted).", default=100_000)
    fsync: bool = _help("fsync each stored batch before acknowledging it.", default=True)
    log_level: str = _help("debug, info, warning or error.", default="info")
    log_format: str = _help("auto (JSON off a TTY), json or console.", default="auto")
    log_limit: int = _help(
        "Bytes of a build's console log 'buildtel run' keeps (before compression): over it, the first "
        "quarter and the last three quarters are kept with a marker where the rest was cut (docs/failures.md).",
        default=4 * 1024 * 1024)
    failure_output_kib: int = _help("KiB of a failed target's output kept with it (its last lines).", default=16)
    failure_rules: Path | None = _help(  # noqa: RUF009 - _help() is dataclasses.field() plus its help text
        "TOML file of the farm's failure-class rules ([[rule]]: class, pattern, exit_code, signal, tool_code), "
        "tried before the built-in ones where failures are classified: the collector, 'buildtel import', "
        "readers of older sessions (docs/failures.md).", default=None)
    stack_credentials: Path | None = _help(  # noqa: RUF009 - _help() is dataclasses.field() plus its help text
        "Credentials file of a stack ('buildtel credentials ROLE -o FILE' writes one): "
        "its NATS URL and role passwords.",
        default=None)
    # Per-role NATS passwords and the Redis password of a local stack (from stack.json or a
    # credentials file); never read from a variable of its own.
    stack_auth: StackAuth | None = field(default=None, metadata={"env": False}, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``BUILDER_TELEMETRY_<FIELD>`` for every field; ``overrides`` (CLI flags) win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.metadata.get("env") is False:
                continue
            key = PREFIX + f.name.upper()
            if key in env:
                values[f.name] = _convert(key, env[key], f.type)
        if "cache_dir" not in values or values["cache_dir"] is None:
            values["cache_dir"] = default_data_dir(env)  # from the environment given, not os.environ
        for name, value in overrides.items():
            if value is not None:
                values[name] = value
        settings = cls(**values)
        settings.validate()
        if settings.stack_credentials is not None and settings.stack_auth is None:
            settings = settings.with_credentials_file(settings.stack_credentials)
        return settings

    def with_credentials_file(self, path: Path) -> Settings:
        """These settings with a stack's role credentials (and its NATS URL, unless one is set)
        read from the file ``buildtel credentials`` wrote."""
        import json

        key = PREFIX + "STACK_CREDENTIALS"
        try:
            data = json.loads(Path(path).read_text())
            auth = StackAuth.from_json(data)
        except (OSError, ValueError) as exc:
            raise SettingsError(f"{key}: cannot use {str(path)!r}: {exc}") from None
        url = self.nats_url or (str(data["nats_url"]) if data.get("nats_url") else None)
        return replace(self, stack_auth=auth, nats_url=url)

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def validate(self) -> None:
        checks = [
            ("max_sessions", self.max_sessions >= 1),
            ("storage_partitions", 1 <= self.storage_partitions <= 64),
            ("replicas", self.replicas is None or 1 <= self.replicas <= 5),  # JetStream allows at most 5
            ("retention_days", self.retention_days > 0),
            # The collector refuses batches over buildtel.shared.validate.MAX_BATCH_EVENTS (docs/protocol.md).
            ("web_rate_limit", self.web_rate_limit >= 1),
            ("batch_size", 1 <= self.batch_size <= 10_000),
            ("buffer_limit", self.buffer_limit >= 1),
            ("flush_interval_s", self.flush_interval_s > 0),
            ("session_timeout_s", self.session_timeout_s > 0),
            ("finish_grace_s", self.finish_grace_s >= 0),
            ("gap_wait_s", self.gap_wait_s >= 0),
            ("namespace", _is_namespace(self.namespace)),
            ("tenants", all(_is_namespace(t) for t in self.tenant_list)),
            ("log_format", self.log_format in {"auto", "json", "console"}),
            ("log_limit", self.log_limit >= 4096),
            ("failure_output_kib", 1 <= self.failure_output_kib <= 64),
            ("log_level", self.log_level.lower() in {"debug", "info", "warning", "error"}),
        ]
        for name, ok in checks:
            if not ok:
                raise SettingsError(f"{PREFIX}{name.upper()}: invalid value {getattr(self, name)!r}")
        self.failure_rule_table()

    def failure_rule_table(self) -> tuple[Any, ...]:
        """The farm's failure-class rules (shared/failclass.py ``Rule``s; none when unset), read again
        when the file changes; SettingsError naming the key when the file cannot be used."""
        from buildtel.shared.failclass import load_rules

        try:
            return load_rules(self.failure_rules)
        except (OSError, ValueError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise SettingsError(f"{PREFIX}FAILURE_RULES: cannot use {str(self.failure_rules)!r}: {why}") from None

    @property
    def tenant_list(self) -> list[str]:
        """The further tenants of ``tenants``, in order, without repeats or the stack's own namespace."""
        return [t for t in dict.fromkeys(t.strip() for t in self.tenants.split(",")) if t and t != self.namespace]

    def for_tenant(self, tenant: str) -> Settings:
        """The settings of a service of ``tenant``: its namespace and its own data directory (the
        stack's own namespace keeps the data directory itself)."""
        if tenant == self.namespace:
            return self
        return replace(self, namespace=tenant, tenants="", cache_dir=self.cache_dir / "tenants" / tenant)

    # -- derived paths ----------------------------------------------------------------------
    @property
    def telemetry_dir(self) -> Path:
        return self.cache_dir / "telemetry"

    @property
    def traces_dir(self) -> Path:
        return self.cache_dir / "traces"

    @property
    def recordings_dir(self) -> Path:
        return self.cache_dir / "recordings"

    @property
    def engines_dir(self) -> Path:
        return self.cache_dir / "engines"

    @property
    def retention_s(self) -> float:
        return self.retention_days * 86400.0


def _is_namespace(name: str) -> bool:
    return bool(name) and len(name) <= 64 and all(c.isalnum() or c in "-_" for c in name)


def _convert(key: str, raw: str, typ: Any) -> Any:
    t = str(typ)
    try:
        if t == "bool":
            low = raw.strip().lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError("expected true or false")
        if t == "int" or t == "int | None":
            return int(raw) if raw else None if "None" in t else int(raw)
        if t == "float":
            return float(raw)
        if "Path" in t:
            return Path(raw) if raw else None
        return raw or None if "None" in t else raw
    except ValueError as exc:
        raise SettingsError(f"{key}: cannot use {raw!r}: {exc}") from None


def describe() -> list[tuple[str, str, str]]:
    """(variable, default, help) for every setting: the README table and ``--help`` use it."""
    out = []
    for f in fields(Settings):
        if f.metadata.get("env") is False:
            continue
        if f.name == "cache_dir":
            default = DATA_DIR_DEFAULT_TEXT
        else:
            default = f.default if f.default is not None and f.default is not MISSING else ""
        out.append((PREFIX + f.name.upper(), str(default), f.metadata.get("help", "")))
    return out
