"""Flame graphs, diffs and recordings over HTTP: handlers registered by :func:`register`.

Like the rest of the API they hold nothing: a flame graph is the analyzer's ``flamegraph``
endpoint's SVG (drawn by the function ``buildtel flamegraph`` uses, so the bytes are the CLI's for
the same sessions and options), a diff of two sessions is computed here from the two sessions
storage sends (``shared/recording/diffview.py``, the CLI's diff), and recordings are asked of the
recorder, which keeps them on its machine (``services/recorder/api.py``).

``/api/v1/diff/{a}/{b}`` always compares stored sessions and ``/api/v1/recordings/{a}/diff/{b}``
recordings: unlike ``buildtel diff``, which prefers a local recording, the API never lets an
answer's kind depend on which service happened to answer.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal, Protocol

import msgspec
from aiohttp import web

from buildtel.services.analyzer.api import AnalyzerClient, AnalyzerError, FlameGraphRequest, FlameGraphSelection
from buildtel.services.recorder.api import (
    MAX_EVENTS,
    MAX_PAGE,
    DiffRequest,
    EventsRequest,
    ListCursor,
    ListRequest,
    RecorderClient,
    RecorderError,
)
from buildtel.services.storage.api import StorageClient, StorageError
from buildtel.services.web.artifacts_schema import (
    DEFAULT_EVENTS,
    DEFAULT_FLAME_LAST,
    DEFAULT_RECORDINGS,
    MAX_FLAME_LAST,
    SVG,
    RecordingPage,
)
from buildtel.services.web.base import BACKEND, TENANT, BadGateway, NotFound, Unavailable, json_response
from buildtel.services.web.query import BadInput, parse_query, parse_session_id, parse_time
from buildtel.shared.keyed import keyed
from buildtel.shared.recording.diff import side_from_session
from buildtel.shared.recording.diffview import typed_diff
from buildtel.shared.subjects import Subjects

Text = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
# Pixels or a percentage of the total, as `buildtel flamegraph --minwidth` takes it.
MinWidth = Annotated[str, msgspec.Meta(pattern=r"^[0-9]{1,6}(\.[0-9]{1,6})?%?$")]


class Source(Protocol):
    """What these handlers need of the web service (``service.py``)."""

    nc: Any

    async def session_id(self, tenant: str, word: str) -> str: ...


class LookQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    title: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    width: Annotated[int, msgspec.Meta(ge=100, le=20_000)] = 1200
    minwidth: MinWidth = "0.1"


class WindowQuery(LookQuery, kw_only=True, forbid_unknown_fields=True):
    last: Annotated[int, msgspec.Meta(ge=1, le=MAX_FLAME_LAST)] | None = None
    branch: Text | None = None
    outcome: Literal["success", "failed", "abandoned", "cancelled", "unknown"] | None = None
    target: Text | None = None
    since: str | None = None
    until: str | None = None


class DiffQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    min_delta: Annotated[float, msgspec.Meta(ge=0, le=1e6)] = 0.05
    min_ratio: Annotated[float, msgspec.Meta(ge=0, le=1e6)] = 0.10


class RecordingsQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE)] = DEFAULT_RECORDINGS
    cursor: Annotated[str, msgspec.Meta(max_length=1024)] | None = None


class EventsQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    from_: Annotated[int, msgspec.Meta(ge=0, le=2**31)] = msgspec.field(default=0, name="from")
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_EVENTS)] = DEFAULT_EVENTS


def _source(request: web.Request) -> Source:
    return request.app[BACKEND]  # type: ignore[return-value]


async def _session_ids(request: web.Request, *names: str) -> list[str]:
    """The full stored ids of the path's ``names`` (a prefix is resolved against storage)."""
    src, tenant = _source(request), request[TENANT]
    return [await src.session_id(tenant, parse_session_id(request.match_info[n])) for n in names]


def _look(q: LookQuery) -> dict[str, Any]:
    minwidth: float | str = q.minwidth if q.minwidth.endswith("%") else float(q.minwidth)
    return {"title": q.title, "width": q.width, "minwidth": minwidth}


async def _svg(request: web.Request, req: FlameGraphRequest) -> web.Response:
    try:
        reply = await AnalyzerClient(_source(request).nc, request[TENANT], attempts=1).flamegraph(req)
    except AnalyzerError as exc:
        raise _failure(exc.code, exc.description, "analyzer") from None
    return web.Response(body=reply.svg, content_type=SVG)


async def session_flamegraph(request: web.Request) -> web.Response:
    [sid] = await _session_ids(request, "id")
    return await _svg(request, FlameGraphRequest(session=sid, **_look(parse_query(request.query, LookQuery))))


async def session_flamechart(request: web.Request) -> web.Response:
    [sid] = await _session_ids(request, "id")
    return await _svg(request, FlameGraphRequest(session=sid, chart=True,
                                                 **_look(parse_query(request.query, LookQuery))))


