"""The browser player in headless Debian Chromium against a real gateway and node.

A viewer opens ``/watch/clip`` (12 s of fMP4 H.264/AAC, 3 s free, 300 sat/s),
sees what a session costs and what leaving costs, confirms a budget, funds
from the demo faucet and plays through MediaSource. Then the money: leaving
settles the channel and the page keeps its record, checks the settlement on
chain and forgets the record only once the settlement is confirmed; a
channel that paid nothing is refunded by the page itself after its (height)
expiry; a multisig channel's refund is signed by the gateway and stored
before its funding is broadcast (protocol.md sections 2, 3, 7 and 8). Every
number the page states is compared with the chain or the gateway's store.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import time
from pathlib import Path
from typing import Any

import pytest
from conftest_browser import Browser
from conftest_gateway import node_rpc
from helpers_chain import get_transaction
from test_transactions import kernel_verify

from gateway.chain.rpc import RpcClient
from gateway.chain.watch import btc_to_sat
from gateway.protocol.metering import total_due
from gateway.protocol.scripts import ChannelScript
from gateway.protocol.settlement import exit_fee, exit_vbytes
from gateway.protocol.transactions import parse_tx
from gateway.server import Gateway
from gateway.web import exit_estimate

MIME = 'video/mp4; codecs="avc1.64000C, mp4a.40.2"'
VIDEO = "document.getElementById('video')"
#: The page's refund feerate (player/web/paystream.js REFUND_FEERATE).
REFUND_FEERATE = 2


def url(gw: Gateway, path: str) -> str:
    """The gateway's own origin (the page talks to /paystream/2 on it)."""
    return f"http://127.0.0.1:{gw.port}{path}"


async def mine(rpc: RpcClient, blocks: int = 1) -> list[str]:
    """Mine ``blocks`` blocks to a throwaway wallet address."""
    return list(await rpc.call("generatetoaddress", blocks, await rpc.call("getnewaddress")))


async def records(browser: Browser) -> list[dict[str, Any]]:
    """The channel records the page keeps in IndexedDB."""
    return list(await browser.js("return window.paystreamRecords.records();"))


async def wait_record(browser: Browser, test: str, what: str, timeout: float = 30) -> Any:
    """Wait until some record satisfies the JS predicate ``test`` (of ``r``); return it."""
    return await browser.wait_for(
        f"window.paystreamRecords && window.paystreamRecords.records().then(rs => "
        f"rs.find(r => {test}) || null)", timeout=timeout, what=what)


async def row_text(browser: Browser, key: str) -> str:
    """What the records table says of the record ``key``."""
    return str(await browser.js(
        "const r = [...document.querySelectorAll('#records-table tbody tr')]"
        ".find(r => r.dataset.key === arguments[0]); return r ? r.innerText : '';", key))


def cltv_exit(gw: Gateway, rate: int = 2) -> tuple[int, int]:
    """(vbytes, fee) of the exit of a cltv channel like the page's, at ``rate`` sat/vB."""
    key = bytes.fromhex("0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798")
    script = ChannelScript.make("cltv", key, key, int(time.time()) + 86_400)
    vbytes = exit_vbytes(script, bytes(22))
    return vbytes, exit_fee(vbytes, rate)


