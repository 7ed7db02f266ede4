"""The gateway's web front end: the browser player, the publisher/operator
dashboard and their JSON endpoints (docs/web.md).

Theory of operation
-------------------

``gateway/server.py`` serves ``/paystream/2``, ``/api/health``,
``/api/catalog`` and ``/api/admin/settle`` itself and hands every other path
to :func:`handle_http`, which answers a :class:`~websockets.http11.Response`
or ``None`` ("not mine": the server answers 404). The handlers get a
:class:`WebContext` (the ledger, the chain, the catalog) and own none of it:
``pages`` renders HTML, ``chain_api`` answers a page that has no node,
``dashboard`` the operator; ``http`` is their plumbing.

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

import logging
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from websockets.http11 import Request, Response

from gateway.chain.rpc import RpcException
from gateway.web.chain_api import chain_api, channel_api, faucet_api, refund_api
from gateway.web.context import WebContext
from gateway.web.dashboard import DASHBOARD, dashboard_api
from gateway.web.http import (
    CSP,
    HttpError,
    json_response,
    not_found_page,
    query_params,
    static_file,
    vendor_file,
)
from gateway.web.pages import catalog_page, dashboard_page, exit_estimate, watch_page

__all__ = ["CSP", "WebContext", "exit_estimate", "handle_http"]

log = logging.getLogger(__name__)


async def handle_http(ctx: WebContext, request: Request) -> Response | None:
    """Answer a request for a front-end path; ``None`` if the path is not one."""
    path, _, query = request.path.partition("?")
    try:
        route = _route(path)
        if route is None:
            if path.startswith(("/api/", "/web/", "/paystream/")):
                return None  # programs ask these: the server answers in JSON
            return not_found_page(f"There is no page {unquote(path)} here.")
        handler, arg = route
        return await handler(ctx, request, arg, query_params(query))
    except HttpError as exc:
        return json_response(exc.status, {"error": exc.message})
    except RpcException as exc:  # the node did not answer: nothing was done
        log.warning("%s: the node failed: %s", path, exc)
        return json_response(HTTPStatus.SERVICE_UNAVAILABLE,
                             {"error": "the gateway's node did not answer; try again"})


def _route(path: str) -> tuple[Any, str] | None:
    if path == "/":
        return catalog_page, ""
    if path.startswith("/watch/"):
        return watch_page, unquote(path[len("/watch/") :])
    if path == "/dashboard":
        return dashboard_page, ""
    if path.startswith("/web/vendor/"):
        return vendor_file, path[len("/web/vendor/") :]
    if path.startswith("/web/"):
        return static_file, path[len("/web/") :]
    if path == "/api/faucet":
        return faucet_api, ""
    if path == "/api/chain":
        return chain_api, ""
    if path == "/api/refund":
        return refund_api, ""
    if path.startswith("/api/channel/"):
        return channel_api, unquote(path[len("/api/channel/") :])
    if path.startswith("/api/dashboard/"):
        name = path[len("/api/dashboard/") :]
        if name in DASHBOARD:
            return dashboard_api, name
    return None


