"""Media catalog, PyAV segmenter and the ``publish``/``publisher``/``media`` commands.

Real media throughout: short clips synthesized and encoded by PyAV, cut by
the segmenter, and every chunk decoded again with PyAV after its init segment.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from fractions import Fraction
from pathlib import Path

import av
import coincurve
import pytest
from bitcoin.core import Hash160

from gateway.cli import main
from gateway.media.catalog import (
    Catalog,
    add_publisher,
    parse_rate,
    parse_seconds,
    publish,
)
from gateway.media.sample import (
    DEMO_KEY_SEED,
    DEMO_PUBLISHER,
    MUSIC_ID,
    VIDEO_ID,
    synthesize_music,
    synthesize_video,
)
from gateway.media.segment import (
    MAX_CHUNK_MS,
    MIN_CHUNK_MS,
    Manifest,
    MediaError,
    _top_level_boxes,
    avc1_codecs,
    segment,
)
from gateway.protocol.scripts import script_pubkey_to_address
from gateway.protocol.settlement import lone_payout_share

CLIP_SECONDS = 6


ALICE = script_pubkey_to_address(bytes.fromhex("0014" + "a1" * 20), "regtest")
CAROL_MAIN = script_pubkey_to_address(bytes.fromhex("0014" + "c4" * 20), "main")

@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 6 s video (pattern + tone) and a 6 s music track, encoded by PyAV."""
    root = tmp_path_factory.mktemp("sources")
    video, music = root / "clip.mp4", root / "tune.m4a"
    synthesize_video(video, CLIP_SECONDS)
    synthesize_music(music, CLIP_SECONDS)
    junk = root / "junk.mp4"
    junk.write_bytes(b"this is not a media file\n" * 100)
    return {"video": video, "music": music, "junk": junk}


@pytest.fixture
def media_dir(tmp_path: Path) -> Path:
    """A media directory whose catalog has one publisher."""
    media = tmp_path / "media"
    add_publisher(media, "alice", "Alice", ALICE)
    return media


def _decode(data: bytes) -> dict[str, list[float]]:
    """Start times (s) of the frames PyAV decodes from ``data``, per media type."""
    times: dict[str, list[float]] = {"video": [], "audio": []}
    with av.open(io.BytesIO(data), "r") as container:
        for frame in container.decode(*container.streams):
            kind = "video" if isinstance(frame, av.VideoFrame) else "audio"
            assert frame.time is not None
            times[kind].append(frame.time)
    return times


def _check_chunks(manifest: Manifest, *, video: bool) -> None:
    """Chunk rules of protocol.md section 7, and each chunk decoding alone."""
    chunks = manifest.chunks
    assert [c.index for c in chunks] == list(range(len(chunks)))
    assert sum(c.duration_ms for c in chunks) == manifest.duration_ms
    assert abs(manifest.duration_ms - CLIP_SECONDS * 1000) < 100
    init = manifest.init_path.read_bytes()
    assert len(init) == manifest.init_size
    assert init[4:8] == b"ftyp"
    start = 0
    for chunk in chunks:
        assert chunk.start_ms == start
        start += chunk.duration_ms
        if chunk is not chunks[-1]:
            assert MIN_CHUNK_MS <= chunk.duration_ms <= MAX_CHUNK_MS
        else:
            assert 0 < chunk.duration_ms <= MAX_CHUNK_MS
        data = chunk.path.read_bytes()
        assert len(data) == chunk.size
        assert data[4:8] == b"moof"  # a media segment (ISO BMFF byte stream format)

        times = _decode(init + data)
        low, high = chunk.start_ms / 1000 - 0.05, (chunk.start_ms + chunk.duration_ms) / 1000
        assert times["audio"], f"chunk {chunk.index} decoded no audio"
        if video:
            # Every frame of the chunk decodes, so it starts with a keyframe:
            # 24 fps for the chunk's duration.
            assert abs(len(times["video"]) - chunk.duration_ms * 24 / 1000) <= 1
        else:
            assert not times["video"]
        for t in times["video"] + times["audio"]:
            assert low <= t < high, f"chunk {chunk.index}: frame at {t} s outside it"