async def open_and_fund(browser: Browser, gw: Gateway, path: str, *, kind: str = "cltv",
                        ready: bool = True) -> dict[str, Any]:
    """Open ``path``, check what it says before funding, confirm the suggested budget,
    fund from the faucet; the page state."""
    await browser.get(url(gw, path))
    await browser.wait_for("window.paystream && window.paystream.state === 'budget'",
                           what="the budget form")
    # No channel yet: nothing to stop, close or switch.
    assert await browser.js("return document.getElementById('channel-controls').hidden;")
    await browser.js("const k = document.getElementById('kind'); k.value = arguments[0];"
                     "k.dispatchEvent(new Event('change'));", kind)
    await browser.wait_for("document.getElementById('costs').textContent.includes('about')",
                           what="the exit estimate")
    costs = await browser.text("#costs")
    estimate = exit_estimate(await gw.settler.feerate())["exit"][kind]
    assert f"about {estimate['fee']} sat now ({estimate['vbytes']} vB at 2 sat/vB)" in costs
    budget = int(await browser.js("return document.getElementById('budget-sat').value;"))
    assert budget == gw.limits.min_value  # the clip costs less than the minimum channel
    await browser.click("#budget-ok")
    await browser.wait_for("window.paystream.state === 'funding'", what="the funding panel")
    assert await browser.js("return document.getElementById('channel-controls').hidden;")
    # The record exists before any money moves: its script and expiry.
    unfunded = await wait_record(browser, "r.status === 'unfunded'", "the unfunded record")
    assert unfunded["kind"] == kind and unfunded["witness_script"] and unfunded["expiry"]
    row = gw.store.read("SELECT exit_fee, expiry FROM channels ORDER BY id DESC LIMIT 1")[0]
    reserve_line = await browser.text("#reserve-line")
    vbytes = unfunded["exit_vbytes"]
    rate = row["exit_fee"] / vbytes
    assert reserve_line.startswith(
        f"Exit reserve: {row['exit_fee']} sat ({vbytes} vB at {rate:g} sat/vB)"), reserve_line
    if kind == "cltv":
        uri = await browser.text("#fund-uri")
        address = await browser.text("#fund-address")
        assert uri == f"bitcoin:{address}?amount=0.0001" and address == unfunded["funding_address"]
        assert await browser.js("return document.getElementById('fund-qr').naturalWidth > 50;")
        await browser.screenshot(f"browser-funding-{kind}.png")
    await browser.click("#faucet")
    if ready:
        await browser.wait_for("window.paystream.state === 'ready' || "
                               "window.paystream.stream", what="the funded channel")
        assert not await browser.js(
            "return document.getElementById('channel-controls').hidden;")
    else:
        await browser.wait_for("window.paystream.channelId", what="the funding output")
    return dict(await browser.js("return window.paystream;"))


async def test_the_catalog_says_what_sessions_and_leaving_cost(gateway, browser):
    """Each item's price for 5 min, 30 min and the whole item, and the exit at today's feerate."""
    await browser.get(url(gateway, "/"))
    item = gateway.catalog.items["clip"]
    assert item.mime == MIME
    assert await browser.js("return MediaSource.isTypeSupported(arguments[0]);", item.mime)
    rows = await browser.js(
        "return [...document.querySelectorAll('#catalog tbody tr')].map(r => "
        "[...r.cells].map(c => c.innerText));"
    )
    clip = next(r for r in rows if r[0] == "Clip")
    whole = total_due(0, 300_000, item.duration_ms - 3000)
    assert clip[1:] == ["Studio", "300 sat/s", "3 s", "12 s", *[f"{whole} sat"] * 3]
    song = next(r for r in rows if r[0] == "Song")
    song_item = gateway.catalog.items["song"]
    assert song[-1] == f"{total_due(0, 150_500, song_item.duration_ms - 2000)} sat"
    vbytes, fee = cltv_exit(gateway)
    note = await browser.text("#costs-note")
    assert (f"leaving costs about {fee} sat (the network fee to return your change: "
            f"{vbytes} vB at 2 sat/vB now)") in note
    assert await browser.text("#records-empty") == "No channel."


