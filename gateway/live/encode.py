"""The live renditions' encoders, each fed from its own worker thread.

Every decoded frame of the ingest is encoded once per rendition: VP8 and
Opus for WebRTC viewers (:class:`Vp8Encoder`, :class:`OpusEncoder`), H.264
and AAC for the MSE path (:mod:`gateway.live.fmp4`). PyAV releases the GIL
while it scales and encodes, so each rendition runs in a
:class:`Pipeline`: a one-thread executor behind a short queue. When a
rendition falls behind, the queue drops its *oldest* frame (counted in
``dropped``) so that latency stays bounded instead of growing.

Keyframes (:class:`KeyframePolicy`): one at the first frame of every live
interval, so that an interval (and an MSE fragment) starts with a keyframe
and a viewer allowed from an interval's start gets one at once; and one on
request (a viewer joining or resuming, a viewer's PLI, RFC 4585 section
6.3.1), at most one per ``min_gap_ms`` so that many viewers asking at once
cost one keyframe.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from typing import Generic, TypeVar

import av
from av.audio.frame import AudioFrame
from av.video.frame import PictureType, VideoFrame
from av.video.reformatter import VideoReformatter

log = logging.getLogger(__name__)

#: Encoders created in this process, by codec (``vp8``, ``opus``, ``h264``,
#: ``aac``): tests and benches check that viewers add none.
ENCODERS_CREATED: Counter[str] = Counter()

#: Encoders take timestamps in live milliseconds.
MS = Fraction(1, 1000)
#: Opus always runs at 48 kHz (RFC 7587 section 4.1).
OPUS_RATE = 48_000
#: 60 ms Opus packets (RFC 7587 allows up to 120 ms, and every Opus decoder
#: takes any duration), not WebRTC's usual 20 ms: each packet costs every
#: viewer an RTP send and an SRTP protect in aiortc, so a third of the audio
#: packets is a measurable part of a viewer's cost, for 40 ms more audio
#: latency (docs/performance.md, "Live").
OPUS_FRAME_MS = 60
OPUS_FRAME_SAMPLES = OPUS_RATE * OPUS_FRAME_MS // 1000
OPUS_TIME_BASE = Fraction(1, OPUS_RATE)
#: A jump of the audio timeline larger than this re-anchors the sample clock
#: (the publisher paused, or its clock jumped) instead of stretching audio.
AUDIO_RESYNC_MS = 200


def fit_size(width: int, height: int, max_height: int) -> tuple[int, int]:
    """The rendition size for a ``width`` x ``height`` ingest: at most ``max_height``
    lines, the same aspect, even dimensions (4:2:0 chroma needs them)."""
    if height > max_height:
        width, height = round(width * max_height / height), max_height
    return max(2, width // 2 * 2), max(2, height // 2 * 2)


class FrameFitter:
    """Gives one rendition its own yuv420p copy of a decoded frame, at its size.

    Several renditions encode the same decoded frame at once, each in its
    thread, and each sets ``pts`` and ``pict_type`` on its input. PyAV's
    ``VideoFrame.reformat`` keeps one scaler per *source* frame, which two
    threads would then share (a crash), and returns the frame itself when
    nothing changes; so each rendition has its own scaler, and an unchanged
    frame is copied.
    """

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self._reformatter = VideoReformatter()

    def __call__(self, frame: VideoFrame) -> VideoFrame:
        out = self._reformatter.reformat(
            frame, width=self.width, height=self.height, format="yuv420p"
        )
        if out is frame:
            out = VideoFrame(self.width, self.height, "yuv420p")
            for source, dest in zip(frame.planes, out.planes, strict=True):
                if source.line_size == dest.line_size:
                    dest.update(bytes(source))
                else:  # different padding: copy row by row
                    view = memoryview(bytes(source))
                    data = b"".join(
                        view[r * source.line_size : r * source.line_size + dest.line_size]
                        for r in range(dest.height)
                    )
                    dest.update(data.ljust(dest.buffer_size, b"\0"))
        return out


class KeyframePolicy:
    """When a video rendition's next frame must be a keyframe (thread-safe)."""

    def __init__(self, interval_ms: int, min_gap_ms: int) -> None:
        self.interval_ms = interval_ms
        self.min_gap_ms = min_gap_ms
        self._lock = threading.Lock()
        self._requested = False
        self._last_ms: int | None = None
        self._last_interval: int | None = None

    def request(self) -> None:
        """Ask for a keyframe soon (honoured once ``min_gap_ms`` has passed)."""
        with self._lock:
            self._requested = True

    def decide(self, live_ms: int) -> bool:
        """Whether the frame at ``live_ms`` is to be a keyframe; records it if so."""
        interval = live_ms // self.interval_ms
        with self._lock:
            due = self._last_interval != interval
            if self._requested and (
                self._last_ms is None or live_ms - self._last_ms >= self.min_gap_ms
            ):
                due = True
            if due:
                self._requested = False
                self._last_ms = live_ms
                self._last_interval = interval
            return due

    def last_keyframe_ms(self) -> int | None:
        """The live time of the last keyframe decided on."""
        with self._lock:
            return self._last_ms