def test_segment_video(sources: dict[str, Path], tmp_path: Path) -> None:
    manifest = segment(sources["video"], tmp_path)
    assert manifest.mime.startswith('video/mp4; codecs="avc1.64')  # H.264 High profile
    assert manifest.mime.endswith(', mp4a.40.2"')
    assert len(manifest.chunks) == CLIP_SECONDS  # one-second GOPs
    _check_chunks(manifest, video=True)
    assert Manifest.load(tmp_path) == manifest
    assert not (tmp_path / "stream.mp4").exists()


def test_segment_music(sources: dict[str, Path], tmp_path: Path) -> None:
    manifest = segment(sources["music"], tmp_path)
    assert manifest.mime == 'audio/mp4; codecs="mp4a.40.2"'
    _check_chunks(manifest, video=False)
    assert Manifest.load(tmp_path) == manifest


def test_segment_scales_odd_and_large_video(tmp_path: Path) -> None:
    # 4:2:0 needs even sizes, and big input is scaled to MAX_HEIGHT (720).
    # The input is intra-only: every decoded frame says "I", which the
    # segmenter must ignore to keep one-second GOPs (design.md, PyAV traps).
    source = tmp_path / "big.mp4"
    with av.open(str(source), "w") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 1281, 961, "yuv420p"
        stream.codec_context.gop_size = 1
        for i in range(20):
            frame = av.VideoFrame(1281, 961, "yuv420p")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    manifest = segment(source, tmp_path)
    assert manifest.mime.startswith('video/mp4; codecs="avc1.')
    assert "mp4a" not in manifest.mime
    assert [c.duration_ms for c in manifest.chunks] == [1000, 1000]
    for chunk in manifest.chunks:  # one fragment (one GOP) per chunk
        assert [box[0] for box in _top_level_boxes(chunk.path)] == [b"moof", b"mdat"]
    with av.open(str(manifest.init_path)) as container:
        ctx = container.streams.video[0].codec_context
        assert (ctx.width, ctx.height) == (960, 720)


def test_avc1_codecs_from_avcc_and_annex_b() -> None:
    assert avc1_codecs(bytes.fromhex("0164001effe1")) == "avc1.64001E"
    assert avc1_codecs(bytes.fromhex("000000016764001eacb4")) == "avc1.64001E"
    with pytest.raises(MediaError):
        avc1_codecs(b"")


