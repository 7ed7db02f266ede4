"""WHIP ingest (RFC 9725) on the gateway's port: a publisher goes live.

``POST /whip/<live-id>`` with ``Authorization: Bearer <publisher token>``
(``gateway publisher token``; RFC 9725 section 4.1) and the SDP offer
(``Content-Type: application/sdp``) answers ``201 Created`` with the SDP
answer and ``Location: /whip/<live-id>/<session>``, the session resource;
``DELETE`` on it (same token) stops the stream. The answer carries every
candidate of the gateway (aiortc gathers before answering), so trickle ICE
(``PATCH``) is not offered: 405, as section 4.3 allows.

Refusals, each a JSON ``{"error": reason}`` and nothing started: 404 no such
live item; 401 a missing or wrong token (with ``WWW-Authenticate: Bearer``);
415 another content type; 400 an offer :func:`gateway.live.validate_offer`
refuses; 409 the live item already has a publisher.
"""

from __future__ import annotations

import hmac
import logging
from http import HTTPStatus

from aiohttp import web

from gateway.live import OfferError, validate_offer
from gateway.live.onair import OnAir, OnAirBusy
from gateway.media.catalog import LiveItem
from gateway.web.context import WebContext
from gateway.web.http import HttpError, response

log = logging.getLogger(__name__)

SDP = "application/sdp"


def _on_air(ctx: WebContext) -> OnAir:
    if ctx.on_air is None or ctx.publisher_token is None:
        raise HttpError(HTTPStatus.NOT_FOUND, "this gateway serves no live items")
    return ctx.on_air


def _authorized(ctx: WebContext, request: web.Request) -> LiveItem:
    """The live item named in the path, if the request carries its publisher's token."""
    live_id = request.match_info["live_id"]
    item = ctx.library.current().live.get(live_id)
    if item is None:
        raise HttpError(HTTPStatus.NOT_FOUND, f"no live item {live_id!r}")
    assert ctx.publisher_token is not None
    expected = f"Bearer {ctx.publisher_token(item.publisher)}"
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise HttpError(
            HTTPStatus.UNAUTHORIZED,
            "the publisher's bearer token is required",
            {"WWW-Authenticate": 'Bearer realm="whip"'},
        )
    return item


async def whip_post(ctx: WebContext, request: web.Request) -> web.StreamResponse:
    """``POST /whip/<live-id>``: a publisher's offer; 201 with the answer."""
    on_air = _on_air(ctx)
    item = _authorized(ctx, request)
    if request.content_type != SDP:
        raise HttpError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"the offer must be {SDP}")
    body = await request.read()
    try:
        offer = validate_offer(body, role="publisher")
    except OfferError as exc:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"bad SDP offer: {exc}") from None
    try:
        ingest = await on_air.publish(item, offer)
    except OnAirBusy as exc:
        raise HttpError(HTTPStatus.CONFLICT, str(exc)) from None
    except ValueError as exc:  # aiortc could not use the offer
        raise HttpError(HTTPStatus.BAD_REQUEST, f"cannot use this offer: {exc}") from None
    assert ingest.answer is not None
    answer = response(HTTPStatus.CREATED, ingest.answer.encode(), SDP)
    answer.headers["Location"] = f"/whip/{item.id}/{ingest.session_id}"
    log.info("live %s: publisher from %s", item.id, request.remote)
    return answer


async def whip_delete(ctx: WebContext, request: web.Request) -> web.StreamResponse:
    """``DELETE /whip/<live-id>/<session>``: the publisher stops; viewers get ``end``."""
    on_air = _on_air(ctx)
    item = _authorized(ctx, request)
    ingest = on_air.session(item.id, request.match_info["session"])
    if ingest is None:
        raise HttpError(HTTPStatus.NOT_FOUND, "no such WHIP session (it has ended)")
    await ingest.stop()
    return response(HTTPStatus.OK, b"", "text/plain")
