"""One viewer's WebSocket as a session sees it: frames in, batches of frames out.

A :class:`~gateway.session.Session` needs four things of its socket: the
next frame, sending several frames in order without another sender's frames
between them, closing with a code, and an exception for a socket that is
gone. :class:`Connection` is that much, so the session does not depend on
the server library (aiohttp here; gateway/server.py).
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Sequence
from typing import Protocol

from aiohttp import WSMsgType, web
from aiohttp.abc import AbstractStreamWriter


class ConnectionClosed(Exception):
    """The socket is closed (by either side, or lost): nothing more goes through it."""


class Connection(Protocol):
    """What a session uses of its WebSocket."""

    async def recv(self) -> str | bytes:
        """The next data frame (text as ``str``); :class:`ConnectionClosed` once closed."""
        ...

    async def send(self, frames: Sequence[str | bytes]) -> None:
        """Send ``frames`` in order (``str`` as text, ``bytes`` as binary), none between."""
        ...

    async def close(self, code: int, reason: str) -> None:
        """Start the closing handshake; returns without waiting long for the peer."""
        ...


# RFC 6455 section 5.2: FIN + opcode, then the payload length in 7 bits, or
# 126 + 16 bits, or 127 + 64 bits. A server's frames are not masked (5.3).
_LEN1 = struct.Struct("!BB").pack
_LEN2 = struct.Struct("!BBH").pack
_LEN3 = struct.Struct("!BBQ").pack
_FIN_TEXT = 0x80 | WSMsgType.TEXT
_FIN_BINARY = 0x80 | WSMsgType.BINARY


def frame_header(fin_opcode: int, length: int) -> bytes:
    """The header of one unmasked, unfragmented frame (RFC 6455 section 5.2)."""
    if length < 126:
        return _LEN1(fin_opcode, length)
    if length < 65536:
        return _LEN2(fin_opcode, 126, length)
    return _LEN3(fin_opcode, 127, length)


class AiohttpConnection:
    """:class:`Connection` over aiohttp's server-side WebSocket.

    Receiving, pings and the closing handshake are aiohttp's. Sending is
    not: aiohttp writes each frame with its own ``transport.write`` (a
    ``send`` system call each on an idle socket), and a paid chunk is four
    frames (``paid``, ``chunk``, the media, the next ``due``). So
    :meth:`send` frames a batch itself and hands it to the transport in one
    ``writelines``, after which it waits only if the transport asked the
    protocol to pause (flow control, as aiohttp's own writer does).
    """

    def __init__(self, ws: web.WebSocketResponse, writer: AbstractStreamWriter) -> None:
        self.ws = ws
        #: What ``ws.prepare`` returned: the HTTP connection's transport and drain.
        self._writer = writer

    async def recv(self) -> str | bytes:
        """The next text or binary frame; pings are answered by aiohttp itself."""
        msg = await self.ws.receive()
        if msg.type is WSMsgType.TEXT:
            return str(msg.data)
        if msg.type is WSMsgType.BINARY:
            return bytes(msg.data)
        # CLOSE, CLOSING, CLOSED or ERROR (a frame too large, a protocol error).
        raise ConnectionClosed(str(msg.extra or msg.type.name))

    async def send(self, frames: Sequence[str | bytes]) -> None:
        """Send the frames in one transport write; a lost socket raises :class:`ConnectionClosed`.

        One write holds every frame whole, so nothing aiohttp writes itself
        (a pong, its close) can come between them, and no lock is needed:
        the write has no ``await`` before it.
        """
        transport = self._writer.transport
        if self.ws.closed or transport is None or transport.is_closing():
            raise ConnectionClosed("closed")
        parts: list[bytes] = []
        for frame in frames:
            if isinstance(frame, bytes):
                parts += (frame_header(_FIN_BINARY, len(frame)), frame)
            else:
                data = frame.encode()
                parts += (frame_header(_FIN_TEXT, len(data)), data)
        transport.writelines(parts)
        try:
            await self._writer.drain()
        except ConnectionError as exc:  # lost while waiting for the peer to read
            raise ConnectionClosed(str(exc)) from None

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code``; the peer's answer is awaited briefly (the response's timeout)."""
        with contextlib.suppress(ConnectionError):
            await self.ws.close(code=code, message=reason.encode())
