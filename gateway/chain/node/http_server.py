"""The RPC server's HTTP/1.1 on h11 (python-hyper's sans-IO parser) and asyncio streams.

Bitcoin Core serves JSON-RPC through libevent's evhttp with a bounded head
(``MAX_HEADERS_SIZE``, 8 KiB), a bounded body (``MAX_SIZE``, 32 MiB) and
``-rpcservertimeout`` (30 s). This server keeps the same bounds and checks
all of them before a byte of the body is read:

- a head over ``max_header_bytes`` or with more than ``max_headers`` fields
  is answered 431 (h11 refuses to buffer more than the limit, so a request
  with a million headers costs at most one read buffer);
- a ``Content-Length`` (or a chunked body) over ``max_body`` gets 413;
- a request not complete within ``timeout`` gets 408 (slowloris); an idle
  keep-alive connection is closed silently;
- a method other than POST gets 405 and a wrong cookie 401 (with
  ``WWW-Authenticate`` and a small delay, as bitcoind), both before the body.

A request refused early is answered ``Connection: close``; the server then
half-closes and discards what the client is still sending for a moment (a
"lingering close"), so that the client reads the answer instead of a reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import h11

from gateway.chain.node.common import MAX_REQUEST_BYTES

log = logging.getLogger(__name__)

#: libevent's header size limit as Core sets it (httpserver.cpp ``MAX_HEADERS_SIZE``).
MAX_HEADER_BYTES = 8192
#: Header fields per request: far more than any JSON-RPC client sends.
MAX_HEADER_COUNT = 100
#: Core's ``-rpcservertimeout`` default, in seconds.
DEFAULT_TIMEOUT = 30.0
#: bitcoind sleeps after a failed login to slow down guessing.
AUTH_FAILURE_DELAY = 0.05
_READ_SIZE = 16 * 1024
_LINGER_SECONDS = 1.0

Handler = Callable[[bytes], Awaitable[tuple[int, bytes]]]
Authorizer = Callable[[str], bool]

_REASONS = {
    100: b"Continue", 200: b"OK", 400: b"Bad Request", 401: b"Unauthorized",
    404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
    413: b"Payload Too Large", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
}


class _Timeout(Exception):
    pass


class _Refused(Exception):
    def __init__(self, status: int, body: bytes = b"", headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(status)
        self.status = status
        self.body = body
        self.headers = headers


class RpcHttpServer:
    """Serves POSTed bodies to ``handle`` once ``authorized(Authorization header)`` agrees."""

    def __init__(
        self,
        handle: Handler,
        authorized: Authorizer,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_body: int = MAX_REQUEST_BYTES,
        max_header_bytes: int = MAX_HEADER_BYTES,
        max_headers: int = MAX_HEADER_COUNT,
    ) -> None:
        self.handle = handle
        self.authorized = authorized
        self.timeout = timeout
        self.max_body = max_body
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port``; return the bound port (for port 0)."""
        self._server = await asyncio.start_server(self._serve, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        """Stop listening and end every connection (a request being answered included)."""
        if self._server is not None:
            self._server.close()
        current = asyncio.current_task()
        tasks = [t for t in self._connections if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_bytes)
        try:
            while await self._one_request(conn, reader, writer):
                conn.start_next_cycle()
        except (ConnectionError, OSError, asyncio.CancelledError):
            pass
        except h11.LocalProtocolError:
            log.exception("RPC HTTP state error")
        finally:
            self._connections.discard(task)
            writer.close()

    async def _next_event(
        self, conn: h11.Connection, reader: asyncio.StreamReader, deadline: float
    ) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            try:
                async with asyncio.timeout_at(deadline):
                    data = await reader.read(_READ_SIZE)
            except TimeoutError:
                raise _Timeout from None
            conn.receive_data(data)

    async def _one_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Serve one request; True when the connection can carry another."""
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            try:
                event = await self._next_event(conn, reader, deadline)
            except _Timeout:
                if conn.trailing_data[0]:
                    raise _Refused(408) from None
                return False  # an idle keep-alive connection: close quietly
            if not isinstance(event, h11.Request):
                return False  # the client closed
            body = await self._read_body(conn, reader, writer, event, deadline)
        except h11.RemoteProtocolError as exc:
            await self._refuse(conn, reader, writer, _Refused(exc.error_status_hint))
            return False
        except _Refused as refusal:
            await self._refuse(conn, reader, writer, refusal)
            return False
        status, payload = await self.handle(body)
        await self._send(conn, writer, status, payload)
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE

    async def _read_body(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        deadline: float,
    ) -> bytes:
        if len(request.headers) > self.max_headers:
            raise _Refused(431)
        headers = {name.lower(): value for name, value in request.headers}
        length = headers.get(b"content-length")
        if length is not None and int(length) > self.max_body:
            raise _Refused(413)
        if request.method != b"POST":
            raise _Refused(405, b"JSONRPC server handles only POST requests")
        if not self.authorized(headers.get(b"authorization", b"").decode("latin-1")):
            await asyncio.sleep(AUTH_FAILURE_DELAY)
            raise _Refused(401, headers=(("WWW-Authenticate", 'Basic realm="jsonrpc"'),))
        if conn.client_is_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                event = await self._next_event(conn, reader, deadline)
            except _Timeout:
                raise _Refused(408) from None
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body:
                    raise _Refused(413)  # a chunked body has no Content-Length to check first
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("client closed inside the body")

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        extra: tuple[tuple[str, str], ...] = (),
        *,
        close: bool = False,
    ) -> None:
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        if close:
            headers.append(("Connection", "close"))
        headers.extend(extra)
        reason = _REASONS.get(status, b"Error")
        data = conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        writer.write(data)
        await writer.drain()

    async def _refuse(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        refusal: _Refused,
    ) -> None:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            await self._send(
                conn, writer, refusal.status, refusal.body, refusal.headers, close=True
            )
        # Lingering close: let the client read the answer instead of a reset
        # for the bytes it is still sending. Bounded in time; nothing is kept.
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError, OSError, ConnectionError):
            async with asyncio.timeout_at(loop.time() + _LINGER_SECONDS):
                while await reader.read(64 * 1024):
                    pass
