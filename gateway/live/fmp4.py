"""The MSE rendition: the live stream as fragmented MP4, cut as it is produced.

Browsers' MediaSource takes ISO BMFF byte streams: an initialization segment
(``ftyp`` + ``moov``) then media segments (``moof`` + ``mdat``). This is the
same layout as the catalog's chunks (``gateway/media/segment.py``), with the
same codecs (H.264 + AAC-LC, ``video/mp4; codecs="avc1.*, mp4a.40.2"``,
which design.md records as working in Chromium's MediaSource), so the
existing browser player and ``player play`` take a live item's fragments as
they take a catalog item's chunks.

:class:`Fmp4Packager` owns one H.264 encoder (libx264, ``zerolatency``: no
look-ahead, no B-frames) and one AAC encoder, as streams of one FFmpeg mp4
muxer writing to memory with ``empty_moov+default_base_moof+frag_keyframe``:
the header is written at once (it is the init segment) and a fragment is
written each time a video keyframe arrives. The hub forces an H.264 keyframe
at the first frame of every live interval and never otherwise, so each
fragment is one interval of about a second, starts with a keyframe, and
becomes available as soon as the next interval's first frame is encoded: a
fragment is ready about one interval after its start. Audio alone is cut by
duration. ``max_interleave_delta`` bounds how long the muxer waits for a
stalled track.

Both tracks start at the packager's origin (the first video frame it
takes): FFmpeg's mp4 muxer, having written its ``moov`` before any sample
(``empty_moov``), moves a track whose first timestamp is not zero to zero,
which would put audio and video out of step. So the muxer is given times
counted from the origin, the first audio frame is stamped at it, and
fragment times are given back on the live clock.

The muxer's output is split at top-level boxes as it arrives. Each
fragment's start and duration are read from its own boxes (``tfdt`` and the
sample durations of ``trun``/``tfhd``/``trex``, ISO/IEC 14496-12 section 8.8)
on the video track (audio when there is no video), so they are exactly what a
MediaSource will see, and consecutive fragments join without gap.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction

import av
from av.audio.frame import AudioFrame
from av.video.frame import PictureType, VideoFrame

from gateway.live.encode import ENCODERS_CREATED, MS, AudioStamper, FrameFitter
from gateway.media.segment import AAC_LC_CODECS, avc1_codecs

log = logging.getLogger(__name__)

AAC_RATE = 48_000
AAC_FRAME_SAMPLES = 1024


@dataclass(frozen=True)
class LiveFragment:
    """One MSE media segment of the live stream, usable like a catalog chunk.

    ``index`` counts from 0; ``start_ms`` and ``duration_ms`` are on the live
    clock (protocol.md section 1: integer milliseconds); ``data`` is
    ``moof`` + ``mdat`` and decodes after the init segment. ``ready_ms`` is
    the live time at which it became available (``ready_ms - start_ms`` is
    how far behind live its start is).
    """

    index: int
    start_ms: int
    duration_ms: int
    data: bytes
    ready_ms: int

    @property
    def end_ms(self) -> int:
        """Where the next fragment starts."""
        return self.start_ms + self.duration_ms

    def __iter__(self) -> Iterator[int | bytes]:
        """``index, start_ms, duration_ms, data = fragment``, as a catalog chunk is described."""
        return iter((self.index, self.start_ms, self.duration_ms, self.data))


def iter_boxes(
    data: bytes, start: int = 0, end: int | None = None
) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload offset, box end) of each box in ``data[start:end]`` (ISO/IEC 14496-12 4.2)."""
    end = len(data) if end is None else end
    offset = start
    while offset + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, offset)
        header = 8
        if size == 1:
            (size,) = struct.unpack_from(">Q", data, offset + 8)
            header = 16
        elif size == 0:
            size = end - offset
        if size < header or offset + size > end:
            raise ValueError(f"truncated {kind!r} box at {offset}")
        yield kind, offset + header, offset + size
        offset += size


def _child(data: bytes, start: int, end: int, kind: bytes) -> tuple[int, int] | None:
    for found, payload, box_end in iter_boxes(data, start, end):
        if found == kind:
            return payload, box_end
    return None


@dataclass(frozen=True)
class _Track:
    timescale: int
    default_duration: int


