"""The front end's pages: the catalog with what sessions cost, the player, the dashboard."""

from __future__ import annotations

import html
import time
from fractions import Fraction
from typing import Any

from aiohttp import web

from gateway.chain.rpc import RpcException
from gateway.protocol.messages import ChannelKind
from gateway.protocol.metering import charged_ms, total_due
from gateway.protocol.scripts import ChannelScript
from gateway.protocol.settlement import exit_fee, exit_vbytes
from gateway.web.context import WebContext
from gateway.web.http import not_found_page, page

#: Session lengths the catalog page prices (minutes), besides the whole item.
SESSION_MINUTES = (5, 30)
#: The key and expiry distance of the example channel whose exit /api/chain
#: prices: the generator point's SEC encoding (any valid key has the same
#: size), and the browser player's default expiry of a day (a time expiry,
#: whose script number is as long as the page's own).
_EXAMPLE_KEY = bytes.fromhex(
    "0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798"
)
_EXAMPLE_EXPIRY_S = 86_400
#: P2WPKH: the change script the browser player uses (its own key's).
_P2WPKH_EXAMPLE = b"\x00\x14" + bytes(20)


# -- pages -------------------------------------------------------------------------


def session_cost(rate_msat: int, free_ms: int, duration_ms: int, seconds: int) -> int:
    """Sat for the media of the first ``seconds`` of an item played from its start.

    The free allowance costs nothing, the rest ``rate_msat`` per second,
    rounded up once (protocol.md section 7); the reserve is not in it.
    """
    played = min(seconds * 1000, duration_ms)
    return total_due(0, rate_msat, charged_ms(0, played, free_ms))


def exit_estimate(rate: Fraction) -> dict[str, Any]:
    """What leaving costs now: the reserve of a channel opened now, per kind.

    protocol.md section 3: ``exit_fee = ceil(feerate * exit_vbytes)`` at the
    gateway's settlement feerate of the moment (``rate``, sat/vB), for a
    channel like the browser player's (a time expiry a day ahead, P2WPKH
    change). ``terms`` quotes the exact figure of each channel before it is
    funded.
    """
    expiry = int(time.time()) + _EXAMPLE_EXPIRY_S
    exits = {}
    for kind in ChannelKind:
        script = ChannelScript.make(kind, _EXAMPLE_KEY, _EXAMPLE_KEY, expiry)
        vbytes = exit_vbytes(script, _P2WPKH_EXAMPLE)
        exits[kind] = {"vbytes": vbytes, "fee": exit_fee(vbytes, rate)}
    return {"feerate": float(rate), "exit": exits}


