"""Cut media into 1-2 s chunks for browser MediaSource playback, with PyAV.

Theory of operation
-------------------
The input is decoded and re-encoded into one *fragmented* MP4 (ISO BMFF),
H.264 (libx264) + AAC-LC, or AAC-LC alone for music:

* Video gets an explicit GOP of about one second (``keyint`` = frame rate,
  no scene-cut keyframes, no B-frames) and every decoded frame's
  ``pict_type`` is cleared first: decoders and synthetic test patterns mark
  frames as I-frames, and libx264 honours that, which would give one
  fragment per frame (design.md, PyAV traps).
* The muxer runs with ``empty_moov+default_base_moof``: the ``moov`` holds
  no samples and every ``moof`` carries its own ``tfdt``, which is what
  MediaSource needs (ISO BMFF byte stream format: an initialization segment
  ``ftyp``+``moov``, then media segments ``moof``+``mdat``). Video is
  fragmented at each keyframe (``frag_keyframe``); audio-only output, where
  every AAC frame is a keyframe, by duration (``frag_duration`` = 1 s).

The muxed file is then split at top-level boxes: everything before the first
``moof`` is the init segment, and each ``moof`` with the boxes after it is a
fragment. Fragments are timed by demuxing the file once and mapping each
packet's byte position to its fragment, then grouped into chunks of 1-2 s of
media time (protocol.md section 7); only the last chunk may be shorter. Each
chunk therefore starts with a keyframe and decodes alone after the init
segment.

Chunk times are integer milliseconds (protocol.md section 1): chunk ``i``
starts where chunk ``i - 1`` ends, so durations sum exactly to the total.
"""

from __future__ import annotations

import bisect
import json
import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
from av.video.frame import PictureType

#: Written beside the chunks; bump when the layout changes.
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
INIT_NAME = "init.mp4"

#: protocol.md section 7: media is cut into chunks of 1-2 s.
MIN_CHUNK_MS = 1000
MAX_CHUNK_MS = 2000

#: Output audio: AAC-LC, 48 kHz stereo, in AAC's fixed 1024-sample frames.
AUDIO_RATE = 48_000
AAC_FRAME_SAMPLES = 1024
#: RFC 6381 codecs parameter for AAC-LC (object type 0x40, audio object type 2).
AAC_LC_CODECS = "mp4a.40.2"

#: Larger input is scaled down to this many lines: enough for the demo player,
#: and it keeps libx264 fast on a small box.
MAX_HEIGHT = 720
#: Frame rates above this are resampled down (duplicate timestamps dropped).
MAX_FPS = 60
DEFAULT_FPS = Fraction(25)

_ENCODERS = ("libx264", "aac")


class MediaError(Exception):
    """The media cannot be used: a missing or undecodable file, or a bad catalog."""


@dataclass(frozen=True)
class ChunkInfo:
    """One media chunk: its place in the stream and the file holding its bytes."""

    index: int
    start_ms: int
    duration_ms: int
    size: int
    path: Path


@dataclass(frozen=True)
class Manifest:
    """What the segmenter wrote into a directory: init segment, chunks, MIME type."""

    mime: str
    duration_ms: int
    init_path: Path
    init_size: int
    chunks: tuple[ChunkInfo, ...]

    def to_json(self) -> dict[str, Any]:
        """The manifest as written to ``manifest.json`` (file names, not paths)."""
        return {
            "version": MANIFEST_VERSION,
            "mime": self.mime,
            "duration_ms": self.duration_ms,
            "init": {"file": self.init_path.name, "size": self.init_size},
            "chunks": [
                {
                    "index": c.index,
                    "start_ms": c.start_ms,
                    "duration_ms": c.duration_ms,
                    "size": c.size,
                    "file": c.path.name,
                }
                for c in self.chunks
            ],
        }

    @classmethod
    def load(cls, directory: Path) -> Manifest:
        """Read and check ``directory/manifest.json`` against the files beside it."""
        path = directory / MANIFEST_NAME
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("version") != MANIFEST_VERSION:
                raise MediaError(f"{path}: unsupported manifest version {data.get('version')!r}")
            init = _checked_file(directory, data["init"]["file"], data["init"]["size"])
            chunks = []
            expected_start = 0
            for index, entry in enumerate(data["chunks"]):
                start, duration = entry["start_ms"], entry["duration_ms"]
                if entry["index"] != index or start != expected_start or not _is_int(duration):
                    raise MediaError(f"{path}: chunk {index} is out of sequence")
                chunk_path = _checked_file(directory, entry["file"], entry["size"])
                chunks.append(ChunkInfo(index, start, duration, entry["size"], chunk_path))
                expected_start = start + duration
            if not chunks or data["duration_ms"] != expected_start or not data["mime"]:
                raise MediaError(f"{path}: chunk durations do not add up to duration_ms")
            return cls(str(data["mime"]), expected_start, init, data["init"]["size"], tuple(chunks))
        except OSError as exc:
            raise MediaError(f"cannot read {path}: {exc.strerror or exc}") from exc
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MediaError(f"{path}: malformed manifest ({exc!r})") from exc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _checked_file(directory: Path, name: object, size: object) -> Path:
    """A manifest's file, which must be a plain name in ``directory`` of that size."""
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise MediaError(f"{directory}: bad file name {name!r} in manifest")
    path = directory / name
    if not _is_int(size) or path.stat().st_size != size:
        raise MediaError(f"{path}: size does not match the manifest")
    return path


