"""The gateway's web front end: the browser player, the publisher/operator
dashboard and their JSON endpoints (docs/web.md).

Theory of operation
-------------------

``gateway/server.py`` serves ``/paystream/2``, ``/api/health``,
``/api/catalog`` and ``/api/admin/settle`` itself and hands every other path
to :func:`handle_http`, which answers a :class:`~websockets.http11.Response`
or ``None`` ("not mine": the server answers 404).

* Pages: ``/`` (the catalog, rendered here), ``/watch/<id>`` (the player),
  ``/dashboard``. Each page carries an import map that points the browser's
  bare module names (``@noble/curves/…``) at ``/web/vendor/…``, which serves
  the files ``npm ci`` installed under ``player/web/node_modules`` — pinned by
  ``package-lock.json``; no CDN and no bundler at run time. A strict
  Content-Security-Policy allows only this origin's scripts plus the import
  map's own hash.
* ``POST /api/faucet`` exists only on regtest: it pays the funding address of
  a channel that was opened and not yet funded (nothing else), once, an
  amount inside the advertised limits, from the node's wallet; with
  ``broadcast=0`` it answers a signed T1 instead, for a multisig channel
  whose refund the gateway must sign before T1 is broadcast.
* The page has no node of its own: ``GET /api/chain`` tells it the tip (so
  it knows when a refund is final) and what leaving costs now;
  ``POST /api/refund`` relays a refund, and nothing but a transaction that
  spends the funding output of a channel this gateway knows; ``GET
  /api/channel/<id>`` says where a channel's money went.
* ``/api/dashboard/*`` need ``Authorization: Bearer <operator token>``:
  earnings are private. Rates are edited through the catalog API, which
  writes ``catalog.toml`` atomically; the gateway re-reads it at the next
  ``play`` (a rate change applies to new plays, protocol.md ``stream``).

websockets accepts no request body, so POST endpoints take query parameters.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import json
import logging
import mimetypes
import re
import time
import weakref
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote

import coincurve
from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxInWitness, CTxOut, CTxWitness, b2lx, lx
from bitcoin.core.script import (
    OP_CHECKSIG,
    OP_DUP,
    OP_EQUALVERIFY,
    OP_HASH160,
    SIGHASH_ALL,
    SIGVERSION_WITNESS_V0,
    CScript,
    CScriptWitness,
    SignatureHash,
)
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from gateway.chain.rpc import RpcError, RpcException, RpcVerifyAlreadyInChain
from gateway.chain.watch import btc_to_sat
from gateway.media.catalog import (
    Catalog,
    parse_rate,
    parse_seconds,
    set_price,
)
from gateway.media.segment import MediaError
from gateway.protocol.metering import charged_ms, total_due
from gateway.protocol.scripts import ChannelScript, address_to_script_pubkey
from gateway.protocol.settlement import exit_fee, exit_vbytes
from gateway.protocol.signatures import sign_digest
from gateway.protocol.transactions import find_funding_output, parse_tx, txid_of

if TYPE_CHECKING:
    from gateway.server import Gateway

log = logging.getLogger(__name__)

#: The browser player's static files and its npm packages (node_modules).
WEB_DIR = Path(__file__).resolve().parent.parent / "player" / "web"
#: npm packages the pages import (package.json); nothing else under node_modules is served.
VENDOR_PACKAGES = ("@noble/curves", "@noble/hashes", "@scure/base", "qrcode-generator")
IMPORT_MAP = json.dumps(
    {
        "imports": {
            "@noble/curves/": "/web/vendor/@noble/curves/",
            "@noble/hashes/": "/web/vendor/@noble/hashes/",
            "@scure/base": "/web/vendor/@scure/base/index.js",
            "qrcode-generator": "/web/vendor/qrcode-generator/dist/qrcode.mjs",
        }
    },
    separators=(",", ":"),
)
_IMPORT_MAP_HASH = base64.b64encode(hashlib.sha256(IMPORT_MAP.encode()).digest()).decode()
CSP = (
    "default-src 'none'; "
    f"script-src 'self' 'sha256-{_IMPORT_MAP_HASH}'; "
    "style-src 'self'; img-src 'self' data:; media-src 'self' blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_STATIC_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*\.(?:js|css|svg)")
_VENDOR_PATH = re.compile(r"(?:[A-Za-z0-9_.-]+/)*[A-Za-z0-9_-][A-Za-z0-9_.-]*\.m?js")
_TYPES = {".js": "text/javascript", ".mjs": "text/javascript", ".css": "text/css",
          ".svg": "image/svg+xml"}
#: How many settlements the dashboard lists (newest first).
RECENT_SETTLEMENTS = 50
#: Funding addresses the demo faucet already paid, per gateway (once per channel).
_FAUCET_PAID: weakref.WeakKeyDictionary[Gateway, set[str]] = weakref.WeakKeyDictionary()
#: Session lengths the catalog page prices (minutes), besides the whole item.
SESSION_MINUTES = (5, 30)
#: A refund is one input and one output: no honest one comes near this size.
MAX_REFUND_BYTES = 4096
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
_TXID = re.compile(r"[0-9a-f]{64}")


class HttpError(Exception):
    """An HTTP error answer with a JSON ``{"error": message}`` body."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def handle_http(gateway: Gateway, request: Request) -> Response | None:
    """Answer a request for a front-end path; ``None`` if the path is not one."""
    path, _, query = request.path.partition("?")
    try:
        route = _route(path)
        if route is None:
            if path.startswith(("/api/", "/web/", "/paystream/")):
                return None  # programs ask these: the server answers in JSON
            return _not_found_page(f"There is no page {unquote(path)} here.")
        handler, arg = route
        return await handler(gateway, request, arg, _query(query))
    except HttpError as exc:
        return json_response(exc.status, {"error": exc.message})
    except RpcException as exc:  # the node did not answer: nothing was done
        log.warning("%s: the node failed: %s", path, exc)
        return json_response(HTTPStatus.SERVICE_UNAVAILABLE,
                             {"error": "the gateway's node did not answer; try again"})


