"""The recorder's bus API: what other services may ask of the recordings on its machine.

Recordings live where the recorder runs (``<data dir>/recordings/``); the web service asks for
them here instead of holding a copy, and the analyzer asks for the diff of the two builds an
alert names (their input files).  Requests go to the ``<ns>-recorder`` NATS micro service on
``<ns>.recorder.{list,get,events,diff}`` (:func:`endpoint_subject`); bodies are MessagePack,
errors micro errors (400 a bad request or an ambiguous id prefix, 404 no such recording, 413 a
reply over one NATS message) raised by :class:`RecorderClient` as :class:`RecorderError`.

What is sent is what a recording holds about itself: its manifest's fields (command, directory,
the redacted environment, file paths with their hashes and sizes), its events and counts of
them, and diffs.  Never a file's content: nothing here reads the object store.  An id is a full
recording id (32 lowercase hex digits) or a prefix of at least 6 of them, matched against the
store's own listing, so no request names a path.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from buildtel.shared import micro
from buildtel.shared.micro import ServiceError
from buildtel.shared.protocol import BuildEnvironment, Event
from buildtel.shared.recording.diffview import BuildDiff
from buildtel.shared.recording.manifest import ExternalInput, FileEntry
from buildtel.shared.subjects import Subjects

ENDPOINTS = ("list", "get", "events", "diff")
MAX_PAGE = 1000  # recordings per list page
MAX_EVENTS = 5000  # events per page
MAX_FILES = 2000  # inputs and outputs listed per recording (the counts are always whole)
RecordingRef = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{6,32}$")]


def endpoint_subject(subjects: Subjects, endpoint: str) -> str:
    return subjects.endpoint("recorder", endpoint)


class ListCursor(msgspec.Struct, array_like=True, frozen=True):
    """Where the previous page stopped: the (created, id) of its last recording."""

    created: float
    id: str


class ListRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_PAGE)] = 50
    cursor: ListCursor | None = None


class RecordingSummary(msgspec.Struct, kw_only=True):
    """One recording: ``kind`` ``files`` (a run captured by ``buildtel run --record``, with its
    manifest) or ``events`` (an event stream the recorder kept without a file capture)."""

    id: str
    kind: str
    created: float  # Unix s: the manifest's time, else when the event stream was last written
    command: list[str] = []
    exit_code: int | None = None
    session_id: str | None = None
    inputs: int = 0
    outputs: int = 0


class ListReply(msgspec.Struct, kw_only=True):
    recordings: list[RecordingSummary]
    cursor: ListCursor | None = None  # set: more follow (pass it back)


class GetRequest(msgspec.Struct, kw_only=True):
    id: RecordingRef


class EventCounts(msgspec.Struct, kw_only=True):
    """The recording's event stream: events in all, per type and per agent, and its time span."""

    total: int = 0
    by_type: dict[str, int] = {}
    agents: dict[str, int] = {}
    first_ts: float | None = None
    last_ts: float | None = None


class RecordingInfo(msgspec.Struct, kw_only=True):
    """A recording described: its manifest's fields (paths, hashes and sizes of its files, at most
    ``MAX_FILES`` of each list; ``*_count`` are whole) and counts of its events.  No file content."""

    id: str
    kind: str
    created: float
    session_id: str | None = None
    command: list[str] = []
    argv_redacted: bool = False
    cwd: str = ""
    exit_code: int | None = None
    started: float = 0.0
    finished: float = 0.0
    input_method: str = ""
    environment: BuildEnvironment | None = None
    inputs: list[FileEntry] = []
    inputs_count: int = 0
    outputs: list[FileEntry] = []
    outputs_count: int = 0
    removed: list[str] = []
    external_inputs: list[ExternalInput] = []
    refused: list[str] = []
    notes: list[str] = []
    files_truncated: bool = False
    events: EventCounts = msgspec.field(default_factory=EventCounts)


class EventsRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    id: RecordingRef
    start: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1, le=MAX_EVENTS)] = 500


class RecordingEvents(msgspec.Struct, kw_only=True):
    """Events ``start`` .. ``start + len(events)`` of the stream in time order (ts, agent, seq);
    ``next`` is the ``start`` of the next page, ``null`` after the last."""

    id: str
    total: int
    start: int
    events: list[Event]
    next: int | None = None


class DiffRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    a: RecordingRef
    b: RecordingRef
    min_delta_s: Annotated[float, msgspec.Meta(ge=0)] = 0.05
    min_ratio: Annotated[float, msgspec.Meta(ge=0)] = 0.10


class RecorderError(ServiceError):
    service = "recorder"


_enc = msgspec.msgpack.Encoder()
_list = msgspec.msgpack.Decoder(ListReply)
_info = msgspec.msgpack.Decoder(RecordingInfo)
_events = msgspec.msgpack.Decoder(RecordingEvents)
_diff = msgspec.msgpack.Decoder(BuildDiff)


class RecorderClient:
    """Ask the recorder service of ``subjects``' namespace (no retries: these are quick reads)."""

    def __init__(self, nc: Any, subjects: Subjects, *, timeout: float = 10.0) -> None:
        self.nc, self.subjects, self.timeout = nc, subjects, timeout

    async def _request(self, endpoint: str, req: msgspec.Struct) -> bytes:
        return await micro.request(self.nc, endpoint_subject(self.subjects, endpoint), _enc.encode(req),
                                   timeout=self.timeout, service="recorder service", error=RecorderError)

    async def list(self, req: ListRequest) -> ListReply:
        return _list.decode(await self._request("list", req))

    async def get(self, rid: str) -> RecordingInfo:
        return _info.decode(await self._request("get", GetRequest(id=rid)))

    async def events(self, req: EventsRequest) -> RecordingEvents:
        return _events.decode(await self._request("events", req))

    async def diff(self, req: DiffRequest) -> BuildDiff:
        return _diff.decode(await self._request("diff", req))
