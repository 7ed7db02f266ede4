"""The live hub: one live stream's clock, renditions, viewers and end.

See the package docstring (:mod:`gateway.live`) for the theory of operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import av
from av.audio.frame import AudioFrame
from av.video.frame import VideoFrame

from gateway.ice import IceConfig
from gateway.live.encode import (
    OPUS_RATE,
    KeyframePolicy,
    OpusEncoder,
    Pipeline,
    PipelineStats,
    Vp8Encoder,
    fit_size,
)
from gateway.live.fmp4 import Fmp4Packager, FragmentLog, LiveFragment
from gateway.live.rendition import Kind, LiveConfig, Rendition
from gateway.live.sdp import Offer, validate_offer

if TYPE_CHECKING:
    from gateway.live.record import Recorder, Recording
    from gateway.live.viewer import LiveViewer
    from gateway.media.catalog import MediaItem

log = logging.getLogger(__name__)

State = Literal["waiting", "live", "ended"]


@dataclass
class HubStats:
    """What the hub did so far (for tests, the dashboard and ``gateway bench --live``)."""

    video_frames_in: int = 0
    audio_frames_in: int = 0
    #: Per rendition: frames submitted, encoded, dropped (``vp8``, ``opus``,
    #: ``h264``, ``aac``).
    renditions: dict[str, PipelineStats] = field(default_factory=dict)
    keyframes: int = 0
    keyframe_requests: int = 0
    fragments: int = 0

    def encodes(self, name: str) -> int:
        """How many frames rendition ``name`` encoded."""
        stats = self.renditions.get(name)
        return stats.encoded if stats is not None else 0


class TrackClock:
    """Maps one ingest track's frame timestamps to live milliseconds.

    A track's timestamps (RTP, RFC 3550 section 5.1, unwrapped by aiortc)
    keep the publisher's spacing of frames; they are anchored to the live
    clock at the track's first frame. They are re-anchored only when they
    part from the arrival time by more than ``tolerance_ms``: falling behind
    (the publisher paused without advancing its clock) moves the track on to
    the arrival time; jumping ahead (its clock jumped) continues just after
    the last frame. A late burst (the gateway's own loop was busy) is not a
    reason: the frames' own spacing is the truth. Live times of one track
    strictly increase.
    """

    def __init__(self, tolerance_ms: int = 2000) -> None:
        self.tolerance_ms = tolerance_ms
        self._anchor: tuple[float, int] | None = None  # (media seconds, live ms)
        self._last = -1

    def live_ms(self, media_seconds: float | None, arrival_ms: int) -> int:
        """The live time of a frame with timestamp ``media_seconds`` arriving at ``arrival_ms``."""
        if media_seconds is None:
            ms = max(arrival_ms, self._last + 1)
        else:
            if self._anchor is None:
                self._anchor = (media_seconds, arrival_ms)
            ms = self._anchor[1] + round((media_seconds - self._anchor[0]) * 1000)
            if ms < arrival_ms - self.tolerance_ms or ms > arrival_ms + self.tolerance_ms:
                ms = max(arrival_ms, self._last + 1) if ms < arrival_ms else self._last + 1
                self._anchor = (media_seconds, ms)
        ms = max(ms, self._last + 1)
        self._last = ms
        return ms


class LiveHub:
    """One live stream: decoded frames in, one encode per rendition, many viewers out.

    Feed it with :class:`~gateway.live.ingest.LiveIngest` (or
    :meth:`push_video`/:meth:`push_audio`); add viewers with
    :meth:`add_viewer`; read the MSE path from :attr:`mse`; stop it with
    :meth:`end`. Create it inside a running event loop.
    """

    def __init__(
        self,
        live_id: str,
        config: LiveConfig | None = None,
        *,
        ice: IceConfig | None = None,
        recording: Recording | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.live_id = live_id
        self.config = config or LiveConfig()
        self.ice = ice or IceConfig()
        self.stats = HubStats()
        self.state: State = "waiting"
        self.end_reason: str | None = None
        self.ended = asyncio.Event()
        self.video = Rendition("video", self.config.backlog_ms)
        self.audio = Rendition("audio", self.config.backlog_ms)
        self.mse = FragmentLog(self.config.fragments_kept)
        self.viewers: set[LiveViewer] = set()
        #: The ingest feeding this hub (one publisher per live stream).
        self.publisher: object | None = None
        self.recorded: MediaItem | None = None
        self._clock = clock
        self._created = clock()
        self._t0: float | None = None
        self._last_media: float | None = None
        self._expected: frozenset[str] = frozenset({"audio", "video"})
        self._end_callbacks: list[Callable[[str], object]] = []
        self._video_clock = TrackClock()
        self._audio_clock = TrackClock()
        cfg = self.config
        self._vp8_keyframes = KeyframePolicy(cfg.interval_ms, cfg.keyframe_gap_ms)
        self._h264_keyframes = KeyframePolicy(cfg.interval_ms, cfg.interval_ms)
        self._vp8: Pipeline[tuple[VideoFrame, int], list[av.Packet]] | None = None
        self._opus: Pipeline[tuple[AudioFrame, int], list[av.Packet]] | None = None
        self._h264: Pipeline[tuple[VideoFrame, int], list[av.Packet]] | None = None
        self._aac: Pipeline[tuple[AudioFrame, int], list[av.Packet]] | None = None
        self._packager: Fmp4Packager | None = None
        self._video_size: tuple[int, int] | None = None
        self._mse_gave_up = not cfg.mse
        self._recorder: Recorder | None = None
        if recording is not None and recording.enabled:
            from gateway.live.record import Recorder

            self._recorder = Recorder(recording)
        self._ending: asyncio.Task[None] | None = None

    # -- the live clock and its intervals --

    def now_ms(self) -> int:
        """The live time now: milliseconds since the stream's first frame (0 before)."""
        if self._t0 is None:
            return 0
        return int((self._clock() - self._t0) * 1000)

    def interval_of(self, live_ms: int) -> int:
        """The interval holding ``live_ms`` (interval ``k`` is ``[k, k + 1)`` intervals)."""
        return live_ms // self.config.interval_ms

    def interval_start(self, interval: int) -> int:
        """Where interval ``interval`` starts, in live ms."""
        return interval * self.config.interval_ms

    @property
    def idle_s(self) -> float:
        """Seconds since the last media frame (or since the hub was created)."""
        last = self._last_media if self._last_media is not None else self._created
        return self._clock() - last

    # -- input --

    def expect(self, kinds: frozenset[str]) -> None:
        """The kinds the publisher announced (its offer); the MSE rendition waits for them."""
        self._expected = kinds

    def _arrival_ms(self) -> int:
        now = self._clock()
        if self._t0 is None:
            self._t0 = now
            self.state = "live"
        self._last_media = now
        return int((now - self._t0) * 1000)

    def push_video(self, frame: VideoFrame) -> int | None:
        """Take one decoded video frame; returns its live time (None once ended)."""
        if self.state == "ended":
            return None
        live_ms = self._video_clock.live_ms(frame.time, self._arrival_ms())
        self.stats.video_frames_in += 1
        if self._video_size is None:
            self._start_video(frame)
        assert self._vp8 is not None
        self._vp8.submit((frame, live_ms))
        self._start_mse_if_ready(live_ms, "video")
        if self._h264 is not None:
            self._h264.submit((frame, live_ms))
        return live_ms

    def push_audio(self, frame: AudioFrame) -> int | None:
        """Take one decoded audio frame; returns its live time (None once ended)."""
        if self.state == "ended":
            return None
        live_ms = self._audio_clock.live_ms(frame.time, self._arrival_ms())
        self.stats.audio_frames_in += 1
        if self._opus is None:
            self._start_audio()
        assert self._opus is not None
        self._opus.submit((frame, live_ms))
        self._start_mse_if_ready(live_ms, "audio")
        if self._aac is not None:
            self._aac.submit((frame, live_ms))
        return live_ms

    def request_keyframe(self) -> None:
        """Ask the WebRTC video rendition for a keyframe soon (coalesced, rate-limited)."""
        self.stats.keyframe_requests += 1
        self._vp8_keyframes.request()

    # -- renditions --

    def _start_video(self, frame: VideoFrame) -> None:
        cfg = self.config
        self._video_size = fit_size(frame.width, frame.height, cfg.max_height)
        encoder = Vp8Encoder(*self._video_size, cfg.video_bitrate)
        policy = self._vp8_keyframes

        def work(item: tuple[VideoFrame, int]) -> list[av.Packet]:
            frame, live_ms = item
            return encoder.encode(frame, live_ms, policy.decide(live_ms))

        def deliver(item: tuple[VideoFrame, int], packets: list[av.Packet]) -> None:
            for packet in packets:
                if packet.is_keyframe:
                    self.stats.keyframes += 1
                self.video.publish(packet, item[1], packet.is_keyframe)

        self._vp8 = Pipeline("vp8", work, deliver, depth=cfg.video_queue)
        self.stats.renditions["vp8"] = self._vp8.stats

    def _start_audio(self) -> None:
        encoder = OpusEncoder(self.config.audio_bitrate)

        def work(item: tuple[AudioFrame, int]) -> list[av.Packet]:
            return encoder.encode(*item)

        def deliver(item: tuple[AudioFrame, int], packets: list[av.Packet]) -> None:
            for packet in packets:
                live_ms = max(0, round((packet.pts or 0) * 1000 / OPUS_RATE))
                self.audio.publish(packet, live_ms, True)

        self._opus = Pipeline("opus", work, deliver, depth=self.config.audio_queue)
        self.stats.renditions["opus"] = self._opus.stats

    def _start_mse_if_ready(self, live_ms: int, kind: Kind) -> None:
        """Start the fMP4 rendition once the announced kinds have shown up.

        Its tracks are fixed when it starts (an MP4 header lists them), so it
        waits for each announced kind, or ``mse_wait_ms`` of live time, then
        starts with the kinds that came, at a video frame when there is
        video: that frame's time is the origin both tracks start from.
        """
        if self._packager is not None or self._mse_gave_up:
            return
        has_video = self._video_size is not None
        has_audio = self._opus is not None
        complete = ("video" not in self._expected or has_video) and (
            "audio" not in self._expected or has_audio
        )
        if not complete and live_ms < self.config.mse_wait_ms:
            return
        if has_video and kind != "video":
            return
        cfg = self.config
        try:
            packager = Fmp4Packager(
                video_size=self._video_size,
                audio=has_audio,
                video_bitrate=cfg.mse_video_bitrate,
                audio_bitrate=cfg.mse_audio_bitrate,
                interval_ms=cfg.interval_ms,
                origin_ms=live_ms,
                now_ms=self.now_ms,
                on_fragment=self._got_fragment,
            )
        except (av.FFmpegError, ValueError) as exc:
            log.warning("live %s: no MSE rendition: %s", self.live_id, exc)
            self._mse_gave_up = True
            return
        self._packager = packager
        assert packager.init_segment is not None
        self.mse.set_init(packager.init_segment, packager.mime)
        if self._recorder is not None:
            self._recorder.start(packager.init_segment, packager.mime)
        if packager.video is not None:
            policy = self._h264_keyframes

            def video_work(item: tuple[VideoFrame, int]) -> list[av.Packet]:
                frame, live_ms = item
                return packager.encode_video(frame, live_ms, policy.decide(live_ms))

            self._h264 = Pipeline(
                "h264",
                video_work,
                lambda _, packets: packager.mux(packets),
                depth=cfg.video_queue,
            )
            self.stats.renditions["h264"] = self._h264.stats
        if packager.audio is not None:
            self._aac = Pipeline(
                "aac",
                lambda item: packager.encode_audio(*item),
                lambda _, packets: packager.mux(packets),
                depth=cfg.audio_queue,
            )
            self.stats.renditions["aac"] = self._aac.stats

    def _got_fragment(self, fragment: LiveFragment) -> None:
        self.stats.fragments += 1
        self.mse.append(fragment)
        if self._recorder is not None:
            self._recorder.add(fragment)

    # -- viewers --

    async def add_viewer(self, offer: str | Offer) -> LiveViewer:
        """A new WebRTC viewer from its SDP offer (it sends the offer, WHEP-style).

        The offer is validated (``role="viewer"``: VP8 and/or Opus to
        receive); :attr:`LiveViewer.answer` is the SDP answer to send back.
        The viewer gets nothing until :meth:`LiveViewer.allow` says up to
        which live time it may.
        """
        from gateway.live.viewer import LiveViewer

        if self.state == "ended":
            raise RuntimeError(f"live stream {self.live_id} has ended")
        if isinstance(offer, str):
            offer = validate_offer(offer, role="viewer")
        viewer = LiveViewer(self)
        self.viewers.add(viewer)
        try:
            await viewer.accept(offer)
        except BaseException:
            self.viewers.discard(viewer)
            await viewer.close()
            raise
        return viewer

    def _viewer_closed(self, viewer: LiveViewer) -> None:
        self.viewers.discard(viewer)

    # -- the end --

    def on_end(self, callback: Callable[[str], object]) -> Callable[[], None]:
        """Call ``callback(reason)`` when the stream ends (at once if it has).

        Returns what forgets it: a viewer that leaves a long stream must not
        stay referenced until the stream ends.
        """
        if self.end_reason is not None:
            callback(self.end_reason)
        else:
            self._end_callbacks.append(callback)

        def forget() -> None:
            with contextlib.suppress(ValueError):
                self._end_callbacks.remove(callback)

        return forget

    async def end(self, reason: str = "stopped") -> None:
        """End the stream: flush the renditions, tell viewers, finish the recording.

        ``reason``: ``stopped`` (the publisher said so: WHIP ``DELETE``) or
        ``lost`` (its connection failed or its media stopped). Idempotent;
        returns once everything is done.
        """
        if self._ending is None:
            self.end_reason = reason
            self.state = "ended"
            self._ending = asyncio.get_running_loop().create_task(self._end())
        await asyncio.shield(self._ending)

    async def _end(self) -> None:
        reason = self.end_reason or "stopped"
        try:
            await self._finish(reason)
        except Exception:
            # Whatever failed, the stream has ended: waiters must hear it.
            log.exception("live %s: ending did not complete", self.live_id)
        finally:
            self.mse.end()
            self.ended.set()

    async def _finish(self, reason: str) -> None:
        for callback in self._end_callbacks:
            try:
                callback(reason)
            except Exception:
                log.exception("live %s: end callback failed", self.live_id)
        for pipeline in (self._vp8, self._opus):
            if pipeline is not None:
                await pipeline.close(drain=False)
        self.video.close()
        self.audio.close()
        await asyncio.gather(
            *(viewer._end(reason) for viewer in list(self.viewers)), return_exceptions=True
        )
        packager = self._packager
        if packager is not None:
            if self._h264 is not None:
                packager.mux(await self._h264.close(flush=packager.flush_video) or [])
            if self._aac is not None:
                packager.mux(await self._aac.close(flush=packager.flush_audio) or [])
            packager.close()
        if self._recorder is not None:
            try:
                self.recorded = await self._recorder.finish()
            except Exception:
                log.exception("live %s: the recording could not be saved", self.live_id)
