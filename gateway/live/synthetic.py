"""Synthetic live peers: a publisher and a viewer, real aiortc peers, for tests and benches.

The publisher sends a moving picture whose top-left corner carries the frame
number as 16 black or white 16x16 blocks (one bit each, most significant
first), plus a tone. Blocks that large survive two lossy encodes, so a
viewer reads the number back from each decoded frame and the gateway's
effect is measured end to end: glass-to-glass latency (the publisher's
capture time of that number against the viewer's decode time, one clock as
both run on one machine) and frames lost (numbers missing between the first
and last one received).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCRtpSender, RTCSessionDescription
from aiortc.codecs.vpx import VpxPayloadDescriptor
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RtpPacket
from av.audio.frame import AudioFrame
from av.video.frame import VideoFrame

from gateway.ice import LOOPBACK, IceConfig, prepare_gathering

STAMP_BITS = 16
STAMP_BLOCK = 16
VIDEO_CLOCK = 90_000  # RTP video clock rate (RFC 3551 section 5)
AUDIO_RATE = 48_000
AUDIO_PTIME_SAMPLES = 960  # 20 ms


def read_stamp(frame: VideoFrame) -> int | None:
    """The frame number a :class:`StampedVideoTrack` wrote into ``frame`` (None: unreadable)."""
    if frame.width < STAMP_BITS * STAMP_BLOCK or frame.height < STAMP_BLOCK:
        return None
    if frame.format.name != "yuv420p":
        frame = frame.reformat(format="yuv420p")
    plane = frame.planes[0]
    data = bytes(plane)
    number = 0
    for bit in range(STAMP_BITS):
        total = 0
        for dy in (6, 8, 10):
            row = dy * plane.line_size + bit * STAMP_BLOCK
            total += sum(data[row + 6 : row + 11])
        number = number << 1 | (total > 128 * 15)
    return number


class StampedVideoTrack(MediaStreamTrack):
    """A paced synthetic video track with the frame number stamped in each frame."""

    kind = "video"

    def __init__(self, width: int = 320, height: int = 240, fps: int = 30) -> None:
        super().__init__()
        if width < STAMP_BITS * STAMP_BLOCK:
            raise ValueError(f"width must be at least {STAMP_BITS * STAMP_BLOCK}")
        self.width, self.height, self.fps = width, height, fps
        #: frame number -> monotonic time it was produced ("captured").
        self.sent: dict[int, float] = {}
        self._number = 0
        self._start: float | None = None
        self._gradient = bytes((x * 255 // (2 * width)) & 0xFF for x in range(2 * width)) * 2

    def _frame(self, number: int) -> VideoFrame:
        frame = VideoFrame(self.width, self.height, "yuv420p")
        luma = frame.planes[0]
        pad = b"\0" * (luma.line_size - self.width)
        shift = number * 4 % (2 * self.width)
        stamp = b"".join(
            (b"\xeb" if number >> (STAMP_BITS - 1 - bit) & 1 else b"\x10") * STAMP_BLOCK
            for bit in range(STAMP_BITS)
        )
        stamp_width = len(stamp)
        rows = []
        for y in range(self.height):
            start = (shift + y) % (2 * self.width)
            row = self._gradient[start : start + self.width]
            if y < STAMP_BLOCK:
                row = stamp + row[stamp_width:]
            rows.append(row + pad)
        luma.update(b"".join(rows))
        for plane in frame.planes[1:]:
            plane.update(b"\x80" * plane.buffer_size)
        return frame

    async def recv(self) -> VideoFrame:
        """The next frame, at its time."""
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._number / self.fps
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        frame = self._frame(self._number % (1 << STAMP_BITS))
        frame.pts = self._number * VIDEO_CLOCK // self.fps
        frame.time_base = Fraction(1, VIDEO_CLOCK)
        self.sent[self._number % (1 << STAMP_BITS)] = time.monotonic()
        self._number += 1
        return frame


class ToneAudioTrack(MediaStreamTrack):
    """A paced 440 Hz stereo tone in 20 ms frames."""

    kind = "audio"

    def __init__(self) -> None:
        super().__init__()
        samples = []
        for i in range(AUDIO_RATE):
            value = int(8000 * math.sin(2 * math.pi * 440 * i / AUDIO_RATE))
            samples.append(value.to_bytes(2, "little", signed=True) * 2)
        self._second = b"".join(samples)
        self._number = 0
        self._start: float | None = None

    async def recv(self) -> AudioFrame:
        """The next 20 ms of tone, at its time."""
        if self.readyState != "live":
            raise MediaStreamError
        if self._start is None:
            self._start = time.monotonic()
        due = self._start + self._number * AUDIO_PTIME_SAMPLES / AUDIO_RATE
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        offset = self._number * AUDIO_PTIME_SAMPLES % AUDIO_RATE * 4
        frame = AudioFrame(format="s16", layout="stereo", samples=AUDIO_PTIME_SAMPLES)
        data = (self._second + self._second)[offset : offset + AUDIO_PTIME_SAMPLES * 4]
        frame.planes[0].update(data)
        frame.sample_rate = AUDIO_RATE
        frame.pts = self._number * AUDIO_PTIME_SAMPLES
        frame.time_base = Fraction(1, AUDIO_RATE)
        self._number += 1
        return frame


class _Peer:
    """An aiortc peer that offers (to the WHIP endpoint, or to receive a stream)."""

    pc: RTCPeerConnection
    ice: IceConfig

    async def offer(self) -> str:
        """The SDP offer, with every candidate gathered (no trickle ICE)."""
        await prepare_gathering(self.pc, self.ice)
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return self.pc.localDescription.sdp

    async def accept(self, answer: str) -> None:
        """Apply the gateway's SDP answer."""
        await self.pc.setRemoteDescription(RTCSessionDescription(answer, "answer"))


