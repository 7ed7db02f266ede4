"""The operator dashboard and the web front end's HTTP endpoints (gateway/web/).

The dashboard test runs a completed session with the Python test viewer,
then checks in headless Chromium that it appears with its earnings and
settlement, that the plot renders, and that a rate edited on the page
applies to the next ``play``. The HTTP tests check the endpoints' guards:
operator token, methods, the regtest faucet's limits, static file paths.
"""

from __future__ import annotations

import asyncio
import json
import time
import tomllib
import urllib.error
import urllib.request
from typing import Any

from conftest_gateway import PUBLISHERS, Viewer, node_rpc, ws_url
from helpers_chain import get_transaction

from gateway.chain.watch import btc_to_sat
from gateway.protocol.messages import Play, Stream
from gateway.protocol.metering import total_due
from gateway.protocol.scripts import address_to_script_pubkey
from gateway.server import Gateway
from gateway.web import CSP


def url(gw: Gateway, path: str) -> str:
    """A URL on the gateway's port."""
    return f"http://127.0.0.1:{gw.port}{path}"


async def http(
    gw: Gateway, path: str, *, method: str = "GET", token: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request, without blocking the gateway's loop."""
    request = urllib.request.Request(url(gw, path), method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")

    def fetch() -> tuple[int, dict[str, str], bytes]:
        try:
            with urllib.request.urlopen(request, timeout=20) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    return await asyncio.to_thread(fetch)


def js_number(x: float) -> str:
    """``String(x)`` in JavaScript for the numbers shown here."""
    return str(int(x)) if x == int(x) else repr(x)


async def completed_session(gw: Gateway) -> tuple[str, int, str]:
    """A viewer watches all of ``clip`` and closes; the settlement is mined and followed."""
    rpc = node_rpc(gw)
    viewer = Viewer(ws_url(gw), rpc)
    await viewer.connect()
    ready = await viewer.open_and_fund()
    await viewer.play_and_pay("clip")
    closed = await viewer.close_channel()
    assert closed.txid is not None
    await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
    deadline = time.monotonic() + 10
    while gw.channels.get(ready.channel_id) is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.1)  # the settlement duty sees the confirmation
    await rpc.close()
    return ready.channel_id, closed.paid, closed.txid


async def test_dashboard_shows_a_completed_session_plot_and_edits_rates(gateway, browser):
    """Login; per item and publisher billed, not yet settled, settled, fees and paid out,
    each equal to the store or the chain; batches; the plot's two series; a rate edit."""
    channel_id, paid, txid = await completed_session(gateway)
    clip = gateway.catalog.items["clip"]
    billed = 300_000 * (clip.duration_ms - 3000) / 1_000_000  # sat, to the msat
    reserve = gateway.store.read("SELECT exit_fee FROM channels")[0]["exit_fee"]
    assert paid == reserve + total_due(0, 300_000, clip.duration_ms - 3000) > reserve > 0
    # The settlement on chain: the viewer's funding in, the change, the studio's payout, the fee.
    rpc = node_rpc(gateway)
    tx = await get_transaction(rpc, txid)
    value = gateway.store.read("SELECT value FROM channels WHERE channel_id = ?",
                               (channel_id,))[0]["value"]
    outputs = [(o["scriptPubKey"]["hex"], btc_to_sat(o["value"])) for o in tx["vout"]]
    fee = value - sum(amount for _, amount in outputs)
    studio_script = address_to_script_pubkey(PUBLISHERS["studio"], "regtest").hex()
    paid_out = sum(amount for spk, amount in outputs if spk == studio_script)
    media = paid - reserve
    assert 0 < paid_out <= media and fee >= reserve

    # A second viewer is still watching the song: billed, not settled yet.
    watching = Viewer(ws_url(gateway), rpc)
    await watching.connect()
    song_ready = await watching.open_and_fund()
    await watching.play_and_pay("song", chunks=3)
    # The dashboard reads the store: a live channel's bill as of its last
    # increment (the chunk sent since is written with the next one).
    live = gateway.channels[song_ready.channel_id]
    song_bill = gateway.store.read("SELECT bill FROM deliveries WHERE channel = ?",
                                   (live.row_id,))[0]["bill"]
    assert 0 < song_bill <= live.meter.bill

    await browser.get(url(gateway, "/dashboard"))
    await browser.wait_for("!document.getElementById('login').hidden", what="the login form")
    await browser.type("#token", "wrong")
    await browser.click("#login button")
    await browser.wait_for("document.getElementById('dash-status').textContent.includes("
                           "'refused')", what="the refused token")
    await browser.type("#token", gateway.operator_token)
    await browser.click("#login button")
    await browser.wait_for("window.paystreamDashboard.loaded >= 1", what="the dashboard data")

    def table(name: str) -> str:
        return (f"return [...document.querySelectorAll('#{name} tbody tr')].map(r => "
                "[...r.cells].map(c => c.textContent));")

    items = await browser.js(table("items"))
    song_sat = js_number(round(song_bill / 1_000_000, 3))
    clip_row = ["Clip", "studio", js_number(billed), "0", "0", str(media), str(media - paid_out),
                f"{clip.duration_ms / 1000:.1f}", "1"]
    assert clip_row in items, items
    song_row = next(i for i in items if i[0] == "Song")
    assert song_row[2:7] == [song_sat, song_sat, "0", "0", "0"], song_row
    publishers = await browser.js(table("publishers"))
    studio = next(p for p in publishers if p[0] == "Studio")
    assert studio[1:7] == [js_number(billed), "0", "0", str(media), str(media - paid_out),
                           str(paid_out)], studio
    label = next(p for p in publishers if p[0] == "Label")
    assert label[1:7] == [song_sat, song_sat, "0", "0", "0", "0"], label
    settlements = await browser.js(table("settlements"))
    assert len(settlements) == 1
    _, shown_txid, count, shown_paid, shown_fee, feerate, confirmations, state = settlements[0]
    assert (shown_txid, count, shown_paid, shown_fee, confirmations, state) == (
        txid, "1", str(paid), str(fee), "1", "confirmed")
    assert float(feerate) == round(fee / tx["vsize"], 2)
    # The plot: one settlement → one dot and a step line; billed-not-settled its own line.
    plot = await browser.js(
        "const s = document.querySelector('#plot svg'); return s && {dots: "
        "s.querySelectorAll('circle').length, path: s.querySelector('path.line')"
        ".getAttribute('d'), unsettled: !!s.querySelector('path.line.unsettled'), "
        "labels: [...s.querySelectorAll('text')].map(t => t.textContent)};"
    )
    assert plot["dots"] == 1 and plot["path"].count("L") == 3 and plot["unsettled"]
    assert paid > song_bill / 1_000_000 and str(paid) in plot["labels"]  # the y axis' top
    series = await browser.js("return window.paystreamDashboard.data.settlements;")
    assert series["series"][-1]["total"] == paid
    assert series["unsettled_series"][-1]["unsettled"] == round(song_bill / 1_000_000, 3)
    await browser.screenshot("dashboard.png")
    await watching.close_channel()

    # Edit the clip's rate on the page: catalog.toml changes, the next play uses it.
    await browser.type("input[name=rate-clip]", "2.5")
    await browser.click("button[name=save-clip]")
    await browser.wait_for("document.getElementById('dash-status').textContent"
                           ".includes('saved')", what="the saved rate")
    saved = tomllib.loads((gateway.catalog.media_dir / "catalog.toml").read_text())
    assert saved["items"]["clip"]["rate_msat"] == 2500
    assert saved["items"]["song"]["rate_msat"] == 150_500  # the other item untouched
    viewer = Viewer(ws_url(gateway), node_rpc(gateway))
    await viewer.connect()
    await viewer.open_and_fund()
    await viewer.send(Play(media="clip"))
    stream = await viewer.expect(Stream)
    assert viewer.channel is not None
    viewer.channel.on_stream(stream)
    assert stream.rate_msat == 2500 and stream.free_ms == 3000
    await viewer.close_channel()
    await viewer.rpc.close()
    await rpc.close()


async def test_dashboard_api_needs_the_operator_token(gateway):
    """Earnings are private: 401 without the token; a rate edit must be a POST."""
    for name in ("earnings", "channels", "settlements", "rates"):
        status, headers, _ = await http(gateway, f"/api/dashboard/{name}")
        assert status == 401
        status, headers, body = await http(gateway, f"/api/dashboard/{name}",
                                           token=gateway.operator_token)
        assert status == 200 and headers["Cache-Control"] == "no-store", body
    token = gateway.operator_token
    status, _, _ = await http(gateway, "/api/dashboard/rate?item=clip&rate=1", token=token)
    assert status == 405
    status, _, body = await http(gateway, "/api/dashboard/rate?item=clip&rate=-1",
                                 method="POST", token=token)
    assert status == 400 and b"rate" in body
    status, _, _ = await http(gateway, "/api/dashboard/rate?item=nope&rate=1", method="POST",
                              token=token)
    assert status == 404
    status, _, body = await http(gateway, "/api/dashboard/rate?item=song&rate=0.25"
                                 "&free_seconds=10", method="POST", token=token)
    assert status == 200 and json.loads(body) == {"id": "song", "rate_msat": 250,
                                                  "rate": 0.25, "free_ms": 10_000}
    song = gateway.catalog_item("song")
    assert song is not None and song.rate_msat == 250


async def test_faucet_pays_only_an_unfunded_channel_within_limits(gateway):
    """regtest only, POST only, the funding address of an open channel, once, within limits."""
    import coincurve

    from gateway.protocol.channel import ClientChannel
    from gateway.protocol.messages import Terms
    from gateway.protocol.scripts import address_to_script_pubkey

    stranger = await node_rpc(gateway).call("getnewaddress")
    status, _, body = await http(gateway, f"/api/faucet?address={stranger}&amount=20000",
                                 method="POST")
    assert status == 400 and b"unfunded channel" in body

    viewer = Viewer(ws_url(gateway), node_rpc(gateway))
    hello = await viewer.connect()
    channel = ClientChannel(coincurve.PrivateKey().secret, hello, budget=20_000)
    await viewer.send(channel.open(expiry=int(time.time()) + 6 * 3600,
                                   change_script=address_to_script_pubkey(stranger, "regtest")))
    terms = await viewer.expect(Terms)
    address = terms.funding_address
    status, _, _ = await http(gateway, f"/api/faucet?address={address}&amount=20000")
    assert status == 405
    too_much = gateway.limits.max_value + 1
    status, _, _ = await http(gateway, f"/api/faucet?address={address}&amount={too_much}",
                              method="POST")
    assert status == 400
    status, _, body = await http(gateway, f"/api/faucet?address={address}&amount=20000",
                                 method="POST")
    assert status == 200, body
    paid = json.loads(body)
    tx = await get_transaction(viewer.rpc, paid["txid"])
    out = tx["vout"][paid["vout"]]
    assert out["scriptPubKey"]["hex"] == terms.funding_script.hex()
    assert round(out["value"] * 100_000_000) == 20_000
    status, _, _ = await http(gateway, f"/api/faucet?address={address}&amount=20000",
                              method="POST")
    assert status == 409
    await viewer.disconnect()
    await viewer.rpc.close()


async def test_pages_and_static_files(gateway):
    """Pages carry the CSP; static and vendor files are served, nothing outside them."""
    status, headers, body = await http(gateway, "/")
    assert status == 200 and headers["Content-Security-Policy"] == CSP
    assert b'href="/watch/clip"' in body and b"Studio" in body
    status, _, body = await http(gateway, "/watch/clip")
    assert status == 200 and b'data-media="clip"' in body and b"importmap" in body
    status, _, _ = await http(gateway, "/watch/nope")
    assert status == 404
    status, headers, body = await http(gateway, "/web/paystream.js")
    assert status == 200 and headers["Content-Type"] == "text/javascript"
    status, headers, _ = await http(gateway, "/web/vendor/@noble/curves/secp256k1.js")
    assert status == 200 and headers["Content-Type"] == "text/javascript"
    status, _, _ = await http(gateway, "/web/vendor/@scure/base/index.js")
    assert status == 200
    bad: list[Any] = [
        "/web/../gateway/web.py", "/web/package.json", "/web/node_modules/x.js",
        "/web/vendor/@noble/curves/../../../../gateway/web.py",
        "/web/vendor/@noble/curves/package.json", "/web/vendor/left-pad/index.js",
        "/web/test/vectors.test.js",
    ]
    for path in bad:
        status, _, _ = await http(gateway, path)
        assert status == 404, path


async def test_unknown_pages_are_html_404s_and_api_paths_stay_json(gateway):
    """Issue 14 item 16: a page for a person (with the way back), JSON for programs."""
    for path, name in (("/watch/nope", b"nope"), ("/nowhere", b"/nowhere")):
        status, headers, body = await http(gateway, path)
        assert status == 404, path
        assert headers["Content-Type"] == "text/html; charset=utf-8"
        assert headers["Content-Security-Policy"] == CSP
        assert name in body and b'<a href="/">the catalog</a>' in body
    status, _, body = await http(gateway, "/watch/%3Cscript%3E")
    assert status == 404 and b"<script>" not in body and b"&lt;script&gt;" in body
    for path in ("/api/nope", "/api/dashboard/nope", "/web/nope.js"):
        status, headers, body = await http(gateway, path)
        assert status == 404 and headers["Content-Type"] == "application/json", path
        assert json.loads(body)["error"]


async def test_an_empty_catalog_page_names_the_command_that_fills_it(gateway_factory, tmp_path):
    gw = await gateway_factory(media=tmp_path / "empty")
    status, _, body = await http(gw, "/")
    assert status == 200
    assert b"<code>gateway publish FILE" in body and b"gateway media sample" in body
