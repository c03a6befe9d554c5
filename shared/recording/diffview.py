"""The result of ``buildtel diff A B`` as msgspec types: what the recorder's ``diff`` endpoint sends
and the HTTP API serves (its OpenAPI components are generated from these classes).

:func:`buildtel.shared.recording.diff.diff` computes the diff as plain data (the CLI prints it as
``--json``); :func:`typed_diff` converts that same data, so the API's JSON and the CLI's are one
document, field for field, and a change to the diff shows in both.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from buildtel.shared.recording.diff import Side, diff


class DiffSide(msgspec.Struct, kw_only=True):
    id: str
    kind: str  # "recording" or "session"
    exit_code: int | None


class CommandChange(msgspec.Struct, kw_only=True):
    a: list[str]
    b: list[str]


class TextChange(msgspec.Struct, kw_only=True):
    a: str
    b: str


class MapDiff(msgspec.Struct, kw_only=True):
    """Variables only in B (``added``), only in A (``removed``), and changed (``[A's, B's]``)."""

    added: dict[str, str]
    removed: dict[str, str]
    changed: dict[str, tuple[str, str]]


class ToolsDiff(MapDiff, kw_only=True):
    """Like :class:`MapDiff`; a tool whose version probe gave no answer on one side is ``unknown``
    (with the reason), never added or removed."""

    unknown: dict[str, str]


class FilesDiff(msgspec.Struct, kw_only=True):
    """Paths (relative to the build's directory) whose content changed, only in B, only in A."""

    changed: list[str]
    added: list[str]
    removed: list[str]


class TimingChange(msgspec.Struct, kw_only=True):
    target: str
    a: float  # seconds in A
    b: float  # seconds in B
    delta_s: float  # b - a


class ValueChange(msgspec.Struct, kw_only=True):
    target: str
    a: str
    b: str


class TargetsDiff(msgspec.Struct, kw_only=True):
    """Per target: timing changes, largest first; cache-result and status changes; targets only in B
    (``added``) or only in A (``removed``)."""

    timing: list[TimingChange]
    cache: list[ValueChange]
    status: list[ValueChange]
    added: list[str]
    removed: list[str]


class Divergence(msgspec.Struct, kw_only=True):
    """The first event at which the two streams did different things (``index`` in time order)."""

    index: int
    a: str
    b: str


class BuildDiff(msgspec.Struct, kw_only=True):
    """What changed from A to B.  ``null`` for ``command``/``cwd``: unchanged; for the file lists:
    unknown (a side that is not a file recording); ``first_divergence`` is ``"unavailable"`` when a
    side has no event stream, ``null`` when the streams never diverge."""

    a: DiffSide
    b: DiffSide
    command: CommandChange | None
    cwd: TextChange | None
    env: MapDiff
    tool_versions: ToolsDiff
    inputs: FilesDiff | None
    external_inputs: FilesDiff | None
    outputs: FilesDiff | None
    targets: TargetsDiff
    first_divergence: Divergence | Literal["unavailable"] | None


def typed_diff(a: Side, b: Side, *, min_delta_s: float = 0.05, min_ratio: float = 0.10) -> BuildDiff:
    """:func:`~buildtel.shared.recording.diff.diff` of ``a`` and ``b`` as a :class:`BuildDiff`."""
    return msgspec.convert(diff(a, b, min_delta_s=min_delta_s, min_ratio=min_ratio), BuildDiff)