def _route(path: str) -> tuple[Any, str] | None:
    if path == "/":
        return _index, ""
    if path.startswith("/watch/"):
        return _watch, unquote(path[len("/watch/") :])
    if path == "/dashboard":
        return _dashboard_page, ""
    if path.startswith("/web/vendor/"):
        return _vendor, path[len("/web/vendor/") :]
    if path.startswith("/web/"):
        return _static, path[len("/web/") :]
    if path == "/api/faucet":
        return _faucet, ""
    if path == "/api/chain":
        return _chain_api, ""
    if path == "/api/refund":
        return _refund_api, ""
    if path.startswith("/api/channel/"):
        return _channel_api, unquote(path[len("/api/channel/") :])
    if path.startswith("/api/dashboard/"):
        name = path[len("/api/dashboard/") :]
        if name in _DASHBOARD:
            return _dashboard_api, name
    return None


def _query(query: str) -> dict[str, str]:
    # Last value wins; blank values are kept so that "rate=" is an error, not absent.
    return {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}


def _method(request: Request, *allowed: str) -> None:
    if request.method not in allowed:
        raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"use {' or '.join(allowed)}")


# -- responses ---------------------------------------------------------------------


def json_response(status: HTTPStatus, body: Any) -> Response:
    """A JSON answer that no cache keeps (earnings are private)."""
    return _response(status, json.dumps(body, default=str).encode(), "application/json")


def _response(
    status: HTTPStatus, body: bytes, content_type: str, cache: str = "no-store"
) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", cache),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
        ]
    )
    if content_type.startswith("text/html"):
        headers["Content-Security-Policy"] = CSP
    return Response(status.value, status.phrase, headers, body)


def _page(
    title: str,
    body: str,
    script: str | None,
    *,
    data: dict[str, str] | None = None,
    status: HTTPStatus = HTTPStatus.OK,
) -> Response:
    attrs = "".join(f' data-{k}="{html.escape(v)}"' for k, v in (data or {}).items())
    text = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)} · Paystream</title>
