"""The browser player in headless Debian Chromium against a real gateway and node.

A viewer opens ``/watch/clip`` (12 s of fMP4 H.264/AAC, 3 s free, 300 sat/s),
confirms a budget, funds from the demo faucet, plays past the free allowance
into paid time through MediaSource, leaves the page, and the settlement
transaction mined in a block pays the gateway exactly what the overlay showed
(protocol.md sections 3, 7 and 8).
"""

from __future__ import annotations

import json
import time
from typing import Any

from conftest_browser import Browser
from conftest_gateway import node_rpc
from helpers_chain import get_transaction

from gateway.chain.watch import btc_to_sat
from gateway.protocol.metering import total_due
from gateway.server import Gateway

MIME = 'video/mp4; codecs="avc1.64000C, mp4a.40.2"'


def url(gw: Gateway, path: str) -> str:
    """The gateway's own origin (the page talks to /paystream/2 on it)."""
    return f"http://127.0.0.1:{gw.port}{path}"


async def open_and_fund(browser: Browser, gw: Gateway, path: str) -> dict[str, Any]:
    """Open ``path``, confirm the suggested budget, fund from the faucet; the page state."""
    await browser.get(url(gw, path))
    await browser.wait_for("window.paystream && window.paystream.state === 'budget'",
                           what="the budget form")
    budget = int(await browser.js("return document.getElementById('budget-sat').value;"))
    assert budget == gw.limits.min_value  # the clip costs less than the minimum channel
    await browser.click("#budget-ok")
    await browser.wait_for("window.paystream.state === 'funding'", what="the funding panel")
    uri = await browser.text("#fund-uri")
    address = await browser.text("#fund-address")
    assert uri == f"bitcoin:{address}?amount=0.0001"
    assert await browser.js("return document.getElementById('fund-qr').naturalWidth > 50;")
    await browser.screenshot("browser-funding.png")
    await browser.click("#faucet")
    await browser.wait_for("window.paystream.channelId", what="the funded channel")
    return dict(await browser.js("return window.paystream;"))


async def test_debian_chromium_plays_the_sample_fmp4_through_mediasource(gateway, browser):
    """The sample's MIME type is accepted by MediaSource (else nothing could play)."""
    await browser.get(url(gateway, "/"))
    item = gateway.catalog.items["clip"]
    assert item.mime == MIME
    assert await browser.js("return MediaSource.isTypeSupported(arguments[0]);", item.mime)
    rows = await browser.js(
        "return [...document.querySelectorAll('#catalog tbody tr')].map(r => r.innerText);"
    )
    assert any("Clip" in r and "Studio" in r and "300 sat/s" in r and "3 s" in r for r in rows)


async def test_watch_fund_play_into_paid_time_leave_and_settle(gateway, browser):
    """Free → paid playback, then leaving settles what the overlay showed."""
    rpc = node_rpc(gateway)
    # ahead=3: the page pays for at most ~3 s beyond playback (pay as you watch).
    state = await open_and_fund(browser, gateway, "/watch/clip?ahead=3")
    channel_id, value = state["channelId"], state["value"]
    assert value == gateway.limits.min_value

    # Into paid time: past the 3 s free allowance, with sats paid.
    await browser.wait_for(
        "document.getElementById('video').currentTime > 5 && window.paystream.paid > 0",
        timeout=40, what="playback past the free allowance",
    )
    t1 = await browser.js("return document.getElementById('video').currentTime;")
    await browser.call(time.sleep, 1.0)
    t2 = await browser.js("return document.getElementById('video').currentTime;")
    assert t2 > t1 + 0.5, f"video.currentTime stalled at {t1} → {t2}"
    shot = await browser.screenshot("browser-playing.png")
    assert shot.stat().st_size > 10_000

    # Stop the stream (no more `due`), read the overlay, leave the page.
    await browser.click("#stop")
    await browser.wait_for("document.getElementById('status').textContent.length > 0")
    await browser.call(time.sleep, 0.5)
    overlay = {
        k: await browser.text(f"#o-{k}") for k in ("paid", "balance", "rate", "free", "time")
    }
    paid = int(overlay["paid"])
    assert paid > 0 and int(overlay["balance"]) == value - paid
    assert float(overlay["rate"]) == 300 and float(overlay["free"]) == 0
    # The reserve, then the media delivered beyond the free 3 s (rounded up
    # once), plus at most the one chunk a `pay` may precede (section 7).
    live = gateway.channels[channel_id]
    reserve = live.core.exit_fee
    delivered = live.meter.delivered_ms["clip"]
    assert reserve + total_due(0, 300_000, delivered - 3000) <= paid
    assert paid <= reserve + total_due(0, 300_000, delivered + 2000 - 3000)
    full_price = total_due(0, 300_000, gateway.catalog.items["clip"].duration_ms - 3000)
    assert paid < reserve + full_price, "the page paid far ahead of playback"

    await browser.get("about:blank")  # pagehide → close → the gateway settles
    deadline = time.monotonic() + 20
    row: Any = None
    while time.monotonic() < deadline:
        rows = gateway.store.read("SELECT * FROM channels WHERE channel_id = ?", (channel_id,))
        row = rows[0] if rows and rows[0]["settle_txid"] else None
        if row is not None:
            break
        await browser.call(time.sleep, 0.1)
    assert row is not None, "leaving the page did not settle the channel"
    block = await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
    tx = await get_transaction(rpc, row["settle_txid"])
    assert tx["confirmations"] == 1 and tx["blockhash"] == block[0]

    # The settlement spends the channel; the viewer's output is value - paid and
    # the gateway's outputs plus the fee are exactly the overlay's "paid".
    funding_txid, funding_vout = channel_id.split(":")
    assert [(i["txid"], i["vout"]) for i in tx["vin"]] == [(funding_txid, int(funding_vout))]
    outputs = [(o["scriptPubKey"]["hex"], btc_to_sat(o["value"])) for o in tx["vout"]]
    assert outputs[0] == (row["change_script"], value - paid)
    gateway_share = sum(amount for _, amount in outputs[1:])
    fee = gateway.store.read("SELECT fee FROM settlements WHERE txid = ?",
                             (row["settle_txid"],))[0]["fee"]
    assert gateway_share + fee == paid and gateway_share > 0 and fee >= reserve
    await rpc.close()


