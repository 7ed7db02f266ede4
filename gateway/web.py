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
  amount inside the advertised limits, from the node's wallet.
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

from bitcoin.core import CTransaction, CTxOut, b2lx
from bitcoin.core.script import CScript
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from gateway.chain.rpc import RpcError
from gateway.media.catalog import (
    Catalog,
    parse_rate,
    parse_seconds,
    set_price,
)
from gateway.media.segment import MediaError
from gateway.protocol.scripts import ChannelScript, address_to_script_pubkey
from gateway.protocol.transactions import find_funding_output, parse_tx

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


async def _index(gateway: Gateway, request: Request, _: str, q: dict[str, str]) -> Response:
    catalog = _catalog(gateway)
    rows = []
    for iid in sorted(catalog.items):
        item = catalog.items[iid]
        publisher = catalog.publishers.get(item.publisher)
        rows.append(
            "<tr>"
            f'<td><a href="/watch/{html.escape(iid)}">{html.escape(item.title)}</a></td>'
            f"<td>{html.escape(publisher.name if publisher else item.publisher)}</td>"
            f'<td class="num">{item.rate_msat / 1000:g} sat/s</td>'
            f'<td class="num">{item.free_ms / 1000:g} s</td>'
            f'<td class="num">{item.duration_ms / 1000:.0f} s</td>'
            "</tr>"
        )
    table = (
        '<table id="catalog"><thead><tr><th>Title</th><th>Publisher</th>'
        "<th>Price per second</th><th>Free</th><th>Length</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
        if rows
        else "<p>The catalog is empty: publish with <code>gateway publish FILE --id ID "
        "--publisher P --rate SAT_PER_S</code>, or add the demo's with "
        "<code>gateway media sample</code> (media/README.md).</p>"
    )
    body = f"<h1>Catalog</h1>\n<p>Network: {html.escape(gateway.network)}</p>\n{table}"
    return _page("Catalog", body, None)


_WATCH_BODY = """<h1 id="title">{title}</h1>
<div class="player">
  <video id="video" controls playsinline></video>
  <div id="overlay" class="overlay" aria-live="polite">
    <span>time <b id="o-time">0.0</b> s</span>
    <span>free left <b id="o-free">-</b> s</span>
    <span>paid <b id="o-paid">0</b> sat</span>
    <span>balance <b id="o-balance">-</b> sat</span>
    <span>rate <b id="o-rate">-</b> sat/s</span>
  </div>
</div>
<p id="status" class="status">Starting…</p>
<section id="budget" hidden>
  <h2>Confirm a budget</h2>
  <p>You fund a payment channel once; each second of media is then paid from it
  as you watch, never above the advertised rate. What you do not spend comes back
  to your own key when you leave.</p>
  <form id="budget-form">
    <label>Budget <input id="budget-sat" type="number" min="1" step="1" required> sat</label>
    <button id="budget-ok" type="submit">Confirm budget and open a channel</button>
  </form>
  <p class="hint" id="budget-hint"></p>
</section>
<section id="funding" hidden>
  <h2>Fund the channel</h2>
  <p>Send <b id="fund-amount"></b> BTC to <code id="fund-address"></code> from any wallet.
  The gateway watches the address.</p>
  <img id="fund-qr" alt="QR code of the payment URI">
  <p><code id="fund-uri"></code></p>
  <p><button id="faucet" type="button" hidden>Fund from demo faucet</button></p>
</section>
<section id="controls">
  <label><input id="close-on-leave" type="checkbox" checked> Close the channel when I leave</label>
  <button id="stop" type="button">Stop</button>
  <button id="leave" type="button">Close channel</button>
  <select id="switch"></select>
  <details><summary>Key</summary>
    <p>Your key (K1) lives in this browser only. Keep a copy to refund a channel
    yourself at its expiry.</p>
    <button id="export" type="button">Export key and channel</button>
    <pre id="export-out" hidden></pre>
  </details>
</section>
"""


