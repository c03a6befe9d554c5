"""One id grammar for every command that takes a session, trace or recording id.

    ID := 32 hex digits          a full id (session, trace or recording)
        | 6 to 31 hex digits     a prefix; it must match exactly one id
        | last | last~N          the newest stored session, or the one N before it

Case does not matter (ids are stored lowercase).  ``show``, ``flamegraph --session``,
``trace``, ``trace export``, ``replay`` and ``diff`` all parse with :func:`parse_id`
and resolve with the functions below, so they accept the same words and fail with
the same messages:

* ``no session id starts with 3f2a9c`` (a prefix that matches nothing),
* ``prefix 3f2a9c is ambiguous: 3f2a9c01…, 3f2a9c77…`` (with the candidates),
* ``no sessions stored yet`` (``last`` with an empty store),
* ``only 3 sessions are stored: last~5 needs 6``.

Stored sessions are resolved through the storage service's query API
(:class:`buildtel.services.storage.api.StorageClient`): a full id with ``get``; a prefix by
paging through ``recent`` decoding only each session's id (a prefix must be unique
among *all* stored sessions, so all are looked at); ``last~N`` with ``recent(N+1)``.
Local recordings (``replay``, ``diff``) are resolved against the recording store,
where ``last`` is the newest recording on this machine.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

import msgspec

from buildtel.cli.errors import CLIError

__all__ = [
    "GRAMMAR",
    "IdRef",
    "local_recording",
    "parse_id",
    "pick",
    "resolve_recording",
    "resolve_session",
    "resolve_session_id",
    "resolve_trace_id",
    "stored_ids",
]

FULL_LEN = 32
MIN_PREFIX = 6
MAX_BACK = 9_999  # last~N: at most one storage request's worth of sessions back
SHOWN_CANDIDATES = 8
GRAMMAR = "a full id (32 hex digits), a unique prefix of at least 6 hex digits, 'last' or 'last~N'"
_HEX = re.compile(r"[0-9a-f]+")
_LAST = re.compile(r"last(?:~(\d{1,6}))?")


class IdRef(msgspec.Struct, frozen=True):
    """A parsed id word: ``kind`` full/prefix/last; ``value`` the lowercase hex; ``back`` N of last~N."""

    text: str
    kind: Literal["full", "prefix", "last"]
    value: str = ""
    back: int = 0


def parse_id(text: str) -> IdRef:
    """Parse one id word; :class:`CLIError` says what is wrong and what is accepted."""
    word = text.strip().lower()
    m = _LAST.fullmatch(word)
    if m:
        back = int(m.group(1) or 0)
        if back > MAX_BACK:
            raise CLIError(f"{text!r}: last~N goes back at most {MAX_BACK} sessions")
        return IdRef(text, "last", back=back)
    if not word or not _HEX.fullmatch(word):
        raise CLIError(f"{text!r} is not an id: give {GRAMMAR}")
    if len(word) > FULL_LEN:
        raise CLIError(f"{text!r} has {len(word)} hex digits; a full id has {FULL_LEN}")
    if len(word) < MIN_PREFIX:
        raise CLIError(f"id prefix {word!r} is too short: give at least {MIN_PREFIX} hex digits")
    return IdRef(text, "full" if len(word) == FULL_LEN else "prefix", value=word)


def _last_word(ref: IdRef) -> str:
    return "last" if ref.back == 0 else f"last~{ref.back}"


def pick(ref: IdRef, ids: Iterable[str], *, what: str = "session",
         describe: Callable[[str], str] | None = None) -> str | None:
    """The one id in ``ids`` that ``ref`` (a full id or a prefix) names; ``None`` when none does.
    Raises :class:`CLIError` listing the candidates when a prefix names several."""
    matches = sorted({i for i in ids if i.startswith(ref.value)})
    if not matches:
        return None
    if len(matches) == 1:
        return matches[0]
    shown = [f"{m[:12]}…" + (f" ({describe(m)})" if describe else "") for m in matches[:SHOWN_CANDIDATES]]
    more = f" and {len(matches) - SHOWN_CANDIDATES} more" if len(matches) > SHOWN_CANDIDATES else ""
    raise CLIError(f"prefix {ref.value} is ambiguous: {len(matches)} {what} ids start with it: "
                   f"{', '.join(shown)}{more}; give more digits")


# -- stored sessions (the storage service) ------------------------------------------------------

class _IdOnly(msgspec.Struct):
    """A stored session decoded down to what resolving needs (targets are skipped, not built)."""

    id: str
    name: str = ""
    start: float = 0.0


class _IdPage(msgspec.Struct):
    sessions: list[_IdOnly] = []
    cursor: Any = None


_id_page = msgspec.msgpack.Decoder(_IdPage)


async def stored_ids(client: Any) -> dict[str, _IdOnly]:
    """Every stored session's id (with name and start, for listing candidates), newest first."""
    from buildtel.services.storage.api import (
        MAX_ITEMS,
        Cursor,
        RecentRequest,
        StorageError,
        endpoint_subject,
    )
    from buildtel.shared import micro
    from buildtel.shared.codec import encode

    out: dict[str, _IdOnly] = {}
    cursor: Cursor | None = None
    while True:
        data = await micro.request(client.nc, endpoint_subject(client.subjects, "recent"),
                                   encode(RecentRequest(n=MAX_ITEMS, cursor=cursor)), timeout=client.timeout,
                                   service="storage service", error=StorageError)
        try:
            page = _id_page.decode(data)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise StorageError(500, f"malformed reply from storage: {exc}") from None
        for s in page.sessions:
            out.setdefault(s.id, s)
        if page.cursor is None or not page.sessions:
            return out
        cursor = Cursor(*page.cursor)


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


