"""Lenient readers for proto3 JSON values, as Bazel writes them in BEP files.

proto3 JSON spells fields in lowerCamelCase (parsers also accept the original
snake_case), writes int64 as strings and int32 as numbers, omits zero values,
and encodes Timestamps as RFC 3339 strings and Durations as ``"1.5s"``.  Each
reader raises ``TypeError``/``ValueError`` on a value of the wrong shape, which
the BEP importer turns into a warning for that one event.
"""

from __future__ import annotations

import re
from typing import Any

from buildtel.shared.importers.common import parse_time

_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)s")
_UPPER = re.compile(r"([A-Z])")


def get(d: dict[str, Any], name: str, default: Any = None) -> Any:
    """A field by its proto3 JSON name, else by its snake_case name, else ``default``."""
    if name in d:
        return d[name]
    return d.get(_UPPER.sub(lambda m: "_" + m.group(1).lower(), name), default)


def obj(v: Any) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise TypeError(f"expected an object, got {type(v).__name__}")
    return v


def arr(v: Any) -> list[Any]:
    if not isinstance(v, list):
        raise TypeError(f"expected a list, got {type(v).__name__}")
    return v


def int64(v: Any) -> int | None:
    """An integer field (string or number); None when absent."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, int | str):
        return int(v)
    raise TypeError(f"expected an integer, got {type(v).__name__}")


def epoch_ms(d: dict[str, Any], ts_name: str, ms_name: str) -> float | None:
    """Epoch milliseconds from a Timestamp field (newer Bazel) or its deprecated ``*Millis`` twin."""
    ts = get(d, ts_name)
    if isinstance(ts, str):
        return parse_time(ts) * 1000.0
    return None if (ms := int64(get(d, ms_name))) is None else float(ms)


def duration(v: Any) -> float | None:
    """Seconds of a Duration such as ``"0.170s"``; None when absent or not a Duration."""
    if isinstance(v, str) and (m := _DURATION.fullmatch(v)):
        return float(m.group(1))
    return None
