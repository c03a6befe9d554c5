"""Argument sanitising for the client SDK: every emit argument becomes something the wire takes.

Emit methods call these only when a cheap type check fails (the common path stays
fast); at batch time :func:`fix_event` also repairs any event whose encoding failed
(lone surrogates, huge ints, oversize values), and :func:`shrink` cuts one that is
still too big, so every accepted event reaches the collector in a form its typed
decoder takes and a bad argument never raises into the build.
"""

from __future__ import annotations

import itertools
import re
import shlex
import socket
import time
from collections.abc import Mapping
from typing import Any, overload

import msgspec

from buildtel.shared.protocol import (
    BuildEnvironment,
    BuildFinished,
    BuildStarted,
    HealthCheckpoint,
    Phase,
    TargetFinished,
    TargetStarted,
    TestResults,
)
from buildtel.shared.redaction import redact_argv, redact_env, redact_text

MAX_SEQ = 1 << 24  # the collector refuses higher seqs (it keeps one bit per seq)
_now = time.time


# -- sanitising: a bad value becomes a default, never an exception -------------------------------
_MAX_STR = 4096  # characters per string field
_MAX_ITEMS = 2000  # entries per list or dict field
_BIG = 1 << 62  # numbers beyond this are nonsense and would overflow int64 on the wire
_STATUSES = ("success", "failed", "skipped", "cancelled")
_CACHES = ("miss", "local_hit", "remote_hit", "uncacheable")
_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
# The collector keys Redis hashes with "agent:seq" and "agent|target"; Msg-Id uses ':'.
_BAD_AGENT_CHARS = re.compile(r"[:|\s\x00-\x1f\x7f]")


def _text(v: Any, default: str = "") -> str:
    if v is None:
        return default
    if type(v) is not str:
        try:
            if isinstance(v, (bytes, bytearray, memoryview)):
                v = bytes(v).decode("utf-8", "replace")
            else:  # str subclasses too: msgspec encodes exact str only
                v = str.__str__(v) if isinstance(v, str) else str(v)
        except Exception:  # noqa: BLE001 - a __str__ that raises
            return default
    text: str = v  # a str by now, whichever branch ran
    if len(text) > _MAX_STR:
        text = text[:_MAX_STR]
    if not text.isascii():  # lone surrogates cannot be encoded as UTF-8
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _opt_text(v: Any) -> str | None:
    return None if v is None else _text(v)


# Overloads: with a number as the default the result is never None (the fixers of fields that
# require a value rely on that).
@overload
def _number(v: Any, default: float) -> float: ...
@overload
def _number(v: Any, default: None) -> float | None: ...
def _number(v: Any, default: float | None) -> float | None:
    if type(v) is not float:
        if v is None:
            return default
        try:
            v = float(v)
        except Exception:  # noqa: BLE001 - float() of arbitrary input: anything unusable is the default
            return default
    return v if -_BIG < v < _BIG else default  # also rejects NaN and infinities


@overload
def _integer(v: Any, default: int, *, lo: int = ...) -> int: ...
@overload
def _integer(v: Any, default: None = None, *, lo: int = ...) -> int | None: ...
def _integer(v: Any, default: int | None = None, *, lo: int = -_BIG) -> int | None:
    if type(v) is not int:
        if v is None:
            return default
        try:
            v = int(v) if not isinstance(v, float) or -_BIG < v < _BIG else default
        except Exception:  # noqa: BLE001 - int() of arbitrary input: anything unusable is the default
            return default
    return v if v is not None and lo <= v < _BIG else default


def _choice(v: Any, allowed: tuple[str, ...], default: Any) -> Any:
    try:
        for a in allowed:
            if v == a:
                return a
    except Exception:  # noqa: BLE001 - an __eq__ that raises
        pass
    return default


def _str_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, (str, bytes)):
        return [_text(v)]
    try:
        return [_text(x) for x in itertools.islice(iter(v), _MAX_ITEMS)]
    except Exception:  # noqa: BLE001 - iterating caller input may raise anything; unusable is empty
        return []


def _str_dict(v: Any) -> dict[str, str]:
    try:
        items = v.items() if hasattr(v, "items") else v
        return {_text(k): _text(x) for k, x in itertools.islice(iter(items), _MAX_ITEMS)} if v else {}
    except Exception:  # noqa: BLE001 - iterating caller input may raise anything; unusable is empty
        return {}


def _argv(v: Any) -> list[str]:
    if isinstance(v, str):
        try:
            v = shlex.split(v)
        except ValueError:
            v = [v]
    return redact_argv(_str_list(v))


def _phases(v: Any) -> list[Phase]:
    out: list[Phase] = []
    name: Any
    dur: Any
    try:
        for p in itertools.islice(iter(v), _MAX_ITEMS):
            try:
                if isinstance(p, Phase):
                    name, dur = p.name, p.duration_s
                elif isinstance(p, Mapping):
                    name, dur = p.get("name"), p.get("duration_s")
                else:
                    name, dur = p  # (name, seconds)
                out.append(Phase(_text(name), _number(dur, 0.0)))
            except Exception:  # noqa: BLE001 - skip the one bad phase
                continue
    except Exception:  # noqa: BLE001 - not iterable
        pass
    return out