<link rel="stylesheet" href="/web/style.css">
<link rel="icon" href="/web/favicon.svg" type="image/svg+xml">
<script type="importmap">{IMPORT_MAP}</script>
{f'<script type="module" src="/web/{script}"></script>' if script else ""}
</head>
<body{attrs}>
<header><a class="brand" href="/">Paystream</a> <a href="/dashboard">dashboard</a></header>
<main>
{body}
</main>
</body>
</html>
"""
    return _response(status, text.encode(), "text/html; charset=utf-8")


def _not_found_page(message: str) -> Response:
    """A 404 for a person: what is missing and the way back (JSON paths keep JSON)."""
    body = (
        f"<h1>Not found</h1>\n<p>{html.escape(message)}</p>\n"
        '<p>See <a href="/">the catalog</a> for what this gateway plays.</p>'
    )
    return _page("Not found", body, None, status=HTTPStatus.NOT_FOUND)


# -- pages -------------------------------------------------------------------------


def _catalog(gateway: Gateway) -> Catalog:
    gateway.catalog = gateway.catalog.reload_if_changed()
    return gateway.catalog


def session_cost(rate_msat: int, free_ms: int, duration_ms: int, seconds: int) -> int:
    """Sat for the media of the first ``seconds`` of an item played from its start.

    The free allowance costs nothing, the rest ``rate_msat`` per second,
    rounded up once (protocol.md section 7); the reserve is not in it.
    """
    played = min(seconds * 1000, duration_ms)
    return total_due(0, rate_msat, charged_ms(0, played, free_ms))


async def exit_estimate(gateway: Gateway) -> dict[str, Any]:
    """What leaving costs now: the reserve of a channel opened now, per kind.

    protocol.md section 3: ``exit_fee = ceil(feerate * exit_vbytes)`` at the
    gateway's settlement feerate of the moment, for a channel like the
    browser player's (a time expiry a day ahead, P2WPKH change). ``terms``
    quotes the exact figure of each channel before it is funded.
    """
    rate = await gateway.settler.feerate()
    expiry = int(time.time()) + _EXAMPLE_EXPIRY_S
    exits = {}
    for kind in ("cltv", "multisig"):
        script = ChannelScript.make(kind, _EXAMPLE_KEY, _EXAMPLE_KEY, expiry)
        vbytes = exit_vbytes(script, _P2WPKH_EXAMPLE)
        exits[kind] = {"vbytes": vbytes, "fee": exit_fee(vbytes, rate)}
    return {"feerate": float(rate), "exit": exits}


async def _index(gateway: Gateway, request: Request, _: str, q: dict[str, str]) -> Response:
    catalog = _catalog(gateway)
    try:
        estimate = await exit_estimate(gateway)
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
        f"<h1>Catalog</h1>\n<p>Network: {html.escape(gateway.network)}</p>\n{table}\n"
        + _RECORDS_SECTION
    )
    return _page("Catalog", body, "catalog.js", data={"network": gateway.network})


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


async def _watch(gateway: Gateway, request: Request, media: str, q: dict[str, str]) -> Response:
    item = _catalog(gateway).items.get(media)
    if item is None:
        return _not_found_page(f"No media {media!r} in the catalog.")
    body = _WATCH_BODY.replace("{title}", html.escape(item.title)) + _RECORDS_SECTION
    return _page(item.title, body, "player.js",
                 data={"media": item.id, "network": gateway.network})


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


async def _dashboard_page(
    gateway: Gateway, request: Request, _: str, q: dict[str, str]
) -> Response:
    return _page("Dashboard", _DASHBOARD_BODY, "dashboard.js")


# -- static files ----------------------------------------------------------------


def _file_response(path: Path, cache: str) -> Response:
    try:
        data = path.read_bytes()
    except OSError:
        raise HttpError(HTTPStatus.NOT_FOUND, "no such file") from None
    ctype = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "text/plain"
    return _response(HTTPStatus.OK, data, ctype, cache)


async def _static(gateway: Gateway, request: Request, name: str, q: dict[str, str]) -> Response:
    if not _STATIC_NAME.fullmatch(name):
        raise HttpError(HTTPStatus.NOT_FOUND, "no such file")
    # Our own files change with the code: the browser revalidates each time.
    return _file_response(WEB_DIR / name, "no-cache")


async def _vendor(gateway: Gateway, request: Request, rest: str, q: dict[str, str]) -> Response:
    package = next((p for p in VENDOR_PACKAGES if rest.startswith(p + "/")), None)
    inner = rest[len(package) + 1 :] if package else ""
    if package is None or ".." in inner.split("/") or not _VENDOR_PATH.fullmatch(inner):
        raise HttpError(HTTPStatus.NOT_FOUND, "no such file")
    root = (WEB_DIR / "node_modules" / package).resolve()
    path = (root / inner).resolve()
    if not path.is_relative_to(root):
        raise HttpError(HTTPStatus.NOT_FOUND, "no such file")
    if not root.is_dir():
        raise HttpError(HTTPStatus.SERVICE_UNAVAILABLE,
                        "player/web/node_modules is missing: run `npm ci --prefix player/web`")
    return _file_response(path, "public, max-age=3600")


# -- demo faucet (regtest only) -----------------------------------------------------


def _int_param(q: dict[str, str], name: str) -> int:
    value = q.get(name, "")
    if not value.isascii() or not value.isdigit() or len(value) > 16:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{name} must be a whole number")
    return int(value)


def _unfunded_addresses(gateway: Gateway) -> dict[str, str]:
    """Funding address -> kind, of every channel opened and not funded yet."""
    rows = gateway.store.read(
        "SELECT kind, client_pubkey, server_pubkey, expiry FROM channels "
        "WHERE state IN ('open', 'refund_signed') AND channel_id IS NULL"
    )
    return {
        ChannelScript.make(
            r["kind"], bytes.fromhex(r["client_pubkey"]), bytes.fromhex(r["server_pubkey"]),
            r["expiry"],
        ).address(gateway.network): r["kind"]
        for r in rows
    }


async def _wallet_pays(gateway: Gateway, script: bytes, amount: int) -> tuple[str, bytes]:
    """The node's wallet pays ``amount`` to ``script`` (broadcast); (txid, raw tx)."""
    # Built, signed and sent here rather than by sendtoaddress: the output
    # index is then known without asking the node where the transaction
    # is (a stock node forgets that once it is mined, without -txindex).
    template = CTransaction([], [CTxOut(amount, CScript(script))], nVersion=2)
    funded = await gateway.rpc.call("fundrawtransaction", template.serialize().hex())
    signed = await gateway.rpc.call("signrawtransactionwithwallet", funded["hex"])
    txid = str(await gateway.rpc.call("sendrawtransaction", signed["hex"]))
    return txid, bytes.fromhex(signed["hex"])