async def resolve_session_id(client: Any, ref: IdRef | str) -> str:
    """The full id of the stored session ``ref`` names (not checked to exist for a full id)."""
    from buildtel.services.storage.api import StorageError

    ref = parse_id(ref) if isinstance(ref, str) else ref
    if ref.kind == "full":
        return ref.value
    try:
        if ref.kind == "last":
            recent = await client.recent(ref.back + 1)
            if not recent:
                raise CLIError("no sessions stored yet")
            if len(recent) <= ref.back:
                raise CLIError(f"only {len(recent)} session{'s are' if len(recent) != 1 else ' is'} stored: "
                               f"{_last_word(ref)} needs {ref.back + 1}")
            return str(recent[ref.back].id)
        known = await stored_ids(client)
    except StorageError as exc:
        raise CLIError(str(exc)) from None
    if not known:
        raise CLIError(f"no session id starts with {ref.value}: no sessions stored yet")
    found = pick(ref, known, describe=lambda i: f"{_when(known[i].start)} {known[i].name or 'unnamed'}")
    if found is None:
        raise CLIError(f"no session id starts with {ref.value}")
    return found


async def resolve_session(client: Any, ref: IdRef | str) -> Any:
    """The stored :class:`~buildtel.shared.protocol.BuildSession` that ``ref`` names."""
    from buildtel.services.storage.api import StorageError

    ref = parse_id(ref) if isinstance(ref, str) else ref
    sid = await resolve_session_id(client, ref)
    try:
        return await client.get(sid)
    except StorageError as exc:  # 404: "storage error 404: session <id> is not stored"
        raise CLIError(str(exc)) from None


# -- traces (the tracer service; a session id names its build's trace) ---------------------------

async def resolve_trace_id(storage: Any, tracer: Any, ref: IdRef | str) -> str:
    """A full session or trace id for the tracer's ``find``: ``last~N`` and session prefixes via
    storage, trace-id prefixes via the tracer's newest 10 000 traces."""
    from buildtel.services.storage.api import StorageError
    from buildtel.services.tracer.query import QueryError

    ref = parse_id(ref) if isinstance(ref, str) else ref
    if ref.kind != "prefix":
        return ref.value if ref.kind == "full" else await resolve_session_id(storage, ref)
    try:
        sessions = set(await stored_ids(storage))
    except StorageError as exc:
        if exc.code not in (503, 504):
            raise CLIError(str(exc)) from None
        sessions = set()  # no storage service: trace ids alone
    try:
        recent = await tracer.recent(10_000)
    except QueryError as exc:
        raise CLIError(str(exc)) from None
    # A build's trace id is usually its session id: the set counts those digits once.
    ids = sessions | {t.trace_id for t in recent}
    found = pick(ref, ids, what="session or trace")
    if found is None:
        raise CLIError(f"no session or trace id starts with {ref.value}")
    return found


# -- local recordings (the recorder's store on this machine) -------------------------------------

def _local(store: Any) -> dict[str, float]:
    """Local recording ids -> when they were made (manifest time, else the event stream's)."""
    out: dict[str, float] = {}
    for sid in store.event_sessions():
        try:
            out[sid] = (store.events / sid).stat().st_mtime
        except OSError:
            out[sid] = 0.0
    for m in store.list_manifests():
        out[m.id] = m.created
    return out


def local_recording(store: Any, ref: IdRef) -> str | None:
    """The local recording a full id or prefix names; ``None`` when nothing local matches
    (ambiguous prefixes raise).  ``last`` words are not local: see :func:`resolve_recording`."""
    if ref.kind == "last":
        return None
    if ref.kind == "full":
        return ref.value if (store.has_manifest(ref.value) or store.has_events(ref.value)) else None
    return pick(ref, _local(store), what="recording")


def resolve_recording(store: Any, ref: IdRef | str) -> str:
    """For ``replay``: the local recording ``ref`` names (``last`` = the newest on this machine)."""
    ref = parse_id(ref) if isinstance(ref, str) else ref
    if ref.kind == "last":
        known = sorted(_local(store).items(), key=lambda kv: kv[1], reverse=True)
        if not known:
            raise CLIError("no recordings on this machine yet (buildtel run --record -- CMD)")
        if len(known) <= ref.back:
            raise CLIError(f"only {len(known)} recording{'s are' if len(known) != 1 else ' is'} on this machine: "
                           f"{_last_word(ref)} needs {ref.back + 1}")
        return known[ref.back][0]
    found = local_recording(store, ref)
    if found is None:
        raise CLIError(f"no recording on this machine has id {ref.value}" if ref.kind == "full"
                       else f"no recording id starts with {ref.value}")
    return found
