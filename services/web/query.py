"""Query parameters of the API, parsed and checked: every refusal is a :class:`BadInput` (a 400
problem), never an exception that would become a 500.  Ids follow the CLI's grammar (a full
32-hex-digit id or a unique prefix of at least 6); cursors are opaque base64url strings."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Literal, TypeVar

import msgspec

from buildtel.services.storage.api import Cursor
from buildtel.services.storage.history import MAX_RUNS
from buildtel.services.web.schema import DEFAULT_LIMIT, MAX_LIMIT

FULL_LEN = 32
MIN_PREFIX = 6
_HEX = re.compile(r"[0-9a-f]+")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
Q = TypeVar("Q", bound=msgspec.Struct)
Text = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class BadInput(ValueError):
    """A parameter the API refuses; the message says which and why (the problem's detail)."""


class SessionsQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    outcome: Literal["success", "failed", "abandoned", "cancelled", "unknown"] | None = None
    branch: Text | None = None
    agent: Text | None = None
    name: Text | None = None
    label: Text | None = None
    target: Text | None = None
    since: str | None = None
    until: str | None = None
    order: Literal["newest", "oldest"] = "newest"
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT
    cursor: Annotated[str, msgspec.Meta(max_length=1024)] | None = None


class ReportQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    last: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] | None = None
    outcome: Literal["success", "failed", "abandoned", "cancelled", "unknown"] | None = None
    branch: Text | None = None
    name: Text | None = None
    target: Text | None = None
    since: str | None = None
    until: str | None = None


class AlertsQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    branch: Text | None = None
    target: Text | None = None
    kind: Annotated[str, msgspec.Meta(pattern=r"^[a-z_]{1,64}$")] | None = None
    status: Literal["open", "acknowledged", "muted"] | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT


class StreamQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    # For clients that cannot set headers (the Last-Event-ID header wins when both are given).
    last_event_id: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class TrendsQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    since: str | None = None  # default: 30 days before until
    until: str | None = None  # default: now
    bucket: Literal["hour", "day", "week"] = "day"
    branch: Text | None = None
    agent: Text | None = None
    name: Text | None = None
    label: Text | None = None
    target: Text | None = None


class TargetHistoryQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    target: Text
    since: str | None = None
    until: str | None = None
    branch: Text | None = None
    outcome: Literal["success", "failed", "abandoned", "cancelled", "unknown"] | None = None
    agent: Text | None = None
    label: Text | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_RUNS)] = 1000
    cursor: Annotated[str, msgspec.Meta(max_length=1024)] | None = None


BUCKETS = {"hour": 3600.0, "day": 86_400.0, "week": 7 * 86_400.0}


def parse_query(query: Mapping[str, str], typ: type[Q]) -> Q:
    """The query string as ``typ`` (strings converted to numbers where the type says so)."""
    items = list(query.items()) if hasattr(query, "items") else []
    seen: set[str] = set()
    for key, _ in items:
        if key in seen:
            raise BadInput(f"parameter {key!r} given more than once")
        seen.add(key)
    try:
        return msgspec.convert(dict(items), typ, strict=False)
    except msgspec.ValidationError as exc:
        raise BadInput(_explain(str(exc))) from None


def _explain(text: str) -> str:
    # msgspec says "... - at `$.limit`"; a query string has parameters, not a JSON path.
    text = re.sub(r"Object contains unknown field `(\w+)`", r"unknown parameter '\1'", text)
    return re.sub(r"`\$\.(\w+)`", r"parameter '\1'", text)


def parse_time(name: str, text: str | None) -> float | None:
    """Unix seconds, or an ISO 8601 date/time (UTC when it names no zone)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise BadInput(f"parameter {name!r}: {text!r} is neither Unix seconds nor an ISO 8601 time") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        value = when.timestamp()
    if not 0 <= value < 1e11:  # NaN fails both comparisons
        raise BadInput(f"parameter {name!r}: {text!r} is not a time after 1970")
    return value


def encode_cursor(cursor: Cursor | None) -> str | None:
    if cursor is None:
        return None
    return base64.urlsafe_b64encode(msgspec.json.encode(cursor)).decode().rstrip("=")


def decode_cursor(text: str | None) -> Cursor | None:
    if text is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        return msgspec.json.decode(raw, type=Cursor)
    except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise BadInput("parameter 'cursor' is not a cursor this API gave (pass next_cursor unchanged)") from None


def parse_session_id(text: str) -> str:
    """The lowercase hex of a full id or prefix; :class:`BadInput` says what is accepted.  A UUID
    (``8-4-4-4-12``) is the same id with dashes: Bazel's invocation id in the link it prints with
    ``--bes_results_url`` (docs/bazel.md)."""
    word = text.strip().lower()
    if _UUID.fullmatch(word):
        word = word.replace("-", "")
    if not word or not _HEX.fullmatch(word) or len(word) > FULL_LEN:
        raise BadInput(f"{text[:64]!r} is not a session id: give a full id ({FULL_LEN} hex digits) "
                       f"or a unique prefix of at least {MIN_PREFIX}")
    if len(word) < MIN_PREFIX:
        raise BadInput(f"id prefix {word!r} is too short: give at least {MIN_PREFIX} hex digits")
    return word


_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86_400.0}


def parse_alert_id(text: str) -> str:
    word = text.strip().lower()
    if len(word) != FULL_LEN or not _HEX.fullmatch(word):
        raise BadInput(f"{text[:64]!r} is not an alert id: give its {FULL_LEN} hex digits (from /api/v1/alerts)")
    return word


def parse_duration(text: str) -> float:
    """``"90"`` (seconds), ``"90m"``, ``"24h"``, ``"7d"``: seconds (the body's pattern checked the form)."""
    unit = text[-1] if text[-1] in _UNIT_S else "s"
    return float(text.rstrip("smhd")) * _UNIT_S[unit]


def parse_body(raw: bytes, typ: type[Q]) -> Q:
    """A JSON request body as ``typ``; an empty body is ``{}`` (every field defaulted or missing)."""
    try:
        return msgspec.json.decode(raw or b"{}", type=typ)
    except msgspec.ValidationError as exc:
        raise BadInput("request body: " + _explain(str(exc)).replace("parameter", "field")) from None
    except msgspec.DecodeError as exc:
        raise BadInput(f"request body is not JSON: {exc}") from None