#: The fee of the demo faucet's unbroadcast T1 (one P2WPKH input, one output):
#: comfortably above the fee floor for its size.
_T1_FEE = 500


async def _unbroadcast_t1(gateway: Gateway, script: bytes, amount: int) -> bytes:
    """A signed T1 paying ``amount`` to ``script``, not broadcast (multisig, section 2).

    The wallet first pays a key of this call's own (broadcast), and T1 spends
    that output alone: T1's input is then no coin of the wallet's, which it
    would otherwise spend again before T1 is broadcast (the node's wallet
    cannot lock coins). It spends a segwit output only, so its txid is fixed
    before it is broadcast, as section 2 requires.
    """
    key = coincurve.PrivateKey()
    pub = key.public_key.format(compressed=True)
    keyhash = hashlib.new("ripemd160", hashlib.sha256(pub).digest()).digest()
    own = b"\x00\x14" + keyhash
    txid, raw = await _wallet_pays(gateway, own, amount + _T1_FEE)
    vout = find_funding_output(raw, own)[0]
    unsigned = CTransaction(
        [CTxIn(COutPoint(lx(txid), vout), nSequence=0xFFFFFFFF)],
        [CTxOut(amount, CScript(script))],
        nVersion=2,
    )
    code = CScript([OP_DUP, OP_HASH160, keyhash, OP_EQUALVERIFY, OP_CHECKSIG])
    digest = SignatureHash(code, unsigned, 0, SIGHASH_ALL, amount=amount + _T1_FEE,
                           sigversion=SIGVERSION_WITNESS_V0)
    sig = sign_digest(key.secret, digest) + bytes([SIGHASH_ALL])
    witness = CTxWitness([CTxInWitness(CScriptWitness([sig, pub]))])
    return bytes(CTransaction(unsigned.vin, unsigned.vout, 0, 2, witness).serialize())


async def _faucet(gateway: Gateway, request: Request, _: str, q: dict[str, str]) -> Response:
    """``POST /api/faucet?address=…&amount=SAT[&broadcast=0]``: regtest coins for an
    unfunded channel; with ``broadcast=0`` a signed T1 that is not broadcast."""
    if gateway.network != "regtest":
        raise HttpError(HTTPStatus.NOT_FOUND, "the demo faucet exists only on regtest")
    _method(request, "POST")
    address = q.get("address", "")
    amount = _int_param(q, "amount")
    broadcast = q.get("broadcast", "1")
    if broadcast not in ("0", "1"):
        raise HttpError(HTTPStatus.BAD_REQUEST, "broadcast must be 0 or 1")
    limits = gateway.limits
    if not limits.min_value <= amount <= limits.max_value:
        raise HttpError(
            HTTPStatus.BAD_REQUEST,
            f"amount must be between {limits.min_value} and {limits.max_value} sat",
        )
    paid = _FAUCET_PAID.setdefault(gateway, set())
    if address in paid:
        raise HttpError(HTTPStatus.CONFLICT, "the faucet already paid this channel")
    kind = _unfunded_addresses(gateway).get(address)
    if kind is None:
        raise HttpError(HTTPStatus.BAD_REQUEST,
                        "not the funding address of an open, unfunded channel")
    if kind == "multisig" and broadcast == "1":
        # protocol.md section 2: T1 goes out only once the gateway signed T2.
        raise HttpError(HTTPStatus.BAD_REQUEST, "a multisig channel's funding must not be "
                        "broadcast before its refund is signed: use broadcast=0")
    paid.add(address)
    script = address_to_script_pubkey(address, gateway.network)
    try:
        if broadcast == "0":
            raw = await _unbroadcast_t1(gateway, script, amount)
            txid = txid_of(raw)
        else:
            txid, raw = await _wallet_pays(gateway, script, amount)
    except RpcError as exc:
        paid.discard(address)
        log.warning("demo faucet failed: %s", exc)
        raise HttpError(HTTPStatus.BAD_GATEWAY, "the node's wallet could not pay") from None
    vout = find_funding_output(raw, script)[0]
    answer: dict[str, Any] = {"txid": txid, "vout": vout, "amount": amount}
    if broadcast == "0":
        answer["tx"] = raw.hex()
    return json_response(HTTPStatus.OK, answer)


