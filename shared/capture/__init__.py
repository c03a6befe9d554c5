"""Live per-target capture for ``buildtel run``: make recipes through a SHELL wrapper,
ninja edges from the ``.ninja_log`` it appends to, and health checkpoints for every
run.  ``docs/live-capture.md`` explains the approach and its limits.

``live_sources(argv, cache_dir)`` is what ``cli/cmd_run.py`` plugs in; every source
implements :class:`TargetSource` (``source.py``).
"""

from buildtel.shared.capture.live import LiveSource, live_sources
from buildtel.shared.capture.source import TargetSource

__all__ = ["LiveSource", "TargetSource", "live_sources"]
