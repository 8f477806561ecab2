"""uvicorn's HTTP/1.1 protocol, guarded: a request must arrive whole within a time limit, its head must fit a
size limit however its bytes arrive, and what the protocol answers by itself is JSON in the API's error shape.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and caps connections
(``limit_concurrency``), but a client that sends half a header, or half a body, is waited for
without end; enough of them hold every connection slot. The protocol class made here closes a
connection whose request (headers and body) has not fully arrived ``read_timeout`` seconds after its
first byte (or after the connection opened).

h11 limits only an event it has not seen the end of: a head (request line and header fields) that
arrives in pieces is refused once its buffer passes 16 KiB, but a whole head read at once is parsed
whatever its size. Here every head is measured before h11 parses it, so a longer one gets 431 however
it arrives. The answers uvicorn gives without the app (a malformed request, too many connections) are
``{"error": ..., "code": ...}`` as well.

    >>> import uvicorn
    >>> config = uvicorn.Config("atman.server:app", http=guarded_protocol(15.0))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("atman.server")
# states of the client's side of the connection in which its request is still arriving
INCOMPLETE = (h11.IDLE, h11.SEND_BODY)
# the request line and header fields together, in bytes (h11's and uvicorn's default for an incomplete event)
MAX_HEADER_BYTES = 16 * 1024
# where a request's head ends, as h11 finds it
HEAD_END = re.compile(b"\n\r?\n")
CODES = {400: "MALFORMED_REQUEST", 431: "HEADERS_TOO_LARGE", 501: "NOT_IMPLEMENTED"}
# seconds a refused connection stays open after its answer, its further bytes read and dropped: closed with
# bytes unread, the connection would be reset, and a client still sending could lose the answer
LINGER_S = 2.0


def error_body(message: str, code: str) -> bytes:
    """The API's error JSON (``{"error": ..., "code": ...}``), ASCII only."""
    return json.dumps({"error": message, "code": code}, ensure_ascii=True).encode("ascii")


class HeadLimitedConnection(h11.Connection):
    """h11's server side of a connection, refusing a request head longer than ``max_header_bytes``.

    The limit is checked on the bytes waiting to be parsed before each request, so it holds whether
    the head came in one read or in many. The refusal is an ``h11.RemoteProtocolError`` with
    ``error_status_hint`` 431, like h11's own for an over-long incomplete head; the last refusal is
    kept in :attr:`refusal` for the answer.
    """

    def __init__(self, max_header_bytes: int, max_incomplete_event_size: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size=max_incomplete_event_size)
        self.max_header_bytes = max_header_bytes
        self.refusal: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            if self.their_state is h11.IDLE:
                self._check_head()
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.refusal = exc
            raise

    def _check_head(self) -> None:
        pending, _ = self.trailing_data
        limit = self.max_header_bytes
        if len(pending) > limit and HEAD_END.search(pending, 0, limit) is None:
            raise h11.RemoteProtocolError(
                f"the request line and headers exceed this server's limit of {limit} bytes", error_status_hint=431)


def guarded_protocol(read_timeout: float, max_header_bytes: int = MAX_HEADER_BYTES) -> type[H11Protocol]:
    """An ``H11Protocol`` class (uvicorn's ``http=`` option) that enforces ``read_timeout`` seconds for a
    request to arrive and ``max_header_bytes`` for its request line and headers."""

    class GuardedProtocol(H11Protocol):
        read_timer: asyncio.TimerHandle | None = None
        refused = False

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            incomplete = max(self.config.h11_max_incomplete_event_size or 0, max_header_bytes)
            self.conn = HeadLimitedConnection(max_header_bytes, incomplete)
            # uvicorn's own connection limit answers in plain text: the same test, made here, answers JSON
            self.connection_limit, self.limit_concurrency = self.limit_concurrency, None
            self.served_app = self.app

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self.refused:
                return
            super().data_received(data)
            if self.conn.their_state in INCOMPLETE:
                if self.read_timer is None:
                    self._arm()
            else:
                self._disarm()

        def handle_events(self) -> None:
            # uvicorn's test, made as it would make it when the next request is parsed
            limit = self.connection_limit
            busy = limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit)
            self.app = unavailable if busy else self.served_app
            super().handle_events()

        def send_400_response(self, msg: str) -> None:
            """uvicorn's answer to a request h11 refused: the status h11 suggests, the reason, as JSON."""
            refusal = self.conn.refusal
            status = refusal.error_status_hint if refusal is not None else 400
            if status not in CODES:
                status = 400
            if refusal is None:
                message = msg
            else:
                message = str(refusal) if status == 431 else f"invalid HTTP request: {refusal}"
            self._answer(status, error_body(message, CODES[status]))

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _answer(self, status: int, body: bytes) -> None:
            if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):  # else a response is already under way
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                           (b"connection", b"close")]
                for event in (h11.Response(status_code=status, headers=headers,
                                           reason=HTTPStatus(status).phrase.encode()),
                              h11.Data(data=body), h11.EndOfMessage()):
                    self.transport.write(self.conn.send(event))
            self.refused = True
            self._disarm()
            if self.transport.can_write_eof():
                self.transport.write_eof()  # the answer, then the end of it; the client closes on reading it
                self.loop.call_later(LINGER_S, self.transport.close)
            else:
                self.transport.close()

        def _arm(self) -> None:
            self.read_timer = self.loop.call_later(read_timeout, self._expired)

        def _disarm(self) -> None:
            if self.read_timer is not None:
                self.read_timer.cancel()
                self.read_timer = None

        def _expired(self) -> None:
            self.read_timer = None
            if self.conn.their_state in INCOMPLETE and not self.transport.is_closing():
                log.warning("%s: closed the connection, its request did not arrive within %g s",
                            "{}:{}".format(*self.client) if self.client else "client", read_timeout)
                self.transport.close()

    return GuardedProtocol


async def unavailable(scope: dict, receive: Callable, send: Callable) -> None:
    """The ASGI answer to a request over the connection limit: 503 ``BUSY``, the connection closed."""
    log.warning("%s %s: refused, too many connections and requests at once", scope["method"], scope["path"])
    body = error_body("too many connections and requests at once; retry later", "BUSY")
    await send({"type": "http.response.start", "status": 503, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"), (b"retry-after", b"1")]})
    await send({"type": "http.response.body", "body": body})
