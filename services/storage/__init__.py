"""The storage service: completed build sessions in an append-only, checksummed file store.

``format`` (bytes on disk), ``index`` (in-memory summaries), ``store``
(:class:`TelemetryStorage`), ``maintenance`` (open and retention), ``api``
(query messages and :class:`StorageClient`), ``service`` (the NATS service).
See ``docs/storage-format.md``.
"""