class SyntheticPublisher(_Peer):
    """A WHIP-style publisher: an aiortc peer sending stamped video and a tone.

    ``video_codec`` (e.g. ``"video/H264"``) restricts what it offers for video.
    """

    def __init__(
        self,
        *,
        width: int = 320,
        height: int = 240,
        fps: int = 30,
        audio: bool = True,
        video: bool = True,
        video_codec: str | None = None,
        ice: IceConfig = LOOPBACK,
    ) -> None:
        self.ice = ice
        self.pc = RTCPeerConnection(ice.configuration())
        self.video = StampedVideoTrack(width, height, fps) if video else None
        self.audio = ToneAudioTrack() if audio else None
        for track in (self.video, self.audio):
            if track is not None:
                transceiver = self.pc.addTransceiver(track, direction="sendonly")
                if track.kind == "video" and video_codec is not None:
                    # e.g. "video/H264", as OBS Studio sends over WHIP.
                    transceiver.setCodecPreferences(
                        [
                            codec
                            for codec in RTCRtpSender.getCapabilities("video").codecs
                            if codec.mimeType.lower() in (video_codec.lower(), "video/rtx")
                        ]
                    )

    async def close(self) -> None:
        """Stop sending (as a publisher hanging up)."""
        await self.pc.close()


@dataclass
class ReceivedFrame:
    """One decoded video frame at a probe viewer."""

    at: float
    number: int | None
    keyframe: bool