async def test_free_part_only_then_leave_settles_the_change_and_the_record_waits_for_it(
    gateway, browser
):
    """Watch only the free part, leave: the change comes back less the reserve, checked.

    The record survives until /api/channel says the settlement is confirmed;
    "free left" counts media played, not delivered.
    """
    rpc = node_rpc(gateway)
    state = await open_and_fund(browser, gateway, "/watch/clip")
    channel_id, value = state["channelId"], state["value"]
    live = gateway.channels[channel_id]
    reserve = live.core.exit_fee
    # Paused in the same breath as seen playing, well inside the free part:
    # the chunk that straddles its end is then not paid for yet (the lead).
    await browser.wait_for(f"{VIDEO}.currentTime > 0.3 && window.paystream.paid > 0 && "
                           f"({VIDEO}.pause(), true)", what="playback of the free part")
    await browser.wait_for("document.getElementById('status').textContent === 'Paused'",
                           what="the Paused status")
    await asyncio.sleep(0.5)
    played = await browser.js(f"return {VIDEO}.currentTime;")
    assert played < 1.5, "played too far into the free part"
    overlay = {k: await browser.text(f"#o-{k}") for k in ("free", "media", "reserve", "balance")}
    assert abs(float(overlay["free"]) - (3 - played)) <= 0.15, (overlay, played)
    # The gateway delivered the free chunks at once, ahead of playback: the
    # page counts what played, not what was delivered.
    delivered = live.meter.delivered_ms["clip"]
    assert delivered >= played * 1000 + 1000, (delivered, played)
    assert int(overlay["reserve"]) == reserve and int(overlay["media"]) == 0
    assert int(overlay["balance"]) == value - reserve == live.core.balance
    # The reserve went as the binary pay the gateway offers (protocol.md section 5a).
    assert await browser.js("return window.paystream.payBinary && "
                            "window.paystream.binaryPays >= 1;")
    lead = await browser.text("#lead")
    assert lead.startswith("The page pays for the next chunk only when less than 1 s of media "
                           "is left to play: at most 1 s plus one chunk (3 s, at most 900 sat")
    await browser.screenshot("browser-free-part.png")

    await browser.get(url(gateway, "/"))  # pagehide → close → the gateway settles at once
    rec = await wait_record(browser, "r.status === 'settling' && r.settlement.check",
                            "the checked settlement")
    assert rec["key"] == channel_id
    check = rec["settlement"]["check"]
    assert check["ok"] and check["change"] == value - reserve
    settle_txid = rec["settlement"]["txid"]
    tx = await rpc.call("getrawtransaction", settle_txid, True)  # in the mempool
    funding_txid, vout = channel_id.split(":")
    index = next(i for i, txin in enumerate(tx["vin"])
                 if (txin["txid"], txin["vout"]) == (funding_txid, int(vout)))
    out = tx["vout"][index]
    assert out["scriptPubKey"]["hex"] == rec["change_script"]
    assert btc_to_sat(out["value"]) == value - reserve  # the viewer's change, on chain
    fee = value - sum(btc_to_sat(o["value"]) for o in tx["vout"])  # one input: ours
    assert (check["index"], check["fee"], check["vsize"]) == (index, fee, tx["vsize"])
    text = await row_text(browser, channel_id)
    assert (f"pays our change {value - reserve} sat at output {index}, and its feerate "
            f"{fee / tx['vsize']:.2f} sat/vB (fee {fee} sat for {tx['vsize']} vB) is at least "
            f"the quoted {reserve / rec['exit_vbytes']:.2f} sat/vB") in text, text
    # Not confirmed: the record stays, whatever time passes.
    await browser.wait_for(f"window.paystreamRecords.rounds > "
                           f"{await browser.js('return window.paystreamRecords.rounds;') + 1}")
    assert [r["key"] for r in await records(browser)] == [channel_id]

    await mine(rpc)
    await browser.wait_for("window.paystreamRecords.records().then(rs => rs.length === 0)",
                           what="the record deleted once the settlement confirmed")
    history = await browser.text("#history")
    assert (f"Settled in {settle_txid} (1 confirmation): {value - reserve} sat back to your "
            f"key, {reserve} sat paid.") in history
    await rpc.close()


