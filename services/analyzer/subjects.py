"""The analyzer's subjects and stream, built on :class:`buildtel.shared.subjects.Subjects` (same namespace rules).

Alerts (JetStream stream ``<NS>_ALERTS``, subjects ``<ns>.alerts.>``)::

    <ns>.alerts.<kind>.<branch>.<target>

* ``kind``: ``build`` (a whole build's duration) or ``target`` (one target);
* ``branch``: the VCS branch as a token, ``_`` when unknown;
* ``target``: the target name as a token, ``_`` for build alerts.

A token is the name with every character NATS does not allow inside a token
(``.``, ``*``, ``>``, whitespace, control characters) replaced by ``_``; use
:func:`token` to build a filter.  A farm subscribes by branch with
``<ns>.alerts.*.main.>``, by target with ``<ns>.alerts.target.*.<token>``.
The payload names the real branch and target.

Analytics requests (NATS micro service ``<ns>-analyzer``, queue group ``q``)::

    <ns>.analyzer.report   ReportRequest -> AnalyticsReport
    <ns>.analyzer.stats    {}            -> AnalyzerStats
"""

from __future__ import annotations

from dataclasses import dataclass

from buildtel.shared.subjects import Subjects, token

__all__ = ["AnalyzerSubjects", "token"]


@dataclass(frozen=True, slots=True)
class AnalyzerSubjects:
    """The analyzer's names; every one is built by :class:`Subjects` (the one builder)."""

    base: Subjects

    @classmethod
    def of(cls, namespace: str) -> AnalyzerSubjects:
        return cls(Subjects(namespace))

    @property
    def ns(self) -> str:
        return self.base.ns

    # -- alerts (JetStream) ----------------------------------------------------------------
    def alert(self, kind: str, branch: str | None, target: str | None) -> str:
        return self.base.alert(kind, branch, target)

    def alerts_filter(self, *, kind: str | None = None, branch: str | None = None, target: str | None = None) -> str:
        """A subscription subject: ``None`` parts match anything."""
        return self.base.alerts_filter(kind=kind, branch=branch, target=target)

    @property
    def alerts_all(self) -> str:
        return self.base.alerts_all

    @property
    def alerts_stream(self) -> str:
        return self.base.alerts_stream

    # -- request/reply ---------------------------------------------------------------------
    @property
    def api(self) -> str:
        return self.base.api("analyzer")

    def endpoint(self, name: str) -> str:
        return self.base.endpoint("analyzer", name)

    @property
    def service_name(self) -> str:
        return self.base.service_name("analyzer")
