"""Redaction of spans received from other processes, before they are stored or forwarded.

Spans arrive over OTLP/HTTP and the bus from tools this project did not write; a
tool that records its command line (``process.command_line``, ``process.command_args``),
a URL with a token in it, or an attribute named like a secret would otherwise put
that secret into the trace store and every exporter.  The same rules as the agent's
(:mod:`buildtel.shared.redaction`) apply: attributes whose key says secret are replaced, and
command lines and URLs keep everything but their secrets.  Other string attributes
are left alone: scanning every value would cost most of the ingest rate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from buildtel.shared.redaction import REDACTED, redact_argv, redact_text
from buildtel.shared.tracemodel import SpanRecord

# Keys (OpenTelemetry semantic conventions) whose values are command lines or URLs.
TEXT_KEYS = frozenset({"process.command_line", "process.command", "url.full", "url.query", "http.url",
                       "http.target", "db.connection_string", "server.url", "build.command"})
ARGV_KEYS = frozenset({"process.command_args", "process.args"})
# An attribute key whose last part names a secret.  Narrower than the environment rule: span
# keys such as ``build.session_id`` or ``cache.key`` name ids, not secrets.
_SECRET_KEY = re.compile(r"(^|[_\-])(password|passwd|passphrase|secret|token|api[_\-]?key|private[_\-]?key|"
                         r"credentials?|authorization|cookie|set[_\-]cookie)$", re.IGNORECASE)


def _redact(attrs: dict[str, Any]) -> int:
    changed = 0
    for key, value in attrs.items():
        if _SECRET_KEY.search(key.rsplit(".", 1)[-1]) and value != REDACTED:
            new: Any = REDACTED
        elif key in TEXT_KEYS and isinstance(value, str):
            new = redact_text(value)
        elif key in ARGV_KEYS and isinstance(value, list) and all(isinstance(v, str) for v in value):
            new = redact_argv(value)
        else:
            continue
        if new != value:
            attrs[key] = new
            changed += 1
    return changed


def redact_spans(spans: Iterable[SpanRecord]) -> int:
    """Redact the attributes (span, resource, events) of ``spans`` in place; returns how many
    values were changed, for a counter and a log line."""
    changed = 0
    for s in spans:
        if s.attributes:
            changed += _redact(s.attributes)
        if s.resource:
            changed += _redact(s.resource)
        for ev in s.events:
            if ev.attributes:
                changed += _redact(ev.attributes)
    return changed