def _tracks(moov: bytes) -> dict[int, _Track]:
    """Track id -> timescale (``mdhd``) and ``trex`` default sample duration."""
    timescales: dict[int, int] = {}
    defaults: dict[int, int] = {}
    for kind, payload, end in iter_boxes(moov, 8):
        if kind == b"trak":
            tkhd, mdia = _child(moov, payload, end, b"tkhd"), _child(moov, payload, end, b"mdia")
            if tkhd is None or mdia is None:
                continue
            version = moov[tkhd[0]]
            (track_id,) = struct.unpack_from(">I", moov, tkhd[0] + (20 if version == 1 else 12))
            mdhd = _child(moov, mdia[0], mdia[1], b"mdhd")
            if mdhd is None:
                continue
            version = moov[mdhd[0]]
            (timescale,) = struct.unpack_from(">I", moov, mdhd[0] + (20 if version == 1 else 12))
            timescales[track_id] = timescale
        elif kind == b"mvex":
            for sub, sub_payload, _ in iter_boxes(moov, payload, end):
                if sub == b"trex":
                    track_id, _, duration = struct.unpack_from(">III", moov, sub_payload + 4)
                    defaults[track_id] = duration
    return {tid: _Track(ts, defaults.get(tid, 0)) for tid, ts in timescales.items()}


def fragment_times(moof: bytes, tracks: dict[int, _Track]) -> dict[int, tuple[int, int]]:
    """Track id -> (start, end) of a ``moof`` in that track's timescale.

    Start is the ``tfdt`` base media decode time; end adds every sample's
    duration (``trun`` per-sample, else ``tfhd``'s default, else ``trex``'s).
    """
    times: dict[int, tuple[int, int]] = {}
    for kind, payload, end in iter_boxes(moof, 8):
        if kind != b"traf":
            continue
        tfhd = _child(moof, payload, end, b"tfhd")
        tfdt = _child(moof, payload, end, b"tfdt")
        if tfhd is None or tfdt is None:
            continue
        (flags,) = struct.unpack_from(">I", moof, tfhd[0])
        (track_id,) = struct.unpack_from(">I", moof, tfhd[0] + 4)
        track = tracks.get(track_id, _Track(1, 0))
        default = track.default_duration
        pos = tfhd[0] + 8
        pos += 8 if flags & 0x01 else 0
        pos += 4 if flags & 0x02 else 0
        if flags & 0x08:
            (default,) = struct.unpack_from(">I", moof, pos)
        version = moof[tfdt[0]]
        (base,) = struct.unpack_from(">Q" if version == 1 else ">I", moof, tfdt[0] + 4)
        total = 0
        for sub, sub_payload, _ in iter_boxes(moof, payload, end):
            if sub != b"trun":
                continue
            trun_flags, count = struct.unpack_from(">II", moof, sub_payload)
            # Optional data offset and first-sample flags precede the samples.
            pos = sub_payload + 8
            pos += (4 if trun_flags & 0x01 else 0) + (4 if trun_flags & 0x04 else 0)
            stride = 4 * bin(trun_flags & 0xF00).count("1")
            if trun_flags & 0x100:
                for i in range(count):
                    total += struct.unpack_from(">I", moof, pos + i * stride)[0]
            else:
                total += default * count
        times[track_id] = (base, base + total)
    return times


class _BoxSplitter:
    """Receives the muxer's bytes; reports the init segment, then whole fragments."""

    def __init__(
        self, on_init: Callable[[bytes], None], on_fragment: Callable[[bytes, bytes], None]
    ) -> None:
        self._buffer = bytearray()
        self._init = bytearray()
        self._moof: bytes | None = None
        self._in_media = False
        self._on_init = on_init
        self._on_fragment = on_fragment

    def write(self, data: bytes) -> int:
        """File-like ``write`` for PyAV's output container."""
        self._buffer += data
        consumed = 0
        for kind, start, end in complete_boxes(self._buffer):
            self._box(kind, bytes(self._buffer[start:end]))
            consumed = end
        del self._buffer[:consumed]
        return len(data)

    def _box(self, kind: bytes, box: bytes) -> None:
        if not self._in_media:
            self._init += box
            if kind == b"moov":
                self._in_media = True
                self._on_init(bytes(self._init))
        elif kind == b"moof":
            self._moof = box
        elif kind == b"mdat" and self._moof is not None:
            self._on_fragment(self._moof, box)
            self._moof = None
        # Anything else after the init segment (an mfra index) is not media.


def complete_boxes(buffer: bytearray) -> Iterator[tuple[bytes, int, int]]:
    """(type, start, end) of the complete top-level boxes at the start of ``buffer``."""
    offset = 0
    while offset + 8 <= len(buffer):
        size, kind = struct.unpack_from(">I4s", buffer, offset)
        header = 8
        if size == 1:
            if offset + 16 > len(buffer):
                return
            (size,) = struct.unpack_from(">Q", buffer, offset + 8)
            header = 16
        if size < header:
            raise ValueError(f"bad {kind!r} box size {size}")
        if offset + size > len(buffer):
            return
        yield kind, offset, offset + size
        offset += size


