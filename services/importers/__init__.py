"""Importers: existing build-tool output → :class:`~shared.protocol.BuildSession` objects.

Pure parsers (bytes in, sessions out; no I/O, no bus) for

* ninja's ``.ninja_log`` (:mod:`services.importers.ninja`),
* Bazel's Build Event Protocol JSON stream (:mod:`services.importers.bep`),
* Trace Event Format files from Bazel ``--profile``, clang ``-ftime-trace`` and
  CMake ``--profiling-output`` (:mod:`services.importers.chrome_trace`).

``buildtel import`` (``services/cli/cmd_import.py``) publishes what they return;
``docs/importers.md`` lists what each maps and ignores.
"""

from services.importers.bep import parse_bep
from services.importers.chrome_trace import (
    ChromeTraceImport,
    TraceSpan,
    parse_chrome_trace,
)
from services.importers.common import ImportFormatError, ImportResult, ParseWarning
from services.importers.ninja import parse_ninja_log

__all__ = [
    "ChromeTraceImport",
    "ImportFormatError",
    "ImportResult",
    "ParseWarning",
    "TraceSpan",
    "parse_bep",
    "parse_chrome_trace",
    "parse_ninja_log",
]
