"""Recorder service (``service``): the bus consumer that keeps flagged sessions' event streams
in the recording store.  See ``docs/recorder.md``.

Recordings themselves (store, capture, replay, time travel, diff) are a library the CLI uses
too: :mod:`buildtel.shared.recording`.
"""