class Vp8Encoder:
    """libvpx VP8 for WebRTC viewers: realtime, constant bitrate, keyframes when told.

    Settings follow aiortc's own VP8 encoder (``aiortc/codecs/vpx.py``) with
    one change: libvpx never places keyframes itself (the
    :class:`KeyframePolicy` does).
    """

    name = "vp8"

    def __init__(self, width: int, height: int, bitrate: int, threads: int = 1) -> None:
        self.width, self.height = width, height
        codec = av.CodecContext.create("libvpx", "w")
        assert isinstance(codec, av.VideoCodecContext)
        codec.width, codec.height = width, height
        codec.pix_fmt = "yuv420p"
        codec.time_base = MS
        codec.bit_rate = bitrate
        codec.gop_size = 1 << 30  # keyframes only when asked
        codec.qmin, codec.qmax = 2, 56
        codec.thread_count = threads
        codec.options = {
            "deadline": "realtime",
            "cpu-used": "8",
            "lag-in-frames": "0",  # one frame in, one packet out: no added latency
            "auto-alt-ref": "0",
            "bufsize": str(bitrate),
            "minrate": str(bitrate),
            "maxrate": str(bitrate),
            "undershoot-pct": "100",
            "overshoot-pct": "15",
            "static-thresh": "1",
            "partitions": "0",
        }
        self._codec = codec
        self._fit = FrameFitter(width, height)
        self.frames = 0
        ENCODERS_CREATED[self.name] += 1

    def encode(self, frame: VideoFrame, live_ms: int, keyframe: bool) -> list[av.Packet]:
        """Encode one frame at ``live_ms`` (runs in the rendition's thread)."""
        own = self._fit(frame)
        own.pts = live_ms
        own.time_base = MS
        # Decoders mark their keyframes I; libvpx would copy that (design.md,
        # PyAV traps), so the policy alone decides.
        own.pict_type = PictureType.I if keyframe else PictureType.NONE
        self.frames += 1
        packets = self._codec.encode(own)
        for packet in packets:
            packet.time_base = MS
        return packets


class AudioStamper:
    """Sample timestamps for one audio rendition, following the live clock.

    Resampled frames come out regrouped (Opus takes 60 ms, AAC 1024
    samples), so output frames are stamped by counting samples from the
    first input's live time; a jump forward of the live timeline beyond
    :data:`AUDIO_RESYNC_MS` re-anchors the count.
    """

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.next_pts: int | None = None
        self._shift: int | None = None

    def anchor(self, live_ms: int) -> None:
        """Note the next input starts at ``live_ms``.

        Only forward: a gap (the publisher paused, frames were dropped) moves
        the count on; input running ahead of the live clock is stamped on in
        sequence, since a timestamp going back would be refused by the muxer
        (and would play audio twice).
        """
        start = live_ms * self.rate // 1000
        if self.next_pts is None:
            self.next_pts = max(0, start)
        elif (start - self.next_pts) * 1000 > AUDIO_RESYNC_MS * self.rate:
            self.next_pts = start

    def stamp(self, frame: AudioFrame) -> None:
        """Give ``frame`` the next timestamp and advance."""
        assert self.next_pts is not None
        frame.pts = self.next_pts
        frame.time_base = Fraction(1, self.rate)
        self.next_pts += frame.samples

    def shift(self, packets: list[av.Packet], first_input_pts: int) -> list[av.Packet]:
        """Move encoder output so its first packet has the first input's timestamp.

        Opus and AAC encoders start with priming samples, so their first
        packet is stamped before the first input (negative at live time 0);
        like aiortc's Opus encoder, the gateway cancels that offset.
        """
        for packet in packets:
            if self._shift is None:
                self._shift = max(0, first_input_pts - (packet.pts or 0))
            if packet.pts is not None:
                packet.pts += self._shift
            if packet.dts is not None:
                packet.dts += self._shift
        return packets


