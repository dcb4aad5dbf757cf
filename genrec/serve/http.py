"""HTTP-level limits: request size and read deadlines, before a request reaches a route.

Two layers, because the ASGI app only sees a request once its headers are in:

- `deadline_protocol(...)`: uvicorn's httptools protocol with a header deadline and a header size bound.
  A connection that sends nothing, or trickles its request line and headers (slowloris), is closed when
  `header_timeout_s` has passed since its first byte (or since it connected); headers larger than
  `max_header_bytes` get uvicorn's 400.
- `BodyLimit`: pure ASGI middleware (no BaseHTTPMiddleware: it adds a task and a copy per request) that
  reads the body before the app does, within `max_body_bytes` (413, also at once from a Content-Length
  that says more) and within `body_timeout_s` (408: a stalled body is cut off), and hands the app the body
  it read. Both replies close the connection.

Knows nothing of recommendation; genrec.serve.app installs BodyLimit, and `uvicorn_options` (the settings every
`genrec serve` process runs uvicorn with) passes the protocol to uvicorn.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from genrec.serve.protocol import APIError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class HTTPLimits:
    max_body_bytes: int = 1 << 20
    """Largest request body (bytes); a larger one gets 413 before it is read (a template of 64 Ki
    characters, JSON-escaped, is under 400 KiB)."""
    body_timeout_s: float = 30.0
    """Seconds a request's body may take to arrive, from when its headers are in; then 408."""
    header_timeout_s: float = 10.0
    """Seconds a connection may take to send a request line and headers (from its first byte, or from
    connecting); then it is closed. Idle keep-alive connections are closed by uvicorn's keep-alive timeout."""
    max_header_bytes: int = 64 * 1024
    """Largest request line plus headers (bytes); a larger request gets 400."""

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "body_timeout_s", "header_timeout_s", "max_header_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"HTTPLimits.{name} must be > 0, got {getattr(self, name)}")


def deadline_protocol(limits: HTTPLimits) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, closing connections whose headers do not arrive in time or in size."""

    class DeadlineProtocol(HttpToolsProtocol):
        _timer: asyncio.TimerHandle | None = None
        _header_bytes = 0

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_message_begin(self) -> None:  # the first byte of a request: its headers are due
            super().on_message_begin()
            self._arm()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value))
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def _count(self, n: int) -> None:
            self._header_bytes += n
            if self._header_bytes > limits.max_header_bytes:
                # raised inside a parser callback: httptools reports it as a parser error, answered with 400
                raise ValueError(f"request headers exceed {limits.max_header_bytes} bytes")

        def _arm(self) -> None:
            self._disarm()
            self._header_bytes = 0
            self._timer = self.loop.call_later(limits.header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expire(self) -> None:
            self._timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return DeadlineProtocol


class BodyLimit:
    """Reads each request's body within the size and time limits, then runs the app with it."""

    def __init__(self, app: ASGIApp, *, limits: HTTPLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limits.max_body_bytes:
            await self._refuse(
                send, 413, f"request body of {declared} bytes exceeds {self.limits.max_body_bytes}"
            )
            return
        body = await self._read(receive, send)
        if body is None:
            return
        await self.app(scope, replaying(body, receive), send)

    async def _read(self, receive: Receive, send: Send) -> bytes | None:
        """The whole body, or None when refused (already answered) or the client went away. One deadline over
        the whole read (`asyncio.timeout`: a timer, where `wait_for` on each message made a task of it)."""
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return None
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.limits.max_body_bytes:
                        break
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return b"".join(chunks)
        except TimeoutError:
            await self._refuse(
                send, 408, f"request body not received within {self.limits.body_timeout_s:g} s"
            )
            return None
        await self._refuse(send, 413, f"request body exceeds {self.limits.max_body_bytes} bytes")
        return None

    async def _refuse(self, send: Send, status: int, message: str) -> None:
        code = "request_too_large" if status == 413 else "request_timeout"
        payload = json.dumps(APIError(status, message, code=code).body()).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),  # the rest of the body is never read
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def replaying(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the app the `body` already read, as one message, then what the client sends after
    it (its disconnect: streamed responses wait for it)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None  # the server's parser refuses it before the app runs
    return None


KEEP_ALIVE_S = 75
"""Seconds an idle keep-alive connection stays open. Longer than clients keep theirs: httpx, and with it
the `openai` client, keeps 5 s, which was also uvicorn's default, and when both sides use the same expiry
a client can send on a connection the server is closing; that request fails with no response. A
10,000-request soak on the H100 had 2 client-side failures and no server error (BENCHMARKS.md); this is
the likely cause, not a proven one. Load balancers' idle timeouts (often 60 s) need the same margin."""


def uvicorn_options(http: HTTPLimits | None = None) -> dict[str, Any]:
    """The uvicorn settings `genrec serve` runs with (the tests' live servers use them too): the
    httptools protocol with header deadlines (genrec.serve.http)."""
    return {
        "timeout_graceful_shutdown": 30,
        "timeout_keep_alive": KEEP_ALIVE_S,
        "http": deadline_protocol(http or HTTPLimits()),
    }