class Fmp4Packager:
    """H.264 + AAC encoders and an fMP4 muxer for one live stream (see module doc).

    ``video_size`` is the rendition size (None: audio only). The encode
    methods run in the renditions' threads; :meth:`mux` and :meth:`close` on
    the event loop. ``on_fragment`` gets each :class:`LiveFragment`.
    """

    def __init__(
        self,
        *,
        video_size: tuple[int, int] | None,
        audio: bool,
        video_bitrate: int,
        audio_bitrate: int,
        interval_ms: int,
        origin_ms: int,
        now_ms: Callable[[], int],
        on_fragment: Callable[[LiveFragment], None],
        frame_rate: int = 30,
    ) -> None:
        if video_size is None and not audio:
            raise ValueError("an fMP4 rendition needs audio or video")
        self.origin_ms = origin_ms
        self._now_ms = now_ms
        self._on_fragment = on_fragment
        self.init_segment: bytes | None = None
        self._tracks: dict[int, _Track] = {}
        self._timing_track: int | None = None
        self._index = 0
        self._splitter = _BoxSplitter(self._got_init, self._got_fragment)
        movflags = "empty_moov+default_base_moof+skip_trailer"
        options = {
            "movflags": movflags + ("+frag_keyframe" if video_size else ""),
            # A cut after two intervals without a keyframe (video stalled),
            # or every interval for audio alone.
            "frag_duration": str(interval_ms * (2000 if video_size else 1000)),
            "max_interleave_delta": str(interval_ms * 1000),
            "flush_packets": "1",
        }
        self._container = av.open(self._splitter, "w", format="mp4", options=options)
        self.video: av.VideoStream | None = None
        self.audio: av.AudioStream | None = None
        codecs = []
        if video_size is not None:
            video = self._container.add_stream(
                "libx264",
                rate=frame_rate,
                options={
                    "preset": "veryfast",
                    "tune": "zerolatency",
                    "forced-idr": "1",
                    # Keyframes only when the hub forces one (interval starts).
                    "x264-params": "keyint=infinite:scenecut=0:bframes=0",
                },
            )
            video.width, video.height = video_size
            video.pix_fmt = "yuv420p"
            video.bit_rate = video_bitrate
            video.codec_context.time_base = MS
            video.time_base = MS
            self.video = video
            self._fit = FrameFitter(*video_size)
            ENCODERS_CREATED["h264"] += 1
        if audio:
            sound = self._container.add_stream("aac", rate=AAC_RATE, layout="stereo")
            sound.bit_rate = audio_bitrate
            sound.codec_context.time_base = Fraction(1, AAC_RATE)
            self.audio = sound
            self._resampler = av.AudioResampler(
                format="fltp", layout="stereo", rate=AAC_RATE, frame_size=AAC_FRAME_SAMPLES
            )
            self._stamper = AudioStamper(AAC_RATE)
            self._first_audio_pts: int | None = None
            ENCODERS_CREATED["aac"] += 1
        # Opens both encoders and writes the header: the init segment.
        self._container.start_encoding()
        if self.video is not None:
            codecs.append(avc1_codecs(bytes(self.video.codec_context.extradata or b"")))
        if self.audio is not None:
            codecs.append(AAC_LC_CODECS)
        kind = "video" if self.video is not None else "audio"
        self.mime = f'{kind}/mp4; codecs="{", ".join(codecs)}"'
        self.video_frames = 0
        self.audio_frames = 0
        self.refused = 0
        self._last_dts: dict[int, int] = {}
        self._closed = False

    # -- encoding (renditions' threads) --

    def encode_video(self, frame: VideoFrame, live_ms: int, keyframe: bool) -> list[av.Packet]:
        """Encode one video frame at ``live_ms``; ``keyframe`` forces an IDR."""
        assert self.video is not None
        own = self._fit(frame)
        own.pts = max(0, live_ms - self.origin_ms)
        own.time_base = MS
        own.pict_type = PictureType.I if keyframe else PictureType.NONE
        self.video_frames += 1
        return self.video.encode(own)

    def encode_audio(self, frame: AudioFrame, live_ms: int) -> list[av.Packet]:
        """Resample and encode one audio frame starting at ``live_ms``."""
        assert self.audio is not None
        if self._stamper.next_pts is None:
            self._stamper.next_pts = 0  # every track starts at the origin
        self._stamper.anchor(max(0, live_ms - self.origin_ms))
        packets: list[av.Packet] = []
        for out in self._resampler.resample(frame):
            self._stamper.stamp(out)
            if self._first_audio_pts is None:
                self._first_audio_pts = out.pts
            packets += self.audio.encode(out)
        self.audio_frames += 1
        return self._stamper.shift(packets, self._first_audio_pts or 0)

    def flush_video(self) -> list[av.Packet]:
        """Drain the H.264 encoder (at the end of the stream)."""
        return self.video.encode(None) if self.video is not None else []

    def flush_audio(self) -> list[av.Packet]:
        """Drain the resampler and the AAC encoder (at the end of the stream)."""
        if self.audio is None:
            return []
        packets: list[av.Packet] = []
        if self._stamper.next_pts is not None:
            for out in self._resampler.resample(None):
                self._stamper.stamp(out)
                packets += self.audio.encode(out)
        packets += self.audio.encode(None)
        return self._stamper.shift(packets, self._first_audio_pts or 0)

    # -- muxing (event loop) --

    def mux(self, packets: list[av.Packet]) -> None:
        """Give encoded packets to the muxer; completed fragments are reported.

        A packet whose decode time does not follow its stream's last one is
        dropped (counted in ``refused``): the muxer would refuse it, and the
        stream must go on.
        """
        if self._closed:
            return
        for packet in packets:
            stream = packet.stream.index
            dts = packet.dts if packet.dts is not None else packet.pts
            last = self._last_dts.get(stream)
            if dts is None or (last is not None and dts <= last):
                self.refused += 1
                continue
            self._last_dts[stream] = dts
            try:
                self._container.mux(packet)
            except av.FFmpegError as exc:
                self.refused += 1
                log.warning("live fMP4: packet refused by the muxer: %s", exc)

    def close(self) -> None:
        """Write what the muxer still holds (the last fragment) and close it."""
        if not self._closed:
            self._closed = True
            try:
                self._container.close()
            except av.FFmpegError as exc:
                log.warning("live fMP4: the last fragment could not be written: %s", exc)

    # -- output --

    def _got_init(self, data: bytes) -> None:
        self.init_segment = data
        self._tracks = _tracks(data[_moov_offset(data) :])
        kinds = {s.index + 1: s.type for s in self._container.streams}
        video_ids = [tid for tid in self._tracks if kinds.get(tid) == "video"]
        self._timing_track = (video_ids or sorted(self._tracks))[0] if self._tracks else None

    def _got_fragment(self, moof: bytes, mdat: bytes) -> None:
        times = fragment_times(moof, self._tracks)
        if not times:
            return
        track = self._timing_track if self._timing_track in times else min(times)
        start, end = times[track]
        scale = self._tracks.get(track, _Track(1000, 0)).timescale
        start_ms = self.origin_ms + start * 1000 // scale
        end_ms = self.origin_ms + end * 1000 // scale
        fragment = LiveFragment(
            self._index, start_ms, max(0, end_ms - start_ms), moof + mdat, self._now_ms()
        )
        self._index += 1
        self._on_fragment(fragment)


