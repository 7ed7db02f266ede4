"""A worker's side of ``gateway serve --workers N``: its place, and its link to the supervisor.

The supervisor (:mod:`gateway.workers`) runs the workers; each worker's
ledger (:mod:`gateway.ledger.ledger`) asks it, through this link, to hand a
channel over from the worker that holds it. See gateway/workers.py for the
theory of operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

#: Longest line on a link: the dashboard's channel list of one worker.
LINK_LIMIT = 1 << 26

Handler = Callable[[str, dict[str, Any]], Awaitable[Any]]


class LinkError(RuntimeError):
    """The other end answered a request with an error, or the link closed."""


class Link:
    """One end of the supervisor ↔ worker channel: requests and answers, both ways.

    A request is ``{"id": n, "op": ..., "args": {...}}``, its answer ``{"re": n, "ok": value}``
    or ``{"re": n, "error": text}``. Each request is answered in its own
    task, so a worker asking the supervisor can be asked something meanwhile.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.handler = handler
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.closed = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def request(self, op: str, **args: Any) -> Any:
        """Ask the other end; raise :class:`LinkError` if it fails or goes away."""
        if self.closed.is_set():
            raise LinkError("the link is closed")
        n = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[n] = future
        try:
            self._write({"id": n, "op": op, "args": args})
            return await future
        finally:
            self._pending.pop(n, None)

    def close(self) -> None:
        """Close this end (the other end sees EOF)."""
        self._writer.close()

    def _write(self, message: dict[str, Any]) -> None:
        self._writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def _read(self) -> None:
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if "re" in message:
                    future = self._pending.get(message["re"])
                    if future is None or future.done():
                        continue
                    if "error" in message:
                        future.set_exception(LinkError(message["error"]))
                    else:
                        future.set_result(message["ok"])
                else:
                    task = asyncio.create_task(self._answer(message))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        except (ConnectionError, ValueError) as exc:
            log.warning("link failed: %s", exc)
        finally:
            self.closed.set()
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(LinkError("the link closed"))

    async def _answer(self, message: dict[str, Any]) -> None:
        try:
            answer: dict[str, Any] = {"ok": await self.handler(message["op"], message["args"])}
        except Exception as exc:
            log.exception("request %s failed", message.get("op"))
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        with contextlib.suppress(ConnectionError, RuntimeError):
            self._write({"re": message["id"], **answer})


@dataclass
class WorkerRole:
    """What a worker process knows of its place among the workers."""

    index: int
    count: int
    link: Link
    #: Channels (row ids) this worker holds although ``id % count`` differs.
    extra: set[int] = field(default_factory=set)
    #: Channels of this worker's residue that another worker holds.
    away: set[int] = field(default_factory=set)

    def holds_at_start(self, row_id: int) -> bool:
        """Whether this worker loads channel ``row_id`` when it starts."""
        if row_id in self.extra:
            return True
        return row_id % self.count == self.index and row_id not in self.away

    def first_id_above(self, largest: int) -> int:
        """The smallest channel id above ``largest`` that is this worker's to allocate."""
        first = largest + 1
        return first + (self.index - first) % self.count
