"""``--json`` output that scripts can rely on: keyed objects with every field stated.

Our wire structs are compact on purpose: ``TargetMetrics`` is ``array_like`` (a
target is an unnamed array on the bus) and ``BuildSession`` omits fields that hold
their default.  Printed as-is, ``show --json`` gave targets as ``["//a:b", 1.0, …]``
and left out ``exit_code`` when it was null.  :func:`keyed` turns any struct into an
object named by field, every field present (defaults included, ``null`` for
``None``), tagged structs with their tag (``"type": "session"``), recursively;
new fields (another engineer's, a newer protocol's) appear without changes here.

The text is passed through :func:`buildtel.cli.textsafe.json_safe`: the same JSON
value, with characters that would act on a terminal written as ``\\u`` escapes.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

import msgspec

from buildtel.cli.textsafe import json_safe
from buildtel.shared.keyed import keyed

__all__ = ["dumps", "emit", "keyed"]

_enc = msgspec.json.Encoder()


def dumps(obj: Any) -> str:
    """One line of JSON (no trailing newline)."""
    return json_safe(_enc.encode(keyed(obj)).decode())


def emit(obj: Any, out: TextIO | None = None) -> None:
    """Write ``obj`` as one JSON line and flush (``watch --json`` streams, one object per line)."""
    stream = out or sys.stdout
    stream.write(dumps(obj) + "\n")
    stream.flush()
