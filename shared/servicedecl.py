"""What a service declares to the skeleton (``shared/service.py``, which re-exports all of it):
the typed error codes of micro endpoints, :class:`ServiceError`, and the :class:`Consumer`,
:class:`Endpoint` and :class:`Worker` declarations its ``consumers()``, ``endpoints()`` and
``workers()`` return.  Plain data: no I/O here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from buildtel.shared.bus import MAX_DELIVER

# Typed error codes of the micro endpoints (HTTP-like, as the NATS micro spec suggests).
BAD_REQUEST = 400
NOT_FOUND = 404
TOO_LARGE = 413
INTERNAL = 500
BAD_GATEWAY = 502


class ServiceError(Exception):
    """An endpoint's refusal: ``code`` (an int, e.g. :data:`NOT_FOUND`) and what went wrong.

    Sent as the ``Nats-Service-Error-Code`` / ``Nats-Service-Error`` headers."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = int(code)
        self.message = message


@dataclass(frozen=True, slots=True)
class Consumer:
    """One durable pull consumer and how its messages are handled."""

    stream: str
    subject: str
    durable: str
    handler: Callable[[Any], Awaitable[None]]  # one message, or a fetch's list when batch
    batch: bool = False
    what: str = "handle"  # names the failure log event: "<service>.<what>_failed"
    fetch: int = 64
    fetch_timeout_s: float = 0.5
    ack_wait_s: float = 30.0
    max_ack_pending: int = 1024
    max_deliver: int = MAX_DELIVER
    # The service dead-letters a failing message itself on this delivery (None: the server's
    # max-deliveries advisory does it once max_deliver is reached).
    poison_after: int | None = None
    nak_delay: Callable[[int], float] | None = None  # delivery count -> redelivery delay; None: no NAK
    # The dead letter's reason once poison_after is reached ({what}, {delivered}, {error} filled in).
    poison_reason: str = "{what} failed {delivered} times (each delivery): {error}"
    failure_pause_s: float = 0.0  # after a failed message or fetch, before the next
    cancel_idle_fetch: bool = False  # on stop, cancel a fetch waiting for messages (nothing in flight)
    stop_timeout_s: float = 5.0  # on stop, how long the batch in hand may take
    lag_metric: str = "consumer_lag"
    lost: Callable[[str, str], Awaitable[None]] | None = None  # (subject, reason) of an advisory dead letter
    # Several filter subjects instead of ``subject`` (storage partitions, shared/partitions.py);
    # ``subject`` still says what the messages are (completed sessions are resolved, see _consume).
    filter_subjects: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A micro-service endpoint: request body in, reply body out (or :class:`ServiceError`)."""

    name: str
    subject: str
    handler: Callable[[bytes], Awaitable[bytes]]


@dataclass(frozen=True, slots=True)
class Worker:
    """A background loop; it should return once :attr:`BusService.stopping` is set."""

    name: str
    run: Callable[[], Coroutine[Any, Any, None]]  # a coroutine: it runs as its own task
    cancel_on_stop: bool = False  # cancelled at once on stop instead of awaited (bounded)