async def test_overcharge_is_refused_and_the_channel_closed(gateway, browser, monkeypatch):
    """A gateway asking 1 sat more than section 7 allows gets `close`, not a payment."""
    from gateway.protocol import metering

    honest = metering.ServerMeter.quote

    def greedy(self: Any, media: str, index: int, duration_ms: int, **kw: Any) -> Any:
        from dataclasses import replace

        quote = honest(self, media, index, duration_ms, **kw)
        return replace(quote, total=quote.total + 1) if quote.charged_ms else quote

    monkeypatch.setattr(metering.ServerMeter, "quote", greedy)
    await open_and_fund(browser, gateway, "/watch/clip")
    over = await browser.wait_for("window.paystream.overcharged", what="the overcharge")
    assert over["total"] == over["figure"] + 1
    closed = await browser.wait_for("window.paystream.closed", what="closed")
    # Only the reserve was paid: it settles the channel and the change comes back.
    assert closed["paid"] == closed["exit_fee"] > 0 and closed["txid"] is not None
    assert "overcharges" in await browser.text("#status") or await browser.js(
        "return window.paystream.errors.some(e => e.includes('overcharges'));"
    )


async def test_reload_resumes_the_channel_when_kept_open(gateway, browser):
    """Unticked "close when I leave": a reload resumes the same channel with a proof."""
    state = await open_and_fund(browser, gateway, "/watch/song")
    await browser.wait_for("window.paystream.paid > 0", timeout=40, what="paid playback")
    await browser.click("#close-on-leave")
    await browser.call(browser.driver.refresh)
    await browser.wait_for("window.paystream && window.paystream.resumed", what="the resume")
    resumed = dict(await browser.js("return window.paystream;"))
    assert resumed["channelId"] == state["channelId"] and resumed["state"] == "ready"
    assert resumed["balance"] <= state["value"] - 1
    # Exported key and channel: K1 and the channel's scripts, nothing from the gateway.
    await browser.click("details summary")
    await browser.click("#export")
    exported = json.loads(await browser.text("#export-out"))
    assert exported["channel"]["channel_id"] == state["channelId"]
    assert len(exported["k1_secret"]) == 64
    await browser.click("#leave")
    closed = await browser.wait_for("window.paystream.closed", what="closed")
    # Nothing is signed after `close`: the gateway settled the page's last figure.
    assert closed["txid"] is not None
    assert closed["paid"] == await browser.js("return window.paystream.paid;") > 0


async def test_seek_and_switch_media_on_the_same_channel(gateway, browser):
    """A seek past what was delivered restarts the stream there; a switch plays the song."""
    video = "document.getElementById('video')"
    state = await open_and_fund(browser, gateway, "/watch/clip?ahead=2")
    await browser.wait_for(f"{video}.currentTime > 1", what="playback")
    await browser.js(f"{video}.currentTime = 9;")
    await browser.wait_for(f"{video}.currentTime > 9.5", what="playback after the seek")
    plays = await browser.js("return window.paystream.plays;")
    assert plays[0] == {"media": "clip", "start_ms": 0}
    assert plays[-1]["media"] == "clip" and 8900 <= plays[-1]["start_ms"] <= 9100

    await browser.js("const s = document.getElementById('switch'); s.value = 'song';"
                     "s.dispatchEvent(new Event('change'));")
    await browser.wait_for(f"window.paystream.stream.media === 'song' && {video}.currentTime > 1",
                           what="the song playing")
    after = dict(await browser.js("return window.paystream;"))
    assert after["channelId"] == state["channelId"]  # one channel for both items
    assert await browser.js("return location.pathname;") == "/watch/song"
    assert after["rateMsat"] == 150_500
    await browser.click("#leave")
    closed = await browser.wait_for("window.paystream.closed", what="closed")
    assert closed["paid"] == await browser.js("return window.paystream.paid;") > 0
