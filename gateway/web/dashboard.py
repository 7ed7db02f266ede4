"""The operator dashboard's JSON (``/api/dashboard/*``, with the operator token).

Earnings are private: every answer needs ``Authorization: Bearer <token>``.
The figures come from the ledger's reports (gateway/ledger/reports.py) and
the chain follower; docs/web.md says what each column means.
"""

from __future__ import annotations

import hmac
import logging
import time
from http import HTTPStatus
from typing import Any

from aiohttp import web

from gateway.ledger import UNSETTLED_STATES
from gateway.media.catalog import add_live, parse_rate, parse_seconds, set_price
from gateway.media.segment import MediaError
from gateway.web.context import WebContext
from gateway.web.http import HttpError, form_params, json_response, query_params

log = logging.getLogger(__name__)

#: How many settlements the dashboard lists (newest first).
RECENT_SETTLEMENTS = 50


# -- dashboard API -------------------------------------------------------------------


def _authorized(ctx: WebContext, request: web.Request) -> bool:
    given = request.headers.get("Authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {ctx.operator_token}".encode())


async def dashboard_api(ctx: WebContext, request: web.Request) -> web.Response:
    """``/api/dashboard/<name>`` with the operator token: one of :data:`DASHBOARD`'s.

    The route allows only the method :data:`DASHBOARD` names (405 otherwise).
    """
    if not _authorized(ctx, request):
        raise HttpError(HTTPStatus.UNAUTHORIZED, "operator token required")
    method, handler = DASHBOARD[request.path.rsplit("/", 1)[1]]
    q = await form_params(request) if method == "POST" else query_params(request)
    return json_response(HTTPStatus.OK, await handler(ctx, q))


def _sat(bill: int) -> float:
    # bill is msat*ms/s (metering.py): /1e6 is sat, kept to the msat.
    return round(bill / 1_000_000, 3)


