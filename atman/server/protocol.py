"""uvicorn's HTTP/1.1 protocol with a read timeout: a request must arrive whole within a time limit.

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and caps connections
(``limit_concurrency``), but a client that sends half a header, or half a body, is waited for
without end; enough of them hold every connection slot. This subclass closes a connection whose
request (headers and body) has not fully arrived ``read_timeout`` seconds after its first byte
(or after the connection opened).

    >>> import uvicorn
    >>> config = uvicorn.Config("atman.server:app", http=guarded_protocol(15.0))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("atman.server")
# states of the client's side of the connection in which its request is still arriving
INCOMPLETE = (h11.IDLE, h11.SEND_BODY)


def guarded_protocol(read_timeout: float) -> type[H11Protocol]:
    """An ``H11Protocol`` class (uvicorn's ``http=`` option) that enforces ``read_timeout`` seconds."""

    class ReadTimeoutProtocol(H11Protocol):
        read_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state in INCOMPLETE:
                if self.read_timer is None:
                    self._arm()
            else:
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

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

    return ReadTimeoutProtocol