# -- the chain, for a page that has no node -------------------------------------------


async def _chain_api(gateway: Gateway, request: Request, _: str, q: dict[str, str]) -> Response:
    """``GET /api/chain``: the node's tip and median-time-past, and what leaving costs now.

    A refund with nLockTime ``E`` fits in the next block once that block's
    height is above ``E`` (a height expiry) or once the tip's median-time-past
    is (a time expiry; protocol.md section 2): the page refunds then.
    """
    _method(request, "GET", "HEAD")
    info = await gateway.rpc.call("getblockchaininfo")
    return json_response(
        HTTPStatus.OK,
        {
            "network": gateway.network,
            "height": int(info["blocks"]),
            "median_time": int(info["mediantime"]),
            **await exit_estimate(gateway),
        },
    )


async def _refund_status(gateway: Gateway, txid: str) -> Response:
    if not _TXID.fullmatch(txid):
        raise HttpError(HTTPStatus.BAD_REQUEST, "txid must be 64 lowercase hex digits")
    out = await gateway.rpc.call("gettxout", txid, 0, True)
    return json_response(
        HTTPStatus.OK,
        {
            "txid": txid,
            "seen": out is not None,
            "confirmations": out["confirmations"] if out is not None else None,
            "value": btc_to_sat(out["value"]) if out is not None else None,
            "script": out["scriptPubKey"]["hex"] if out is not None else None,
        },
    )


def _spends_a_channel_script(gateway: Gateway, tx: CTransaction) -> bool:
    """Does ``tx``'s input carry the witness script of a channel this gateway opened?

    For a funding the gateway never saw (paid after the page left, or closed
    before the gateway noticed it): the channel is known by its script, not by
    its outpoint. The node checks that the script is the one the spent output
    pays (P2WSH, BIP141), so such a tx spends nothing but a channel's funding.
    """
    witness = tx.wit.vtxinwit[0].scriptWitness.stack if tx.wit.vtxinwit else []
    script = bytes(witness[-1]) if witness else b""
    if script[:2] == b"\x63\x21":  # cltv: OP_IF <K2> ...
        server = script[2:35]
    elif script[:2] == b"\x52\x21" and script[35:36] == b"\x21":  # OP_2 <K1> <K2> ...
        server = script[36:69]
    else:
        return False
    rows = gateway.store.read(
        "SELECT kind, client_pubkey, server_pubkey, expiry FROM channels "
        "WHERE server_pubkey = ?",
        (server.hex(),),
    )
    for r in rows:
        try:
            known = ChannelScript.make(r["kind"], bytes.fromhex(r["client_pubkey"]), server,
                                       r["expiry"])
        except Exception:  # a row that makes no script cannot match
            continue
        if known.witness_script == script:
            return True
    return False


async def _refund_api(gateway: Gateway, request: Request, _: str, q: dict[str, str]) -> Response:
    """``POST /api/refund?tx=HEX[&channel=TXID:VOUT]``: relay a channel's refund to the node.

    Only a transaction whose one input is the funding output of a channel
    this gateway knows (protocol.md section 2: a refund has exactly that
    input) — by its outpoint, or by the channel's witness script when the
    gateway never saw the funding — never anything else: the gateway is no
    open relay. 400 for what is not such a transaction (or does not spend
    ``channel``), 404 for an output that funds no channel here, 409 with the
    node's reason when it refuses (``non-final`` before the expiry has passed).

    ``GET /api/refund?txid=TXID``: whether that refund's output 0 is on
    chain or in the mempool, what it pays and how deep — a stock node finds
    a transaction by an unspent output of it, without a transaction index.
    """
    if request.method in ("GET", "HEAD"):
        return await _refund_status(gateway, q.get("txid", ""))
    _method(request, "POST")
    raw = q.get("tx", "")
    if not re.fullmatch(r"(?:[0-9a-f]{2})+", raw) or len(raw) > 2 * MAX_REFUND_BYTES:
        raise HttpError(HTTPStatus.BAD_REQUEST, "tx must be a transaction in lowercase hex")
    try:
        parsed = parse_tx(bytes.fromhex(raw))
    except ValueError:
        raise HttpError(HTTPStatus.BAD_REQUEST, "tx is not a transaction") from None
    if len(parsed.vin) != 1:
        raise HttpError(HTTPStatus.BAD_REQUEST,
                        "a refund has one input: the channel's funding output")
    spent = f"{b2lx(parsed.vin[0].prevout.hash)}:{parsed.vin[0].prevout.n}"
    named = q.get("channel", spent)
    if named != spent:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"tx does not spend the funding of {named}")
    if not gateway.known_outpoint(spent) and not _spends_a_channel_script(gateway, parsed):
        raise HttpError(HTTPStatus.NOT_FOUND, f"no channel {named} here")
    try:
        txid = str(await gateway.rpc.call("sendrawtransaction", raw))
    except RpcVerifyAlreadyInChain:
        txid = txid_of(bytes.fromhex(raw))
    except RpcError as exc:
        return json_response(HTTPStatus.CONFLICT,
                             {"error": f"the node refused it: {exc.message}",
                              "reason": exc.message})
    log.info("relayed refund %s of channel %s", txid, spent)
    return json_response(HTTPStatus.OK, {"txid": txid, "channel_id": spent})


