"""HTTP plumbing of the web front end: errors, responses, pages, static files."""

from __future__ import annotations

import base64
import hashlib
import html
import json
import mimetypes
import re
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from aiohttp import web

from gateway.web.context import WebContext

#: The browser player's static files and its npm packages (node_modules).
WEB_DIR = Path(__file__).resolve().parents[2] / "player" / "web"
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


class HttpError(Exception):
    """An HTTP error answer with a JSON ``{"error": message}`` body (and ``headers``)."""

    def __init__(
        self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def query_params(request: web.Request) -> dict[str, str]:
    """The request's query parameters (the last value of each wins)."""
    # Blank values are kept so that "rate=" is an error, not absent.
    query = request.query_string
    return {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}


#: The largest form body a POST endpoint reads (a refund in hex is the largest).
MAX_FORM_BYTES = 64 * 1024


async def form_params(request: web.Request) -> dict[str, str]:
    """A POST's parameters: the query's, then an urlencoded body's (which win).

    Query parameters alone were the only way before the gateway read bodies;
    both work, so older pages keep working.
    """
    params = query_params(request)
    if request.content_type == "application/x-www-form-urlencoded" and request.can_read_body:
        if (request.content_length or 0) > MAX_FORM_BYTES:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "the form is too large")
        body = (await request.content.read(MAX_FORM_BYTES + 1)).decode("utf-8", "replace")
        if len(body) > MAX_FORM_BYTES:
            raise HttpError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "the form is too large")
        params.update({k: v[-1] for k, v in parse_qs(body, keep_blank_values=True).items()})
    return params


# -- responses ---------------------------------------------------------------------


def json_response(status: HTTPStatus, body: Any) -> web.Response:
    """A JSON answer that no cache keeps (earnings are private)."""
    return response(status, json.dumps(body, default=str).encode(), "application/json")


def response(
    status: HTTPStatus, body: bytes, content_type: str, cache: str = "no-store"
) -> web.Response:
    """An answer with the headers every one carries (a page also gets the CSP)."""
    headers = {
        "Content-Type": content_type,
        "Cache-Control": cache,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if content_type.startswith("text/html"):
        headers["Content-Security-Policy"] = CSP
    return web.Response(status=status.value, body=body, headers=headers)


def page(
    title: str,
    body: str,
    script: str | None,
    *,
    data: dict[str, str] | None = None,
    status: HTTPStatus = HTTPStatus.OK,
) -> web.Response:
    """An HTML page of the front end: ``body`` in the common frame, ``script`` its module."""
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
    return response(status, text.encode(), "text/html; charset=utf-8")


def not_found_page(message: str) -> web.Response:
    """A 404 for a person: what is missing and the way back (JSON paths keep JSON)."""
    body = (
        f"<h1>Not found</h1>\n<p>{html.escape(message)}</p>\n"
        '<p>See <a href="/">the catalog</a> for what this gateway plays.</p>'
    )
    return page("Not found", body, None, status=HTTPStatus.NOT_FOUND)


# -- static files ----------------------------------------------------------------


def file_response(path: Path, cache: str) -> web.Response:
    """A file's bytes with its type; 404 if it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError:
        raise HttpError(HTTPStatus.NOT_FOUND, "no such file") from None
    ctype = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "text/plain"
    return response(HTTPStatus.OK, data, ctype, cache)


async def static_file(ctx: WebContext, request: web.Request) -> web.Response:
    """``/web/<name>``: the player's own files."""
    name = request.match_info["name"]
    if not _STATIC_NAME.fullmatch(name):
        raise HttpError(HTTPStatus.NOT_FOUND, "no such file")
    # Our own files change with the code: the browser revalidates each time.
    return file_response(WEB_DIR / name, "no-cache")


async def vendor_file(ctx: WebContext, request: web.Request) -> web.Response:
    """``/web/vendor/<package>/<path>``: a file of a pinned npm package the pages import."""
    rest = request.match_info["rest"]
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
    return file_response(path, "public, max-age=3600")



def int_param(q: dict[str, str], name: str) -> int:
    """Parameter ``name`` as a whole number; 400 otherwise."""
    value = q.get(name, "")
    if not value.isascii() or not value.isdigit() or len(value) > 16:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"{name} must be a whole number")
    return int(value)