def _environment(v: Any) -> BuildEnvironment | None:
    if v is None:
        return None
    try:
        env = msgspec.convert(msgspec.to_builtins(v) if isinstance(v, msgspec.Struct) else v,
                              BuildEnvironment, strict=False)
    except Exception:  # noqa: BLE001 - an unusable environment is dropped, never raised
        return None
    for f in ("os", "os_release", "arch", "hostname", "user", "cwd", "python"):
        setattr(env, f, _text(getattr(env, f)))
    env.cpus, env.memory_bytes = _integer(env.cpus, 0, lo=0), _integer(env.memory_bytes, 0, lo=0)
    env.tool_versions = _str_dict(env.tool_versions)
    env.missing_probes = _str_dict(env.missing_probes)
    env.env = redact_env(_str_dict(env.env))  # whoever captured it, secrets do not leave the agent
    if env.vcs is not None:
        vcs = env.vcs
        vcs.system, vcs.dirty = _text(vcs.system, "git"), vcs.dirty is True
        vcs.commit, vcs.branch, vcs.remote = _opt_text(vcs.commit), _opt_text(vcs.branch), _opt_text(vcs.remote)
        if vcs.remote:  # https://user:token@host/repo.git, as `git remote get-url` prints it
            vcs.remote = redact_text(vcs.remote)
    return env


def _counts(v: Any) -> dict[str, int] | None:
    try:
        return {_agent_id(k): _integer(c, 0, lo=0) for k, c in itertools.islice(iter(v.items()), _MAX_ITEMS)} or None
    except Exception:  # noqa: BLE001 - None, or not a mapping
        return None


def _agent_id(v: Any) -> str:
    s = _text(v) if isinstance(v, str) and v else socket.gethostname()  # the machine (shared/identity.py)
    return _BAD_AGENT_CHARS.sub("_", s)[:200] or "agent"


def _nonneg(v: Any) -> int | None:
    return _integer(v, None, lo=0)


def _count(v: Any) -> int:
    return _integer(v, 0, lo=0)


def _rate(v: Any) -> float:
    return _number(v, 0.0)


# Field name -> sanitiser, shared by every event type; the few names whose meaning differs
# between types are overridden per type.  seq, session_id and agent_id are the client's own.
_FIX: dict[str, Any] = {
    "ts": lambda v: _number(v, None) or time.time(), "name": _text, "target": _text, "worker": _text,
    "command": _argv, "environment": _environment, "labels": _str_dict,
    "record": lambda v: type(v) in (bool, int) and bool(v),
    "traceparent": lambda v: v if type(v) is str and _TRACEPARENT.fullmatch(v) else None,
    "start": _rate, "duration_s": _rate, "cache": lambda v: _choice(v, _CACHES, "miss"),
    "status": lambda v: _choice(v, _STATUSES, "success"), "exit_code": _integer, "kind": _opt_text,
    "mnemonic": _opt_text, "cpu_s": lambda v: _number(v, None), "peak_rss_bytes": _nonneg, "deps": _str_list,
    "phases": _phases, "reasons": _str_list, "eta_s": lambda v: _number(v, None), "expected_events": _counts,
    "outcome": lambda v: _choice(v, ("success", "failed", "cancelled"), None),
    "cache_hits": _nonneg, "cache_misses": _nonneg,
    **dict.fromkeys(("completed_tasks", "failed_tasks", "active_tasks", "pending_tasks", "worker_count",
                     "active_workers", "memory_bytes"), _count),
    **dict.fromkeys(("memory_percent", "velocity", "throughput", "utilisation"), _rate),
}
_FIXERS: dict[type, dict[str, Any]] = {
    cls: {f: _FIX[f] for f in cls.__struct_fields__ if f in _FIX}
    for cls in (BuildStarted, TargetStarted, TargetFinished, HealthCheckpoint, BuildFinished, TestResults)
}
_FIXERS[HealthCheckpoint]["status"] = lambda v: _choice(v, ("healthy", "degraded", "critical"), "healthy")
_FIXERS[BuildFinished]["exit_code"] = lambda v: _integer(v, 0)
_HEALTH_FIELDS = frozenset(HealthCheckpoint.__struct_fields__) - {"session_id", "agent_id", "seq", "ts"}


def fix_event(ev: Any) -> Any:
    """Sanitise every field of ``ev`` in place: afterwards it encodes, is bounded in size and
    passes the collector's typed decoder.  Used for unusual emit arguments and, at batch
    time, for any event whose encoding failed."""
    for f, fix in _FIXERS[type(ev)].items():
        setattr(ev, f, fix(getattr(ev, f)))
    return ev


def shrink(ev: Any) -> Any:
    """The event without its collections: what survives when it alone exceeds a batch."""
    changes: dict[str, Any] = {
        f: type(x)() for f in ev.__struct_fields__ if isinstance(x := getattr(ev, f), (list, dict))}
    if isinstance(ev, BuildStarted):
        changes["environment"] = None
    return msgspec.structs.replace(ev, **changes)
