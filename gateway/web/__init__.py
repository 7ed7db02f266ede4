"""The gateway's web front end: the browser player, the publisher/operator
dashboard and their JSON endpoints (docs/web.md).

Theory of operation
-------------------

``gateway/server.py`` serves ``/paystream/2``, ``/api/health``,
``/api/catalog`` and ``/api/admin/settle`` itself and has :func:`add_routes`
register the rest on the same aiohttp application; :data:`errors` answers
every failure (JSON for programs, a page for people). The handlers get a
:class:`WebContext` (the ledger, the chain, the catalog) and own none of it:
``pages`` renders HTML, ``chain_api`` answers a page that has no node,
``dashboard`` the operator; ``http`` is their plumbing.

* Pages: ``/`` (the catalog, rendered here), ``/watch/<id>`` (the player),
  ``/dashboard``, ``/golive/<live-id>`` (a publisher's camera over WHIP).
  Each page carries an import map that points the browser's bare module
  names (``@noble/curves/…``) at ``/web/vendor/…``, which serves
  the files ``npm ci`` installed under ``player/web/node_modules`` — pinned by
  ``package-lock.json``; no CDN and no bundler at run time. A strict
  Content-Security-Policy allows only this origin's scripts plus the import
  map's own hash.
* ``POST /whip/<live-id>`` and ``DELETE /whip/<live-id>/<session>``: a
  publisher goes live and stops (WHIP, RFC 9725; ``whip``).
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

Each route allows only its methods (405 with ``Allow`` otherwise; ``HEAD``
wherever ``GET`` is, without a body); state changes only on ``POST``, whose
parameters come from the query or an urlencoded body.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import web

from gateway.chain.rpc import RpcException
from gateway.web.chain_api import chain_api, channel_api, faucet_api, refund_api
from gateway.web.context import WebContext
from gateway.web.dashboard import DASHBOARD, dashboard_api
from gateway.web.http import (
    CSP,
    HttpError,
    json_response,
    not_found_page,
    static_file,
    vendor_file,
)
from gateway.web.pages import (
    catalog_page,
    dashboard_page,
    exit_estimate,
    golive_page,
    watch_page,
)
from gateway.web.whip import whip_delete, whip_post

__all__ = ["CSP", "WebContext", "add_routes", "errors", "exit_estimate"]

log = logging.getLogger(__name__)

Handler = Callable[[WebContext, web.Request], Awaitable[web.StreamResponse]]

#: Paths programs ask: their errors are JSON, never a page.
_PROGRAM_PATHS = ("/api/", "/web/", "/paystream/", "/whip/")


def add_routes(app: web.Application, ctx: WebContext) -> None:
    """Register the front end's routes on ``app``, each with its methods."""

    def route(method: str, path: str, handler: Handler) -> None:
        bound = functools.partial(handler, ctx)
        if method == "GET":
            app.router.add_get(path, bound)  # and HEAD, answered without a body
        else:
            app.router.add_route(method, path, bound)

    route("GET", "/", catalog_page)
    route("GET", "/watch/{media}", watch_page)
    route("GET", "/dashboard", dashboard_page)
    route("GET", "/golive/{live_id}", golive_page)
    route("GET", "/web/vendor/{rest:.+}", vendor_file)
    route("GET", "/web/{name}", static_file)
    route("POST", "/api/faucet", faucet_api)
    route("GET", "/api/chain", chain_api)
    route("GET", "/api/refund", refund_api)
    route("POST", "/api/refund", refund_api)
    route("GET", "/api/channel/{channel_id}", channel_api)
    for name, (method, _) in DASHBOARD.items():
        route(method, f"/api/dashboard/{name}", dashboard_api)
    route("POST", "/whip/{live_id}", whip_post)
    route("DELETE", "/whip/{live_id}/{session}", whip_delete)


@web.middleware
async def errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error as its answer: JSON ``{"error": …}`` for programs, a page for people.

    Nothing raised here reaches the log with a traceback unless it is the
    gateway's own bug: bad requests are the client's (one line at most).
    """
    try:
        return await handler(request)
    except HttpError as exc:
        answer = json_response(exc.status, {"error": exc.message})
        answer.headers.update(exc.headers)
        return answer
    except RpcException as exc:  # the node did not answer: nothing was done
        log.warning("%s: the node failed: %s", request.path, exc)
        return json_response(HTTPStatus.SERVICE_UNAVAILABLE,
                             {"error": "the gateway's node did not answer; try again"})
    except web.HTTPMethodNotAllowed as exc:
        allowed = sorted(exc.allowed_methods)
        answer = json_response(HTTPStatus.METHOD_NOT_ALLOWED,
                               {"error": f"use {' or '.join(allowed)}"})
        answer.headers["Allow"] = ", ".join(allowed)
        return answer
    except web.HTTPNotFound:
        if request.path.startswith(_PROGRAM_PATHS) or request.path in ("/api", "/web"):
            return json_response(HTTPStatus.NOT_FOUND, {"error": f"no such path {request.path}"})
        return not_found_page(f"There is no page {request.path} here.")
