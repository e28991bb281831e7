"""The connection layer: the limits a hostile or careless client meets before any handler runs.

uvicorn's own settings are used where they exist: ``timeout_keep_alive`` closes a connection idle
between requests, ``server_header=False`` names no stack, ``timeout_graceful_shutdown`` bounds a drain.
What uvicorn (with httptools, its fast parser) leaves open is closed here, in a subclass of its
``HttpToolsProtocol``:

* a request head (request line and headers) must arrive within ``header_timeout`` seconds of the
  connection opening or of its previous response, else the connection is closed (a 408 if some of it
  came): a client that connects and sends nothing, or trickles a header, holds nothing for long;
* a head over ``max_header_bytes`` is answered 431 and the connection closed (llhttp sets no limit;
  h11's ``h11_max_incomplete_event_size`` would, but uvicorn answers it with a 400 and h11 parses
  several times slower);
* at most ``max_connections`` connections are open at once; past that a new one is answered 503 and
  closed at once, so the process never reaches its file-descriptor limit (uvicorn's
  ``limit_concurrency`` counts only connections that have sent a whole head, and answers in plain text);
* a client that stops reading its answer is dropped once ``write_timeout`` seconds pass without the
  send buffer draining (the buffered bytes are freed with it): uvicorn waits for it forever.

The app writes large answers in pieces (``ChunkedResponse``), so what waits in a connection's send
buffer stays near the transport's high-water mark instead of holding a second copy of the answer.
"""

from __future__ import annotations

import asyncio
import dataclasses

import orjson

CHUNK = 256 * 1024  # bytes per write of a large answer


@dataclasses.dataclass(frozen=True)
class ConnectionLimits:
    header_timeout: float = 10.0  # seconds for a request head to arrive
    max_header_bytes: int = 16 * 1024  # request line and headers
    max_connections: int = 2048  # open at once
    write_timeout: float = 30.0  # seconds a client may leave its answer unread
    keep_alive_timeout: float = 5.0  # seconds a connection may idle between requests (uvicorn's)
    body_timeout: float = 60.0  # seconds for a request body to arrive (the app's)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{field.name} must be a positive number, got {value!r}")


def _raw_response(status: int, reason: str, message: str, error_type: str) -> bytes:
    body = orjson.dumps({"error": message, "error_type": error_type})
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode("ascii") + body


def protocol_class(limits: ConnectionLimits, metrics=None) -> type:
    """uvicorn's httptools protocol with ``limits`` (see the module docstring); ``metrics`` counts the
    connections dropped, by reason."""
    from uvicorn.protocols.http.flow_control import FlowControl
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    def dropped(reason: str) -> None:
        if metrics is not None:
            metrics.connections_dropped.labels(reason).inc()

    class TimedFlowControl(FlowControl):
        """uvicorn's flow control, whose wait for a full send buffer to drain gives up after
        ``write_timeout`` seconds by dropping the connection."""

        async def drain(self) -> None:
            try:
                await asyncio.wait_for(self._is_writable_event.wait(), limits.write_timeout)
            except asyncio.TimeoutError:
                dropped("write_timeout")
                self._transport.abort()  # frees the buffer; connection_lost marks the request disconnected
                self.resume_writing()

    class HardenedProtocol(HttpToolsProtocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.flow = TimedFlowControl(transport)
            self._in_head = True
            self._head_bytes = 0
            self._head_timer = None
            if len(self.connections) > limits.max_connections:
                dropped("too_many_connections")
                transport.write(_raw_response(503, "Service Unavailable", f"the server is at its limit of "
                                              f"{limits.max_connections} connections; retry later", "overloaded"))
                transport.close()
                return
            self._arm_head_timer()

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(limits.header_timeout, self._head_timed_out)

        def _disarm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing() or not self._in_head:
                return
            if self._head_bytes:  # a head begun and never finished
                dropped("header_timeout")
                self.transport.write(_raw_response(408, "Request Timeout", f"the request head did not arrive within "
                                                   f"{limits.header_timeout:g} s", "validation"))
            self.transport.close()

        def connection_lost(self, exc) -> None:
            self._disarm_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                self._head_bytes += len(data)
            super().data_received(data)
            if self._in_head and self._head_bytes > limits.max_header_bytes and not self.transport.is_closing():
                dropped("header_too_large")
                self.transport.write(_raw_response(431, "Request Header Fields Too Large", f"the request head is over "
                                                   f"{limits.max_header_bytes} bytes", "validation"))
                self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = True
            self._arm_head_timer()

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._head_bytes = 0
            self._disarm_head_timer()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and not self.pipeline:
                self._in_head = True  # the next request's head, once it starts, has its own deadline
                self._head_bytes = 0

    return HardenedProtocol
