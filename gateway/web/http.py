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

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

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
    """An HTTP error answer with a JSON ``{"error": message}`` body."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def query_params(query: str) -> dict[str, str]:
    """A query string's parameters (the last value of each wins)."""
    # Last value wins; blank values are kept so that "rate=" is an error, not absent.
    return {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}


def require_method(request: Request, *allowed: str) -> None:
    """405 unless the request uses one of the ``allowed`` methods."""
    if request.method not in allowed:
        raise HttpError(HTTPStatus.METHOD_NOT_ALLOWED, f"use {' or '.join(allowed)}")


# -- responses ---------------------------------------------------------------------


def json_response(status: HTTPStatus, body: Any) -> Response:
    """A JSON answer that no cache keeps (earnings are private)."""
    return response(status, json.dumps(body, default=str).encode(), "application/json")


def response(
    status: HTTPStatus, body: bytes, content_type: str, cache: str = "no-store"
) -> Response:
    """An answer with the headers every one carries (a page also gets the CSP)."""
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


def page(
    title: str,
    body: str,
    script: str | None,
    *,
    data: dict[str, str] | None = None,
    status: HTTPStatus = HTTPStatus.OK,
) -> Response:
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


def not_found_page(message: str) -> Response:
    """A 404 for a person: what is missing and the way back (JSON paths keep JSON)."""
    body = (
        f"<h1>Not found</h1>\n<p>{html.escape(message)}</p>\n"
        '<p>See <a href="/">the catalog</a> for what this gateway plays.</p>'
    )
    return page("Not found", body, None, status=HTTPStatus.NOT_FOUND)


# -- static files ----------------------------------------------------------------


def file_response(path: Path, cache: str) -> Response:
    """A file's bytes with its type; 404 if it cannot be read."""
    try:
        data = path.read_bytes()
    except OSError:
        raise HttpError(HTTPStatus.NOT_FOUND, "no such file") from None
    ctype = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "text/plain"
    return response(HTTPStatus.OK, data, ctype, cache)


async def static_file(ctx: WebContext, request: Request, name: str, q: dict[str, str]) -> Response:
    """``/web/<name>``: the player's own files."""
    if not _STATIC_NAME.fullmatch(name):
        raise HttpError(HTTPStatus.NOT_FOUND, "no such file")
    # Our own files change with the code: the browser revalidates each time.
    return file_response(WEB_DIR / name, "no-cache")


async def vendor_file(ctx: WebContext, request: Request, rest: str, q: dict[str, str]) -> Response:
    """``/web/vendor/<package>/<path>``: a file of a pinned npm package the pages import."""
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