async def earnings(ctx: WebContext, q: dict[str, str]) -> dict[str, Any]:
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
    catalog = ctx.library.current()
    reports = ctx.ledger.reports
    billed = reports.billed_by_item()
    settled = {
        (r["media"], r["publisher"]): (r["gross"], r["fee"])
        for r in reports.settled_by_item()
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
    paid_out = reports.paid_out()
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


async def channels(ctx: WebContext, q: dict[str, str]) -> dict[str, Any]:
    """The channels the gateway holds live (funding, ready, closing)."""
    held = [item for answer in await ctx.everywhere("channels") for item in answer]
    held.sort(key=lambda item: item.pop("row_id"))  # opening order, over every worker
    return {"channels": held}


def _confirmations(ctx: WebContext, txid: str, confirmed_height: int | None) -> int | None:
    """As the follower sees it now, else from the stored block height; None: not in a block."""
    seen = ctx.follower.confirmed(txid)
    if seen is not None:
        return ctx.follower.depth(seen)
    if confirmed_height is not None:
        return ctx.follower.height - confirmed_height + 1
    return None


async def settlements(ctx: WebContext, q: dict[str, str]) -> dict[str, Any]:
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
    height = ctx.follower.height
    recent = []
    for b in ctx.ledger.reports.recent_batches(RECENT_SETTLEMENTS):
        inside = b["members"]
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
                "confirmations": _confirmations(ctx, b["txid"], b["confirmed_height"]),
                "state": b["state"],
            }
        )
    now = time.time()
    rows = ctx.ledger.reports.funded_channels_money()
    # Earnings over time: cumulative sat paid by the viewers of settled channels.
    series, total = [], 0
    for r in sorted((r for r in rows if r["settle_txid"]), key=lambda r: r["settled_at"]):
        total += r["paid"]
        series.append({"t": r["settled_at"], "paid": r["paid"], "total": total})
    spans = [
        (r["closing_at"] or now, r["settled_at"] if r["settle_txid"] else None, r["bill"])
        for r in rows
        if (r["bill"] or 0) > 0
        and (r["settle_txid"] or r["state"] in UNSETTLED_STATES)
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


async def rates(ctx: WebContext, q: dict[str, str]) -> dict[str, Any]:
    """Each item's rate and free allowance."""
    catalog = ctx.library.current()
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


async def set_rate(ctx: WebContext, q: dict[str, str]) -> dict[str, Any]:
    """``POST …/rate?item=ID&rate=SAT_PER_S[&free_seconds=S]``: edit catalog.toml atomically."""
    item_id = q.get("item", "")
    try:
        rate_msat = parse_rate(q.get("rate", ""))
        free_ms = parse_seconds(q["free_seconds"]) if "free_seconds" in q else None
    except MediaError as exc:
        raise HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from None
    try:
        item = set_price(
            ctx.library.catalog.media_dir, item_id, rate_msat=rate_msat, free_ms=free_ms
        )
    except (MediaError, OSError) as exc:
        log.warning("rate change failed: %s", exc)
        raise HttpError(HTTPStatus.INTERNAL_SERVER_ERROR, "could not write the catalog") from None
    if item is None:
        raise HttpError(HTTPStatus.NOT_FOUND, f"no media {item_id!r} in the catalog")
    log.info("rate of %s set to %d msat/s (free %d ms)", item.id, item.rate_msat, item.free_ms)
    ctx.library.current()
    return {"id": item.id, "rate_msat": item.rate_msat, "rate": item.rate,
            "free_ms": item.free_ms}


async def add_live_item(ctx: WebContext, q: dict[str, str]) -> dict[str, Any]:
    """``POST …/live_add?id=ID&title=T&publisher=P&rate=R[&free_seconds=S][&record=0]``.

    As ``gateway live add``: writes catalog.toml atomically; a bad field is a
    400 with the reason and changes nothing.
    """
    try:
        item = add_live(
            ctx.library.catalog.media_dir,
            q.get("id", ""),
            title=q.get("title") or q.get("id", ""),
            publisher=q.get("publisher", ""),
            rate_msat=parse_rate(q.get("rate", "")),
            free_ms=parse_seconds(q.get("free_seconds", "60")),
            record=q.get("record", "1") not in ("0", "false"),
        )
    except MediaError as exc:
        raise HttpError(HTTPStatus.BAD_REQUEST, str(exc)) from None
    log.info("live item %s added (publisher %s)", item.id, item.publisher)
    ctx.library.current()
    return {"id": item.id, "rate_msat": item.rate_msat, "free_ms": item.free_ms,
            "record": item.record, "whip": f"/whip/{item.id}"}


async def live(ctx: WebContext, q: dict[str, str]) -> dict[str, Any]:
    """Per live item, as it happens (this process, since it started): on air,
    viewers now, paid seconds and what they earned (the section 7 bill), and
    where and with which token its publisher goes live (WHIP).

    The ledger's figures (``earnings``) include live items too, durably, as
    of each channel's last payment.
    """
    catalog = ctx.library.current()
    on_air = ctx.on_air.on_air() if ctx.on_air is not None else set()
    items = []
    for lid in sorted(catalog.live):
        item = catalog.live[lid]
        tally = ctx.on_air.tally(lid) if ctx.on_air is not None else None
        items.append(
            {
                "id": lid,
                "title": item.title,
                "publisher": item.publisher,
                "on_air": lid in on_air,
                "viewers": tally.viewers if tally else 0,
                "paid_seconds": tally.paid_ms / 1000 if tally else 0,
                "earned_sat": _sat(tally.bill) if tally else 0,
                "whip": f"/whip/{lid}",
                "token": ctx.publisher_token(item.publisher) if ctx.publisher_token else None,
            }
        )
    return {"items": items}


DASHBOARD: dict[str, tuple[str, Any]] = {
    "earnings": ("GET", earnings),
    "channels": ("GET", channels),
    "settlements": ("GET", settlements),
    "rates": ("GET", rates),
    "rate": ("POST", set_rate),
    "live": ("GET", live),
    "live_add": ("POST", add_live_item),
}
