"""WebRTC viewers: one aiortc peer each, forwarding the hub's encoded packets.

A viewer sends its SDP offer (WHEP-style: the viewer offers to receive, the
gateway answers), so the browser gathers its candidates before the single
round trip, exactly as a WHIP publisher does. The answer's senders carry
:class:`ForwardTrack` s, whose ``recv()`` returns the hub's shared
``av.Packet`` s rather than frames: aiortc's ``RTCRtpSender`` then only
packetizes them (``_next_encoded_frame`` calls its codec's ``pack()`` for
anything that is not an ``av.Frame``; VP8's RFC 7741 payload descriptor,
Opus as is), so a viewer costs RTP packetization and SRTP, never an encode.
The RTP timestamp follows the packet's ``pts`` (RFC 3550 section 5.1: the
media clock), so gaps while a viewer is not allowed are gaps in time, not
lost packets: sequence numbers stay contiguous.

Two aiortc details follow from sending pre-encoded packets:

* the sender must use the codec the packets are in, so after aiortc has
  negotiated the codecs (``setRemoteDescription``) each transceiver's codec
  list (``RTCRtpTransceiver._codecs``) is narrowed to VP8 (with its RTX) or
  Opus, whatever the viewer listed first;
* a viewer's picture loss indication (PLI, RFC 4585 section 6.3.1) or full
  intra request makes aiortc's sender call its ``_send_keyframe()``, which
  only flags its own (unused) encoder: each video sender's
  ``_send_keyframe`` is replaced by one that asks the hub's VP8 rendition
  for a keyframe.

Gating: a track forwards a packet only if its live time is before the
viewer's allowance (:meth:`LiveViewer.allow`); at the first packet beyond it
the track reports the viewer blocked at that interval (a callback that
allows the interval at once lets that packet through) and drops packets
until the allowance grows. Video then resumes at a keyframe: one at most
``keyframe_gap_ms`` old if the hub has it (sent at once), else the next one,
requested from the encoder; audio resumes at the first packet it held back
if that is at most ``keyframe_gap_ms`` old (a prompt payment loses no
audio), else at the newest.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import av
from aiortc import RTCPeerConnection, RTCRtpTransceiver, RTCSessionDescription
from aiortc.codecs import is_rtx
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from gateway.ice import IceConfig, keep_reachable_candidates, prepare_gathering
from gateway.live.rendition import EncodedPacket, LiveConfig, Rendition
from gateway.live.sdp import Offer


class ViewerHub(Protocol):
    """What a viewer uses of its hub (:class:`gateway.live.hub.LiveHub` is one)."""

    config: LiveConfig
    ice: IceConfig
    video: Rendition
    audio: Rendition

    def request_keyframe(self) -> None:
        """Ask the video encoder for a keyframe soon."""

    def interval_of(self, live_ms: int) -> int:
        """The live interval ``live_ms`` falls in."""

    def interval_start(self, interval: int) -> int:
        """Where live interval ``interval`` starts (live ms)."""

    def _viewer_closed(self, viewer: LiveViewer) -> None:
        """The viewer is gone: stop counting it."""

log = logging.getLogger(__name__)

#: The codec each forwarded kind is encoded in (aiortc mime types).
FORWARDED_CODECS = {"video": "video/vp8", "audio": "audio/opus"}


@dataclass
class ViewerStats:
    """What one viewer was sent (gateway side)."""

    video_packets: int = 0
    audio_packets: int = 0
    bytes: int = 0
    keyframes: int = 0
    #: Packets skipped because the viewer could not keep up.
    skipped: int = 0
    #: Live time of the last packet sent, per kind.
    last_live_ms: dict[str, int] = field(default_factory=dict)
    #: For each resume (blocked, then allowed): ms from ``allow()`` to the
    #: first video keyframe handed to aiortc.
    resume_ms: list[float] = field(default_factory=list)
    #: ms from the video sender's first request for media (the connection is
    #: up) to the first keyframe handed to it.
    join_ms: float | None = None


class ForwardTrack(MediaStreamTrack):
    """A track whose ``recv()`` returns the hub's encoded packets of one kind."""

    def __init__(self, viewer: LiveViewer, rendition: Rendition) -> None:
        super().__init__()
        self.kind = rendition.kind
        self._viewer = viewer
        self._rendition = rendition
        self._cursor = rendition.next_seq
        self._need_keyframe = rendition.kind == "video"
        self._sought = False
        self._blocked = False
        #: Audio: the first packet held back at the allowance's edge, sent
        #: after all if the allowance grows while it is recent.
        self._held: int | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._first_recv: float | None = None

    def kick(self) -> None:
        """Wake a waiting ``recv()`` to look again (the allowance changed)."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def stop(self) -> None:
        """End the track (aiortc's sender then stops)."""
        super().stop()
        self.kick()

    def picture_lost(self) -> None:
        """The viewer reported picture loss: ask the encoder for a keyframe."""
        self._viewer.hub.request_keyframe()

    async def _wait(self) -> None:
        waiter = self._rendition.waiter()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._rendition.discard(waiter)
            self._waiter = None

    async def recv(self) -> av.Packet:
        """The next packet this viewer may have (waits for it)."""
        viewer, rendition = self._viewer, self._rendition
        if self._first_recv is None:
            self._first_recv = time.monotonic()
        while True:
            if self.readyState != "live" or viewer.ended.is_set():
                raise MediaStreamError
            if self._need_keyframe and not self._sought:
                self._seek_keyframe()
            if self._held is not None:
                self._resume_audio()
            packet = rendition.get(self._cursor)
            if packet is None:
                if rendition.closed:
                    raise MediaStreamError
                await self._wait()
                continue
            if packet.seq > self._cursor and self.kind == "video":
                # Fell out of the backlog: what follows needs a keyframe.
                viewer.stats.skipped += packet.seq - self._cursor
                self._need_keyframe, self._sought = True, False
            self._cursor = packet.seq + 1
            newest = rendition.newest
            if (
                newest is not None
                and newest.live_ms - packet.live_ms > viewer.hub.config.max_viewer_lag_ms
            ):
                viewer.stats.skipped += newest.seq - packet.seq
                self._cursor = newest.seq
                if self.kind == "video":
                    self._need_keyframe, self._sought = True, False
                continue
            if packet.live_ms >= viewer.allowed_until_ms:
                self._block(packet)
                # A blocked callback may allow it at once (a free or prepaid
                # interval): then it goes out, video if it is a keyframe.
                if packet.live_ms >= viewer.allowed_until_ms or (
                    self._need_keyframe and not packet.keyframe
                ):
                    continue
            self._blocked = False
            self._held = None
            if self._need_keyframe:
                if not packet.keyframe:
                    continue
                self._need_keyframe = False
                if viewer.stats.join_ms is None and self._first_recv is not None:
                    viewer.stats.join_ms = (time.monotonic() - self._first_recv) * 1000
            viewer._sent(packet)
            return packet.packet

    def _seek_keyframe(self) -> None:
        """Start at a recent allowed keyframe, or ask the encoder for one."""
        viewer, rendition = self._viewer, self._rendition
        newest = rendition.newest
        if newest is None:
            self._sought = True  # the first frame of a stream is a keyframe
            return
        if newest.live_ms >= viewer.allowed_until_ms:
            return  # not allowed yet: look again when it is
        self._sought = True
        gap = viewer.hub.config.keyframe_gap_ms
        keyframe = rendition.keyframe_since(newest.live_ms - gap, viewer.allowed_until_ms)
        if keyframe is not None:
            self._cursor = min(self._cursor, keyframe.seq)
        else:
            viewer.hub.request_keyframe()

    def _resume_audio(self) -> None:
        """Allowed again soon after the edge (a prompt pay): lose no audio packet."""
        viewer, rendition = self._viewer, self._rendition
        held = rendition.get(self._held) if self._held is not None else None
        newest = rendition.newest
        if held is None or held.seq != self._held or newest is None:
            self._held = None  # fell out of the backlog
        elif held.live_ms < viewer.allowed_until_ms:
            if newest.live_ms - held.live_ms <= viewer.hub.config.keyframe_gap_ms:
                self._cursor = min(self._cursor, held.seq)
            self._held = None

    def _block(self, packet: EncodedPacket) -> None:
        if not self._blocked:
            self._blocked = True
            if self.kind == "audio":
                self._held = packet.seq
            if self.kind == "video":
                self._need_keyframe, self._sought = True, False
        self._viewer._blocked(self._viewer.hub.interval_of(packet.live_ms))


class LiveViewer:
    """One WebRTC viewer of a live hub (create with :meth:`LiveHub.add_viewer`).

    Nothing is forwarded until :meth:`allow` (or :meth:`allow_interval`)
    says up to where: the payment layer calls it for the free intervals and
    for each one paid. :attr:`waiting_interval` and :meth:`on_blocked` say
    which interval the viewer is stopped at.
    """

    def __init__(self, hub: ViewerHub) -> None:
        self.hub = hub
        self.id = secrets.token_urlsafe(12)
        self.pc = RTCPeerConnection(hub.ice.configuration())
        self.answer: str | None = None
        self.allowed_until_ms = 0
        #: The interval the viewer is stopped at (None while media flows).
        self.waiting_interval: int | None = None
        self.ended = asyncio.Event()
        self.end_reason: str | None = None
        self.stats = ViewerStats()
        self.tracks: list[ForwardTrack] = []
        self._blocked_callbacks: list[Callable[[int], object]] = []
        self._end_callbacks: list[Callable[[str], object]] = []
        self._resume_from: float | None = None
        self._closing = False

    async def accept(self, offer: Offer) -> str:
        """Answer the viewer's validated offer; returns (and keeps) the SDP answer."""
        pc = self.pc
        sdp = keep_reachable_candidates(offer.sdp, self.hub.ice)
        await pc.setRemoteDescription(RTCSessionDescription(sdp, "offer"))
        transceivers = pc.getTransceivers()
        wanted = {section.mid: section for section in offer.media}
        for index, transceiver in enumerate(transceivers):
            section = wanted.get(transceiver.mid)
            if section is None:
                section = next((s for s in offer.media if s.mid is None and s.index == index), None)
            if section is None:
                transceiver.direction = "inactive"
                continue
            rendition = self.hub.video if section.kind == "video" else self.hub.audio
            track = ForwardTrack(self, rendition)
            self.tracks.append(track)
            _forward_only(transceiver, FORWARDED_CODECS[section.kind])
            transceiver.sender.replaceTrack(track)
            transceiver.direction = "sendonly"
            if section.kind == "video":
                # aiortc calls this on a PLI or FIR (rtcrtpsender.py).
                setattr(transceiver.sender, "_send_keyframe", track.picture_lost)  # noqa: B010

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed") and not self._closing:
                await self.close()

        await prepare_gathering(pc, self.hub.ice)
        await pc.setLocalDescription(await pc.createAnswer())
        self.answer = pc.localDescription.sdp
        return self.answer

    # -- gating --

    def allow(self, until_ms: int) -> None:
        """Forward media whose live time is before ``until_ms`` (and no further).

        Takes effect at once: a blocked viewer resumes (video from a
        keyframe) as soon as there is media before ``until_ms``. A lower
        value than before takes the allowance back.
        """
        if until_ms > self.allowed_until_ms and self.waiting_interval is not None:
            self._resume_from = time.monotonic()
        self.allowed_until_ms = until_ms
        if (
            self.waiting_interval is not None
            and self.hub.interval_start(self.waiting_interval) < until_ms
        ):
            self.waiting_interval = None
        for track in self.tracks:
            track.kick()

    def allow_interval(self, interval: int) -> None:
        """Forward media up to the end of interval ``interval`` (paid or free)."""
        self.allow(self.hub.interval_start(interval + 1))

    def on_blocked(self, callback: Callable[[int], object]) -> None:
        """Call ``callback(interval)`` each time the viewer stops at ``interval``."""
        self._blocked_callbacks.append(callback)

    def _blocked(self, interval: int) -> None:
        # Audio and video reach the edge at slightly different times: report
        # each interval once, in order.
        if self.waiting_interval is not None and interval <= self.waiting_interval:
            return
        self.waiting_interval = interval
        for callback in self._blocked_callbacks:
            try:
                callback(interval)
            except Exception:
                log.exception("live viewer %s: blocked callback failed", self.id)

    def _sent(self, packet: EncodedPacket) -> None:
        stats = self.stats
        stats.bytes += packet.size
        stats.last_live_ms[packet.kind] = packet.live_ms
        if packet.kind == "video":
            stats.video_packets += 1
            if packet.keyframe:
                stats.keyframes += 1
                if self._resume_from is not None:
                    stats.resume_ms.append((time.monotonic() - self._resume_from) * 1000)
                    self._resume_from = None
        else:
            stats.audio_packets += 1

    # -- the end --

    def on_end(self, callback: Callable[[str], object]) -> None:
        """Call ``callback(reason)`` when this viewer ends (the stream ended, or it left)."""
        if self.end_reason is not None:
            callback(self.end_reason)
        else:
            self._end_callbacks.append(callback)

    async def _end(self, reason: str) -> None:
        if self.end_reason is not None:
            return
        self.end_reason = reason
        self.ended.set()
        for track in self.tracks:
            track.stop()
        for callback in self._end_callbacks:
            try:
                callback(reason)
            except Exception:
                log.exception("live viewer %s: end callback failed", self.id)
        self._closing = True
        await self.pc.close()
        self.hub._viewer_closed(self)

    async def close(self) -> None:
        """The viewer leaves: stop forwarding and close its connection."""
        await self._end("closed")


def _forward_only(transceiver: RTCRtpTransceiver, mime: str) -> None:
    """Keep only ``mime`` (and its RTX) among the transceiver's negotiated codecs."""
    codecs = transceiver._codecs
    kept = [c for c in codecs if c.mimeType.lower() == mime]
    if not kept:
        raise ValueError(f"the viewer did not offer {mime}")
    payload_types = {c.payloadType for c in kept}
    kept += [c for c in codecs if is_rtx(c) and c.parameters.get("apt") in payload_types]
    transceiver._codecs = kept