async def _watch(gateway: Gateway, request: Request, media: str, q: dict[str, str]) -> Response:
    item = _catalog(gateway).items.get(media)
    if item is None:
        return _not_found_page(f"No media {media!r} in the catalog.")
    body = _WATCH_BODY.replace("{title}", html.escape(item.title))
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
  <h2>Earnings per publisher</h2>
  <table id="publishers"><thead><tr><th>Publisher</th><th>Billed sat</th>
  <th>Paid out on chain sat</th><th>Media seconds</th></tr></thead><tbody></tbody></table>
  <h2>Earnings per item</h2>
  <table id="items"><thead><tr><th>Item</th><th>Publisher</th><th>Billed sat</th>
  <th>Media seconds</th><th>Channels</th></tr></thead><tbody></tbody></table>
  <h2>Rates</h2>
  <table id="rates"><thead><tr><th>Item</th><th>Rate sat/s</th><th>Free s</th><th></th>
  </tr></thead><tbody></tbody></table>
  <h2>Open channels</h2>
  <table id="channels"><thead><tr><th>Channel</th><th>State</th><th>Value</th><th>Paid</th>
  <th>Expiry</th><th>Viewer</th></tr></thead><tbody></tbody></table>
  <h2>Recent settlements</h2>
  <table id="settlements"><thead><tr><th>Settled</th><th>Txid</th><th>Paid</th><th>Fee</th>
  <th>Confirmations</th><th>State</th></tr></thead><tbody></tbody></table>
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


def _unfunded_cltv_addresses(gateway: Gateway) -> set[str]:
    rows = gateway.store.read(
        "SELECT kind, client_pubkey, server_pubkey, expiry FROM channels "
        "WHERE state = 'open' AND channel_id IS NULL AND kind = 'cltv'"
    )
    return {
        ChannelScript.make(
            r["kind"], bytes.fromhex(r["client_pubkey"]), bytes.fromhex(r["server_pubkey"]),
            r["expiry"],
        ).address(gateway.network)
        for r in rows
    }


async def _faucet(gateway: Gateway, request: Request, _: str, q: dict[str, str]) -> Response:
    """``POST /api/faucet?address=…&amount=SAT``: regtest coins for an unfunded channel."""
    if gateway.network != "regtest":
        raise HttpError(HTTPStatus.NOT_FOUND, "the demo faucet exists only on regtest")
    _method(request, "POST")
    address = q.get("address", "")
    amount = _int_param(q, "amount")
    limits = gateway.limits
    if not limits.min_value <= amount <= limits.max_value:
        raise HttpError(
            HTTPStatus.BAD_REQUEST,
            f"amount must be between {limits.min_value} and {limits.max_value} sat",
        )
    paid = _FAUCET_PAID.setdefault(gateway, set())
    if address in paid:
        raise HttpError(HTTPStatus.CONFLICT, "the faucet already paid this channel")
    if address not in _unfunded_cltv_addresses(gateway):
        raise HttpError(HTTPStatus.BAD_REQUEST,
                        "not the funding address of an open, unfunded channel")
    paid.add(address)
    try:
        # Built, signed and sent here rather than by sendtoaddress: the output
        # index is then known without asking the node where the transaction
        # is (a stock node forgets that once it is mined, without -txindex).
        script = address_to_script_pubkey(address, gateway.network)
        template = CTransaction([], [CTxOut(amount, CScript(script))], nVersion=2)
        funded = await gateway.rpc.call("fundrawtransaction", template.serialize().hex())
        signed = await gateway.rpc.call("signrawtransactionwithwallet", funded["hex"])
        txid = str(await gateway.rpc.call("sendrawtransaction", signed["hex"]))
    except RpcError as exc:
        paid.discard(address)
        log.warning("demo faucet failed: %s", exc)
        raise HttpError(HTTPStatus.BAD_GATEWAY, "the node's wallet could not pay") from None
    vout = find_funding_output(bytes.fromhex(signed["hex"]), script)[0]
    return json_response(HTTPStatus.OK, {"txid": txid, "vout": vout, "amount": amount})


