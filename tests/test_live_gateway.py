"""Live items through the gateway (issue 16): catalog, WHIP, and the paid session.

A real gateway (embedded node, real SQLite, aiohttp on 127.0.0.1), a real
aiortc publisher over WHIP (:class:`SyntheticPublisher`), and viewers on
the paystream WebSocket: MSE (live fMP4 fragments as paid chunks) and
WebRTC (``play.webrtc``, an aiortc :class:`ProbeViewer` receiving).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import av
import pytest

from gateway.chain.watch import btc_to_sat
from gateway.cli import main
from gateway.keys import MasterKey
from gateway.live.synthetic import ProbeViewer, SyntheticPublisher
from gateway.media.catalog import Catalog, add_live
from gateway.protocol.messages import (
    Closed,
    Due,
    End,
    Error,
    Interval,
    Paid,
    Play,
    Stop,
    Stream,
    WebrtcAnswer,
)
from gateway.protocol.scripts import address_to_script_pubkey
from gateway.server import Gateway
from player import cli as player_cli
from player.client import Player
from player.keystore import Keystore
from player.wallet import Wallet
from player.webrtc import WebrtcReceiver
from tests.conftest_gateway import PUBLISHERS, Viewer, node_rpc, ws_url
from tests.helpers_chain import get_transaction

LIVE = "match"
RATE_MSAT = 300_000  # 300 sat per live second
FREE_MS = 2000


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest.fixture
async def live_gateway(gateway_factory: Any, media_copy: Path) -> Gateway:
    add_live(media_copy, LIVE, title="The match", publisher="studio",
             rate_msat=RATE_MSAT, free_ms=FREE_MS)
    gw: Gateway = await gateway_factory()
    return gw


def token(gw: Gateway, publisher: str = "studio") -> str:
    return MasterKey.load_or_create(gw.datadir / "master.key").publisher_token(publisher)


def base(gw: Gateway) -> str:
    return f"http://127.0.0.1:{gw.port}"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def whip(
    http: aiohttp.ClientSession, gw: Gateway, sdp: str, *, live: str = LIVE,
    auth: str | None = "good", content_type: str = "application/sdp",
) -> tuple[int, str, str | None]:
    headers = {"Content-Type": content_type}
    if auth == "good":
        headers["Authorization"] = f"Bearer {token(gw)}"
    elif auth is not None:
        headers["Authorization"] = auth
    async with http.post(f"{base(gw)}/whip/{live}", data=sdp.encode(), headers=headers) as r:
        return r.status, await r.text(), r.headers.get("Location")


async def go_live(http: aiohttp.ClientSession, gw: Gateway) -> tuple[SyntheticPublisher, str]:
    publisher = SyntheticPublisher()
    status, answer, location = await whip(http, gw, await publisher.offer())
    assert status == 201, answer
    assert location is not None and location.startswith(f"/whip/{LIVE}/")
    await publisher.accept(answer)
    await wait_until(lambda: gw.on_air.hub(LIVE) is not None
                     and gw.on_air.hubs[LIVE].mse.latest is not None, 20, "the first fragment")
    return publisher, location


async def stop_live(http: aiohttp.ClientSession, gw: Gateway, location: str) -> int:
    headers = {"Authorization": f"Bearer {token(gw)}"}
    async with http.delete(f"{base(gw)}{location}", headers=headers) as r:
        return r.status


async def dashboard_live(http: aiohttp.ClientSession, gw: Gateway) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {gw.operator_token}"}
    async with http.get(f"{base(gw)}/api/dashboard/live", headers=headers) as r:
        assert r.status == 200
        body = await r.json()
    return next(i for i in body["items"] if i["id"] == LIVE)


async def catalog_entry(http: aiohttp.ClientSession, gw: Gateway) -> dict[str, Any]:
    async with http.get(f"{base(gw)}/api/catalog") as r:
        entries = await r.json()
    return next(e for e in entries if e["id"] == LIVE)


def test_live_and_publisher_token_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    media, data = tmp_path / "m", tmp_path / "d"
    address = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080"
    assert main(["publisher", "add", "pub", "--name", "Pub", "--address", address,
                 "--media", str(media), "--datadir", str(data)]) == 0
    printed = capsys.readouterr().out.split("WHIP bearer token: ")[1].strip()
    assert main(["publisher", "token", "pub", "--media", str(media), "--datadir", str(data)]) == 0
    assert capsys.readouterr().out.strip() == printed  # the same token, shown again
    assert printed == MasterKey.load_or_create(data / "master.key").publisher_token("pub")
    assert main(["publisher", "token", "nobody", "--media", str(media),
                 "--datadir", str(data)]) == 1
    assert "unknown publisher 'nobody'" in capsys.readouterr().err
    args = ["live", "add", "gig", "--title", "Gig", "--rate", "2", "--free", "5",
            "--media", str(media)]
    before = (media / "catalog.toml").read_bytes()
    assert main([*args, "--publisher", "nobody"]) == 1  # one line, catalog unchanged
    assert (media / "catalog.toml").read_bytes() == before
    assert main([*args, "--publisher", "pub", "--no-record"]) == 0
    gig = Catalog.load(media).live["gig"]
    assert (gig.rate_msat, gig.free_ms, gig.record, gig.title) == (2000, 5000, False, "Gig")
    assert Catalog.load(media).to_api() == [{
        "id": "gig", "title": "Gig", "publisher": "pub", "rate": 2, "rate_msat": 2000,
        "free_seconds": 5, "live": True, "on_air": False}]


async def test_whip_refusals_and_on_air(live_gateway: Gateway, http: aiohttp.ClientSession) -> None:
    gw = live_gateway
    assert (await catalog_entry(http, gw))["on_air"] is False
    probe = SyntheticPublisher()
    offer = await probe.offer()
    try:
        assert (await whip(http, gw, offer, live="nothing"))[0] == 404
        assert (await whip(http, gw, offer, auth=None))[0] == 401
        status, body, _ = await whip(http, gw, offer, auth="Bearer wrong")
        assert status == 401 and "token" in body
        # Another publisher's token does not open this one's live item.
        assert (await whip(http, gw, offer, auth=f"Bearer {token(gw, 'label')}"))[0] == 401
        assert (await whip(http, gw, offer, content_type="text/plain"))[0] == 415
        status, body, _ = await whip(http, gw, "v=0\r\nthis is not sdp\r\n")
        assert status == 400 and "SDP" in body
        assert gw.on_air.on_air() == set()  # nothing refused started anything
    finally:
        await probe.close()
    publisher, location = await go_live(http, gw)
    try:
        assert (await catalog_entry(http, gw))["on_air"] is True
        figures = await dashboard_live(http, gw)
        assert figures["on_air"] is True and figures["token"] == token(gw)
        assert figures["whip"] == f"/whip/{LIVE}"
        second = SyntheticPublisher()
        status, body, _ = await whip(http, gw, await second.offer())
        await second.close()
        assert status == 409, body
        assert await stop_live(http, gw, location) == 200
        assert (await catalog_entry(http, gw))["on_air"] is False
        assert await stop_live(http, gw, location) == 404
    finally:
        await publisher.close()


async def funded_viewer(gw: Gateway) -> Viewer:
    viewer = Viewer(ws_url(gw), node_rpc(gw))
    await viewer.connect()
    await viewer.open_and_fund(value=20_000)
    return viewer


async def test_mse_live_items_are_paid_chunks(
    live_gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    """MSE: the live fragments go out as ordinary chunks, paid as any chunk."""
    gw = live_gateway
    publisher, location = await go_live(http, gw)
    viewer = await funded_viewer(gw)
    channel = viewer.channel
    assert channel is not None
    try:
        await viewer.send(Play(media=LIVE))
        stream = await viewer.expect(Stream)
        assert stream.live is True and stream.mime.startswith("video/mp4")
        assert (stream.rate_msat, stream.free_ms) == (RATE_MSAT, FREE_MS)
        channel.on_stream(stream)
        paid_media = 0
        while paid_media < 2:  # through the free seconds into two paid fragments
            msg = await viewer.recv()
            if isinstance(msg, Due):
                if msg.index >= 0:
                    paid_media += 1
                await viewer.send(channel.pay_due(msg))
            elif isinstance(msg, Paid):
                channel.on_paid(msg)
            assert not isinstance(msg, Error | End), msg
        fragments = [chunk for chunk, _ in viewer.media if chunk.index >= 0]
        assert viewer.media[0][0].index == -1  # the init segment first
        # Consecutive live fragments, each about one interval.
        indexes = [chunk.index for chunk in fragments]
        assert indexes == list(range(indexes[0], indexes[0] + len(indexes)))
        assert await stop_live(http, gw, location) == 200
        # The publisher stopped: `end`, and the due left unpaid is never billed.
        while True:
            msg = await viewer.recv()
            if isinstance(msg, Due):
                continue  # not paid: that fragment never goes out
            if isinstance(msg, Paid):
                channel.on_paid(msg)
            if isinstance(msg, End):
                assert msg.reason == "finished"
                break
        live = next(iter(gw.channels.values()))
        delivered = sum(chunk.duration_ms for chunk, _ in viewer.media if chunk.index >= 0)
        assert live.meter.delivered_ms[LIVE] == delivered
        billed_ms = delivered - FREE_MS
        closed = await viewer.close_channel()
        assert isinstance(closed, Closed)
        # Exactly the media delivered beyond the free seconds, and the reserve.
        assert closed.paid == closed.exit_fee + -(-RATE_MSAT * billed_ms // 1_000_000)
    finally:
        await viewer.disconnect()
        await publisher.close()


class RtcWatcher:
    """A session viewer watching over WebRTC: pays when told, counts frames."""

    def __init__(self, viewer: Viewer) -> None:
        self.viewer = viewer
        self.probe = ProbeViewer()
        self.paying = True
        self.intervals: list[Interval] = []
        self.dues: list[Due] = []
        self.unpaid: Due | None = None
        self.end: End | None = None
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Stream:
        viewer, channel = self.viewer, self.viewer.channel
        assert channel is not None
        await viewer.send(Play(media=LIVE, webrtc=await self.probe.offer()))
        stream = await viewer.expect(Stream)
        assert stream.live is True
        channel.on_stream(stream)
        answer = await viewer.expect(WebrtcAnswer)
        await self.probe.accept(answer.sdp)
        self.task = asyncio.create_task(self._run())
        return stream

    async def _run(self) -> None:
        channel = self.viewer.channel
        assert channel is not None
        while True:
            msg = await self.viewer.recv(timeout=60)
            if isinstance(msg, Interval):
                channel.on_chunk(msg)
                self.intervals.append(msg)
            elif isinstance(msg, Due):
                self.dues.append(msg)
                if self.paying:
                    await self.viewer.send(channel.pay_due(msg))
                else:
                    self.unpaid = msg
            elif isinstance(msg, Paid):
                channel.on_paid(msg)
            elif isinstance(msg, End):
                self.end = msg
                return
            else:
                raise AssertionError(f"unexpected {msg}")

    async def pay_again(self) -> None:
        channel = self.viewer.channel
        assert channel is not None
        self.paying = True
        if self.unpaid is not None:
            due, self.unpaid = self.unpaid, None
            await self.viewer.send(channel.pay_due(due))

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        await self.probe.close()


async def test_webrtc_live_flows_only_while_paid(
    live_gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    """WebRTC: free seconds, then each interval flows once paid; unpaid, media stops."""
    gw = live_gateway
    publisher, location = await go_live(http, gw)
    viewer = await funded_viewer(gw)
    watcher = RtcWatcher(viewer)
    channel = viewer.channel
    assert channel is not None
    try:
        await watcher.start()
        frames = watcher.probe.frames
        # Through the free seconds into paid intervals: media flows.
        await wait_until(lambda: sum(d.index >= 0 for d in watcher.dues) >= 2, 20,
                         "two paid intervals")
        count = len(frames)
        await wait_until(lambda: len(frames) > count + 10, 10, "frames while paid")
        assert gw.on_air.tally(LIVE).viewers == 1
        figures = await dashboard_live(http, gw)
        assert figures["viewers"] == 1 and figures["paid_seconds"] >= 1
        assert figures["earned_sat"] == gw.on_air.tally(LIVE).bill / 1_000_000
        # Payments stop: media stops within an interval.
        watcher.paying = False
        await wait_until(lambda: watcher.unpaid is not None, 5, "an unpaid due")
        await asyncio.sleep(0.5)  # what was in flight arrives
        stalled = len(frames)
        await asyncio.sleep(1.5)
        assert len(frames) <= stalled + 1  # aiortc's jitter buffer holds one frame back
        # Paid again: media flows again, from a keyframe.
        await watcher.pay_again()
        await wait_until(lambda: len(frames) > stalled + 10, 5, "frames after paying again")
        assert any(f.keyframe for f in frames[stalled:])
        # The publisher drops (no DELETE): `end`; an interval not paid is not billed.
        watcher.paying = False
        await wait_until(lambda: watcher.unpaid is not None, 5, "an unpaid due")
        await publisher.close()
        await wait_until(lambda: watcher.end is not None, 15, "end after the publisher left")
        assert watcher.end is not None and watcher.end.reason == "finished"
        live = next(iter(gw.channels.values()))
        allowed_ms = sum(i.duration_ms for i in watcher.intervals)
        assert live.meter.delivered_ms[LIVE] == allowed_ms
        tally = gw.on_air.tally(LIVE)
        assert tally.paid_ms == allowed_ms - FREE_MS
        assert tally.viewers == 0
        await watcher.stop()
        closed = await viewer.close_channel()
        assert closed.paid == closed.exit_fee + -(-RATE_MSAT * (allowed_ms - FREE_MS) // 1_000_000)
        assert closed.paid == channel.meter.figure  # the client's own bill agrees
        assert (await catalog_entry(http, gw))["on_air"] is False
        del location
    finally:
        await watcher.stop()
        await viewer.disconnect()
        await publisher.close()


async def test_player_play_webrtc_writes_the_live_media_to_a_file(
    live_gateway: Gateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """``player play --webrtc``: aiortc receives, the file decodes, the bill is the intervals."""
    gw = live_gateway
    publisher, location = await go_live(http, gw)
    out = tmp_path / "live.mkv"
    player = Player(ws_url(gw), Keystore(tmp_path / "player"), wallet=Wallet(node_rpc(gw)),
                    budget=20_000, buffer_s=None, webrtc=WebrtcReceiver(ws_url(gw), out))
    try:
        result = await player.play(LIVE, duration_ms=FREE_MS + 2000)
    finally:
        await stop_live(http, gw, location)
        await publisher.close()
    assert result.reason == "duration" and result.closed
    assert result.chunks == (FREE_MS + 2000) // 1000  # one per live interval
    exit_fee = result.channel.exit_fee
    assert result.paid == exit_fee + -(-RATE_MSAT * 2000 // 1_000_000)
    with av.open(str(out)) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames > 30  # seconds of video at the publisher's 30 frames a second
    # The live stream was recorded into the catalog at the live item's rate.
    await wait_until(lambda: any(i.startswith(f"{LIVE}-") for i in Catalog.load(
        gw.config.media).items), 20, "the recording")
    recorded = next(i for i in Catalog.load(gw.config.media).items.values()
                    if i.id.startswith(f"{LIVE}-"))
    assert (recorded.rate_msat, recorded.free_ms) == (RATE_MSAT, FREE_MS)
    assert recorded.duration_ms > 2000


async def test_player_play_takes_a_live_item_through_mediasource_unchanged(
    live_gateway: Gateway, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """``player play`` (no --webrtc): the live fragments are chunks like a file's."""
    gw = live_gateway
    publisher, location = await go_live(http, gw)
    out = io.BytesIO()
    player = Player(ws_url(gw), Keystore(tmp_path / "player"), wallet=Wallet(node_rpc(gw)),
                    budget=20_000, buffer_s=None, out=out)
    try:
        result = await player.play(LIVE, max_chunks=6)
    finally:
        await stop_live(http, gw, location)
        await publisher.close()
    assert result.reason == "max_chunks" and result.closed
    # Free fragments first, then paid ones: paid is what was delivered past the free ms.
    row = gw.store.read("SELECT delivered_ms, publisher FROM deliveries WHERE media = ?", [LIVE])
    assert len(row) == 1 and row[0]["publisher"] == "studio"
    charged_ms = row[0]["delivered_ms"] - FREE_MS
    assert charged_ms > 0
    assert result.paid == result.channel.exit_fee + -(-RATE_MSAT * charged_ms // 1_000_000)
    # Settled: the live item's publisher is paid what viewers paid for its seconds.
    assert result.closed_txid is not None
    rpc = node_rpc(gw)
    tx = await get_transaction(rpc, result.closed_txid)
    await rpc.close()
    outputs = {o["scriptPubKey"]["hex"]: btc_to_sat(o["value"]) for o in tx["vout"]}
    fee = gw.store.read("SELECT fee FROM settlements WHERE txid = ?", [result.closed_txid])[0][0]
    studio = address_to_script_pubkey(PUBLISHERS["studio"], "regtest").hex()
    assert outputs[studio] == result.paid - fee
    with av.open(io.BytesIO(out.getvalue())) as container:
        frames = sum(1 for _ in container.decode(video=0))
    assert frames > 60  # six fragments of a 30 fps stream, decoded from the file
    # The catalog page lists the live item, and says whether it is on air.
    async with http.get(f"{base(gw)}/") as r:
        page = await r.text()
    assert f'data-live="{LIVE}"' in page and "off air" in page


async def test_player_webrtc_on_a_file_item_is_refused_before_any_money_moves(
    live_gateway: Gateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "player"
    args = ["play", ws_url(live_gateway), "clip", "--webrtc", "--data-dir", str(data)]
    assert await asyncio.to_thread(player_cli.main, args) == 1
    assert "--webrtc is for live items; clip is not one" in capsys.readouterr().err
    assert not live_gateway.channels  # no channel opened, nothing funded


async def test_dashboard_adds_a_live_item(live_gateway: Gateway,
                                          http: aiohttp.ClientSession) -> None:
    gw = live_gateway
    endpoint = f"{base(gw)}/api/dashboard/live_add"
    headers = {"Authorization": f"Bearer {gw.operator_token}"}
    form = {"id": "gig", "title": "Gig", "publisher": "label", "rate": "1.5",
            "free_seconds": "10", "record": "0"}
    async with http.post(endpoint, data=form) as r:
        assert r.status == 401
    before = (gw.config.media / "catalog.toml").read_bytes()
    async with http.post(endpoint, data={**form, "publisher": "nobody"}, headers=headers) as r:
        assert r.status == 400 and "unknown publisher" in (await r.json())["error"]
    async with http.post(endpoint, data={**form, "id": "clip"}, headers=headers) as r:
        assert r.status == 400  # a media item's id
    assert (gw.config.media / "catalog.toml").read_bytes() == before
    async with http.post(endpoint, data=form, headers=headers) as r:
        assert r.status == 200, await r.text()
    async with http.get(f"{base(gw)}/api/catalog") as r:
        gig = next(e for e in await r.json() if e["id"] == "gig")
    assert gig == {"id": "gig", "title": "Gig", "publisher": "label", "rate": 1.5,
                   "rate_msat": 1500, "free_seconds": 10, "live": True, "on_air": False}
    assert Catalog.load(gw.config.media).live["gig"].record is False


async def test_stop_over_webrtc_keeps_both_bills_equal(
    live_gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    """``stop`` mid-stream: every interval the gateway metered was announced first."""
    gw = live_gateway
    publisher, location = await go_live(http, gw)
    viewer = await funded_viewer(gw)
    watcher = RtcWatcher(viewer)
    channel = viewer.channel
    assert channel is not None
    try:
        await watcher.start()
        await wait_until(lambda: len(watcher.intervals) >= 3, 20, "three intervals")
        await viewer.send(Stop())
        await wait_until(lambda: watcher.end is not None, 10, "end")
        assert watcher.end is not None and watcher.end.reason == "stopped"
        live = next(iter(gw.channels.values()))
        assert live.meter.delivered_ms[LIVE] == sum(i.duration_ms for i in watcher.intervals)
        assert gw.on_air.tally(LIVE).viewers == 0
        await watcher.stop()
        closed = await viewer.close_channel()
        assert closed.paid == channel.meter.figure
    finally:
        await watcher.stop()
        await viewer.disconnect()
        await stop_live(http, gw, location)
        await publisher.close()
