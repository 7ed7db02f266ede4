"""The gateway's catalog, read over HTTP before ``player play`` does anything else.

A ``play`` of an id the gateway does not have fails with ``media_unknown``
only after a channel is open and funded, leaving the coins locked until the
channel settles or expires. ``GET /api/catalog`` on the WebSocket URL's host
and port answers first, with no channel and no money involved.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from player.client import AGENT, PlayerError

__all__ = ["catalog_item", "fetch_catalog", "web_url"]

#: Ids listed in the error for an unknown one; more are left to the catalog page.
_LISTED: Final = 8


def web_url(ws_url: str) -> str:
    """``http(s)://host:port`` of the gateway whose WebSocket URL is ``ws_url``."""
    parts = urlsplit(ws_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    return urlunsplit((scheme, parts.netloc, "", "", ""))


def fetch_catalog(ws_url: str, *, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The gateway's ``GET /api/catalog``: one dict per item (``id``, ``duration_ms``...)."""
    url = web_url(ws_url) + "/api/catalog"
    request = urllib.request.Request(url, headers={"User-Agent": AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            items = json.load(answer)
    except urllib.error.HTTPError as exc:
        raise PlayerError(f"cannot read the gateway's catalog at {url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PlayerError(f"cannot connect to {ws_url}: {reason}") from None
    except ValueError:
        raise PlayerError(f"the gateway's catalog at {url} is not JSON") from None
    if not isinstance(items, list) or not all(
        isinstance(item, dict) and isinstance(item.get("id"), str) for item in items
    ):
        raise PlayerError(f"the gateway's catalog at {url} is not a list of items")
    return items


def catalog_item(ws_url: str, media: str, *, timeout: float = 30.0) -> dict[str, Any]:
    """The catalog entry of ``media``; :class:`PlayerError` naming where to look if none."""
    items = fetch_catalog(ws_url, timeout=timeout)
    for item in items:
        if item["id"] == media:
            return item
    ids = sorted(item["id"] for item in items)
    has = ", ".join(ids[:_LISTED]) + (", ..." if len(ids) > _LISTED else "")
    web = web_url(ws_url)
    raise PlayerError(
        f"no media {media!r} in the gateway's catalog "
        f"({'it has: ' + has if ids else 'it is empty'}); see {web}/ or {web}/api/catalog"
    )
