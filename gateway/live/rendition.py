"""A live stream's tunables and its renditions' shared encoded packets.

Apart from :mod:`gateway.live.hub` so that a viewer reads the packets
without importing the hub that owns it (no import cycle).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Literal

import av

Kind = Literal["audio", "video"]


@dataclass(frozen=True)
class LiveConfig:
    """Tunables of one live stream (defaults suit the issue's targets)."""

    #: Length of one live interval, the unit a viewer pays for (a "chunk"
    #: in protocol.md section 7's sense); also the GOP and MSE fragment length.
    interval_ms: int = 1000
    #: Renditions are scaled down to this many lines (never up).
    max_height: int = 360
    #: WebRTC rendition: VP8 and Opus.
    video_bitrate: int = 500_000
    audio_bitrate: int = 48_000
    #: MSE rendition (fMP4): H.264 and AAC; off when False.
    mse: bool = True
    mse_video_bitrate: int = 600_000
    mse_audio_bitrate: int = 96_000
    #: Keyframes asked for by viewers come at most this often; a viewer
    #: joining or resuming starts at a keyframe at most this old instead.
    keyframe_gap_ms: int = 100
    #: A viewer whose next packet is this far behind the newest one (its
    #: connection is slower than the stream) skips ahead to a keyframe.
    max_viewer_lag_ms: int = 1000
    #: Frames an encoder may fall behind by before the oldest is dropped
    #: (they arrive in bursts after network jitter; an encoder's first frame
    #: also waits for it to open).
    video_queue: int = 8
    audio_queue: int = 25
    #: Encoded packets kept per WebRTC rendition.
    backlog_ms: int = 3000
    #: MSE fragments kept in memory for readers.
    fragments_kept: int = 8
    #: The publisher is gone when no media came for this long.
    idle_timeout_s: float = 5.0
    #: ... or when no media came this long after the ingest was set up.
    start_timeout_s: float = 20.0
    #: With a kind announced but not arriving, the MSE rendition starts
    #: without it this long after the first frame.
    mse_wait_ms: int = 2000


@dataclass(slots=True)
class EncodedPacket:
    """One encoded frame of a WebRTC rendition, shared by every viewer.

    ``packet`` is the very ``av.Packet`` aiortc's sender packetizes for each
    viewer (read only: its bytes, ``pts`` and ``time_base``).
    """

    seq: int
    kind: Kind
    live_ms: int
    keyframe: bool
    packet: av.Packet
    size: int


class Rendition:
    """The recent encoded packets of one kind, and the viewers waiting for more."""

    def __init__(self, kind: Kind, backlog_ms: int) -> None:
        self.kind = kind
        self.backlog_ms = backlog_ms
        self.packets: deque[EncodedPacket] = deque()
        self.next_seq = 0
        self.closed = False
        self._waiters: set[asyncio.Future[None]] = set()

    def publish(self, packet: av.Packet, live_ms: int, keyframe: bool) -> EncodedPacket:
        """Append a packet and wake the readers."""
        encoded = EncodedPacket(self.next_seq, self.kind, live_ms, keyframe, packet, packet.size)
        self.next_seq += 1
        self.packets.append(encoded)
        while self.packets and live_ms - self.packets[0].live_ms > self.backlog_ms:
            self.packets.popleft()
        self._wake()
        return encoded

    def close(self) -> None:
        """No more packets: readers see the end."""
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()

    def waiter(self) -> asyncio.Future[None]:
        """A future resolved at the next packet (or the end)."""
        future = asyncio.get_running_loop().create_future()
        self._waiters.add(future)
        return future

    def discard(self, waiter: asyncio.Future[None]) -> None:
        """Forget a waiter (its reader was woken otherwise or cancelled)."""
        self._waiters.discard(waiter)

    def get(self, seq: int) -> EncodedPacket | None:
        """The packet ``seq`` if still held (the oldest held if ``seq`` is older)."""
        if not self.packets or seq >= self.next_seq:
            return None
        first = self.packets[0].seq
        return self.packets[max(0, seq - first)]

    @property
    def newest(self) -> EncodedPacket | None:
        """The newest packet."""
        return self.packets[-1] if self.packets else None

    def keyframe_since(self, live_ms: int, before_ms: int) -> EncodedPacket | None:
        """The newest keyframe at or after ``live_ms`` and before ``before_ms``."""
        for packet in reversed(self.packets):
            if packet.live_ms < live_ms:
                return None
            if packet.keyframe and packet.live_ms < before_ms:
                return packet
        return None