def missing_encoders() -> list[str]:
    """The encoders this segmenter needs that the installed FFmpeg (PyAV) lacks."""
    return [name for name in _ENCODERS if name not in av.codecs_available]


def segment(source: Path, out_dir: Path, *, preset: str = "veryfast", crf: int = 26) -> Manifest:
    """Re-encode ``source`` and write init segment, chunks and manifest into ``out_dir``.

    ``out_dir`` must exist and should be empty. Raises :class:`MediaError` if
    ``source`` is missing, has no audio or video, or does not decode.
    """
    missing = missing_encoders()
    if missing:
        raise MediaError(f"this PyAV build lacks the encoder(s) {', '.join(missing)}")
    if not source.is_file():
        raise MediaError(f"no such file: {source}")
    stream_path = out_dir / "stream.mp4"
    try:
        mime = _transcode(source, stream_path, preset=preset, crf=crf)
        manifest = _split(stream_path, out_dir, mime)
    except av.FFmpegError as exc:
        raise MediaError(f"cannot decode {source}: {exc}") from exc
    finally:
        stream_path.unlink(missing_ok=True)
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=1) + "\n")
    return manifest


def _transcode(source: Path, dest: Path, *, preset: str, crf: int) -> str:
    """Encode ``source`` into fragmented MP4 ``dest``; return the MIME type with codecs."""
    with av.open(str(source)) as src:
        video_in = src.streams.video[0] if src.streams.video else None
        audio_in = src.streams.audio[0] if src.streams.audio else None
        inputs = [s for s in (video_in, audio_in) if s is not None]
        if not inputs:
            raise MediaError(f"{source} has no audio or video stream")
        # Streams may start late (MPEG-TS starts near 1.4 s): output starts at 0.
        starts = [
            float(s.start_time * s.time_base)
            for s in inputs
            if s.start_time is not None and s.time_base is not None
        ]
        origin = min(starts, default=0.0)

        # Video: a fragment per keyframe, plus a cut after 1.5 s of any one
        # track so audio running on past the last video frame is still cut.
        # Audio only: every frame is a keyframe, so cut by duration alone.
        options = {"movflags": "empty_moov+default_base_moof+skip_trailer"}
        if video_in is not None:
            options["movflags"] += "+frag_keyframe"
            options["frag_duration"] = str(MIN_CHUNK_MS * 1500)  # microseconds
        else:
            options["frag_duration"] = str(MIN_CHUNK_MS * 1000)
        with av.open(str(dest), "w", format="mp4", options=options) as out:
            video = _VideoEncoder(out, video_in, origin, preset, crf) if video_in else None
            audio = _AudioEncoder(out, origin) if audio_in else None
            frames = 0
            for frame in src.decode(*inputs):
                if isinstance(frame, av.VideoFrame) and video is not None:
                    video.encode(frame)
                elif isinstance(frame, av.AudioFrame) and audio is not None:
                    audio.encode(frame)
                frames += 1
            if frames == 0:
                raise MediaError(f"{source}: no frame could be decoded")
            codecs = []
            if video is not None:
                video.flush()
                codecs.append(video.codecs())
            if audio is not None:
                audio.flush()
                codecs.append(AAC_LC_CODECS)
    kind = "video" if video is not None else "audio"
    return f'{kind}/mp4; codecs="{", ".join(codecs)}"'


