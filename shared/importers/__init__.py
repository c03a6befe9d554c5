"""Importers: existing build-tool output → :class:`~buildtel.shared.protocol.BuildSession` objects.

Pure parsers (bytes in, sessions out; no I/O, no bus) for

* ninja's ``.ninja_log`` (:mod:`buildtel.shared.importers.ninja`),
* Bazel's Build Event Protocol JSON stream (:mod:`buildtel.shared.importers.bep`),
* Trace Event Format files from Bazel ``--profile``, clang ``-ftime-trace`` and
  CMake ``--profiling-output`` (:mod:`buildtel.shared.importers.chrome_trace`).

``buildtel import`` (``cli/cmd_import.py``) publishes what they return;
``docs/importers.md`` lists what each maps and ignores.
"""

from buildtel.shared.importers.bep import parse_bep
from buildtel.shared.importers.chrome_trace import (
    ChromeTraceImport,
    TraceSpan,
    parse_chrome_trace,
)
from buildtel.shared.importers.common import ImportFormatError, ImportResult, ParseWarning
from buildtel.shared.importers.ninja import parse_ninja_log

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
