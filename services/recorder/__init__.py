"""Build recorder: capture a build (command, redacted environment, inputs and outputs by content
hash, event stream), replay it in a sandbox to check reproducibility, travel through its
events, republish them, and diff two builds.  See ``docs/recorder.md``.

Modules: ``manifest`` (on-disk structs, path safety), ``store`` (content-addressed store),
``recorder`` (:class:`BuildRecorder`), ``capture`` (``buildtel run --record``), ``toolquery``
(make/ninja inputs), ``replay`` (:class:`ReplayEngine`), ``timetravel``, ``diff``, and
``service`` (the bus consumer that keeps flagged sessions' event streams).
"""
