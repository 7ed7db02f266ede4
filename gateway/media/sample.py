"""``gateway media sample``: synthesize a demo video and music track with PyAV.

Both come from FFmpeg's lavfi sources through PyAV filter graphs, so no media
file is shipped: the video is ``testsrc2`` (moving pattern with a clock) with
a 440 Hz tone beeping every second; the music is a plucked melody over a soft
fifth, written as an ``aevalsrc`` expression. The sources are written under
``<media>/.sources/`` and then published through the same path as
``gateway publish``, under the ids ``sample-video`` and ``sample-music``.

The demo publisher is paid to a fixed regtest address derived from a fixed,
public test key — never use it outside regtest::

    private key = SHA256(b"paystream demo publisher")
    address     = P2WPKH(compressed pubkey) on regtest (BIP84/BIP173)
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from pathlib import Path

import av
import av.filter
from av.video.frame import PictureType

from gateway.media.catalog import Catalog, MediaItem, Publisher, add_publisher, publish

DEMO_PUBLISHER = Publisher(
    id="demo",
    name="Paystream Demo Publisher",
    address="bcrt1q0p0fyyzdcvyfkwqpklcqqk8yalukuq9fak5mvn",
)
#: Seed of the demo payout key (see the module docstring); regtest only.
DEMO_KEY_SEED = b"paystream demo publisher"

VIDEO_ID = "sample-video"
MUSIC_ID = "sample-music"
DEFAULT_SECONDS = 180
#: The samples' free time per channel (the catalog's default is 60 s).
SAMPLE_FREE_MS = 30_000

_WIDTH, _HEIGHT, _FPS = 320, 180, 24
_RATE = 48_000

#: Semitones above C4 of a 16-note melody (quarter-second notes, 4 s loop).
_MELODY = (0, 4, 7, 12, 11, 7, 4, 2, 0, 5, 9, 12, 11, 7, 2, -1)
_NOTE_S = 0.25


def _melody_expression() -> str:
    """An ``aevalsrc`` expression: each note rises and falls (no clicks between notes)."""
    note = f"floor(mod(t/{_NOTE_S}\\,{len(_MELODY)}))"
    freq = "0"
    for i, semitones in enumerate(_MELODY):
        freq = f"if(eq({note}\\,{i})\\,{261.63 * 2 ** (semitones / 12):.2f}\\,{freq})"
    envelope = f"sin(PI*mod(t/{_NOTE_S}\\,1))"
    return f"{envelope}*(0.35*sin(2*PI*t*{freq})+0.12*sin(2*PI*t*{freq}*2/3))"


def _pull(graph: av.filter.Graph) -> Iterator[av.VideoFrame | av.AudioFrame]:
    """Every frame a configured source → sink graph produces."""
    while True:
        try:
            yield graph.pull()
        except av.EOFError:
            return


def _source(filter_name: str, args: str, convert: tuple[str, str], sink: str) -> av.filter.Graph:
    graph = av.filter.Graph()
    nodes = [graph.add(filter_name, args), graph.add(*convert), graph.add(sink)]
    nodes[0].link_to(nodes[1])
    nodes[1].link_to(nodes[2])
    graph.configure()
    return graph


def synthesize_video(path: Path, seconds: int) -> None:
    """Write an MP4 of ``seconds``: a moving 320x180 test pattern with a beeping tone."""
    video = _source(
        "testsrc2",
        f"size={_WIDTH}x{_HEIGHT}:rate={_FPS}:duration={seconds}",
        ("format", "yuv420p"),
        "buffersink",
    )
    audio = _source(
        "sine",
        f"frequency=440:beep_factor=2:sample_rate={_RATE}:duration={seconds}",
        ("aformat", "sample_fmts=fltp:channel_layouts=stereo"),
        "abuffersink",
    )
    with av.open(str(path), "w", format="mp4") as out:
        # A near-lossless, fast source: the publish step does the real encode.
        vs = out.add_stream("libx264", rate=_FPS, options={"preset": "ultrafast", "crf": "18"})
        vs.width, vs.height, vs.pix_fmt = _WIDTH, _HEIGHT, "yuv420p"
        aus = out.add_stream("aac", rate=_RATE, layout="stereo")
        # Interleave by time so the file streams like a real one.
        for frame in heapq.merge(_pull(video), _pull(audio), key=lambda f: f.time or 0.0):
            if isinstance(frame, av.VideoFrame):
                frame.pict_type = PictureType.NONE  # testsrc2 marks every frame a keyframe
                out.mux(vs.encode(frame))
            elif isinstance(frame, av.AudioFrame):
                out.mux(aus.encode(frame))
        out.mux(vs.encode(None))
        out.mux(aus.encode(None))


def synthesize_music(path: Path, seconds: int) -> None:
    """Write an audio-only M4A of ``seconds``: a looping melody of tones."""
    expr = _melody_expression()
    audio = _source(
        "aevalsrc",
        f"exprs={expr}|{expr}:sample_rate={_RATE}:duration={seconds}:channel_layout=stereo",
        ("aformat", "sample_fmts=fltp:channel_layouts=stereo"),
        "abuffersink",
    )
    with av.open(str(path), "w", format="mp4") as out:
        aus = out.add_stream("aac", rate=_RATE, layout="stereo")
        for frame in _pull(audio):
            assert isinstance(frame, av.AudioFrame)  # an abuffersink graph
            out.mux(aus.encode(frame))
        out.mux(aus.encode(None))


def ensure_samples(media_dir: Path, seconds: int = DEFAULT_SECONDS) -> list[MediaItem]:
    """Create the demo publisher and both samples unless the catalog has them.

    Returns the items that were published (empty when all were already there).
    """
    catalog = Catalog.load(media_dir)
    if DEMO_PUBLISHER.id not in catalog.publishers:
        add_publisher(media_dir, DEMO_PUBLISHER.id, DEMO_PUBLISHER.name, DEMO_PUBLISHER.address)
    # The demo's prices: a viewer who watches the whole sample video pays
    # 150 s x 5 sat/s = 750 sat beyond its exit fee, enough for the
    # publisher's own output when that viewer's channel settles alone (see
    # docs/economics.md); the music, at 2 sat/s, earns only in a batch.
    wanted = (
        (VIDEO_ID, "Sample video: test pattern and tone", synthesize_video, ".mp4", 5000),
        (MUSIC_ID, "Sample music: a melody of tones", synthesize_music, ".m4a", 2000),
    )
    sources = media_dir / ".sources"
    published = []
    for item_id, title, synthesize, suffix, rate_msat in wanted:
        if item_id in catalog.items:
            continue
        sources.mkdir(parents=True, exist_ok=True)
        source = sources / f"{item_id}{suffix}"
        synthesize(source, seconds)
        published.append(
            publish(
                media_dir,
                source,
                item_id=item_id,
                title=title,
                publisher=DEMO_PUBLISHER.id,
                rate_msat=rate_msat,
                free_ms=SAMPLE_FREE_MS,
            )
        )
    return published
