"""WHIP ingest (RFC 9725): the publisher's aiortc peer, feeding decoded frames to a hub.

The HTTP layer validates the offer (:func:`gateway.live.sdp.validate_offer`),
calls :meth:`LiveIngest.start` and answers ``201 Created`` with
:attr:`LiveIngest.answer` (``Content-Type: application/sdp``) and a
``Location`` naming :attr:`LiveIngest.session_id`; ``DELETE`` on that
resource calls :meth:`LiveIngest.stop`. The answer carries all of the
gateway's candidates (aiortc gathers before it answers), so no trickle
``PATCH`` is needed.

aiortc decodes each received track once, in its receiver's decoder thread
(``RTCRtpReceiver``), and hands the frames to ``RemoteStreamTrack.recv()``;
one reader task per track passes them to the hub.

The publisher is gone when its connection fails or closes, when every
track it sent has ended (an RTCP BYE, RFC 3550 section 6.6), when no media
came for ``idle_timeout_s`` (a publisher that vanished without a word; ICE
consent freshness, RFC 7675, would notice only much later), or when none came
at all within ``start_timeout_s``: the hub then ends with reason ``lost``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av.audio.frame import AudioFrame
from av.video.frame import VideoFrame

from gateway.ice import keep_reachable_candidates, prepare_gathering
from gateway.live.hub import LiveHub
from gateway.live.sdp import Offer, validate_offer

log = logging.getLogger(__name__)

#: How often the publisher's liveness is checked.
WATCH_INTERVAL_S = 0.25


class LiveIngest:
    """One WHIP publisher session feeding a :class:`LiveHub`."""

    def __init__(self, hub: LiveHub, offer: Offer) -> None:
        self.hub = hub
        self.offer = offer
        #: Names the session resource (the ``Location`` of RFC 9725 section 4.2).
        self.session_id = secrets.token_urlsafe(16)
        self.pc = RTCPeerConnection(hub.ice.configuration())
        self.answer: str | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._watch: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None
        self._stopping = False

    @classmethod
    async def start(cls, hub: LiveHub, offer: str | Offer) -> LiveIngest:
        """Set up the publisher's peer from its offer; :attr:`answer` is the SDP answer.

        A string offer is validated first (:class:`~gateway.live.sdp.OfferError`
        names what is wrong).
        """
        if hub.state == "ended":
            raise RuntimeError(f"live stream {hub.live_id} has ended")
        if hub.publisher is not None:
            raise RuntimeError(f"live stream {hub.live_id} already has a publisher")
        if isinstance(offer, str):
            offer = validate_offer(offer, role="publisher")
        ingest = cls(hub, offer)
        hub.publisher = ingest
        try:
            await ingest._negotiate()
        except BaseException:
            hub.publisher = None
            await ingest.pc.close()
            raise
        return ingest

    async def _negotiate(self) -> None:
        pc, hub = self.pc, self.hub
        hub.expect(self.offer.kinds)

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            task = asyncio.create_task(self._read(track), name=f"live-in-{track.kind}")
            self._readers.append(task)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed") and not self._stopping:
                await self._lost(f"connection {pc.connectionState}")

        sdp = keep_reachable_candidates(self.offer.sdp, hub.ice)
        await pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        wanted = {section.mid for section in self.offer.media}
        for transceiver in pc.getTransceivers():
            # The gateway only receives (RFC 9725: the publisher sends).
            transceiver.direction = "recvonly" if transceiver.mid in wanted else "inactive"
        await prepare_gathering(pc, hub.ice)
        await pc.setLocalDescription(await pc.createAnswer())
        self.answer = pc.localDescription.sdp
        self._watch = asyncio.create_task(self._watchdog(), name="live-in-watch")
        hub.on_end(self._hub_ended)

    async def _read(self, track: MediaStreamTrack) -> None:
        hub = self.hub
        try:
            while True:
                frame = await track.recv()
                if isinstance(frame, VideoFrame):
                    pushed = hub.push_video(frame)
                elif isinstance(frame, AudioFrame):
                    pushed = hub.push_audio(frame)
                else:
                    continue
                if pushed is None:
                    return
        except MediaStreamError:
            pass
        if not self._stopping and all(
            task.done() or task is asyncio.current_task() for task in self._readers
        ):
            await self._lost("every track ended")

    async def _watchdog(self) -> None:
        hub, cfg = self.hub, self.hub.config
        while hub.state != "ended":
            await asyncio.sleep(WATCH_INTERVAL_S)
            if hub.state == "live" and hub.idle_s > cfg.idle_timeout_s:
                await self._lost(f"no media for {cfg.idle_timeout_s} s")
            elif hub.state == "waiting" and hub.idle_s > cfg.start_timeout_s:
                await self._lost(f"no media within {cfg.start_timeout_s} s")

    async def _lost(self, why: str) -> None:
        if self._stopping:
            return
        log.info("live %s: publisher lost (%s)", self.hub.live_id, why)
        await self._shutdown("lost")

    async def stop(self) -> None:
        """The publisher stops (WHIP ``DELETE``): end the stream."""
        await self._shutdown("stopped")

    async def _shutdown(self, reason: str) -> None:
        if not self._stopping:
            self._stopping = True
            await self._close_peer()
        await self.hub.end(reason)

    def _hub_ended(self, reason: str) -> None:
        """The hub ended by itself (:meth:`LiveHub.end`): hang up on the publisher."""
        if not self._stopping:
            self._stopping = True
            self._closing = asyncio.get_running_loop().create_task(self._close_peer())

    async def _close_peer(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in [*self._readers, self._watch] if t is not None and t is not current]
        for task in tasks:
            task.cancel()
        await self.pc.close()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, MediaStreamError):
                await task
