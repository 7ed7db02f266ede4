"""One viewer's WebSocket as a session sees it: frames in, batches of frames out.

A :class:`~gateway.session.Session` needs four things of its socket: the
next frame, sending several frames in order without another sender's frames
between them, closing with a code, and an exception for a socket that is
gone. :class:`Connection` is that much, so the session does not depend on
the server library (aiohttp here; gateway/server.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Protocol

from aiohttp import WSMsgType, web


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


class AiohttpConnection:
    """:class:`Connection` over aiohttp's server-side WebSocket."""

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        #: Held across one batch: frames of concurrent senders never interleave.
        self._sending = asyncio.Lock()

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
        """Send each frame in order; a lost socket raises :class:`ConnectionClosed`."""
        ws = self.ws
        async with self._sending:
            if ws.closed:
                raise ConnectionClosed("closed")
            try:
                for frame in frames:
                    if isinstance(frame, bytes):
                        await ws.send_bytes(frame)
                    else:
                        await ws.send_str(frame)
            except ConnectionError as exc:  # aiohttp: a closing or lost transport
                raise ConnectionClosed(str(exc)) from None

    async def close(self, code: int, reason: str) -> None:
        """Close with ``code``; the peer's answer is awaited briefly (the response's timeout)."""
        with contextlib.suppress(ConnectionError):
            await self.ws.close(code=code, message=reason.encode())