async def test_nothing_paid_the_page_refunds_after_a_height_expiry_and_keeps_the_record(
    gateway_factory, browser, tmp_path
):
    """Leave before anything is paid: nothing settles; after the expiry the page refunds.

    The record (and the backup) survive until the refund is confirmed; the
    gateway relays the refund only once it is final.
    """
    gw = await gateway_factory(limits={"min_conf": 1})
    rpc = node_rpc(gw)
    state = await open_and_fund(browser, gw, "/watch/clip?expiry_blocks=14", ready=False)
    await browser.wait_for("window.paystream.faucet && window.paystream.fundingSeen",
                           what="the faucet's answer and the gateway's `funding`")
    rec = await wait_record(browser, "r.signed_refund", "the signed refund in the record")
    channel_id, value, expiry = rec["channel_id"], rec["value"], rec["expiry"]
    assert channel_id == state["channelId"] and value == gw.limits.min_value
    assert expiry == await rpc.call("getblockcount") + 14  # a height: no block mined since
    assert await browser.js("return window.paystream.state;") == "funding"

    await browser.get(url(gw, "/"))  # leaves while the funding waits for a confirmation
    rec = await wait_record(browser, "r.status === 'refund_wait'", "nothing to settle")
    row = gw.store.read("SELECT state, settle_txid, value, balance FROM channels "
                        "WHERE channel_id = ?", (channel_id,))[0]
    assert (row["state"], row["settle_txid"], row["balance"]) == ("closed", None, value)
    refund = parse_tx(bytes.fromhex(rec["signed_refund"]))
    refund_fee = value - refund.vout[0].nValue
    assert refund_fee == rec["refund_fee"]
    text = await row_text(browser, channel_id)
    assert (f"Nothing was paid, so nothing will be settled: the page refunds the whole {value} "
            f"sat (less a network fee of {refund_fee} sat) after block {expiry}") in text, text
    assert await browser.js("return document.querySelector('button.refund') === null;")
    await browser.screenshot("catalog-refund-wait.png")

    # The backup holds what a refund needs, and that refund is valid.
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    await browser.call(browser.driver.execute_cdp_cmd, "Browser.setDownloadBehavior",
                       {"behavior": "allow", "downloadPath": str(downloads)})
    await browser.click("#backup")
    backup = await wait_backup(downloads)
    await check_backup(backup, rec, state)

    # Before the expiry the node refuses the refund, and the page does not try.
    tip = await rpc.call("getblockcount")
    await mine(rpc, expiry - 1 - tip)
    status, body = await post(gw, f"/api/refund?tx={rec['signed_refund']}")
    assert status == 409 and "non-final" in body["reason"]
    rounds = await browser.js("return window.paystreamRecords.rounds;")
    await browser.wait_for(f"window.paystreamRecords.rounds > {rounds + 1}")
    rec = (await records(browser))[0]
    assert rec["status"] == "refund_wait" and not rec.get("refund_txid")

    await mine(rpc)  # the next block's height is above the expiry: final
    rec = await wait_record(browser, "r.status === 'refund_sent'", "the page's own refund")
    tx = await rpc.call("getrawtransaction", rec["refund_txid"], True)
    assert tx["hex"] == rec["signed_refund"] == backup["channels"][0]["signed_refund"]
    assert tx["locktime"] == expiry and [(i["txid"], i["vout"]) for i in tx["vin"]] == [
        (rec["txid"], rec["vout"])]
    back = btc_to_sat(tx["vout"][0]["value"])
    assert tx["vout"][0]["scriptPubKey"]["hex"] == rec["change_script"]
    assert back == value - refund_fee and refund_fee == math.ceil(REFUND_FEERATE * tx["vsize"])
    assert [r["key"] for r in await records(browser)] == [channel_id]  # not confirmed yet

    await mine(rpc)
    await browser.wait_for("window.paystreamRecords.records().then(rs => rs.length === 0)",
                           what="the record deleted once the refund confirmed")
    history = await browser.text("#history")
    assert (f"Refunded in {rec['refund_txid']} (1 confirmation): {back} sat back to your key "
            f"(the network fee was {refund_fee} sat).") in history
    await rpc.close()


async def post(gw: Gateway, path: str) -> tuple[int, Any]:
    """POST ``path`` (status, JSON body), without blocking the gateway's loop."""
    import urllib.error
    import urllib.request

    def fetch() -> tuple[int, Any]:
        request = urllib.request.Request(url(gw, path), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=20) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    return await asyncio.to_thread(fetch)