class OpusEncoder:
    """libopus for WebRTC viewers: 48 kHz stereo, 60 ms packets (RFC 7587)."""

    name = "opus"

    def __init__(self, bitrate: int) -> None:
        codec = av.CodecContext.create("libopus", "w")
        assert isinstance(codec, av.AudioCodecContext)
        codec.sample_rate = OPUS_RATE
        codec.layout = "stereo"
        codec.format = "s16"
        codec.bit_rate = bitrate
        codec.time_base = OPUS_TIME_BASE
        codec.options = {"application": "lowdelay", "frame_duration": str(OPUS_FRAME_MS)}
        self._codec = codec
        self._resampler = av.AudioResampler(
            format="s16", layout="stereo", rate=OPUS_RATE, frame_size=OPUS_FRAME_SAMPLES
        )
        self._stamper = AudioStamper(OPUS_RATE)
        self._first_pts: int | None = None
        self.frames = 0
        ENCODERS_CREATED[self.name] += 1

    def encode(self, frame: AudioFrame, live_ms: int) -> list[av.Packet]:
        """Resample and encode one decoded frame starting at ``live_ms``."""
        self._stamper.anchor(live_ms)
        packets: list[av.Packet] = []
        for out in self._resampler.resample(frame):
            self._stamper.stamp(out)
            if self._first_pts is None:
                self._first_pts = out.pts
            packets += self._codec.encode(out)
        self.frames += 1
        for packet in packets:
            packet.time_base = OPUS_TIME_BASE
        return self._stamper.shift(packets, self._first_pts or 0)


T = TypeVar("T")
R = TypeVar("R")


@dataclass
class PipelineStats:
    """What one rendition's pipeline did: frames submitted, encoded, dropped."""

    submitted: int = 0
    encoded: int = 0
    dropped: int = 0
    #: CPU seconds the encoder thread spent encoding.
    cpu_s: float = 0.0


class Pipeline(Generic[T, R]):
    """One rendition's encoder thread behind a short drop-oldest queue.

    ``work(item)`` runs in the thread; ``deliver(item, result)`` runs on the
    event loop, in submission order.
    """

    def __init__(
        self,
        name: str,
        work: Callable[[T], R],
        deliver: Callable[[T, R], None],
        *,
        depth: int = 2,
    ) -> None:
        self.name = name
        self.stats = PipelineStats()
        self._work = work
        self._deliver = deliver
        self._depth = depth
        self._queue: deque[T] = deque()
        self._ready = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"live-{name}")
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"live-{name}")

    def submit(self, item: T) -> None:
        """Queue ``item``; the oldest waiting one is dropped when the queue is full."""
        if self._closing:
            return
        if len(self._queue) >= self._depth:
            self._queue.popleft()
            self.stats.dropped += 1
        self._queue.append(item)
        self.stats.submitted += 1
        self._ready.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            item = self._queue.popleft()
            try:
                result = await loop.run_in_executor(self._executor, self._timed, item)
            except (av.FFmpegError, ValueError) as exc:
                # One bad frame (say, an odd size mid-stream) must not stop
                # the rendition: count it as dropped and go on.
                self.stats.dropped += 1
                log.warning("live %s: frame not encoded: %s", self.name, exc)
                continue
            self.stats.encoded += 1
            try:
                self._deliver(item, result)
            except Exception:
                log.exception("live %s: encoded frame not delivered", self.name)

    def _timed(self, item: T) -> R:
        start = time.thread_time()
        try:
            return self._work(item)
        finally:
            self.stats.cpu_s += time.thread_time() - start

    async def close(self, *, drain: bool = True, flush: Callable[[], R] | None = None) -> R | None:
        """Stop taking items; finish the queued ones (``drain``) or drop them.

        ``flush``, if given, then runs in the thread (to drain the encoder)
        and its result is returned.
        """
        self._closing = True
        if not drain:
            self.stats.dropped += len(self._queue)
            self._queue.clear()
        self._ready.set()
        try:
            await self._task
            if flush is None:
                return None
            return await asyncio.get_running_loop().run_in_executor(self._executor, flush)
        finally:
            self._executor.shutdown(wait=False)
