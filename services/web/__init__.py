"""The web service: a versioned HTTP/JSON API (``/api/v1/``) over the stack's data, answered by
asking storage and the analyzer over NATS (``docs/api.md``)."""
