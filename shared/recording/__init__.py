"""Local recordings: capture a build (command, redacted environment, inputs and outputs by
content hash, event stream), replay it in a sandbox to check reproducibility, travel through its
events, republish them, and diff two builds.  See ``docs/recorder.md``.

A library, not a process: ``buildtel run --record``/``replay``/``diff`` (the CLI) and the
recorder service (``services/recorder``) both use it, so it sits in ``shared/``
(docs/architecture.md).

Modules: ``manifest`` (on-disk structs, path safety), ``store`` (content-addressed store),
``trust`` (manifest signatures), ``recorder`` (:class:`BuildRecorder`), ``capture``
(``buildtel run --record``), ``toolquery`` (make/ninja inputs), ``replay``
(:class:`ReplayEngine`), ``timetravel`` and ``diff``.
"""
