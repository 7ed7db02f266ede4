"""``gateway bench --live``: the live media core's cost per viewer, measured.

Theory of operation
-------------------
Two processes on one machine, talking over loopback only, each on uvloop
as ``gateway serve`` is:

* the *gateway*: a :class:`~gateway.live.LiveHub` with its WHIP ingest and
  one aiortc peer per viewer, started with :mod:`multiprocessing` (spawn);
  it answers SDP offers sent over a pipe and reports its own CPU time
  (``time.process_time()``: every thread of the process, so the encoders'
  threads are counted);
* the *client* (this process): one
  :class:`~gateway.live.synthetic.SyntheticPublisher` (640x360 at 30 fps
  by default, each frame stamped with its number) and N
  :class:`~gateway.live.synthetic.ProbeViewer` s, all real peers (ICE, DTLS,
  SRTP). ``probes`` of them, spread evenly over the order they joined in
  (the gateway serves viewers in that order), decode what they receive and
  read the number back; the others stop at RTP and count packets and
  sequence gaps, because N decoders would saturate the client long before
  the gateway.

With two or more cores and ``pin`` (the default), the gateway runs on CPU 0
and the client on the others, so the gateway's CPU figures are one core's
worth.

Phases: the publisher alone for ``warmup_s`` then ``baseline_s`` (the
gateway's CPU per second with no viewer: ingest, decode and the four
encodes); then N viewers join and, once each has media and ``settle_s`` has
passed, a window of ``seconds`` is measured: the gateway's CPU per second,
per viewer above the baseline; the video RTP packets every viewer missed
(sequence gaps); per decoding viewer, the frames lost (numbers missing
between the first and last one it decoded in the window); and every decoded
frame's glass-to-glass latency (its decode time at the viewer minus its
capture time at the publisher; one clock, CLOCK_MONOTONIC, in both
processes). aiortc's receivers hold each video frame until the first packet
of the next one arrives (its jitter buffer finds a frame's end that way), at
the ingest and again at the viewer, so each adds about one frame interval
that a browser, which uses the RTP marker bit, does not.

Pay→media: after the window the decoding viewers are stopped at the live
edge (:meth:`LiveViewer.allow` with the live time now, as an unpaid
interval does) for ``pause_s``, then allowed again (as a durable ``pay``
does); the figure is the time from that allowance to the first frame
captured after the pause that each viewer decodes (``rounds`` times). The
MSE path's lag is how far behind live each fMP4 fragment's start is when it
becomes available (:attr:`LiveFragment.ready_ms`).

The client's own CPU use is reported too: a client that saturates its cores
loses frames and adds latency the gateway did not cause.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

import uvloop

from gateway.live import LOOPBACK, LiveConfig, LiveHub, LiveIngest, LiveViewer
from gateway.live.synthetic import ProbeViewer, SyntheticPublisher


@dataclass
class LiveBenchResult:
    """One run's figures (CPU in seconds per second of wall time: 1.0 is one core)."""

    viewers: int
    seconds: float
    width: int
    height: int
    fps: int
    gateway_cpu_baseline: float
    gateway_cpu: float
    gateway_cpu_per_viewer: float
    client_cpu: float
    probes: int
    frames_published: int
    frames_expected_per_probe: float
    frames_lost_total: int
    frames_lost_max: int
    video_packets: int
    video_packets_lost: int
    viewers_with_loss: int
    latency_p50_ms: float
    latency_p95_ms: float
    latency_p99_ms: float
    latency_max_ms: float
    hub_dropped: int
    hub_encodes: dict[str, int]
    #: Per rendition: CPU seconds per second spent encoding during the run.
    encoder_cpu: dict[str, float]
    viewer_skipped: int
    #: From a viewer's allowance growing (a paid interval) to its first decoded
    #: frame captured after the pause (decoding viewers, every round).
    pay_to_media_p50_ms: float = float("nan")
    pay_to_media_max_ms: float = float("nan")
    #: From the allowance to the viewer holding a whole keyframe (its last RTP
    #: packet arrived): media flowing again, before aiortc's receiver and decoder.
    pay_to_keyframe_p50_ms: float = float("nan")
    pay_to_keyframe_max_ms: float = float("nan")
    #: The gateway's share of it: from the allowance to the first keyframe
    #: handed to aiortc's sender (:attr:`ViewerStats.resume_ms`).
    resume_p50_ms: float = float("nan")
    resume_max_ms: float = float("nan")
    #: How far behind live an MSE fragment's start is when it is ready (max).
    mse_behind_max_ms: float = float("nan")

    @property
    def viewers_per_core(self) -> float:
        """Viewers one core carries beside the stream's own decode and encodes."""
        if self.gateway_cpu_per_viewer <= 0:
            return float("inf")
        return max(0.0, 1.0 - self.gateway_cpu_baseline) / self.gateway_cpu_per_viewer

    def report(self) -> str:
        """A few lines for people."""
        return "\n".join(
            [
                f"live bench: {self.viewers} WebRTC viewers, {self.width}x{self.height} "
                f"at {self.fps} fps, {self.seconds:.0f} s window",
                f"  gateway CPU: {self.gateway_cpu:.3f} core "
                f"(no viewer: {self.gateway_cpu_baseline:.3f}), "
                f"per viewer {self.gateway_cpu_per_viewer * 1000:.2f} ms/s",
                f"  viewers per gateway core (beside the stream's encodes): "
                f"{self.viewers_per_core:.0f}",
                f"  client CPU:  {self.client_cpu:.3f} core (publisher + probe viewers)",
                f"  video RTP packets lost: {self.video_packets_lost} of "
                f"{self.video_packets} ({self.viewers_with_loss} viewers with any loss)",
                f"  frames lost at the {self.probes} decoding viewers: "
                f"{self.frames_lost_total} (max {self.frames_lost_max} for one) of "
                f"{self.frames_expected_per_probe:.0f} each",
                f"  glass-to-glass (decoding viewers): p50 {self.latency_p50_ms:.0f} ms, "
                f"p95 {self.latency_p95_ms:.0f} ms, p99 {self.latency_p99_ms:.0f} ms, "
                f"max {self.latency_max_ms:.0f} ms",
                f"  pay->media (decoding viewers): whole keyframe received p50 "
                f"{self.pay_to_keyframe_p50_ms:.0f} ms, max {self.pay_to_keyframe_max_ms:.0f} ms; "
                f"first new frame decoded p50 {self.pay_to_media_p50_ms:.0f} ms, "
                f"max {self.pay_to_media_max_ms:.0f} ms",
                f"    of which the gateway's (allowance to the keyframe handed to aiortc): "
                f"p50 {self.resume_p50_ms:.0f} ms, max {self.resume_max_ms:.0f} ms",
                f"  MSE fragments ready at most {self.mse_behind_max_ms / 1000:.2f} s "
                "behind live",
                f"  encoders (core each): {self.encoder_cpu}",
                f"  hub: encodes {self.hub_encodes}, frames dropped by encoders "
                f"{self.hub_dropped}, packets skipped for slow viewers {self.viewer_skipped}",
            ]
        )