# -- a channel's settlement, for its client ----------------------------------------------


async def _channel_api(
    gateway: Gateway, request: Request, channel_id: str, q: dict[str, str]
) -> Response:
    """``GET /api/channel/<txid:vout>``: where a channel's money went (protocol.md section 8).

    For the client that funded it, to follow and check its settlement: the
    state, what was paid (the reserve included), ``settle_by`` while its batch
    is pending, then the settlement transaction, the value of each input in
    order (so the client can compute the fee and feerate it pays) and its
    confirmations. ``funding`` says whether the funding output is still
    unspent (the node's ``gettxout``, mempool included). Public: the channel
    id is an outpoint and all of this is on chain for anyone to read.
    """
    _method(request, "GET", "HEAD")
    rows = gateway.store.read(
        "SELECT id, channel_id, state, value, balance, exit_fee, closing_at, settle_txid, "
        "confirmed_height FROM channels WHERE channel_id = ?",
        (channel_id,),
    )
    if not rows:
        raise HttpError(HTTPStatus.NOT_FOUND, f"no channel {channel_id}")
    row = rows[0]
    value, balance = row["value"] or 0, row["balance"] if row["balance"] is not None else 0
    live = gateway.channels.get(channel_id)
    answer: dict[str, Any] = {
        "channel_id": channel_id,
        "state": live.core.state.value if live is not None else row["state"],
        "value": value,
        "paid": value - balance,
        "balance": balance,
        "exit_fee": row["exit_fee"] or 0,
        "settle_by": gateway.settler.settle_by(live) if live is not None else None,
        "settlement": None,
    }
    txid = live.core.settlement_txid if live is not None else row["settle_txid"]
    if txid:
        batch = gateway.store.read(
            "SELECT tx, fee, vsize, state, confirmed_height FROM settlements WHERE txid = ?",
            (txid,),
        )
        members = gateway.store.read(
            "SELECT channel_id, value FROM channels WHERE settle_txid = ?", (txid,)
        )
        values = {m["channel_id"]: m["value"] for m in members}
        if batch:
            tx = parse_tx(bytes.fromhex(batch[0]["tx"]))
            inputs = [f"{b2lx(i.prevout.hash)}:{i.prevout.n}" for i in tx.vin]
            seen = gateway.watcher.confirmed(txid)
            height = batch[0]["confirmed_height"] or (seen.height if seen else None)
            answer["settlement"] = {
                "txid": txid,
                "tx": batch[0]["tx"],
                "fee": batch[0]["fee"],
                "vsize": batch[0]["vsize"],
                "input_values": [values.get(i) for i in inputs],
                "state": batch[0]["state"],
                "confirmations": None if height is None else gateway.watcher.height - height + 1,
            }
    txid_, _, vout = channel_id.partition(":")
    funding = await gateway.rpc.call("gettxout", txid_, int(vout), True)
    answer["funding"] = {
        "unspent": funding is not None,
        "confirmations": funding["confirmations"] if funding is not None else None,
    }
    return json_response(HTTPStatus.OK, answer)


# -- dashboard API -------------------------------------------------------------------


def _authorized(gateway: Gateway, request: Request) -> bool:
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {gateway.operator_token}".encode())


async def _dashboard_api(
    gateway: Gateway, request: Request, name: str, q: dict[str, str]
) -> Response:
    if not _authorized(gateway, request):
        raise HttpError(HTTPStatus.UNAUTHORIZED, "operator token required")
    method, handler = _DASHBOARD[name]
    _method(request, method)
    return json_response(HTTPStatus.OK, await handler(gateway, q))


def _sat(bill: int) -> float:
    # bill is msat*ms/s (metering.py): /1e6 is sat, kept to the msat.
    return round(bill / 1_000_000, 3)


#: Channel states whose bill may still be settled (protocol.md section 8).
_UNSETTLED_STATES = ("funding", "ready", "closing")
#: A settlement batch that is (or will be) on chain: not one the node refused.
_LIVE_BATCH = "s.state IN ('broadcast', 'confirmed')"