class _VideoEncoder:
    """libx264 at a constant frame rate with a keyframe every second."""

    def __init__(
        self,
        out: av.container.OutputContainer,
        stream: av.video.stream.VideoStream,
        origin: float,
        preset: str,
        crf: int,
    ) -> None:
        rate = stream.average_rate or stream.guessed_rate or DEFAULT_FPS
        self.fps = Fraction(min(Fraction(rate), Fraction(MAX_FPS)))
        keyint = max(1, round(self.fps))
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height:
            raise MediaError("the video stream has no picture size")
        if height > MAX_HEIGHT:
            width, height = round(width * MAX_HEIGHT / height), MAX_HEIGHT
        self.out = out
        self.origin = origin
        self.next_pts = 0
        self.stream = out.add_stream(
            "libx264",
            rate=self.fps,
            options={
                "preset": preset,
                "crf": str(crf),
                # One GOP per second and no B-frames: fragments of ~1 s whose
                # presentation order equals decode order.
                "x264-params": f"keyint={keyint}:min-keyint={keyint}:scenecut=0:bframes=0",
            },
        )
        # 4:2:0 needs even dimensions.
        self.stream.width = max(2, width // 2 * 2)
        self.stream.height = max(2, height // 2 * 2)
        self.stream.pix_fmt = "yuv420p"

    def encode(self, frame: av.VideoFrame) -> None:
        """Encode one decoded frame at its (constant-rate) time, dropping duplicates."""
        pts = self.next_pts if frame.time is None else round((frame.time - self.origin) * self.fps)
        if pts < self.next_pts:
            return
        out_frame = frame.reformat(self.stream.width, self.stream.height, "yuv420p")
        out_frame.pts = pts
        out_frame.time_base = 1 / self.fps
        # Let the GOP decide keyframes (design.md, PyAV traps).
        out_frame.pict_type = PictureType.NONE
        self.next_pts = pts + 1
        self.out.mux(self.stream.encode(out_frame))

    def flush(self) -> None:
        """Drain the encoder."""
        self.out.mux(self.stream.encode(None))

    def codecs(self) -> str:
        """RFC 6381 ``avc1.PPCCLL`` from the encoder's SPS."""
        return avc1_codecs(bytes(self.stream.codec_context.extradata or b""))


class _AudioEncoder:
    """AAC-LC, 48 kHz stereo; timestamps counted in samples from the first frame."""

    def __init__(self, out: av.container.OutputContainer, origin: float) -> None:
        self.out = out
        self.origin = origin
        self.stream = out.add_stream("aac", rate=AUDIO_RATE, layout="stereo")
        self.resampler = av.AudioResampler(
            format="fltp", layout="stereo", rate=AUDIO_RATE, frame_size=AAC_FRAME_SAMPLES
        )
        self.next_pts: int | None = None

    def encode(self, frame: av.AudioFrame | None) -> None:
        """Resample and encode one decoded frame (``None`` drains the resampler)."""
        if self.next_pts is None:
            start = 0.0 if frame is None or frame.time is None else frame.time - self.origin
            self.next_pts = max(0, round(start * AUDIO_RATE))
        for out_frame in self.resampler.resample(frame):
            out_frame.pts = self.next_pts
            out_frame.time_base = Fraction(1, AUDIO_RATE)
            self.next_pts += out_frame.samples
            self.out.mux(self.stream.encode(out_frame))

    def flush(self) -> None:
        """Drain the resampler and the encoder."""
        self.encode(None)
        self.out.mux(self.stream.encode(None))


def avc1_codecs(extradata: bytes) -> str:
    """The ``avc1.PPCCLL`` codecs string (RFC 6381) from H.264 extradata.

    ``extradata`` is either an ``avcC`` record (ISO/IEC 14496-15 5.3.3.1:
    version 1, then profile, constraint flags, level) or Annex B NAL units,
    where the same three bytes follow the SPS NAL header (type 7).
    """
    if extradata[:1] == b"\x01" and len(extradata) >= 4:
        return "avc1." + extradata[1:4].hex().upper()
    pos = extradata.find(b"\x00\x00\x01")
    while pos >= 0:
        nal = extradata[pos + 3 : pos + 7]
        if len(nal) == 4 and nal[0] & 0x1F == 7:
            return "avc1." + nal[1:4].hex().upper()
        pos = extradata.find(b"\x00\x00\x01", pos + 3)
    raise MediaError("the H.264 encoder produced no sequence parameter set")


def _top_level_boxes(path: Path) -> list[tuple[bytes, int, int]]:
    """(type, offset, size) of each top-level ISO BMFF box (ISO/IEC 14496-12 4.2)."""
    boxes = []
    file_size = path.stat().st_size
    with path.open("rb") as f:
        offset = 0
        while offset < file_size:
            f.seek(offset)
            header = f.read(16)
            size, kind = int.from_bytes(header[:4], "big"), header[4:8]
            if size == 1:  # 64-bit largesize follows the type
                size = int.from_bytes(header[8:16], "big")
            elif size == 0:  # box extends to the end of the file
                size = file_size - offset
            if size < 8 or offset + size > file_size:
                raise MediaError(f"{path}: truncated {kind!r} box at {offset}")
            boxes.append((kind, offset, size))
            offset += size
    return boxes


def _split(stream_path: Path, out_dir: Path, mime: str) -> Manifest:
    """Cut the fragmented MP4 into init segment and 1-2 s chunk files."""
    boxes = _top_level_boxes(stream_path)
    moofs = [offset for kind, offset, _ in boxes if kind == b"moof"]
    if not moofs:
        raise MediaError("the muxer wrote no fragments (is the input empty?)")
    # A fragment is a moof and the boxes after it (its mdat), up to the next
    # moof; an mfra index box, if any, is left out (not part of a media segment).
    fragments: list[list[tuple[int, int]]] = []
    for kind, offset, size in boxes:
        if kind == b"moof":
            fragments.append([])
        if fragments and kind != b"mfra":
            fragments[-1].append((offset, size))

    starts = [math.inf] * len(fragments)
    end = 0.0
    with av.open(str(stream_path)) as demuxed:
        for packet in demuxed.demux():
            if packet.pts is None or packet.pos is None or packet.pos < 0 or not packet.time_base:
                continue  # flush packets carry no data
            fragment = bisect.bisect_right(moofs, packet.pos) - 1
            time_base = packet.time_base
            start = float(packet.pts * time_base)
            starts[fragment] = min(starts[fragment], start)
            end = max(end, start + float((packet.duration or 0) * time_base))
    if any(math.isinf(s) for s in starts):
        raise MediaError("a fragment holds no media")

    # Fragment boundaries in ms; the first chunk starts at 0 whatever the
    # encoder delay, and each boundary is at least the one before.
    bounds = [0]
    for start in starts[1:]:
        bounds.append(max(bounds[-1], round(start * 1000)))
    bounds.append(max(bounds[-1], round(end * 1000)))
    if bounds[-1] == 0:
        raise MediaError("the media has no duration")

    # Group fragments into chunks of at least MIN_CHUNK_MS; a short tail joins
    # the chunk before it when the two fit in MAX_CHUNK_MS.
    groups: list[list[int]] = [[]]
    for index in range(len(fragments)):
        groups[-1].append(index)
        if bounds[index + 1] - bounds[groups[-1][0]] >= MIN_CHUNK_MS:
            groups.append([])
    if not groups[-1]:
        groups.pop()
    if len(groups) > 1:
        tail = bounds[-1] - bounds[groups[-1][0]]
        if tail < MIN_CHUNK_MS and bounds[-1] - bounds[groups[-2][0]] <= MAX_CHUNK_MS:
            groups[-2].extend(groups.pop())

    init_size = moofs[0]
    chunks = []
    with stream_path.open("rb") as f:
        init_path = out_dir / INIT_NAME
        init_path.write_bytes(f.read(init_size))
        for number, group in enumerate(groups):
            path = out_dir / f"chunk-{number:05d}.m4s"
            size = 0
            with path.open("wb") as chunk_file:
                for fragment in group:
                    for offset, box_size in fragments[fragment]:
                        f.seek(offset)
                        chunk_file.write(f.read(box_size))
                        size += box_size
            start_ms = bounds[group[0]]
            duration_ms = bounds[group[-1] + 1] - start_ms
            chunks.append(ChunkInfo(number, start_ms, duration_ms, size, path))
    return Manifest(mime, bounds[-1], init_path, init_size, tuple(chunks))