@dataclass
class ProbeViewer(_Peer):
    """A viewer peer that records what it receives (stamp, time, keyframe).

    aiortc decodes VP8 with libvpx, which does not mark keyframes in the
    frames it returns, so keyframes are read from the RTP payload instead
    (RFC 7741 section 4.3: the VP8 payload header's inverse key frame bit)
    by wrapping the video receiver's ``_handle_rtp_packet``; a decoded frame
    is a keyframe if its timestamp is one of theirs. The wrapper also counts
    RTP packets and sequence gaps (RFC 3550 section A.3).

    With ``decode=False`` the viewer is still a real peer (ICE, DTLS, SRTP)
    but stops at RTP: packets are counted and not decoded, and a video
    frame is recorded (without a number) when its last packet, the one with
    the marker bit (RFC 7741 section 4.1), arrives. Many such viewers cost a
    bench's client far less than decoding ones.
    """

    ice: IceConfig = LOOPBACK
    video: bool = True
    audio: bool = True
    decode: bool = True
    frames: list[ReceivedFrame] = field(default_factory=list)
    audio_frames: int = 0
    #: Video RTP packets received, and how many were missing in between.
    video_packets: int = 0
    lost_packets: int = 0
    #: When each video keyframe's last packet arrived (monotonic s): media
    #: flowing again, before any decoder (aiortc's receiver holds each frame
    #: until the next one's first packet).
    keyframes_complete: list[float] = field(default_factory=list)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    on_frame: Callable[[ReceivedFrame], None] | None = None

    def __post_init__(self) -> None:
        self.pc = RTCPeerConnection(self.ice.configuration())
        self._readers: list[asyncio.Task[None]] = []
        self._keyframe_times: set[int] = set()
        self._rtx_payload_types: set[int] = set()
        self._first_rtp_time: int | None = None
        self._last_seq: int | None = None
        if self.video:
            receiver = self.pc.addTransceiver("video", direction="recvonly").receiver
            self._watch_video(receiver)
        if self.audio:
            receiver = self.pc.addTransceiver("audio", direction="recvonly").receiver
            if not self.decode:
                self._count_audio(receiver)

        @self.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            self._readers.append(asyncio.create_task(self._read(track)))

    def _watch_video(self, receiver: RTCRtpReceiver) -> None:
        handle = receiver._handle_rtp_packet

        async def handle_and_note(packet: RtpPacket, arrival_time_ms: int) -> None:
            if packet.payload_type in self._rtx_payload_types:
                if self.decode:
                    await handle(packet, arrival_time_ms)
                return
            try:
                descriptor, data = VpxPayloadDescriptor.parse(packet.payload)
            except ValueError:
                return
            self.video_packets += 1
            if self._last_seq is not None:
                self.lost_packets += (packet.sequence_number - self._last_seq - 1) % (1 << 16)
            self._last_seq = packet.sequence_number
            if self._first_rtp_time is None:
                self._first_rtp_time = packet.timestamp
            start = descriptor.partition_start and descriptor.partition_id == 0
            keyframe = bool(start and data and not data[0] & 1)
            mapped = (packet.timestamp - self._first_rtp_time) % (1 << 32)
            if keyframe:
                self._keyframe_times.add(mapped)
            if packet.marker and mapped in self._keyframe_times:
                self.keyframes_complete.append(time.monotonic())
            if self.decode:
                await handle(packet, arrival_time_ms)
            elif packet.marker:
                received = ReceivedFrame(time.monotonic(), None, mapped in self._keyframe_times)
                self.frames.append(received)
                if self.on_frame is not None:
                    self.on_frame(received)

        setattr(receiver, "_handle_rtp_packet", handle_and_note)  # noqa: B010

    def _count_audio(self, receiver: RTCRtpReceiver) -> None:
        async def count(packet: RtpPacket, arrival_time_ms: int) -> None:
            self.audio_frames += 1

        setattr(receiver, "_handle_rtp_packet", count)  # noqa: B010

    async def accept(self, answer: str) -> None:
        """Apply the gateway's SDP answer."""
        await super().accept(answer)
        # Retransmissions (RFC 4588) carry an original sequence number first.
        self._rtx_payload_types = {
            codec.payloadType
            for transceiver in self.pc.getTransceivers()
            for codec in transceiver._codecs
            if codec.mimeType.lower() == "video/rtx" and codec.payloadType is not None
        }

    async def _read(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                if isinstance(frame, VideoFrame):
                    keyframe = frame.pts in self._keyframe_times
                    received = ReceivedFrame(time.monotonic(), read_stamp(frame), keyframe)
                    self.frames.append(received)
                    if self.on_frame is not None:
                        self.on_frame(received)
                else:
                    self.audio_frames += 1
        except MediaStreamError:
            pass
        if all(t.done() or t is asyncio.current_task() for t in self._readers):
            self.ended.set()

    async def close(self) -> None:
        """Hang up."""
        for task in self._readers:
            task.cancel()
        await self.pc.close()
        for task in self._readers:
            with contextlib.suppress(asyncio.CancelledError, MediaStreamError):
                await task