# -- a channel's settlement, for its client ----------------------------------------------


async def _channel_api(
    gateway: Gateway, request: Request, channel_id: str, q: dict[str, str]
) -> Response:
    """``GET /api/channel/<txid:vout>``: where a channel's money went (protocol.md section 8).

    For the client that funded it, to follow and check its settlement: the
    state, what was paid (the reserve included), ``settle_by`` while its batch
    is pending, then the settlement transaction, the value of each input in
    order (so the client can compute the fee and feerate it pays) and its
    confirmations. Public: the channel id is an outpoint and the settlement
    is on chain for anyone to read.
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


async def earnings(gateway: Gateway, q: dict[str, str]) -> dict[str, Any]:
    """Billed earnings per item and per publisher, and payouts made on chain."""
    catalog = _catalog(gateway)
    items = [
        {
            "media": r["media"],
            "title": catalog.items[r["media"]].title if r["media"] in catalog.items else None,
            "publisher": r["publisher"],
            "billed_sat": _sat(r["bill"]),
            "seconds": r["ms"] / 1000,
            "channels": r["n"],
        }
        for r in gateway.store.read(
            "SELECT media, publisher, SUM(bill) AS bill, SUM(delivered_ms) AS ms, "
            "COUNT(*) AS n FROM deliveries GROUP BY media, publisher ORDER BY media"
        )
    ]
    paid_out = {
        r["publisher"]: r["amount"]
        for r in gateway.store.read(
            "SELECT publisher, SUM(amount) AS amount FROM payouts GROUP BY publisher"
        )
    }
    publishers: dict[str, dict[str, Any]] = {}
    for item in items:
        entry = publishers.setdefault(
            item["publisher"], {"publisher": item["publisher"], "billed_sat": 0.0, "seconds": 0.0}
        )
        entry["billed_sat"] = round(entry["billed_sat"] + item["billed_sat"], 3)
        entry["seconds"] += item["seconds"]
    for pid in paid_out:  # the operator (no item of its own) and removed publishers
        publishers.setdefault(pid, {"publisher": pid, "billed_sat": 0.0, "seconds": 0.0})
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


async def settlements(gateway: Gateway, q: dict[str, str]) -> dict[str, Any]:
    """Recent settlements with txids and confirmations, and earnings over time."""
    rows = gateway.store.read(
        "SELECT id, channel_id, state, value, balance, settle_txid, settle_fee, settled_at, "
        "confirmed_height FROM channels WHERE settle_txid IS NOT NULL "
        "ORDER BY settled_at DESC LIMIT ?",
        (RECENT_SETTLEMENTS,),
    )
    height = gateway.watcher.height
    recent = []
    for r in rows:
        # As the follower saw it (current), else from the stored block height.
        seen = gateway.watcher.confirmed(r["settle_txid"])
        confirmations = gateway.watcher.depth(seen) if seen is not None else None
        if confirmations is None and r["confirmed_height"] is not None:
            confirmations = height - r["confirmed_height"] + 1
        recent.append(
            {
                "channel_id": r["channel_id"],
                "txid": r["settle_txid"],
                "paid": r["value"] - r["balance"],
                "fee": r["settle_fee"],
                "settled_at": r["settled_at"],
                "confirmations": confirmations,
                "state": r["state"],
            }
        )
    # Earnings over time: cumulative sat paid by the viewers of settled channels.
    series, total = [], 0
    for r in gateway.store.read(
        "SELECT settled_at, value - balance AS paid FROM channels "
        "WHERE settle_txid IS NOT NULL ORDER BY settled_at"
    ):
        total += r["paid"]
        series.append({"t": r["settled_at"], "paid": r["paid"], "total": total})
    return {"settlements": recent, "series": series, "height": height, "now": time.time()}


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