async def catalog_page(ctx: WebContext, request: web.Request) -> web.Response:
    """``/``: every item with its price and what sessions of it cost; the viewer's channels."""
    catalog = ctx.library.current()
    try:
        estimate = exit_estimate(await ctx.settler.feerate())
        cltv = estimate["exit"]["cltv"]
        leaving = (
            f'leaving costs about <b>{cltv["fee"]}</b> sat (the network fee to return your '
            f"change: {cltv['vbytes']} vB at <b>{estimate['feerate']:g}</b> sat/vB now)"
        )
    except RpcException:
        leaving = "what leaving costs is not known now (the gateway's node did not answer)"
    rows = []
    for iid in sorted(catalog.items):
        item = catalog.items[iid]
        publisher = catalog.publishers.get(item.publisher)
        costs = [
            session_cost(item.rate_msat, item.free_ms, item.duration_ms, minutes * 60)
            for minutes in SESSION_MINUTES
        ]
        costs.append(session_cost(item.rate_msat, item.free_ms, item.duration_ms,
                                  -(-item.duration_ms // 1000)))
        rows.append(
            f'<tr data-item="{html.escape(iid)}">'
            f'<td><a href="/watch/{html.escape(iid)}">{html.escape(item.title)}</a></td>'
            f"<td>{html.escape(publisher.name if publisher else item.publisher)}</td>"
            f'<td class="num">{item.rate_msat / 1000:g} sat/s</td>'
            f'<td class="num">{item.free_ms / 1000:g} s</td>'
            f'<td class="num">{item.duration_ms / 1000:.0f} s</td>'
            + "".join(f'<td class="num cost">{c} sat</td>' for c in costs)
            + "</tr>"
        )
    minutes = "".join(f"<th>{m} min</th>" for m in SESSION_MINUTES)
    table = (
        '<table id="catalog"><thead><tr><th>Title</th><th>Publisher</th>'
        "<th>Price per second</th><th>Free</th><th>Length</th>"
        f"{minutes}<th>Whole item</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>\n"
        '<p id="costs-note" class="hint">What watching from the start for that long costs '
        "in media: the free seconds cost nothing, then the price per second (an item "
        "shorter than that is the whole item). Each channel also pays its exit reserve "
        f'first, once: <span id="exit-estimate">{leaving}</span>. The rest of your budget '
        "comes back to your key.</p>"
        if rows
        else "<p>The catalog is empty: publish with <code>gateway publish FILE --id ID "
        "--publisher P --rate SAT_PER_S</code>, or add the demo's with "
        "<code>gateway media sample</code> (media/README.md).</p>"
    )
    body = (
        f"<h1>Catalog</h1>\n<p>Network: {html.escape(ctx.network)}</p>\n{table}\n"
        + _live_table(ctx)
        + _RECORDS_SECTION
    )
    return page("Catalog", body, "catalog.js", data={"network": ctx.network})


def _live_table(ctx: WebContext) -> str:
    """The live items: price, and whether each is on air now (``/api/catalog`` says the same)."""
    catalog = ctx.library.current()
    on_air = ctx.on_air.on_air() if ctx.on_air is not None else set()
    rows = []
    for lid in sorted(catalog.live):
        item = catalog.live[lid]
        publisher = catalog.publishers.get(item.publisher)
        state = "on air" if lid in on_air else "off air"
        rows.append(
            f'<tr data-live="{html.escape(lid)}" data-on-air="{str(lid in on_air).lower()}">'
            f'<td><a href="/watch/{html.escape(lid)}">{html.escape(item.title)}</a></td>'
            f"<td>{html.escape(publisher.name if publisher else item.publisher)}</td>"
            f'<td class="num">{item.rate_msat / 1000:g} sat/s</td>'
            f'<td class="num">{item.free_ms / 1000:g} s</td>'
            f'<td class="on-air">{state}</td></tr>'
        )
    if not rows:
        return ""
    return (
        '<h2>Live</h2>\n<table id="live"><thead><tr><th>Title</th><th>Publisher</th>'
        "<th>Price per second</th><th>Free</th><th>Now</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>\n"
        '<p class="hint">A live item is paid per second watched, like any item, from the '
        "first second after its free seconds; when the publisher stops it becomes an item "
        "of the catalog (unless the publisher turned recording off).</p>\n"
    )


#: The viewer's channels kept in this browser (player/web/records.js fills it).
_RECORDS_SECTION = """<section id="records">
  <h2>Your channels in this browser</h2>
  <p class="hint">A channel stays listed here until its money is back with you: its
  settlement confirmed and checked, or its refund confirmed. A channel that nothing will
  settle is refunded by this page once its expiry has passed (open a page of this gateway
  then). The backup holds your key and every channel with its signed refund: with it you
  can refund without this browser, from any node once the expiry has passed. Anyone holding
  it can take the change of your open channels: keep it secret.</p>
  <p id="records-empty">No channel.</p>
  <table id="records-table" hidden><thead><tr><th>Channel</th><th>Kind</th><th>Value</th>
  <th>Paid</th><th>Expiry</th><th>State</th><th></th></tr></thead><tbody></tbody></table>
  <p><button id="backup" type="button">Download backup</button></p>
  <ul id="history"></ul>
</section>
"""


_WATCH_BODY = """<h1 id="title">{title}</h1>
<div class="player">
  <video id="video" controls playsinline></video>
  <div id="overlay" class="overlay" aria-live="polite">
    <span>time <b id="o-time">0.0</b> s</span>
    <span>free left to play <b id="o-free">-</b> s</span>
    <span>paid for media <b id="o-media">0</b> sat</span>
    <span>exit reserve <b id="o-reserve">0</b> sat</span>
    <span>balance <b id="o-balance">-</b> sat</span>
    <span>rate <b id="o-rate">-</b> sat/s</span>
  </div>
</div>
<p id="status" class="status">Starting…</p>
<p id="lead" class="hint"></p>
<section id="budget" hidden>
  <h2>Confirm a budget</h2>
  <p>You fund a payment channel once; each second of media is then paid from it
  as you watch, never above the advertised rate. What you do not spend comes back
  to your own key when you leave, less the exit reserve (the network fee that returns it).</p>
  <p id="costs"></p>
  <form id="budget-form">
    <label>Channel <select id="kind">
      <option value="cltv" selected>cltv: you refund alone after expiry</option>
      <option value="multisig">multisig: the gateway signs your refund before you fund</option>
    </select></label>
    <label>Budget <input id="budget-sat" type="number" min="1" step="1" required> sat</label>
    <button id="budget-ok" type="submit">Confirm budget and open a channel</button>
  </form>
  <p class="hint" id="budget-hint"></p>
</section>
<section id="funding" hidden>
  <h2>Fund the channel</h2>
  <p id="reserve-line"></p>
  <div id="fund-address-panel">
    <p>Send <b id="fund-amount"></b> BTC to <code id="fund-address"></code> from any wallet.
    The gateway watches the address.</p>
    <img id="fund-qr" alt="QR code of the payment URI">
    <p><code id="fund-uri"></code></p>
  </div>
  <div id="fund-t1-panel" hidden>
    <p>A multisig channel's refund must be signed by the gateway before its funding
    transaction (T1) is broadcast. Make T1 with your wallet, paying <b id="t1-amount"></b>
    sat to <code id="t1-address"></code> from segwit outputs only, signed but not
    broadcast, and paste it here; the page gets the refund signed and stored, then the
    gateway broadcasts T1.</p>
    <textarea id="t1-hex" rows="3" cols="60"></textarea>
    <button id="t1-use" type="button">Use this transaction</button>
  </div>
  <p><button id="faucet" type="button" hidden>Fund from demo faucet</button></p>
</section>
<section id="controls">
  <span id="channel-controls" hidden>
    <button id="stop" type="button">Stop</button>
    <button id="leave" type="button">Close channel</button>
    <select id="switch"></select>
  </span>
  <label><input id="close-on-leave" type="checkbox" checked> Close the channel when I leave</label>
</section>
"""


async def watch_page(ctx: WebContext, request: web.Request) -> web.Response:
    """``/watch/<id>``: the browser player (player/web/player.js)."""
    media = request.match_info["media"]
    catalog = ctx.library.current()
    item = catalog.items.get(media) or catalog.live.get(media)
    if item is None:
        return not_found_page(f"No media {media!r} in the catalog.")
    body = _WATCH_BODY.replace("{title}", html.escape(item.title)) + _RECORDS_SECTION
    live = "1" if media in catalog.live else ""
    return page(item.title, body, "player.js",
                 data={"media": item.id, "network": ctx.network, "live": live})


_GOLIVE_BODY = """<h1>Go live: <span id="live-title">{title}</span></h1>
<p>Publish your camera and microphone to this live item over WHIP. Viewers pay
per second they watch; <span id="live-record">{record}</span></p>
<form id="golive-form">
  <label>Publisher token <input id="golive-token" type="password" autocomplete="off"
  required></label>
  <button id="golive-start" type="submit">Go live</button>
  <button id="golive-stop" type="button" hidden>Stop</button>
</form>
<p class="hint">The token is shown by <code>gateway publisher token {publisher}</code>.
OBS Studio 30+ publishes the same way: Settings → Stream → Service: WHIP, Server:
<code id="golive-url">/whip/{id}</code>, Bearer Token: the same token.</p>
<video id="preview" muted playsinline autoplay></video>
<p id="golive-status" class="status">Off air.</p>
"""


async def golive_page(ctx: WebContext, request: web.Request) -> web.Response:
    """``/golive/<live-id>``: a publisher goes live from the browser (player/web/golive.js)."""
    live_id = request.match_info["live_id"]
    item = ctx.library.current().live.get(live_id)
    if item is None:
        return not_found_page(f"No live item {live_id!r} in the catalog.")
    record = (
        "when you stop, the stream becomes an item of the catalog at the same price."
        if item.record
        else "the stream is not recorded."
    )
    body = (
        _GOLIVE_BODY.replace("{title}", html.escape(item.title))
        .replace("{record}", record)
        .replace("{publisher}", html.escape(item.publisher))
        .replace("{id}", html.escape(item.id))
    )
    return page(f"Go live: {item.title}", body, "golive.js", data={"live": item.id})


_DASHBOARD_BODY = """<h1>Dashboard</h1>
<form id="login" hidden>
  <label>Operator token <input id="token" type="password" autocomplete="current-password"
  required></label> <button type="submit">Sign in</button>
  <p class="hint">The token is in the gateway's data dir (<code>operator-token</code>).</p>
</form>
<p id="dash-status" class="status"></p>
<div id="dash" hidden>
  <p><button id="logout" type="button">Sign out</button>
  <button id="refresh" type="button">Refresh</button></p>
  <h2>Earnings over time</h2>
  <div id="plot" class="plot"></div>
  <p class="hint">Billed: the price of every chunk delivered (the free seconds cost
  nothing). Not yet settled: billed in channels still open or waiting for their batch.
  Lost: billed in channels that will never settle (the viewer refunded at expiry).
  Settled: what viewers paid for media in settlement batches broadcast or confirmed.
  Fees: the part of those batches' network fees the publishers' share paid (the viewers'
  reserves paid the rest). Paid out: the outputs paying the publisher in those batches.
  A channel still playing counts as of its last payment (the chunk sent since is
  recorded with the next one).</p>
  <h2>Earnings per publisher</h2>
  <table id="publishers"><thead><tr><th>Publisher</th><th>Billed sat</th>
  <th>Not yet settled sat</th><th>Lost sat</th><th>Settled sat</th><th>Fees sat</th>
  <th>Paid out on chain sat</th><th>Media seconds</th></tr></thead><tbody></tbody></table>
  <h2>Earnings per item</h2>
  <table id="items"><thead><tr><th>Item</th><th>Publisher</th><th>Billed sat</th>
  <th>Not yet settled sat</th><th>Lost sat</th><th>Settled sat</th><th>Fees sat</th>
  <th>Media seconds</th><th>Channels</th></tr></thead><tbody></tbody></table>
  <h2>Live items</h2>
  <table id="live"><thead><tr><th>Live item</th><th>Now</th><th>Viewers</th>
  <th>Paid seconds</th><th>Earned sat</th><th>WHIP server</th><th>Bearer token</th>
  <th></th></tr></thead><tbody></tbody></table>
  <p class="hint">Live figures since the gateway started, updated every two seconds;
  the earnings tables count live items too, as of each channel's last payment.
  OBS Studio: Settings → Stream → Service: WHIP, Server: the WHIP server, Bearer Token:
  the token. Or go live from this browser.</p>
  <form id="live-add">
    <label>Id <input id="live-id" required></label>
    <label>Title <input id="live-title-in"></label>
    <label>Publisher <input id="live-publisher" required></label>
    <label>Rate sat/s <input id="live-rate" class="rate" required></label>
    <label>Free s <input id="live-free" class="rate" value="60"></label>
    <label><input id="live-record" type="checkbox" checked> Record</label>
    <button type="submit">Add live item</button>
  </form>
  <h2>Rates</h2>
  <table id="rates"><thead><tr><th>Item</th><th>Rate sat/s</th><th>Free s</th><th></th>
  </tr></thead><tbody></tbody></table>
  <h2>Open channels</h2>
  <table id="channels"><thead><tr><th>Channel</th><th>State</th><th>Value</th><th>Paid</th>
  <th>Expiry</th><th>Viewer</th></tr></thead><tbody></tbody></table>
  <h2>Recent settlement batches</h2>
  <table id="settlements"><thead><tr><th>Broadcast</th><th>Txid</th><th>Channels</th>
  <th>Paid by viewers sat</th><th>Fee sat</th><th>Feerate sat/vB</th><th>Confirmations</th>
  <th>State</th></tr></thead><tbody></tbody></table>
</div>
"""


async def dashboard_page(ctx: WebContext, request: web.Request) -> web.Response:
    """``/dashboard``: the operator's page (its data comes from ``/api/dashboard/*``)."""
    return page("Dashboard", _DASHBOARD_BODY, "dashboard.js")


