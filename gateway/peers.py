"""Asking the other gateway hosts of a shared ledger (``--store postgresql://…``).

The operator's settle, ``/api/health`` and the dashboard's channel list
cover every channel of the cluster: the host asked answers for itself and
asks each other live host (the ``hosts`` table names their URLs) at
``GET /api/admin/host?what=…`` with the cluster's operator token, which
every host shares. This is the cluster's counterpart of the supervisor's
fan-out between workers (gateway/workers.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import urlencode

import aiohttp

log = logging.getLogger(__name__)

#: Longest one host may take to answer (an operator's settle broadcasts).
ASK_TIMEOUT_S = 60.0
PATH = "api/admin/host"


class HostDown(RuntimeError):
    """A request that needs every host found one not answering."""


async def ask(url: str, token: str, what: str, args: dict[str, Any]) -> Any:
    """Ask the host at ``url`` (its web root) ``what``; its answer."""
    query = urlencode({"what": what, "args": json.dumps(args)})
    timeout = aiohttp.ClientTimeout(total=ASK_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(
        f"{url.rstrip('/')}/{PATH}?{query}", headers={"Authorization": f"Bearer {token}"}
    ) as answer:
        body = await answer.json(content_type=None)
        if answer.status != 200:
            raise HostDown(f"{url} answered {answer.status}: {body.get('error')}")
        return body["answer"]


async def ask_all(
    hosts: list[dict[str, Any]], token: str, what: str, args: dict[str, Any], *, whole: bool
) -> list[Any]:
    """Ask every host in ``hosts`` (``host``, ``url``); the answers of those that answered.

    ``whole``: every one must answer, else :class:`HostDown`.
    """
    answers = await asyncio.gather(
        *(ask(h["url"], token, what, args) for h in hosts), return_exceptions=True
    )
    found = []
    for host, answer in zip(hosts, answers, strict=True):
        if isinstance(answer, BaseException):
            log.warning("host %s did not answer %s: %s", host["host"], what, answer)
            if whole:
                raise HostDown(f"gateway host {host['host']} did not answer: {answer}")
        else:
            found.append(answer)
    return found
