"""Asking the other gateway hosts of a shared ledger (``--store postgresql://…``).

The operator's settle, ``/api/health`` and the dashboard's channel list
cover every channel of the cluster: the host asked answers for itself and
asks each other live host (the ``hosts`` table names their URLs) at
``POST /api/admin/host`` (form ``what``, ``args``) with the cluster's operator
token, which every host shares. This is the cluster's counterpart of the
supervisor's fan-out between workers (gateway/workers.py). It also names this
host (:func:`host_name`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from gateway.datadir import write_private

if TYPE_CHECKING:
    from gateway.config import Config
    from gateway.ledger import Cluster

log = logging.getLogger(__name__)

#: Longest one host may take to answer (an operator's settle broadcasts).
ASK_TIMEOUT_S = 60.0
PATH = "api/admin/host"


class HostDown(RuntimeError):
    """A request that needs every host found one not answering."""


async def ask(url: str, token: str, what: str, args: dict[str, Any]) -> Any:
    """Ask the host at ``url`` (its web root) ``what``; its answer."""
    form = {"what": what, "args": json.dumps(args)}
    timeout = aiohttp.ClientTimeout(total=ASK_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.post(
        f"{url.rstrip('/')}/{PATH}", data=form, headers={"Authorization": f"Bearer {token}"}
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


async def everywhere_in_cluster(
    cluster: Cluster,
    token: str,
    answer: Callable[[str, dict[str, Any]], Awaitable[Any]],
    what: str,
    args: dict[str, Any],
    *,
    whole: bool,
) -> list[Any]:
    """``answer(what, args)`` here and on every other live host of ``cluster``.

    ``whole`` (the operator's settle): a channel held by a host whose lease
    ran out (the leader adopts it soon) or a host that does not answer
    raises :class:`HostDown`.
    """
    hosts = await cluster.hosts()
    others = [h for h in hosts if h["alive"] and h["host"] != cluster.host_id and h["url"]]
    if whole:
        orphans = await cluster.orphans()
        if orphans:
            raise HostDown(
                f"{len(orphans)} channel(s) are held by a gateway host that stopped "
                "answering; another host adopts them when its lease runs out: try again"
            )
    mine = await answer(what, args)
    return [mine, *await ask_all(others, token, what, args, whole=whole)]


def host_name(config: Config) -> str:
    """This host's name: configured, else kept in ``DATADIR/host-id`` (shared ledger)
    or the machine's name."""
    from gateway.ledger import new_host_id

    if config.host_id:
        return config.host_id
    if not config.store:
        return socket.gethostname()
    path = Path(config.datadir) / "host-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        name = new_host_id()
        write_private(path, name + "\n")
        return name