async def earnings(gateway: Gateway, q: dict[str, str]) -> dict[str, Any]:
    """Per item and per publisher: billed, not yet settled, settled, fees, paid out.

    * ``billed_sat``: the section 7 bill of every chunk delivered (to the msat);
    * ``unsettled_sat``: the part of it in channels not settled yet (funding,
      ready or closing without a batch);
    * ``lost_sat``: billed in channels that will never settle (the viewer
      refunded, or the funding vanished);
    * ``settled_sat``: what viewers paid for the item's media in batches on
      chain or on their way (``earnings.gross``: each channel's share beyond
      its reserve, split by what each item billed); ``fees_sat``: the part of
      the batches' fees it paid beyond the viewers' reserves (``earnings.fee``);
    * ``paid_out_sat`` (publishers): the outputs paying them in those batches
      (``payouts``; ``operator`` collects shares below dust and removed items).
    """
    catalog = _catalog(gateway)
    states = ", ".join(f"'{s}'" for s in _UNSETTLED_STATES)
    billed = gateway.store.read(
        "SELECT d.media, d.publisher, SUM(d.bill) AS bill, SUM(d.delivered_ms) AS ms, "
        "COUNT(*) AS n, "
        f"SUM(CASE WHEN c.settle_txid IS NULL AND c.state IN ({states}) "
        "THEN d.bill ELSE 0 END) AS unsettled, "
        "SUM(CASE WHEN c.state IN ('refunded', 'void') THEN d.bill ELSE 0 END) AS lost "
        "FROM deliveries d JOIN channels c ON c.id = d.channel "
        "GROUP BY d.media, d.publisher ORDER BY d.media"
    )
    settled = {
        (r["media"], r["publisher"]): (r["gross"], r["fee"])
        for r in gateway.store.read(
            "SELECT e.media, d.publisher, SUM(e.gross) AS gross, SUM(e.fee) AS fee "
            "FROM earnings e JOIN settlements s ON s.txid = e.txid "
            "LEFT JOIN deliveries d ON d.channel = e.channel AND d.media = e.media "
            f"WHERE {_LIVE_BATCH} GROUP BY e.media, d.publisher"
        )
    }
    items = []
    for r in billed:
        gross, fee = settled.get((r["media"], r["publisher"]), (0, 0))
        items.append(
            {
                "media": r["media"],
                "title": catalog.items[r["media"]].title if r["media"] in catalog.items else None,
                "publisher": r["publisher"],
                "billed_sat": _sat(r["bill"]),
                "unsettled_sat": _sat(r["unsettled"]),
                "lost_sat": _sat(r["lost"]),
                "settled_sat": gross,
                "fees_sat": fee,
                "seconds": r["ms"] / 1000,
                "channels": r["n"],
            }
        )
    paid_out = {
        r["publisher"]: r["amount"]
        for r in gateway.store.read(
            "SELECT p.publisher, SUM(p.amount) AS amount FROM payouts p "
            f"JOIN settlements s ON s.txid = p.txid WHERE {_LIVE_BATCH} GROUP BY p.publisher"
        )
    }
    publishers: dict[str, dict[str, Any]] = {}
    sums = ("billed_sat", "unsettled_sat", "lost_sat", "settled_sat", "fees_sat", "seconds")
    for item in items:
        entry = publishers.setdefault(
            item["publisher"], {"publisher": item["publisher"], **dict.fromkeys(sums, 0)}
        )
        for key in sums:
            entry[key] = round(entry[key] + item[key], 3)
    for pid in paid_out:  # the operator (no item of its own) and removed publishers
        publishers.setdefault(pid, {"publisher": pid, **dict.fromkeys(sums, 0)})
    for pid, entry in publishers.items():
        publisher = catalog.publishers.get(pid)
        entry["name"] = publisher.name if publisher else pid
        entry["paid_out_sat"] = paid_out.get(pid, 0)
    return {"items": items, "publishers": sorted(publishers.values(), key=lambda p: p["publisher"])}


async def channels(gateway: Gateway, q: dict[str, str]) -> dict[str, Any]:
    """The channels the gateway holds live (funding, ready, closing)."""
    held = [item for answer in await gateway.everywhere("channels") for item in answer]
    held.sort(key=lambda item: item.pop("row_id"))  # opening order, over every worker
    return {"channels": held}


def _confirmations(gateway: Gateway, txid: str, confirmed_height: int | None) -> int | None:
    """As the follower sees it now, else from the stored block height; None: not in a block."""
    seen = gateway.watcher.confirmed(txid)
    if seen is not None:
        return gateway.watcher.depth(seen)
    if confirmed_height is not None:
        return gateway.watcher.height - confirmed_height + 1
    return None


