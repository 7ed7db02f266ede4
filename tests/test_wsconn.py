"""gateway/wsconn.py frames its batches itself: the bytes aiohttp's own writer would send."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import WSMsgType
from aiohttp._websocket.writer import WebSocketWriter

from gateway.wsconn import frame_header


class _Transport:
    """Collects what a writer writes."""

    def __init__(self) -> None:
        self.data = b""

    def write(self, data: Any) -> None:
        self.data += bytes(data)

    def is_closing(self) -> bool:
        return False


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65_535, 65_536, 200_000])
@pytest.mark.parametrize("opcode", [WSMsgType.TEXT, WSMsgType.BINARY])
def test_frame_header_is_rfc6455_as_aiohttp_writes_it(size: int, opcode: WSMsgType) -> None:
    transport = _Transport()
    writer = WebSocketWriter(None, transport)  # type: ignore[arg-type]
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    writer._write_websocket_frame(payload, opcode, 0)
    assert frame_header(0x80 | opcode, size) + payload == transport.data
