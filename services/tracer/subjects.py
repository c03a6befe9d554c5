"""NATS subjects and JetStream names of the tracer, derived from ``buildtel.shared.subjects.Subjects``.

Every name is built by :class:`buildtel.shared.subjects.Subjects` (the one builder,
same namespace rules); this view keeps the tracer's spelling for its callers, and
the spans stream's limits.
"""

from __future__ import annotations

from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

from buildtel.shared.subjects import Subjects

DAY_S = 86400.0
MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class TracerSubjects:
    subjects: Subjects

    @property
    def ns(self) -> str:
        return self.subjects.ns

    # -- span batches from processes using the tracing API (JetStream) ---------------------
    @property
    def spans(self) -> str:
        return self.subjects.spans

    @property
    def spans_stream(self) -> str:
        return self.subjects.spans_stream

    # -- trace queries (nats.micro request/reply) ------------------------------------------
    @property
    def traces_api(self) -> str:
        return self.subjects.api("tracer")

    def endpoint(self, name: str) -> str:
        return self.subjects.endpoint("tracer", name)

    @property
    def service_name(self) -> str:
        return self.subjects.service_name("tracer")

    def spans_stream_config(self) -> StreamConfig:
        # Limits retention: the stream is a buffer between exporting processes and the
        # tracer, so a tracer that is down for a while catches up instead of losing spans.
        return StreamConfig(
            name=self.spans_stream,
            subjects=[self.spans],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            max_age=7 * DAY_S,
            max_bytes=1024 * MiB,
            max_msg_size=1 * MiB,
            discard=DiscardPolicy.OLD,
            duplicate_window=120.0,
        )


async def ensure_spans_stream(js: JetStreamContext, tsubjects: TracerSubjects, *, replicas: int | None = None) -> None:
    """Declare the spans stream (idempotent; converges on our limits if it exists)."""
    from buildtel.shared.bus import ensure_stream

    await ensure_stream(js, tsubjects.spans_stream_config(), replicas=replicas)
