"""Every NATS subject and JetStream stream name, in one place.

All names hang off a *namespace* (``BUILDER_TELEMETRY_NAMESPACE``, default
``buildtel``) so that several farms, or parallel test runs, share one NATS
cluster without seeing each other.  ``docs/protocol.md`` lists who publishes
and subscribes to each.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Subjects:
    ns: str = "buildtel"

    # -- agent -> collector (JetStream: must not be lost) ---------------------------------
    def events(self, session_id: str) -> str:
        return f"{self.ns}.events.{session_id}"

    @property
    def events_all(self) -> str:
        return f"{self.ns}.events.>"

    @property
    def events_stream(self) -> str:
        return f"{self.ns.upper().replace('.', '_').replace('-', '_')}_EVENTS"

    # -- collector -> storage, analyzer (JetStream) ----------------------------------------
    @property
    def sessions_completed(self) -> str:
        return f"{self.ns}.sessions.completed"

    @property
    def sessions_stream(self) -> str:
        return f"{self.ns.upper().replace('.', '_').replace('-', '_')}_SESSIONS"

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
        return f"{self.ns.upper().replace('.', '_').replace('-', '_')}_DEADLETTER"

    # -- request/reply micro services ------------------------------------------------------
    @property
    def storage_api(self) -> str:
        return f"{self.ns}.storage"

    @property
    def micro_prefix(self) -> str:
        """Prefix of the NATS micro discovery subjects ($SRV.*) is fixed by the protocol;
        services are told apart by name, which carries the namespace."""
        return "$SRV"

    def service_name(self, service: str) -> str:
        return f"{self.ns.replace('.', '-')}-{service}"
