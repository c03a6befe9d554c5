"""Calling a NATS micro service: one request, its error headers turned into a coded exception.

Every query API (storage, tracer, analyzer) answers errors the NATS micro way
(``Nats-Service-Error-Code`` / ``Nats-Service-Error`` headers); clients raise their
own exception type with an HTTP-like code: the service's, 503 when no instance
is listening, 504 when none answered in time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError


class ServiceError(Exception):
    """A service refused or failed a request; ``code`` is HTTP-like (404 = not found, 503 = no
    instance listening, 504 = none answered in time).  Each client has its subclass, whose
    ``service`` names it in the message."""

    service = "service"

    def __init__(self, code: int, description: str) -> None:
        super().__init__(f"{self.service} error {code}: {description}")
        self.code = code
        self.description = description


ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"


async def request(nc: Any, subject: str, body: bytes, *, timeout: float, service: str,
                  error: Callable[[int, str], Exception]) -> bytes:
    """The reply's body; raises ``error(code, description)`` for any failure."""
    try:
        msg = await nc.request(subject, body, timeout=timeout)
    except NoRespondersError:
        raise error(503, f"no {service} is answering on {subject}") from None
    except NatsTimeoutError:
        raise error(504, f"the {service} did not answer {subject} within {timeout:g}s") from None
    headers = msg.headers or {}
    code = headers.get(ERROR_CODE_HEADER)
    if code:
        raise error(int(code) if code.isdigit() else 500, headers.get(ERROR_HEADER, ""))
    data: bytes = msg.data  # nats-py leaves Msg.data untyped; it is the reply's body
    return data
