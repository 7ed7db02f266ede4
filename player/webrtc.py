"""``player play --webrtc``: receive a live item over WebRTC with aiortc.

The session stays the paystream WebSocket (protocol.md section 11): the
player sends its SDP offer in ``play.webrtc``, applies ``webrtc_answer``,
and pays each ``due`` as for chunks; the media arrives on the peer
connection and is written to a file by aiortc's ``MediaRecorder`` (the
container follows the file's extension, e.g. ``.mkv``), or dropped.

Candidates: when the gateway is on a loopback address they are gathered on
that address alone (:mod:`gateway.ice`: aioice leaves loopback out).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from urllib.parse import urlsplit

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.contrib.media import MediaBlackhole, MediaRecorder
from aiortc.mediastreams import MediaStreamTrack

from gateway.ice import IceConfig, is_loopback, prepare_gathering

__all__ = ["WebrtcReceiver"]


class WebrtcReceiver:
    """One receive-only peer connection for a live item; media to ``out`` (or nowhere)."""

    def __init__(self, gateway_url: str, out: Path | None = None) -> None:
        host = urlsplit(gateway_url).hostname
        self.ice = IceConfig(host=host if is_loopback(host) else None)
        self.pc = RTCPeerConnection(self.ice.configuration())
        self.out = out
        self.recorder: MediaRecorder | MediaBlackhole = (
            MediaRecorder(str(out)) if out is not None else MediaBlackhole()
        )
        self.tracks: list[MediaStreamTrack] = []
        self._started = False
        for kind in ("video", "audio"):
            self.pc.addTransceiver(kind, direction="recvonly")

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self.tracks.append(track)
            self.recorder.addTrack(track)

    async def offer(self) -> str:
        """The SDP offer for ``play.webrtc``."""
        await prepare_gathering(self.pc, self.ice)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return str(self.pc.localDescription.sdp)

    async def accept(self, answer: str) -> None:
        """Apply ``webrtc_answer`` and start writing what arrives."""
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        if not self._started:
            self._started = True
            await self.recorder.start()

    async def close(self) -> None:
        """Hang up and finish the file."""
        with contextlib.suppress(Exception):
            await self.pc.close()
        if self._started:
            with contextlib.suppress(Exception):
                await self.recorder.stop()