def _moov_offset(init: bytes) -> int:
    for kind, payload, _ in iter_boxes(init):
        if kind == b"moov":
            return payload - 8
    raise ValueError("no moov box in the init segment")


class FragmentLog:
    """The recent fragments of a live stream, for the MSE path to read live.

    Keeps the init segment and the last ``keep`` fragments; readers iterate
    :meth:`fragments` and wait for new ones until the stream ends.
    """

    def __init__(self, keep: int) -> None:
        self.init_segment: bytes | None = None
        self.mime: str | None = None
        self._recent: deque[LiveFragment] = deque(maxlen=keep)
        self._changed = asyncio.Event()
        self.ended = False
        self.created = time.monotonic()

    def set_init(self, init: bytes, mime: str) -> None:
        """Record the init segment and MIME type (once the packager has them)."""
        self.init_segment, self.mime = init, mime
        self._wake()

    def append(self, fragment: LiveFragment) -> None:
        """Add a fragment, waking readers."""
        self._recent.append(fragment)
        self._wake()

    def end(self) -> None:
        """No more fragments will come."""
        self.ended = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    @property
    def latest(self) -> LiveFragment | None:
        """The newest fragment, if any."""
        return self._recent[-1] if self._recent else None

    def recent(self) -> list[LiveFragment]:
        """The fragments still held, oldest first."""
        return list(self._recent)

    async def wait_init(self) -> bytes | None:
        """The init segment once known (None if the stream ended without one)."""
        while self.init_segment is None and not self.ended:
            await self._changed.wait()
        return self.init_segment

    async def fragments(self, start: int | None = None) -> AsyncIterator[LiveFragment]:
        """Fragments from index ``start`` (default: the newest one), as they come.

        A reader that asks for a fragment no longer held, or falls that far
        behind, continues at the oldest one held. The iteration ends with
        the stream.
        """
        next_index = start
        while True:
            event = self._changed
            held = list(self._recent)
            if next_index is None and held:
                next_index = held[-1].index
            if next_index is not None and held:
                next_index = max(next_index, held[0].index)
                for fragment in held:
                    if fragment.index >= next_index:
                        yield fragment
                        next_index = fragment.index + 1
                if self._recent and self._recent[-1].index >= next_index:
                    continue
            if self.ended:
                return
            await event.wait()