def _pin(cpus: set[int]) -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def _gateway_main(conn: Connection, pin: bool) -> None:
    """The gateway process: answers offers from the pipe until told to stop."""
    faulthandler.enable()
    if pin:
        _pin({0})
    # As `gateway serve` runs (gateway/server_cli.py): on uvloop.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_gateway(conn))


async def _gateway(conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    hub = LiveHub("bench", LiveConfig(), ice=LOOPBACK)
    ingest: LiveIngest | None = None
    viewers: list[LiveViewer] = []
    while True:
        command, *args = await loop.run_in_executor(None, conn.recv)
        if command == "publish":
            ingest = await LiveIngest.start(hub, args[0])
            conn.send(ingest.answer)
        elif command == "view":
            viewer = await hub.add_viewer(args[0])
            viewer.allow(2**53 - 1)
            viewers.append(viewer)
            conn.send(viewer.answer)
        elif command == "cpu":
            conn.send((time.process_time(), time.monotonic()))
        elif command == "block":  # as an unpaid interval: nothing past the live edge
            for index in args[0]:
                viewers[index].allow(hub.now_ms())
            conn.send(time.monotonic())
        elif command == "pay":  # as a durable pay: media again
            paid_at = time.monotonic()
            for index in args[0]:
                viewers[index].allow(2**53 - 1)
            conn.send(paid_at)
        elif command == "stop":
            stats = hub.stats
            summary = {
                "encodes": {name: s.encoded for name, s in stats.renditions.items()},
                "encoder_cpu_s": {name: s.cpu_s for name, s in stats.renditions.items()},
                "live_s": hub.now_ms() / 1000,
                "dropped": sum(s.dropped for s in stats.renditions.values()),
                "skipped": sum(v.stats.skipped for v in viewers),
                "resume_ms": [ms for v in viewers for ms in v.stats.resume_ms],
                "mse_behind_ms": [f.ready_ms - f.start_ms for f in hub.mse.recent()],
            }
            if ingest is not None:
                await ingest.stop()
            conn.send(summary)
            return


async def _pay_to_media(
    call: Any,
    peers: list[ProbeViewer],
    decoding: list[int],
    rounds: int,
    pause_s: float,
    publisher: SyntheticPublisher,
) -> tuple[list[float], list[float]]:
    """ms from each allowance (a paid interval) to the first new frame decoded, per probe,
    and to the first whole keyframe received.

    A decoded frame counts only if it was captured after the viewer was
    stopped: the last frame before a pause comes out of aiortc's receiver
    when media resumes (design.md, "Traps"). A keyframe counts if its last
    packet arrived after the allowance: nothing is sent to a stopped viewer.
    """
    assert publisher.video is not None
    sent = publisher.video.sent
    figures: list[float] = []
    keyframes: list[float] = []
    for _ in range(rounds):
        blocked_at = await call("block", decoding)
        await asyncio.sleep(pause_s)
        paid_at = await call("pay", decoding)
        await asyncio.sleep(1.0)
        for index in decoding:
            fresh = [
                f.at
                for f in peers[index].frames
                if f.at > paid_at and f.number in sent and sent[f.number] > blocked_at + 0.1
            ]
            if fresh:
                figures.append((min(fresh) - paid_at) * 1000)
            whole = [t for t in peers[index].keyframes_complete if t > paid_at]
            if whole:
                keyframes.append((min(whole) - paid_at) * 1000)
    return figures, keyframes


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def measure(
    viewers: int,
    seconds: float = 10.0,
    *,
    width: int = 640,
    height: int = 360,
    fps: int = 30,
    warmup_s: float = 2.0,
    baseline_s: float = 3.0,
    settle_s: float = 2.0,
    probes: int = 4,
    pin: bool = True,
    rounds: int = 3,
    pause_s: float = 1.5,
) -> LiveBenchResult:
    """Run the gateway in a child process and measure it with ``viewers`` viewers."""
    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2:
        pin = False
    if pin:
        _pin(set(os.sched_getaffinity(0)) - {0})
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_gateway_main, args=(theirs, pin), daemon=True)
    process.start()
    loop = asyncio.get_running_loop()

    def answer() -> Any:
        while not ours.poll(0.2):
            if not process.is_alive():
                raise RuntimeError(f"the gateway process died (exit code {process.exitcode})")
        return ours.recv()

    async def call(*message: Any) -> Any:
        ours.send(message)
        return await loop.run_in_executor(None, answer)

    publisher = SyntheticPublisher(width=width, height=height, fps=fps)
    peers: list[ProbeViewer] = []
    try:
        await publisher.accept(await call("publish", await publisher.offer()))
        await asyncio.sleep(warmup_s)
        cpu0, t0 = await call("cpu")
        await asyncio.sleep(baseline_s)
        cpu1, t1 = await call("cpu")
        baseline = (cpu1 - cpu0) / (t1 - t0)

        probes = min(probes, viewers)
        decoding = {round(i * (viewers - 1) / max(1, probes - 1)) for i in range(probes)}
        for index in range(viewers):
            probe = ProbeViewer(decode=index in decoding)
            peers.append(probe)
            await probe.accept(await call("view", await probe.offer()))
        deadline = time.monotonic() + 30
        while not all(p.frames for p in peers):
            if time.monotonic() > deadline:
                raise RuntimeError("some viewers got no media within 30 s")
            await asyncio.sleep(0.05)
        await asyncio.sleep(settle_s)

        start = time.monotonic()
        client0 = time.process_time()
        packets0 = [(p.video_packets, p.lost_packets) for p in peers]
        cpu2, t2 = await call("cpu")
        await asyncio.sleep(seconds)
        cpu3, t3 = await call("cpu")
        end = time.monotonic()
        packets = [
            (p.video_packets - n, p.lost_packets - lost)
            for p, (n, lost) in zip(peers, packets0, strict=True)
        ]
        client_cpu = (time.process_time() - client0) / (end - start)
        gateway_cpu = (cpu3 - cpu2) / (t3 - t2)
        pay_to_media, pay_to_keyframe = await _pay_to_media(
            call, peers, sorted(decoding), rounds, pause_s, publisher
        )
        summary = await call("stop")
    finally:
        for peer in peers:
            await peer.close()
        await publisher.close()
        process.join(10)
        if process.is_alive():
            process.kill()

    assert publisher.video is not None
    sent = publisher.video.sent
    in_window = [n for n, at in sent.items() if start <= at <= end]
    lost: list[int] = []
    latencies: list[float] = []
    expected: list[int] = []
    for probe in (p for p in peers if p.decode):
        numbers = sorted(
            {
                f.number
                for f in probe.frames
                if start <= f.at <= end and f.number is not None and f.number in sent
            }
        )
        if numbers:
            expected.append(numbers[-1] - numbers[0] + 1)
            lost.append(numbers[-1] - numbers[0] + 1 - len(numbers))
        latencies += [
            (f.at - sent[f.number]) * 1000
            for f in probe.frames
            if start <= f.at <= end and f.number is not None and f.number in sent
        ]
    return LiveBenchResult(
        viewers=viewers,
        seconds=seconds,
        width=width,
        height=height,
        fps=fps,
        gateway_cpu_baseline=baseline,
        gateway_cpu=gateway_cpu,
        gateway_cpu_per_viewer=(gateway_cpu - baseline) / viewers if viewers else 0.0,
        client_cpu=client_cpu,
        probes=probes,
        frames_published=len(in_window),
        frames_expected_per_probe=statistics.fmean(expected) if expected else 0.0,
        frames_lost_total=sum(lost),
        frames_lost_max=max(lost, default=0),
        video_packets=sum(n for n, _ in packets),
        video_packets_lost=sum(missed for _, missed in packets),
        viewers_with_loss=sum(1 for _, missed in packets if missed),
        latency_p50_ms=_percentile(latencies, 0.50),
        latency_p95_ms=_percentile(latencies, 0.95),
        latency_p99_ms=_percentile(latencies, 0.99),
        latency_max_ms=max(latencies, default=float("nan")),
        hub_dropped=summary["dropped"],
        hub_encodes=summary["encodes"],
        encoder_cpu={
            name: round(cpu / max(summary["live_s"], 1e-9), 3)
            for name, cpu in summary["encoder_cpu_s"].items()
        },
        viewer_skipped=summary["skipped"],
        pay_to_media_p50_ms=_percentile(pay_to_media, 0.50),
        pay_to_media_max_ms=max(pay_to_media, default=float("nan")),
        pay_to_keyframe_p50_ms=_percentile(pay_to_keyframe, 0.50),
        pay_to_keyframe_max_ms=max(pay_to_keyframe, default=float("nan")),
        resume_p50_ms=_percentile(summary["resume_ms"], 0.50),
        resume_max_ms=max(summary["resume_ms"], default=float("nan")),
        mse_behind_max_ms=float(max(summary["mse_behind_ms"], default=float("nan"))),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m gateway.bench.live --viewers 10 50``: one run per count, a report each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--viewers", type=int, nargs="+", default=[10])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--probes", type=int, default=4, help="viewers that decode (default 4)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead")
    args = parser.parse_args(argv)
    for count in args.viewers:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            result = runner.run(
                measure(
                    count,
                    args.seconds,
                    width=args.width,
                    height=args.height,
                    fps=args.fps,
                    probes=args.probes,
                    pin=not args.no_pin,
                )
            )
        if args.json:
            import json

            print(json.dumps(asdict(result)), flush=True)
        else:
            print(result.report(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
