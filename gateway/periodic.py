"""A background duty that runs one step every few seconds until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable


class Periodic:
    """Run ``step`` every ``interval_s`` seconds in a task, from :meth:`start` to :meth:`stop`.

    A step that fails is logged with ``failure`` and tried again at the next
    interval: the node may be down for a while, and a duty that handles
    money must outlive it (the chain follower, the settlement duty).
    """

    def __init__(
        self,
        name: str,
        interval_s: float,
        step: Callable[[], Awaitable[object]],
        *,
        log: logging.Logger,
        failure: str,
        level: int = logging.WARNING,
    ) -> None:
        self.name, self.interval_s, self.step = name, interval_s, step
        self._log, self._failure, self._level = log, failure, level
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin: the first step runs one interval from now."""
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Stop between steps (or cancel the one running); a no-op if never started."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                self._log.log(self._level, self._failure, exc_info=True)
