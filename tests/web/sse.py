"""A small real server-sent-events client for the live stream tests (aiohttp, line by line)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import aiohttp


@dataclass
class Event:
    event: str
    id: str | None
    data: Any


@dataclass
class SseClient:
    """One open ``/api/v1/stream``: :meth:`next` returns its events in order (comments are kept in
    ``comments``, ``retry`` and the last ``id`` as the browser would keep them)."""

    resp: aiohttp.ClientResponse
    last_id: str | None = None
    retry: int | None = None
    comments: list[str] = field(default_factory=list)
    ended: bool = False

    async def next(self, timeout: float = 20.0) -> Event:
        """The next event with data (an ``id:``-only block just updates ``last_id``)."""
        async with asyncio.timeout(timeout):
            while True:
                ev = await self._block()
                if ev is not None:
                    return ev

    async def events(self, n: int, timeout: float = 20.0) -> list[Event]:
        return [await self.next(timeout) for _ in range(n)]

    async def until_end(self, timeout: float = 20.0) -> list[Event]:
        """Every event up to the end of the stream (the server closed it)."""
        out = []
        async with asyncio.timeout(timeout):
            while not self.ended:
                ev = await self._block()
                if ev is not None:
                    out.append(ev)
        return out

    async def _block(self) -> Event | None:
        name, data, ident = "message", [], None
        while True:
            raw = await self.resp.content.readline()
            if not raw:
                self.ended = True
                return None
            line = raw.decode().rstrip("\n")
            if line == "":
                break
            if line.startswith(":"):
                self.comments.append(line[1:].strip())
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                name = value
            elif key == "data":
                data.append(value)
            elif key == "id":
                ident = value
            elif key == "retry":
                self.retry = int(value)
        if ident is not None:
            self.last_id = ident
        if not data:
            return None
        return Event(name, ident, json.loads("\n".join(data)))


async def open_stream(http: aiohttp.ClientSession, url: str, key: str | None, last_id: str | None = None,
                      **params: str) -> SseClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if last_id is not None:
        headers["Last-Event-ID"] = last_id
    resp = await http.get(url + "/api/v1/stream", headers=headers, params=params or None,
                          timeout=aiohttp.ClientTimeout(total=None, sock_read=None))
    assert resp.status == 200, await resp.text()
    assert resp.content_type == "text/event-stream"
    client = SseClient(resp)
    await client._block()  # the opening retry/id block: the stream is live from here on
    return client
