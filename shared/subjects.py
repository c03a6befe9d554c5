"""Every NATS subject and JetStream stream name, in one place.

All names hang off a *namespace* (``BUILDER_TELEMETRY_NAMESPACE``, default
``buildtel``) so that several farms, or parallel test runs, share one NATS
cluster without seeing each other.  ``docs/protocol.md`` lists who publishes
and subscribes to each.

One rule builds every stream name (:func:`stream_name`) and one every request
subject (:meth:`Subjects.endpoint`); the analyzer's and tracer's views
(``services/analyzer/subjects.py``, ``services/tracer/subjects.py``) only
delegate here, so a name on the wire is spelled once.
"""

from __future__ import annotations

from dataclasses import dataclass

_BAD = frozenset(".*>")


def stream_name(ns: str, suffix: str) -> str:
    """``<NS>_<SUFFIX>``: the namespace upper-cased, ``.`` and ``-`` (not allowed in stream
    names) as ``_``.  ``*`` (any namespace, in permissions) stays a one-token wildcard."""
    if ns == "*":
        return "*"
    return f"{ns.upper().replace('.', '_').replace('-', '_')}_{suffix}"


def token(value: str | None) -> str:
    """``value`` as one NATS subject token (lossy but stable; ``_`` for empty or None)."""
    if not value:
        return "_"
    return "".join("_" if (c in _BAD or c.isspace() or not c.isprintable()) else c for c in value)


@dataclass(frozen=True, slots=True)
class Subjects:
    ns: str = "buildtel"

    def stream(self, suffix: str) -> str:
        return stream_name(self.ns, suffix)

    # -- agent -> collector (JetStream: must not be lost) ---------------------------------
    def events(self, session_id: str) -> str:
        return f"{self.ns}.events.{session_id}"

    @property
    def events_all(self) -> str:
        return f"{self.ns}.events.>"

    @property
    def events_stream(self) -> str:
        return self.stream("EVENTS")

    # -- collector -> storage, analyzer, tracer (JetStream) --------------------------------
    @property
    def sessions_completed(self) -> str:
        return f"{self.ns}.sessions.completed"

    def sessions_completed_for(self, session_id: str) -> str:
        """Where the collector publishes a completed session when storage is partitioned: the id as
        the last token, which the sessions stream maps to ``completed.<partition>.<id>``
        (``shared/partitions.py``)."""
        return f"{self.ns}.sessions.completed.{token(session_id)}"

    def sessions_partition(self, k: int) -> str:
        """The completed sessions of storage partition ``k`` (a consumer filter)."""
        return f"{self.ns}.sessions.completed.{k}.*"

    @property
    def sessions_completed_any(self) -> str:
        """Completed sessions published with their id (every partition), for consumer filters."""
        return f"{self.ns}.sessions.completed.>"

    @property
    def sessions_started(self) -> str:
        """A build's first BuildStarted, announced once by the collector (``SessionStarted``)."""
        return f"{self.ns}.sessions.started"

    @property
    def sessions_all(self) -> str:
        """Everything of the sessions stream: started announcements and completed sessions."""
        return f"{self.ns}.sessions.>"

    @property
    def sessions_stream(self) -> str:
        return self.stream("SESSIONS")

    @property
    def sessions_bucket(self) -> str:
        """JetStream object store bucket of the sessions too large for one message
        (``shared/bigmsg.py``); its stream is ``OBJ_<bucket>``."""
        return self.stream("SESSION_OBJECTS")

    @property
    def logs_bucket(self) -> str:
        """JetStream object store bucket of the builds' console logs, one object per session named
        by its id (``shared/logstore.py``); its stream is ``OBJ_<bucket>``."""
        return self.stream("BUILD_LOGS")

    # -- live, best effort (core NATS) -----------------------------------------------------
    def health(self, session_id: str) -> str:
        return f"{self.ns}.health.{session_id}"

    @property
    def health_all(self) -> str:
        return f"{self.ns}.health.*"

    # -- bad input (JetStream, bounded) ----------------------------------------------------
    def dead_letter(self, service: str) -> str:
        return f"{self.ns}.deadletter.{service}"

    @property
    def dead_letter_all(self) -> str:
        return f"{self.ns}.deadletter.>"

    @property
    def dead_letter_stream(self) -> str:
        return self.stream("DEADLETTER")

    # -- analyzer alerts (JetStream; see services/analyzer/subjects.py) ---------------------
    def alert(self, kind: str, branch: str | None, target: str | None) -> str:
        return f"{self.ns}.alerts.{kind}.{token(branch)}.{token(target)}"

    def alerts_filter(self, *, kind: str | None = None, branch: str | None = None, target: str | None = None) -> str:
        """A subscription subject: ``None`` parts match anything."""
        parts = [kind or "*", token(branch) if branch else "*", token(target) if target else "*"]
        return f"{self.ns}.alerts." + ".".join(parts)

    @property
    def alerts_all(self) -> str:
        return f"{self.ns}.alerts.>"

    @property
    def alerts_stream(self) -> str:
        return self.stream("ALERTS")

    # -- the notifier's republished alerts (core NATS; a subscription's ``subject``) ----------
    def notify(self, suffix: str) -> str:
        return f"{self.ns}.notify.{suffix}"

    @property
    def notify_all(self) -> str:
        return f"{self.ns}.notify.>"

    # -- tracer span batches (JetStream) ---------------------------------------------------
    @property
    def spans(self) -> str:
        return f"{self.ns}.spans"

    @property
    def spans_stream(self) -> str:
        return self.stream("SPANS")

    # -- request/reply micro services ------------------------------------------------------
    def api(self, service: str) -> str:
        """Subject prefix of a service's request endpoints (the tracer's is ``<ns>.traces``)."""
        return f"{self.ns}.{_API_TOKEN.get(service, service)}"

    def endpoint(self, service: str, name: str) -> str:
        return f"{self.api(service)}.{name}"

    @property
    def storage_api(self) -> str:
        return self.api("storage")

    def storage_partition_endpoint(self, k: int, name: str) -> str:
        """The request subject of storage partition ``k`` alone (``<ns>.storage.p<k>.<name>``);
        ``endpoint("storage", name)`` is answered by any partition for all of them, merged."""
        return f"{self.storage_api}.p{k}.{name}"

    @property
    def micro_prefix(self) -> str:
        """Prefix of the NATS micro discovery subjects ($SRV.*) is fixed by the protocol;
        services are told apart by name, which carries the namespace."""
        return "$SRV"

    def service_name(self, service: str) -> str:
        return f"{self.ns.replace('.', '-')}-{service}"


# Request subjects named otherwise than their service (kept: they are on the wire).
_API_TOKEN = {"tracer": "traces"}