async def wait_backup(downloads: Path) -> dict[str, Any]:
    """The backup file Chromium downloaded, parsed."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done = [p for p in downloads.iterdir() if p.suffix == ".json"]
        if done:
            return dict(json.loads(done[0].read_text()))
        await asyncio.sleep(0.1)
    raise AssertionError(f"no backup downloaded: {list(downloads.iterdir())}")


async def check_backup(backup: dict[str, Any], rec: dict[str, Any], state: dict[str, Any]) -> None:
    """The backup holds K1 and the record, and its refund spends the funding output."""
    import coincurve

    secret = bytes.fromhex(backup["k1_secret"])
    pub = coincurve.PrivateKey(secret).public_key.format(compressed=True).hex()
    assert pub == backup["k1_pubkey"] == rec["client_pubkey"]
    assert "SECRET" in backup["warning"] and backup["network"] == "regtest"
    [channel] = backup["channels"]
    for key in ("kind", "witness_script", "expiry", "txid", "vout", "value", "change_script",
                "server_pubkey", "exit_fee", "signed_refund", "funding_script"):
        assert channel[key] == rec[key], key
    assert channel["seq"] == rec["seq"] and channel["balance"] == rec["balance"]
    script = ChannelScript.make(channel["kind"], bytes.fromhex(pub),
                                bytes.fromhex(channel["server_pubkey"]), channel["expiry"])
    assert script.witness_script.hex() == channel["witness_script"]
    refund = bytes.fromhex(channel["signed_refund"])
    assert kernel_verify(refund, [(script.script_pubkey, channel["value"])])
    assert parse_tx(refund).nLockTime == channel["expiry"]
    assert f"block {channel['expiry']}" in channel["how_to_refund"]


async def test_multisig_from_the_page_stores_the_signed_refund_before_funding(
    gateway, browser, monkeypatch
):
    """kind multisig: T1 from the faucet (not broadcast), T2 signed by the gateway and
    stored before `fund`; it plays, leaves, settles, and the record goes once confirmed."""
    from gateway import session
    from gateway.protocol.messages import Fund

    rpc = node_rpc(gateway)
    seen_at_fund: list[dict[str, Any]] = []
    honest = session._HANDLERS[Fund]

    async def fund_after_looking(self: Any, msg: Any) -> None:
        # What the page had stored when `fund` reached the gateway.
        seen_at_fund.extend(await records(browser))
        await honest(self, msg)

    monkeypatch.setitem(session._HANDLERS, Fund, fund_after_looking)
    state = await open_and_fund(browser, gateway, "/watch/song", kind="multisig")
    channel_id, value = state["channelId"], state["value"]
    [at_fund] = seen_at_fund
    assert at_fund["key"] == channel_id and at_fund["signed_refund"]
    t2 = bytes.fromhex(at_fund["signed_refund"])
    script = ChannelScript.make("multisig", bytes.fromhex(at_fund["client_pubkey"]),
                                bytes.fromhex(at_fund["server_pubkey"]), at_fund["expiry"])
    assert kernel_verify(t2, [(script.script_pubkey, value)])  # both signatures valid
    parsed = parse_tx(t2)
    assert parsed.nLockTime == at_fund["expiry"] and parsed.vin[0].nSequence == 0xFFFFFFFE
    assert value - parsed.vout[0].nValue == at_fund["refund_fee"]
    assert (await get_transaction(rpc, channel_id.split(":")[0]))["txid"]  # T1 broadcast

    await browser.wait_for("window.paystream.paid > window.paystream.exitFee",
                           timeout=40, what="paid playback")
    await browser.click("#leave")
    closed = await browser.wait_for("window.paystream.closed", what="closed")
    assert closed["txid"] is not None and closed["paid"] > closed["exit_fee"]
    assert await browser.js("return document.getElementById('channel-controls').hidden;")
    assert (f"Channel closed: paid {closed['paid']} sat (exit reserve {closed['exit_fee']} + "
            f"media {closed['paid'] - closed['exit_fee']}). Settlement {closed['txid']} "
            f"broadcast: your change {closed['balance']} sat") in await browser.text("#status")
    rec = await wait_record(browser, "r.settlement && r.settlement.check", "the check")
    assert rec["settlement"]["check"]["ok"] and rec["kind"] == "multisig"
    tx = await rpc.call("getrawtransaction", closed["txid"], True)
    change = tx["vout"][rec["settlement"]["check"]["index"]]
    assert btc_to_sat(change["value"]) == closed["balance"] == value - closed["paid"]
    assert change["scriptPubKey"]["hex"] == rec["change_script"]
    await mine(rpc)
    await browser.wait_for("window.paystreamRecords.records().then(rs => rs.length === 0)",
                           what="the record deleted once the settlement confirmed")
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
    assert await browser.js(
        "return window.paystream.errors.some(e => e.includes('overcharges'));"
    )


async def test_reload_resumes_the_channel_when_kept_open(gateway, browser):
    """Unticked "close when I leave": a reload resumes the same channel with a proof."""
    state = await open_and_fund(browser, gateway, "/watch/song")
    await browser.wait_for("window.paystream.paid > window.paystream.exitFee", timeout=40,
                           what="paid playback")
    await browser.click("#close-on-leave")
    await browser.call(browser.driver.refresh)
    await browser.wait_for("window.paystream && window.paystream.resumed", what="the resume")
    resumed = dict(await browser.js("return window.paystream;"))
    assert resumed["channelId"] == state["channelId"] and resumed["state"] == "ready"
    assert resumed["balance"] <= state["value"] - 1
    await browser.click("#leave")
    closed = await browser.wait_for("window.paystream.closed", what="closed")
    # Nothing is signed after `close`: the gateway settled the page's last figure.
    assert closed["txid"] is not None
    assert closed["paid"] == await browser.js("return window.paystream.paid;") > 0


async def test_seek_and_switch_media_on_the_same_channel(gateway, browser):
    """A seek past what was delivered restarts the stream there; a switch plays the song."""
    state = await open_and_fund(browser, gateway, "/watch/clip?lead=2")
    await browser.wait_for(f"{VIDEO}.currentTime > 1", what="playback")
    await browser.js(f"{VIDEO}.currentTime = 9;")
    await browser.wait_for(f"{VIDEO}.currentTime > 9.5", what="playback after the seek")
    plays = await browser.js("return window.paystream.plays;")
    assert plays[0] == {"media": "clip", "start_ms": 0}
    assert plays[-1]["media"] == "clip" and 8900 <= plays[-1]["start_ms"] <= 9100

    await browser.js("const s = document.getElementById('switch'); s.value = 'song';"
                     "s.dispatchEvent(new Event('change'));")
    await browser.wait_for(f"window.paystream.stream.media === 'song' && {VIDEO}.currentTime > 1",
                           what="the song playing")
    after = dict(await browser.js("return window.paystream;"))
    assert after["channelId"] == state["channelId"]  # one channel for both items
    assert await browser.js("return location.pathname;") == "/watch/song"
    assert after["rateMsat"] == 150_500
    await browser.click("#leave")
    closed = await browser.wait_for("window.paystream.closed", what="closed")
    assert closed["paid"] == await browser.js("return window.paystream.paid;") > 0


@pytest.mark.parametrize("lead", [1])
async def test_paid_playback_pays_no_further_ahead_than_the_lead(gateway, browser, lead):
    """Into paid time: the page holds at most the lead plus one chunk of paid media."""
    rpc = node_rpc(gateway)
    state = await open_and_fund(browser, gateway, f"/watch/clip?lead={lead}")
    channel_id, value = state["channelId"], state["value"]
    await browser.wait_for(f"{VIDEO}.currentTime > 5 && window.paystream.mediaPaid > 0",
                           timeout=40, what="playback past the free allowance")
    t1 = await browser.js(f"return {VIDEO}.currentTime;")
    await asyncio.sleep(1.0)
    t2 = await browser.js(f"return {VIDEO}.currentTime;")
    assert t2 > t1 + 0.5, f"video.currentTime stalled at {t1} → {t2}"
    shot = await browser.screenshot("browser-playing.png")
    assert shot.stat().st_size > 10_000
    for _ in range(10):  # every sample: paid media within what played, the lead and a chunk
        sample = await browser.js(
            f"return [{VIDEO}.currentTime, window.paystream.mediaPaid, "
            "window.paystream.reservePaid];")
        played, media_paid, reserve_paid = sample
        ahead = media_paid * 1000 / 300_000 - max(0, played - 3)
        assert ahead <= lead + 2 + 0.05, sample
        await asyncio.sleep(0.3)
    overlay = {k: await browser.text(f"#o-{k}")
               for k in ("media", "reserve", "balance", "rate", "free")}
    live = gateway.channels[channel_id]
    assert int(overlay["reserve"]) == live.core.exit_fee == reserve_paid
    assert int(overlay["media"]) + int(overlay["reserve"]) == value - int(overlay["balance"])
    assert float(overlay["rate"]) == 300 and float(overlay["free"]) == 0
    await browser.click("#leave")
    closed = await browser.wait_for("window.paystream.closed", what="closed")
    assert closed["paid"] == value - int(await browser.text("#o-balance"))
    row = gateway.store.read("SELECT * FROM channels WHERE channel_id = ?", (channel_id,))[0]
    assert row["balance"] == closed["balance"] and re.fullmatch(r"[0-9a-f]{64}", closed["txid"])
    # Every pay of this new channel went as the binary frame (protocol.md section
    # 5a), and the gateway took each: its last seq counts them all.
    assert await browser.js("return window.paystream.binaryPays;") == row["seq"] > 1
    await rpc.close()


async def test_a_reorg_that_takes_the_funding_back_waits_then_replays(gateway_factory, browser):
    """`funding_lost` (section 4): the page says so, pays nothing, and plays on after `ready`."""
    gw = await gateway_factory(limits={"min_conf": 1})
    rpc = node_rpc(gw)
    await open_and_fund(browser, gw, "/watch/clip", ready=False)
    await browser.wait_for("window.paystream.fundingSeen", what="the gateway's `funding`")
    [block] = await mine(rpc)
    await browser.wait_for(f"window.paystream.state === 'ready' && {VIDEO}.currentTime > 0.5",
                           what="playback on the confirmed channel")
    # A competing block at the same height without the funding: a reorg that
    # sends the funding back to the mempool (its only confirmation is gone).
    await rpc.call("invalidateblock", block)
    await rpc.call("generateblock", await rpc.call("getnewaddress"), [])
    await browser.wait_for("window.paystream.state === 'reorg'", what="funding_lost")
    assert (await browser.text("#status")).startswith(
        "The funding lost its confirmations (reorg): waiting")
    seq = await browser.js("return window.paystream.seq;")
    await asyncio.sleep(1.0)
    assert await browser.js("return window.paystream.seq;") == seq  # nothing paid meanwhile
    plays = len(await browser.js("return window.paystream.plays;"))
    await mine(rpc)  # the funding confirmed again, on the new branch
    await browser.wait_for(f"window.paystream.state === 'ready' && window.paystream.plays.length "
                           f"> {plays}", what="ready again and a new play")
    replay = (await browser.js("return window.paystream.plays;"))[-1]
    assert replay["media"] == "clip" and replay["start_ms"] > 0  # where it was, not the start
    await browser.wait_for(f"{VIDEO}.currentTime > {replay['start_ms'] / 1000 + 0.5}",
                           what="playback after the replay")
    await rpc.close()


async def test_a_later_visit_after_the_gateway_settled_keeps_the_record_until_confirmed(
    gateway, browser
):
    """Kept open and left: the gateway settles after the resume grace; the next visit
    cannot resume it, keeps its record, checks the settlement and forgets it once mined."""
    rpc = node_rpc(gateway)
    state = await open_and_fund(browser, gateway, "/watch/clip")
    await browser.wait_for("window.paystream.paid > 0", what="the reserve paid")
    await browser.click("#close-on-leave")  # leave without `close`
    await browser.get("about:blank")
    channel_id = state["channelId"]
    deadline = time.monotonic() + 20
    while not gateway.store.read("SELECT settle_txid FROM channels WHERE channel_id = ? AND "
                                 "settle_txid IS NOT NULL", (channel_id,)):
        assert time.monotonic() < deadline, "the gateway did not settle after the grace"
        await asyncio.sleep(0.1)
    await browser.get(url(gateway, "/watch/clip"))
    # A new channel is offered; the old one's record stays until its money is back.
    await browser.wait_for("window.paystream.state === 'budget'", what="a new budget")
    rec = await wait_record(browser, f"r.key === '{channel_id}' && r.settlement && "
                            "r.settlement.check", "the old record, checked")
    assert rec["settlement"]["check"]["ok"] and rec["status"] == "settling"
    await mine(rpc)
    await browser.wait_for("window.paystreamRecords.records().then(rs => rs.length === 0)",
                           what="the record deleted once the settlement confirmed")
    assert "Settled in" in await browser.text("#history")
    await rpc.close()


async def test_a_version_1_record_is_moved_into_the_records_and_can_refund(gateway, browser):
    """The page's first version kept one channel per host in `kv`: it is kept, not lost."""
    import coincurve

    k1 = coincurve.PrivateKey()
    k2 = coincurve.PrivateKey().public_key.format(compressed=True)
    pub = k1.public_key.format(compressed=True)
    script = ChannelScript.make("cltv", pub, k2, 1_000)
    change = b"\x00\x14" + hashlib.new("ripemd160", hashlib.sha256(pub).digest()).digest()
    channel_id = f"{'ab' * 32}:1"
    old = {"channel_id": channel_id, "kind": "cltv", "expiry": 1_000, "value": 20_000,
           "balance": 19_000, "seq": 3, "budget": 20_000, "network": "regtest",
           "witness_script": script.witness_script.hex(), "change_script": change.hex(),
           "meter": {"bill": "0", "reserve": 282, "rates": {}, "free": {}, "used": {}},
           "media": "clip"}
    await browser.get(url(gateway, "/dashboard"))  # this origin, no IndexedDB opened yet
    await browser.js(
        "const [k1, key, old] = arguments; return new Promise((ok, fail) => {"
        "const r = indexedDB.open('paystream', 1);"
        "r.onupgradeneeded = () => r.result.createObjectStore('kv');"
        "r.onsuccess = () => { const tx = r.result.transaction('kv', 'readwrite');"
        "tx.objectStore('kv').put(k1, 'k1'); tx.objectStore('kv').put(old, key);"
        "tx.oncomplete = () => { r.result.close(); ok(true); }; tx.onerror = fail; };"
        "r.onerror = fail; });",
        k1.secret.hex(), f"channel:127.0.0.1:{gateway.port}", old)
    await browser.get(url(gateway, "/"))
    rec = await wait_record(browser, "r.signed_refund", "the kept record, with its refund")
    assert rec["key"] == channel_id and (rec["value"], rec["balance"], rec["seq"]) == (
        20_000, 19_000, 3)
    assert rec["client_pubkey"] == pub.hex() and rec["server_pubkey"] == k2.hex()
    assert rec["exit_fee"] == 282 and rec["funding_script"] == script.script_pubkey.hex()
    # The gateway never saw it: nothing will settle it, and its refund is valid.
    assert rec["status"] == "refund_wait"
    assert kernel_verify(bytes.fromhex(rec["signed_refund"]), [(script.script_pubkey, 20_000)])
    left = await browser.js(
        "return new Promise(ok => { const r = indexedDB.open('paystream');"
        "r.onsuccess = () => { const q = r.result.transaction('kv').objectStore('kv')"
        ".getAllKeys(); q.onsuccess = () => { ok(q.result); r.result.close(); }; }; });")
    assert left == ["k1"]  # the old key moved; K1 is the same one