async def settlements(gateway: Gateway, q: dict[str, str]) -> dict[str, Any]:
    """Recent settlement batches, and earnings over time (the plot's two series).

    ``settlements``: the newest batches — txid, the channels it settles,
    what they paid, fee, vsize, feerate, the reserves' part of the fee,
    confirmations and state (``broadcast``, ``confirmed``, ``abandoned``: the
    node refused it and its channels went into another batch).
    ``series``: per settled channel, cumulative sat paid by viewers.
    ``unsettled_series``: billed and not yet settled over time, in sat — a
    channel counts from when it stopped taking payments (its bill is then
    final; a live channel counts at ``now`` only) until its batch; channels
    that will never settle (refunded, void, nothing paid) do not count.
    """
    height = gateway.watcher.height
    batches = gateway.store.read(
        "SELECT txid, fee, vsize, reserves, channels, state, created_at, confirmed_height "
        "FROM settlements ORDER BY created_at DESC LIMIT ?",
        (RECENT_SETTLEMENTS,),
    )
    members: dict[str, list[Any]] = {}
    for r in gateway.store.read(
        "SELECT channel_id, settle_txid, value - balance AS paid FROM channels "
        "WHERE settle_txid IN (SELECT txid FROM settlements ORDER BY created_at DESC LIMIT ?) "
        "ORDER BY id",
        (RECENT_SETTLEMENTS,),
    ):
        members.setdefault(r["settle_txid"], []).append(r)
    recent = []
    for b in batches:
        inside = members.get(b["txid"], [])
        recent.append(
            {
                "txid": b["txid"],
                "channels": [m["channel_id"] for m in inside],
                "channel_count": b["channels"],
                "paid": sum(m["paid"] for m in inside),
                "fee": b["fee"],
                "vsize": b["vsize"],
                "feerate": round(b["fee"] / b["vsize"], 2) if b["vsize"] else None,
                "reserves": b["reserves"],
                "created_at": b["created_at"],
                "confirmations": _confirmations(gateway, b["txid"], b["confirmed_height"]),
                "state": b["state"],
            }
        )
    now = time.time()
    rows = gateway.store.read(
        "SELECT state, bill, closing_at, settle_txid, settled_at, value - balance AS paid "
        "FROM channels WHERE channel_id IS NOT NULL"
    )
    # Earnings over time: cumulative sat paid by the viewers of settled channels.
    series, total = [], 0
    for r in sorted((r for r in rows if r["settle_txid"]), key=lambda r: r["settled_at"]):
        total += r["paid"]
        series.append({"t": r["settled_at"], "paid": r["paid"], "total": total})
    spans = [
        (r["closing_at"] or now, r["settled_at"] if r["settle_txid"] else None, r["bill"])
        for r in rows
        if (r["bill"] or 0) > 0
        and (r["settle_txid"] or r["state"] in _UNSETTLED_STATES)
    ]
    times = sorted({t for start, end, _ in spans for t in (start, end) if t is not None} | {now})
    unsettled = [
        {
            "t": t,
            "unsettled": _sat(
                sum(bill for start, end, bill in spans if start <= t and (end is None or t < end))
            ),
        }
        for t in times
        if t <= now
    ]
    return {"settlements": recent, "series": series, "unsettled_series": unsettled,
            "height": height, "now": now}


async def rates(gateway: Gateway, q: dict[str, str]) -> dict[str, Any]:
    """Each item's rate and free allowance."""
    catalog = _catalog(gateway)
    return {
        "items": [
            {
                "id": item.id,
                "title": item.title,
                "publisher": item.publisher,
                "rate_msat": item.rate_msat,
                "rate": item.rate,
                "free_ms": item.free_ms,
            }
            for item in (catalog.items[i] for i in sorted(catalog.items))
        ]
    }


async def set_rate(gateway: Gateway, q: dict[str, str]) -> dict[str, Any]:
    """``POST …/rate?item=ID&rate=SAT_PER_S[&free_seconds=S]``: edit catalog.toml atomically."""
    item_id = q.get("item", "")
    try:
        rate_msat = parse_rate(q.get("rate", ""))
        free_ms = parse_seconds(q["free_seconds"]) if "free_seconds" in q else None
    except MediaError as exc:
        raise HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from None
    try:
        item = set_price(
            gateway.catalog.media_dir, item_id, rate_msat=rate_msat, free_ms=free_ms
        )
    except (MediaError, OSError) as exc:
        log.warning("rate change failed: %s", exc)
        raise HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, "could not write the catalog") from None
    if item is None:
        raise HttpError(HTTPStatus.NOT_FOUND, f"no media {item_id!r} in the catalog")
    log.info("rate of %s set to %d msat/s (free %d ms)", item.id, item.rate_msat, item.free_ms)
    gateway.catalog = gateway.catalog.reload_if_changed()
    return {"id": item.id, "rate_msat": item.rate_msat, "rate": item.rate,
            "free_ms": item.free_ms}


_DASHBOARD: dict[str, tuple[str, Any]] = {
    "earnings": ("GET", earnings),
    "channels": ("GET", channels),
    "settlements": ("GET", settlements),
    "rates": ("GET", rates),
    "rate": ("POST", set_rate),
}
