"""The live media core end to end, in one process over real UDP on 127.0.0.1.

A real aiortc publisher sends synthetic video (each frame stamped with its
number) and a tone to the WHIP ingest; real aiortc viewers decode what the
gateway forwards; the MSE fragments and the recording are decoded with
PyAV. A few seconds of media per test.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import pytest

from gateway.live import (
    LOOPBACK,
    EncodedPacket,
    LiveConfig,
    LiveFragment,
    LiveHub,
    LiveIngest,
    LiveViewer,
)
from gateway.live.encode import ENCODERS_CREATED, OPUS_FRAME_MS, FrameFitter, fit_size
from gateway.live.fmp4 import Fmp4Packager
from gateway.live.hub import TrackClock
from gateway.live.record import Recording
from gateway.live.synthetic import ProbeViewer, ReceivedFrame, SyntheticPublisher, read_stamp
from gateway.media.catalog import Catalog, add_publisher
from gateway.protocol.scripts import script_pubkey_to_address

PAYOUT = script_pubkey_to_address(bytes.fromhex("0014" + "d1" * 20), "regtest")


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass
class Live:
    hub: LiveHub
    ingest: LiveIngest
    publisher: SyntheticPublisher
    probes: list[ProbeViewer]

    async def viewer(self, allow_until_ms: int | None = None) -> tuple[ProbeViewer, LiveViewer]:
        probe = ProbeViewer()
        self.probes.append(probe)
        viewer = await self.hub.add_viewer(await probe.offer())
        assert viewer.answer is not None
        await probe.accept(viewer.answer)
        if allow_until_ms is not None:
            viewer.allow(allow_until_ms)
        return probe, viewer


@asynccontextmanager
async def live(
    config: LiveConfig | None = None,
    recording: Recording | None = None,
    video_codec: str | None = None,
) -> AsyncIterator[Live]:
    hub = LiveHub("test-live", config, ice=LOOPBACK, recording=recording)
    publisher = SyntheticPublisher(video_codec=video_codec)
    ingest = await LiveIngest.start(hub, await publisher.offer())
    assert ingest.answer is not None
    await publisher.accept(ingest.answer)
    state = Live(hub, ingest, publisher, [])
    try:
        yield state
    finally:
        await ingest.stop()
        for probe in state.probes:
            await probe.close()
        await publisher.close()


async def test_two_viewers_share_one_encode_per_rendition() -> None:
    before = ENCODERS_CREATED.copy()
    async with live() as state:
        hub = state.hub
        (probe1, viewer1), (probe2, viewer2) = [await state.viewer(10**9) for _ in range(2)]
        await wait_until(lambda: hub.now_ms() > 2500, 10, "2.5 s of live media")
        await wait_until(
            lambda: min(len(probe1.frames), len(probe2.frames)) > 40, 5, "frames at both viewers"
        )
        # Each viewer's aiortc sender packetized the hub's packets: its own
        # encoder never encoded a frame (aiortc creates it lazily).
        for viewer in (viewer1, viewer2):
            for transceiver in viewer.pc.getTransceivers():
                encoder = transceiver.sender._RTCRtpSender__encoder  # type: ignore[attr-defined]
                assert encoder is not None
                codec = encoder.codec
                assert codec is None or not codec.is_open
        stats = hub.stats
        created = ENCODERS_CREATED - before
        assert created == {"vp8": 1, "opus": 1, "h264": 1, "aac": 1}
        # One encode per rendition per input frame, not one per viewer.
        assert 0 < stats.encodes("vp8") <= stats.video_frames_in
        assert 0 < stats.encodes("opus") <= stats.audio_frames_in
        assert 0 < stats.encodes("h264") <= stats.video_frames_in
        assert 0 < stats.encodes("aac") <= stats.audio_frames_in
        sent = viewer1.stats.video_packets + viewer2.stats.video_packets
        assert sent > stats.encodes("vp8")  # the same packets went to both
        for probe in (probe1, probe2):
            numbers = [f.number for f in probe.frames]
            assert numbers[0] is not None and probe.frames[0].keyframe
            assert numbers == sorted(numbers)  # in order, decoded and readable
            assert probe.audio_frames * OPUS_FRAME_MS > 1000  # a second of audio, decoded
        print(
            f"\nfan-out: {stats.video_frames_in} video / {stats.audio_frames_in} audio frames in, "
            f"encodes {[(n, s.encoded) for n, s in stats.renditions.items()]}, "
            f"viewer frames {len(probe1.frames)}, {len(probe2.frames)}"
        )


async def test_an_h264_publisher_like_obs_is_taken() -> None:
    """OBS Studio sends H.264 over WHIP: decoded once, forwarded as VP8."""
    async with live(video_codec="video/H264") as state:
        assert "H264/90000" in (state.ingest.answer or "")
        assert "VP8/90000" not in (state.ingest.answer or "")
        probe, _ = await state.viewer(10**9)
        await wait_until(lambda: len(probe.frames) > 20, 10, "frames from an H.264 ingest")
        numbers = [f.number for f in probe.frames]
        assert None not in numbers and numbers == sorted(numbers)


async def test_a_prompt_payment_at_the_edge_loses_no_audio_packet() -> None:
    """Paid as the viewer reaches an interval (the session's due is answered at
    once): the audio packets held back at the edge are sent after all.

    The resume window (``keyframe_gap_ms``) is wide here so that a loaded
    machine's slow loop cannot turn the prompt payment into a late one.
    """
    async with live(LiveConfig(keyframe_gap_ms=1000)) as state:
        _, viewer = await state.viewer()
        sent: list[int] = []
        forward = viewer._sent

        def note(packet: EncodedPacket) -> None:
            if packet.kind == "audio":
                sent.append(packet.seq)
            forward(packet)

        viewer._sent = note  # type: ignore[method-assign]

        def pay_soon(interval: int) -> None:  # a durable pay a few ms later
            asyncio.get_running_loop().call_later(0.05, viewer.allow_interval, interval)

        viewer.on_blocked(pay_soon)
        viewer.allow_interval(0)
        await wait_until(lambda: viewer.stats.last_live_ms.get("audio", 0) > 3500, 15,
                         "three paid edges")
        assert sent == list(range(sent[0], sent[0] + len(sent))), "an audio packet was lost"


async def test_an_unpaid_viewer_stops_within_an_interval_and_resumes_at_a_keyframe() -> None:
    async with live() as state:
        hub = state.hub
        probe, viewer = await state.viewer()
        blocked: list[int] = []
        viewer.on_blocked(blocked.append)
        viewer.allow_interval(1)  # the free intervals 0 and 1: live [0, 2000)
        edge = hub.interval_start(2)
        await wait_until(lambda: hub.now_ms() >= edge + hub.config.interval_ms, 10, "live 3 s")
        edge_at = time.monotonic() - (hub.now_ms() - edge) / 1000
        assert probe.frames, "the viewer received the free intervals"
        assert viewer.stats.last_live_ms["video"] < edge
        assert viewer.stats.last_live_ms["audio"] < edge
        # Blocked at interval 2, and told again as intervals pass.
        assert blocked == list(range(2, 2 + len(blocked)))
        assert viewer.waiting_interval == blocked[-1]
        late = [f.at - edge_at for f in probe.frames if f.at > edge_at]
        assert all(lag < hub.config.interval_ms / 1000 for lag in late), late
        frames, audio = len(probe.frames), probe.audio_frames
        await asyncio.sleep(0.3)
        assert len(probe.frames) == frames and probe.audio_frames == audio, "media while unpaid"

        # Paid again: media within a bound, starting with a keyframe. aiortc's
        # jitter buffer holds the last frame before the gap until the next
        # packet: it comes out first, the resumed media after it.
        held = max(f.number for f in probe.frames if f.number is not None) + 1
        paid_at = time.monotonic()
        viewer.allow_interval(hub.interval_of(hub.now_ms()) + 2)

        def resumed() -> list[ReceivedFrame]:
            return [f for f in probe.frames[frames:] if f.number != held]

        await wait_until(lambda: bool(resumed()), 3, "media after payment")
        first = resumed()[0]
        resume_s = first.at - paid_at
        assert first.keyframe
        assert viewer.waiting_interval is None
        assert resume_s < 1.0
        assert viewer.stats.resume_ms and viewer.stats.resume_ms[-1] < 1000
        await asyncio.sleep(0.5)
        assert len(resumed()) > 5 and (probe.audio_frames - audio) * OPUS_FRAME_MS > 200
        print(
            f"\npay -> media: gateway {viewer.stats.resume_ms[-1]:.1f} ms (keyframe handed to "
            f"aiortc), viewer {resume_s * 1000:.1f} ms (first decoded frame)"
        )


async def test_a_late_viewer_starts_at_a_keyframe_and_a_pli_gets_one() -> None:
    # Long intervals: the PLI's keyframe must come within the interval it was
    # sent in, and a loaded machine (CI) may take most of a second for it.
    async with live(LiveConfig(interval_ms=4000)) as state:
        hub = state.hub
        await wait_until(lambda: hub.now_ms() > 1300, 10, "live 1.3 s")  # mid-interval
        probe, viewer = await state.viewer(10**9)
        await wait_until(lambda: len(probe.frames) > 5, 5, "frames at the late viewer")
        assert probe.frames[0].keyframe and probe.frames[0].number is not None
        assert viewer.stats.join_ms is not None and viewer.stats.join_ms < 1000
        # A picture loss indication (RFC 4585 section 6.3.1) from the viewer
        # makes the encoder send a keyframe it would not have sent otherwise.
        assert viewer.answer is not None
        video = viewer.answer[viewer.answer.index("m=video") :]
        ssrc = int(video.split("a=ssrc:", 1)[1].split(" ", 1)[0])
        receiver = next(t.receiver for t in probe.pc.getTransceivers() if t.kind == "video")
        interval = hub.config.interval_ms

        def newest_ms() -> int:
            return hub.video.packets[-1].live_ms if hub.video.packets else -1

        # Media time, not the wall clock: on a loaded machine the encoder may
        # run seconds behind, and the PLI must land early in an interval.
        early = lambda: newest_ms() % interval < interval // 4  # noqa: E731
        await wait_until(early, 20, "an interval's start")
        sent_at, requests = newest_ms(), hub.stats.keyframe_requests
        await receiver._send_rtcp_pli(ssrc)

        def same_interval(a: int, b: int) -> bool:
            return a // interval == b // interval

        def pli_keyframe() -> bool:
            # A keyframe after the PLI that does not start its interval (every
            # interval starts with one anyway).
            return any(
                p.keyframe and p.live_ms > sent_at and same_interval(q.live_ms, p.live_ms)
                for q, p in itertools.pairwise(list(hub.video.packets))
            )

        await wait_until(pli_keyframe, 20, "a keyframe after the PLI")
        assert hub.stats.keyframe_requests > requests
        print(f"\njoin -> first keyframe handed to aiortc: {viewer.stats.join_ms:.1f} ms")


def decoded_video(init: bytes, data: bytes) -> list[av.VideoFrame]:
    with av.open(io.BytesIO(init + data)) as container:
        return list(container.decode(video=0))


async def test_mse_fragments_are_about_an_interval_and_each_decodes_alone() -> None:
    fragments: list[LiveFragment] = []
    async with live() as state:
        hub = state.hub

        async def read() -> None:
            async for fragment in hub.mse.fragments(start=0):
                fragments.append(fragment)

        reader = asyncio.create_task(read())
        await wait_until(lambda: len(fragments) >= 3, 10, "three fragments")
        init = await hub.mse.wait_init()
    await asyncio.wait_for(reader, 5)  # ends with the stream
    assert init is not None and hub.mse.mime is not None
    assert hub.mse.mime.startswith('video/mp4; codecs="avc1.') and "mp4a.40.2" in hub.mse.mime
    interval = hub.config.interval_ms
    assert [f.index for f in fragments] == list(range(len(fragments)))
    index, start_ms, duration_ms, data = fragments[1]  # unpacks like a catalog chunk
    assert (index, start_ms, duration_ms) == (1, fragments[0].end_ms, fragments[1].duration_ms)
    assert data == fragments[1].data
    for before, after in itertools.pairwise(fragments):
        assert after.start_ms == before.end_ms  # they join without gap
    for fragment in fragments[1:-1]:
        # One interval each (a busy machine may drop an interval's first frame).
        assert abs(fragment.duration_ms - interval) <= interval // 4, fragment.duration_ms
        assert fragment.start_ms % interval < interval // 4
    lags = []
    for fragment in fragments:
        with av.open(io.BytesIO(init + fragment.data)) as container:
            # (kind, keyframe) read while the container is open: a packet's
            # stream is freed with it.
            packets = [(p.stream.type, p.is_keyframe) for p in container.demux() if p.size]
        video = [keyframe for kind, keyframe in packets if kind == "video"]
        assert video[0], f"fragment {fragment.index} starts without a keyframe"
        assert ("audio", True) in packets
        frames = decoded_video(init, fragment.data)
        assert frames and frames[0].key_frame
        assert read_stamp(frames[0]) is not None
        if fragment is not fragments[-1]:
            lags.append(fragment.ready_ms - fragment.start_ms)
    # Ready about one interval after it starts: the MSE path is <= 3 s behind.
    assert max(lags) < 3000
    print(f"\nMSE: {len(fragments)} fragments, ready after start (ms): {lags}")


async def test_publisher_hanging_up_ends_the_hub_and_tells_viewers() -> None:
    async with live() as state:
        hub = state.hub
        probe, viewer = await state.viewer(10**9)
        told: list[str] = []
        hub.on_end(told.append)
        viewer.on_end(told.append)
        forgotten: list[str] = []
        hub.on_end(forgotten.append)()  # a viewer that left: not called, not kept
        await wait_until(lambda: len(probe.frames) > 10, 10, "frames")
        await state.publisher.close()
        await asyncio.wait_for(hub.ended.wait(), 5)
        assert hub.end_reason == "lost" and told == ["lost", "lost"] and forgotten == []
        assert viewer.ended.is_set()
        await asyncio.wait_for(probe.ended.wait(), 5)  # its tracks ended (RTCP BYE)
        assert hub.viewers == set()


async def test_publisher_going_silent_ends_the_hub_after_the_idle_timeout() -> None:
    async with live(LiveConfig(idle_timeout_s=1.0)) as state:
        hub = state.hub
        probe, viewer = await state.viewer(10**9)
        await wait_until(lambda: len(probe.frames) > 10, 10, "frames")
        publisher = state.publisher
        assert publisher.video is not None and publisher.audio is not None
        silent_at = time.monotonic()
        publisher.video.stop()  # media stops, the connection stays up
        publisher.audio.stop()
        await asyncio.wait_for(hub.ended.wait(), 5)
        took = time.monotonic() - silent_at
        assert hub.end_reason == "lost" and viewer.end_reason == "lost"
        assert 0.9 < took < 3.0, took
        await asyncio.wait_for(probe.ended.wait(), 5)


async def test_stopped_stream_is_recorded_as_a_catalog_item(tmp_path: Path) -> None:
    media_dir = tmp_path / "media"
    add_publisher(media_dir, "demo", "Demo", PAYOUT)
    recording = Recording(
        media_dir, "live-rec", "Live recording", "demo", rate_msat=3000, free_ms=5000
    )
    async with live(recording=recording) as state:
        hub = state.hub
        await wait_until(lambda: hub.stats.fragments >= 2, 10, "two fragments")
        ended_at_ms = hub.now_ms()
        await state.ingest.stop()
    assert hub.end_reason == "stopped" and hub.recorded is not None
    item = Catalog.load(media_dir).items["live-rec"]
    assert (item.rate_msat, item.free_ms, item.title) == (3000, 5000, "Live recording")
    assert item.mime == hub.mse.mime and item.source == "live:live-rec"
    assert len(item.chunks) >= 3 and item.chunks[0].start_ms == 0
    assert abs(item.duration_ms - ended_at_ms) < 1500
    init = item.read_chunk(-1)
    for chunk in item.chunks:
        frames = decoded_video(init, item.read_chunk(chunk.index))
        assert frames and frames[0].key_frame
    assert not [p for p in media_dir.iterdir() if p.name.startswith(".staging")]


async def test_recording_can_be_turned_off(tmp_path: Path) -> None:
    media_dir = tmp_path / "media"
    add_publisher(media_dir, "demo", "Demo", PAYOUT)
    off = Recording(media_dir, "live-off", "Off", "demo", rate_msat=1000, enabled=False)
    async with live(recording=off) as state:
        await wait_until(lambda: state.hub.stats.fragments >= 1, 10, "a fragment")
    assert state.hub.recorded is None
    assert "live-off" not in Catalog.load(media_dir).items
    assert [p.name for p in media_dir.iterdir() if not p.name.startswith(".")] == ["catalog.toml"]


async def test_a_second_publisher_or_a_late_viewer_is_refused() -> None:
    async with live() as state:
        second = SyntheticPublisher()
        try:
            with pytest.raises(RuntimeError, match="already has a publisher"):
                await LiveIngest.start(state.hub, await second.offer())
        finally:
            await second.close()
    probe = ProbeViewer()
    try:
        with pytest.raises(RuntimeError, match="has ended"):
            await state.hub.add_viewer(await probe.offer())
    finally:
        await probe.close()


async def test_ending_the_hub_hangs_up_on_the_publisher() -> None:
    async with live() as state:
        await wait_until(lambda: state.hub.state == "live", 10, "media")
        await state.hub.end("stopped")
        await wait_until(lambda: state.ingest.pc.connectionState == "closed", 5, "hang-up")
        assert state.hub.end_reason == "stopped" and state.hub.ended.is_set()


def test_fmp4_packager_survives_timestamps_going_back() -> None:
    """Audio input behind its sample clock is stamped on; a repeated time is dropped."""
    fragments: list[LiveFragment] = []
    packager = Fmp4Packager(
        video_size=(320, 240),
        audio=True,
        video_bitrate=300_000,
        audio_bitrate=64_000,
        interval_ms=1000,
        origin_ms=500,
        now_ms=lambda: 0,
        on_fragment=fragments.append,
    )
    frame = av.VideoFrame(320, 240, "yuv420p")
    for plane in frame.planes:
        plane.update(bytes([90]) * plane.buffer_size)
    sound = av.AudioFrame(format="s16", layout="stereo", samples=960)
    sound.planes[0].update(bytes(sound.planes[0].buffer_size))
    sound.sample_rate = 48_000
    times = [500 + 33 * i for i in range(80)]
    times[40] = times[39]  # a repeated video time
    for i, ms in enumerate(times):
        packager.mux(packager.encode_video(frame, ms, keyframe=i % 30 == 0))
        # Audio "arrives" with live times jumping back by half a second.
        packager.mux(packager.encode_audio(sound, ms - (500 if i > 50 else 0)))
    packager.mux(packager.flush_video())
    packager.mux(packager.flush_audio())
    packager.close()
    assert packager.refused == 1  # the repeated video time; audio never went back
    assert len(fragments) >= 2 and fragments[0].start_ms == 500
    for before, after in itertools.pairwise(fragments):
        assert after.start_ms == before.end_ms


def test_rendition_size_and_frame_fitting() -> None:
    assert fit_size(1920, 1080, 360) == (640, 360)
    assert fit_size(321, 241, 360) == (320, 240)
    assert fit_size(480, 640, 360) == (270, 360)
    frame = av.VideoFrame(320, 240, "yuv420p")
    for plane in frame.planes:
        plane.update(bytes([7]) * plane.buffer_size)
    copy = FrameFitter(320, 240)(frame)
    assert copy is not frame and bytes(copy.planes[0]) == bytes(frame.planes[0])
    assert FrameFitter(160, 120)(frame).width == 160


async def test_live_bench_runs_and_reports() -> None:
    """The measurement runs end to end (its figures are for people, not asserted)."""
    from gateway.bench.live import measure

    result = await measure(
        3, 1.0, width=320, height=240, warmup_s=0.5, baseline_s=0.5, settle_s=0.5, probes=2
    )
    assert result.viewers == 3 and result.probes == 2
    assert result.frames_published > 0 and result.video_packets > 0
    assert result.hub_encodes["vp8"] > 0 and result.latency_p50_ms > 0
    assert "glass-to-glass" in result.report()


def test_track_clock_keeps_the_publishers_spacing() -> None:
    clock = TrackClock()
    assert clock.live_ms(10.0, 0) == 0
    assert clock.live_ms(10.033, 40) == 33  # jitter in arrival is ignored
    # A late burst (the gateway was busy for a second): spacing is kept.
    assert [clock.live_ms(10.066 + 0.033 * i, 1100) for i in range(3)] == [66, 99, 132]
    # The publisher paused without advancing its clock: on to the arrival time.
    assert clock.live_ms(10.2, 9000) == 9000
    assert clock.live_ms(10.233, 9040) == 9033
    # Its clock jumped ahead: continue just after the last frame.
    assert clock.live_ms(500.0, 9070) == 9034
    assert clock.live_ms(500.033, 9100) == 9067


def test_opus_rendition_makes_60_ms_packets_from_20_ms_input() -> None:
    """Fewer audio packets per viewer (encode.py, OPUS_FRAME_MS), timed by the live clock."""
    from gateway.live.encode import OPUS_FRAME_SAMPLES, OpusEncoder

    encoder = OpusEncoder(64_000)
    sound = av.AudioFrame(format="s16", layout="stereo", samples=960)  # 20 ms, as WebRTC sends
    sound.planes[0].update(bytes(sound.planes[0].buffer_size))
    sound.sample_rate = 48_000
    packets = [p for i in range(30) for p in encoder.encode(sound, 1000 + 20 * i)]
    assert 8 <= len(packets) <= 10  # 600 ms of input: ten packets, less the encoder's delay
    assert all(p.duration == OPUS_FRAME_SAMPLES for p in packets)
    pts = [p.pts for p in packets]
    assert pts[0] == 48 * 1000  # the first input's live time, in samples
    assert all(b - a == OPUS_FRAME_SAMPLES for a, b in itertools.pairwise(pts))