async def window_flamegraph(request: web.Request) -> web.Response:
    q = parse_query(request.query, WindowQuery)
    since, until = parse_time("since", q.since), parse_time("until", q.until)
    # The analyzer reads each session whole: never all of history at once.  No window at all is the
    # last few sessions; a time window at most the last MAX_FLAME_LAST of it.
    if q.last is not None:
        last = q.last
    else:
        last = MAX_FLAME_LAST if since is not None or until is not None else DEFAULT_FLAME_LAST
    return await _svg(request, FlameGraphRequest(last=last, branch=q.branch, outcome=q.outcome, target=q.target,
                                                 since=since, until=until, **_look(q)))


async def diff_flamegraph(request: web.Request) -> web.Response:
    a, b = await _session_ids(request, "a", "b")
    q = parse_query(request.query, LookQuery)
    return await _svg(request, FlameGraphRequest(session=b, diff=FlameGraphSelection(session=a), **_look(q)))


async def session_diff(request: web.Request) -> web.Response:
    q = parse_query(request.query, DiffQuery)
    ids = await _session_ids(request, "a", "b")
    storage = StorageClient(_source(request).nc, Subjects(request[TENANT]))
    sides = []
    for sid in ids:
        try:
            sides.append(side_from_session(await storage.get(sid)))
        except StorageError as exc:
            raise _failure(exc.code, f"no session {sid} is stored" if exc.code == 404 else exc.description,
                           "storage service") from None
    return json_response(typed_diff(sides[0], sides[1], min_delta_s=q.min_delta, min_ratio=q.min_ratio))


# -- recordings (the recorder service) ---------------------------------------------------------
def _recorder(request: web.Request) -> RecorderClient:
    return RecorderClient(_source(request).nc, Subjects(request[TENANT]))


def _recording_id(request: web.Request, name: str = "id") -> str:
    """A recording id or prefix from the path: lowercase hex only (never a path), else 400."""
    try:
        return parse_session_id(request.match_info[name])
    except BadInput:
        raise BadInput(f"{request.match_info[name][:64]!r} is not a recording id: give a full id (32 hex "
                       "digits) or a unique prefix of at least 6") from None


async def _ask(coro: Any) -> Any:
    try:
        return await coro
    except RecorderError as exc:
        raise _failure(exc.code, exc.description, "recorder") from None


async def list_recordings(request: web.Request) -> web.Response:
    q = parse_query(request.query, RecordingsQuery)
    reply = await _ask(_recorder(request).list(ListRequest(limit=q.limit, cursor=_decode_cursor(q.cursor))))
    return json_response(RecordingPage(recordings=reply.recordings, next_cursor=_encode_cursor(reply.cursor)))


async def get_recording(request: web.Request) -> web.Response:
    rid = _recording_id(request)
    return json_response(keyed(await _ask(_recorder(request).get(rid))))


async def recording_events(request: web.Request) -> web.Response:
    rid = _recording_id(request)
    q = parse_query(request.query, EventsQuery)
    reply = await _ask(_recorder(request).events(EventsRequest(id=rid, start=q.from_, limit=q.limit)))
    return json_response(keyed(reply))


async def recording_diff(request: web.Request) -> web.Response:
    a, b = _recording_id(request, "a"), _recording_id(request, "b")
    q = parse_query(request.query, DiffQuery)
    return json_response(await _ask(_recorder(request).diff(DiffRequest(a=a, b=b, min_delta_s=q.min_delta,
                                                                         min_ratio=q.min_ratio))))


def _encode_cursor(cursor: ListCursor | None) -> str | None:
    if cursor is None:
        return None
    return base64.urlsafe_b64encode(msgspec.json.encode(cursor)).decode().rstrip("=")


def _decode_cursor(text: str | None) -> ListCursor | None:
    if text is None:
        return None
    try:
        return msgspec.json.decode(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)), type=ListCursor)
    except (binascii.Error, ValueError, msgspec.DecodeError, msgspec.ValidationError):
        raise BadInput("parameter 'cursor' is not a cursor this API gave (pass next_cursor unchanged)") from None


def _failure(code: int, description: str, service: str) -> Exception:
    """A backend's coded failure as the API's: 400/413 what to change, 404, 503 away, else 502."""
    if code in (400, 413):
        return BadInput(description)
    if code == 404:
        return NotFound(description)
    if code in (503, 504):
        return Unavailable(f"the {service} did not answer: {description}")
    return BadGateway(f"the {service} failed the request: {description}")


def register(app: web.Application) -> None:
    """Add these routes to the API's application (``service.py``, next to ``create_app``)."""
    app.router.add_get("/api/v1/sessions/{id}/flamegraph.svg", session_flamegraph)
    app.router.add_get("/api/v1/sessions/{id}/flamechart.svg", session_flamechart)
    app.router.add_get("/api/v1/flamegraph.svg", window_flamegraph)
    app.router.add_get("/api/v1/diff/{a}/{b}/flamegraph.svg", diff_flamegraph)
    app.router.add_get("/api/v1/diff/{a}/{b}", session_diff)
    app.router.add_get("/api/v1/recordings", list_recordings)
    app.router.add_get("/api/v1/recordings/{id}", get_recording)
    app.router.add_get("/api/v1/recordings/{id}/events", recording_events)
    app.router.add_get("/api/v1/recordings/{a}/diff/{b}", recording_diff)