def test_segment_rejects_bad_input(sources: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(MediaError, match="cannot decode"):
        segment(sources["junk"], tmp_path)
    with pytest.raises(MediaError, match="no such file"):
        segment(tmp_path / "absent.mp4", tmp_path)


def test_catalog_round_trip(sources: dict[str, Path], media_dir: Path) -> None:
    item = publish(
        media_dir,
        sources["music"],
        item_id="tune",
        title="A tune",
        publisher="alice",
        rate_msat=1500,
        free_ms=30_000,
    )
    catalog = Catalog.load(media_dir)
    assert catalog.items == {"tune": item}
    assert catalog.publishers["alice"].address == ALICE
    assert catalog.to_api() == [
        {
            "id": "tune",
            "title": "A tune",
            "publisher": "alice",
            "rate": 1.5,
            "rate_msat": 1500,
            "free_seconds": 30,
            "duration_ms": item.duration_ms,
            "mime": 'audio/mp4; codecs="mp4a.40.2"',
        }
    ]
    assert catalog.reload_if_changed() is catalog  # file unchanged: same snapshot
    # Writing the loaded catalog again gives the same file.
    before = catalog.path.read_bytes()
    catalog.save()
    assert catalog.path.read_bytes() == before
    reloaded = catalog.reload_if_changed()  # rewritten: a fresh, equal snapshot
    assert reloaded is not catalog and reloaded.items == catalog.items

    assert item.read_chunk(-1) == (media_dir / "tune" / "init.mp4").read_bytes()
    assert len(item.read_chunk(0)) == item.chunks[0].size
    with pytest.raises(IndexError):
        item.read_chunk(len(item.chunks))


def test_publish_is_idempotent(sources: dict[str, Path], media_dir: Path) -> None:
    def run(rate: int) -> bytes:
        publish(
            media_dir,
            sources["video"],
            item_id="clip",
            title="Clip",
            publisher="alice",
            rate_msat=rate,
        )
        return (media_dir / "catalog.toml").read_bytes()

    first = run(2000)
    files = sorted(p.name for p in (media_dir / "clip").iterdir())
    assert run(2000) == first
    assert sorted(p.name for p in (media_dir / "clip").iterdir()) == files
    run(3000)  # re-publish replaces
    catalog = Catalog.load(media_dir)
    assert list(catalog.items) == ["clip"]
    assert catalog.items["clip"].rate_msat == 3000
    assert catalog.items["clip"].free_ms == 60_000
    # No staging or old directories are left behind.
    assert sorted(p.name for p in media_dir.iterdir()) == [".lock", "catalog.toml", "clip"]


def _publish_args(media: Path, source: Path, *extra: str) -> list[str]:
    return ["publish", str(source), "--id", "clip", "--media", str(media), *extra]


@pytest.mark.parametrize(
    ("source", "extra", "message"),
    [
        ("video", ["--publisher", "bob", "--rate", "2"], "unknown publisher 'bob'"),
        ("absent", ["--publisher", "alice", "--rate", "2"], "no such file"),
        ("junk", ["--publisher", "alice", "--rate", "2"], "cannot decode"),
        ("video", ["--publisher", "alice", "--rate", "-1"], "bad rate"),
        ("video", ["--publisher", "alice", "--rate", "two"], "bad rate"),
        ("video", ["--publisher", "alice", "--rate", "0.0001"], "whole number of msat"),
        ("video", ["--publisher", "alice", "--rate", "nan"], "bad rate"),
        ("video", ["--publisher", "alice", "--rate", "1", "--free", "-5"], "bad free"),
        ("video", ["--publisher", "alice", "--rate", "1", "--id", "Bad/Id"], "bad item id"),
    ],
)
def test_publish_bad_input_changes_nothing(
    sources: dict[str, Path],
    media_dir: Path,
    capsys: pytest.CaptureFixture[str],
    source: str,
    extra: list[str],
    message: str,
) -> None:
    assert (
        main(_publish_args(media_dir, sources["music"], "--publisher", "alice", "--rate", "1")) == 0
    )
    # ^ the id "clip" is now taken by a good item; the bad publish must not touch it.
    capsys.readouterr()
    catalog_bytes = (media_dir / "catalog.toml").read_bytes()
    clip_files = {p.name: p.read_bytes() for p in (media_dir / "clip").iterdir()}
    path = sources.get(source, media_dir / "absent.mp4")

    assert main(_publish_args(media_dir, path, *extra)) == 1
    err = capsys.readouterr().err
    assert err.startswith("gateway: error: ") and err.count("\n") == 1
    assert message in err
    assert (media_dir / "catalog.toml").read_bytes() == catalog_bytes
    assert {p.name: p.read_bytes() for p in (media_dir / "clip").iterdir()} == clip_files
    assert sorted(p.name for p in media_dir.iterdir()) == [".lock", "catalog.toml", "clip"]


def test_publish_cli_prints_summary(
    sources: dict[str, Path], media_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = _publish_args(media_dir, sources["music"], "--publisher", "alice", "--rate", "0.25")
    assert main([*args, "--title", "Tune", "--free", "1.5"]) == 0
    assert "published clip: 6 chunks" in capsys.readouterr().out
    item = Catalog.load(media_dir).items["clip"]
    assert (item.title, item.rate_msat, item.free_ms, item.rate) == ("Tune", 250, 1500, 0.25)


def test_publish_warns_when_one_viewer_cannot_pay_the_publisher(
    sources: dict[str, Path], media_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A 6-second tune at 0.25 sat/s: 2 sat for the whole of it, far below the
    # ~580 sat a channel settled alone needs to pay a publisher at 2 sat/vB.
    args = _publish_args(media_dir, sources["music"], "--publisher", "alice", "--free", "0")
    assert main([*args, "--rate", "0.25"]) == 0
    err = capsys.readouterr().err
    item = Catalog.load(media_dir).items["clip"]
    needed = lone_payout_share(Fraction(2))
    assert f"all of clip costs 2 sat beyond its free time, below the {needed} sat" in err
    even = -(-needed * 1_000_000 // item.duration_ms) / 1000  # sat/s to reach it alone
    assert f"--rate {even:g} or more breaks even alone" in err
    # At that rate one viewer's whole watch pays the publisher: no warning.
    assert main([*args, "--rate", f"{even:g}"]) == 0
    assert "warning" not in capsys.readouterr().err
    # A higher feerate needs more; a feerate below the relay minimum is refused.
    assert main([*args, "--rate", f"{even:g}", "--feerate", "50"]) == 0
    assert "warning: all of clip" in capsys.readouterr().err
    assert main([*args, "--rate", "1", "--feerate", "0.5"]) == 1
    assert "--feerate must be at least 1" in capsys.readouterr().err


def test_publisher_add_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    media = tmp_path / "m"
    args = ["publisher", "add", "carol", "--name", "Carol", "--media", str(media)]
    assert main([*args, "--address", ALICE]) == 0
    assert main([*args, "--address", CAROL_MAIN]) == 0  # replaces; any network's address
    assert Catalog.load(media).publishers["carol"].address == CAROL_MAIN
    before = (media / "catalog.toml").read_bytes()
    capsys.readouterr()
    assert main([*args, "--address", ""]) == 1
    assert "payout address" in capsys.readouterr().err
    # One character changed: the bech32 checksum fails, the catalog is untouched.
    typo = CAROL_MAIN[:-1] + ("q" if CAROL_MAIN[-1] != "q" else "p")
    assert main([*args, "--address", typo]) == 1
    assert capsys.readouterr().err.strip() == (
        f"gateway: error: {typo} is not a Bitcoin address (bad checksum or format)"
    )
    assert main(["publisher", "add", "Carol!", "--name", "C", "--address", "x",
                 "--media", str(media)]) == 1  # fmt: skip
    assert (media / "catalog.toml").read_bytes() == before


def test_media_sample_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    media = tmp_path / "media"
    assert main(["media", "sample", "--media", str(media), "--seconds", "6"]) == 0
    catalog = Catalog.load(media)
    assert sorted(catalog.items) == [MUSIC_ID, VIDEO_ID]
    assert catalog.publishers["demo"] == DEMO_PUBLISHER
    assert catalog.items[VIDEO_ID].mime.startswith("video/mp4")
    assert catalog.items[MUSIC_ID].mime.startswith("audio/mp4")
    # The demo's prices (docs/economics.md): the video pays its publisher
    # from one viewer's whole watch, the music only in a batch.
    assert (catalog.items[VIDEO_ID].rate_msat, catalog.items[MUSIC_ID].rate_msat) == (5000, 2000)
    for item in catalog.items.values():
        assert abs(item.duration_ms - 6000) < 100
        assert item.free_ms == 30_000
    capsys.readouterr()
    before = (media / "catalog.toml").read_bytes()
    assert main(["media", "sample", "--media", str(media), "--seconds", "6"]) == 0
    assert "already" in capsys.readouterr().out
    assert (media / "catalog.toml").read_bytes() == before
    assert main(["media", "list", "--media", str(media)]) == 0
    assert "sample-music\t2 sat/s" in capsys.readouterr().out


def test_demo_address_derives_from_documented_key() -> None:
    key = coincurve.PrivateKey(hashlib.sha256(DEMO_KEY_SEED).digest())
    program = Hash160(key.public_key.format(compressed=True))
    spk = b"\x00\x14" + program  # P2WPKH (BIP141)
    assert script_pubkey_to_address(spk, "regtest") == DEMO_PUBLISHER.address


@pytest.mark.parametrize(
    ("value", "msat"),
    [(2, 2000), ("2", 2000), (0.5, 500), ("1.25", 1250), ("0", 0), ("0.001", 1)],
)
def test_parse_rate(value: object, msat: int) -> None:
    assert parse_rate(value) == msat


@pytest.mark.parametrize("value", [-1, "-0.5", "1e400", "inf", "x", True, None, "0.0005"])
def test_parse_rate_rejects(value: object) -> None:
    with pytest.raises(MediaError, match="bad rate"):
        parse_rate(value)


def test_parse_seconds() -> None:
    assert parse_seconds("60") == 60_000
    assert parse_seconds(1.5) == 1500


def _catalog_with(tmp_path: Path, sources: dict[str, Path]) -> Path:
    media = tmp_path / "media"
    add_publisher(media, "alice", "Alice", ALICE)
    publish(media, sources["music"], item_id="tune", title="T", publisher="alice", rate_msat=10)
    return media


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t + "[[oops", "catalog.toml"),
        (lambda t: t.replace('publisher = "alice"', 'publisher = "zed"'), "unknown publisher"),
        (lambda t: t.replace("rate = 0.01", "rate = 0.02"), "disagree"),
        (lambda t: t.replace("rate_msat = 10", 'rate_msat = "10"'), "rate_msat"),
        (lambda t: t.replace("free_ms = 60000", "free_ms = -1"), "free_ms"),
        (lambda t: t.replace('dir = "tune"', 'dir = "../tune"'), "dir"),
        (lambda t: t.replace('name = "Alice"', "name = 3"), "name"),
    ],
)
def test_load_rejects_bad_catalog(
    tmp_path: Path, sources: dict[str, Path], edit: object, message: str
) -> None:
    media = _catalog_with(tmp_path, sources)
    path = media / "catalog.toml"
    assert callable(edit)
    text = edit(path.read_text())
    assert text != path.read_text()
    path.write_text(text)
    with pytest.raises(MediaError, match=message):
        Catalog.load(media)


def test_load_accepts_rate_alone_and_reloads_on_change(
    tmp_path: Path, sources: dict[str, Path]
) -> None:
    media = _catalog_with(tmp_path, sources)
    catalog = Catalog.load(media)
    path = media / "catalog.toml"
    path.write_text(path.read_text().replace("rate_msat = 10\n", "").replace("0.01", "0.5"))
    assert catalog.reload_if_changed().items["tune"].rate_msat == 500


def test_load_rejects_damaged_media(tmp_path: Path, sources: dict[str, Path]) -> None:
    media = _catalog_with(tmp_path, sources)
    chunk = media / "tune" / "chunk-00002.m4s"
    chunk.write_bytes(chunk.read_bytes()[:-1])
    with pytest.raises(MediaError, match="size does not match"):
        Catalog.load(media)
    manifest = media / "tune" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["chunks"][1]["start_ms"] += 1
    manifest.write_text(json.dumps(data))
    with pytest.raises(MediaError, match="out of sequence"):
        Catalog.load(media)
    shutil.rmtree(media / "tune")
    with pytest.raises(MediaError, match="cannot read"):
        Catalog.load(media)


def test_segment_audio_outlasting_video(sources: dict[str, Path], tmp_path: Path) -> None:
    # 3 s of the clip's video with 6 s of the tune's audio, remuxed as is: the
    # audio-only tail must still be cut into 1-2 s chunks.
    mixed = tmp_path / "mixed.mkv"
    with (
        av.open(str(sources["video"])) as video,
        av.open(str(sources["music"])) as music,
        av.open(str(mixed), "w") as out,
    ):
        # All output streams exist before the first packet is muxed.
        copies = [
            (container, stream, out.add_stream_from_template(stream))
            for container, stream in (
                (video, video.streams.video[0]),
                (music, music.streams.audio[0]),
            )
        ]
        for container, source_stream, out_stream in copies:
            kind = out_stream.type
            for packet in container.demux(source_stream):
                if packet.pts is None or packet.time_base is None:
                    continue  # the demuxer's final flush packet
                if kind == "video" and packet.pts * packet.time_base >= 3:
                    break
                packet.stream = out_stream
                out.mux(packet)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    manifest = segment(mixed, out_dir)
    assert manifest.duration_ms > 5900
    for chunk in manifest.chunks[:-1]:
        assert MIN_CHUNK_MS <= chunk.duration_ms <= MAX_CHUNK_MS
    assert manifest.chunks[-1].duration_ms <= MAX_CHUNK_MS
