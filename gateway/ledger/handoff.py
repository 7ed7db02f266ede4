"""Handing a channel from one holder to another: between workers of one host
(through the supervisor, gateway/handover.py) and between gateway hosts
sharing a PostgreSQL ledger (gateway/ledger/cluster.py).

The :class:`HandOver` methods are part of :class:`gateway.ledger.Ledger`;
they live here to keep the ledger's file about recording changes.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from gateway.handover import LinkError, WorkerRole
from gateway.ledger.live import LIVE_STATES, LiveChannel
from gateway.protocol.channel import ServerState
from gateway.protocol.errors import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from gateway.ledger.cluster import Cluster
    from gateway.ledger.store import Op

log = logging.getLogger("gateway.ledger.ledger")

#: States from which a channel may be settled or handed over.
SETTLEABLE = (ServerState.READY, ServerState.FUNDING)


class HandOver:
    """Take-over and release of held channels (a mixin of the ledger)."""

    worker: WorkerRole | None
    cluster: Cluster | None
    channels: dict[str, LiveChannel]
    store: Any

    if TYPE_CHECKING:

        def load_stored(self, channel_id: str) -> LiveChannel | None: ...

        def hold(self, live: LiveChannel) -> None: ...

        def drop(self, live: LiveChannel) -> None: ...

        def _restore(self, row: Any) -> LiveChannel: ...

        async def meter_flushed(
            self, live: LiveChannel, disconnected_at: float | None
        ) -> None: ...

        async def _write_with_meter(self, live: LiveChannel, ops: list[Op]) -> None: ...

    async def take_over(self, stored: LiveChannel) -> LiveChannel:
        """Become the holder of a live channel another worker holds.

        The supervisor has the holder end its session and make the meter
        durable first, so the copy loaded here afterwards is complete. Answers
        the stored copy if the channel closed meanwhile (the holder kept it).
        On PostgreSQL the holder is another host (gateway/ledger/cluster.py).
        """
        if stored.core.state not in SETTLEABLE:
            return stored
        if self.cluster is not None:
            return await self._take_from_host(stored)
        assert self.worker is not None
        try:
            acquired = await self.worker.link.request("acquire", row=stored.row_id)
        except LinkError:
            raise ProtocolError(
                ErrorCode.BUSY, "the channel is being handed between workers; resume again"
            ) from None
        held = self.channels.get(stored.channel_id)
        if held is not None:  # another session here took it meanwhile
            return held
        fresh = self.load_stored(stored.channel_id)
        assert fresh is not None
        if not acquired or fresh.core.state not in SETTLEABLE:
            return fresh
        fresh.disconnected_at = time.time()
        self.hold(fresh)
        return fresh

    async def release(self, row_id: int) -> bool:
        """Hand channel ``row_id`` to another worker (the supervisor asks).

        Ends its session (``session_replaced``, as a resume does in section 5)
        and makes the meter durable, then forgets the channel. False if it is
        closing: a settlement in flight stays with the worker that started it.
        """
        live = next((c for c in self.channels.values() if c.row_id == row_id), None)
        if live is None:
            return True
        async with live.lock:  # no payment or settlement of it is half done
            if self.channels.get(live.channel_id) is not live:
                return True
            if live.core.state not in SETTLEABLE:
                return False
            session, live.session = live.session, None
            if session is not None:
                session.replaced()  # its stream stops before the meter is written
            live.disconnected_at = live.disconnected_at or time.time()
            await self.meter_flushed(live, live.disconnected_at)
            # Only once durable: if the write failed, it stays held here.
            live.released = True
            self.drop(live)
        return True

    # -- hand-over between hosts (gateway/ledger/cluster.py) ------------------------------

    @property
    def shared(self) -> bool:
        """Whether other processes hold channels of this ledger (workers or hosts)."""
        return self.worker is not None or self.cluster is not None

    async def _take_from_host(self, stored: LiveChannel) -> LiveChannel:
        assert self.cluster is not None
        states = tuple(s.value for s in SETTLEABLE)
        holding = await self.cluster.acquire(stored.row_id, states)
        if holding is None:
            raise ProtocolError(
                ErrorCode.BUSY, "the channel is being handed between gateways; resume again"
            )
        held = self.channels.get(stored.channel_id)
        if held is not None:  # another session here took it meanwhile
            return held
        fresh = self.load_stored(stored.channel_id)
        assert fresh is not None
        if holding.holder != self.cluster.host_id or fresh.core.state not in SETTLEABLE:
            return fresh
        fresh.disconnected_at = time.time()
        self.hold(fresh)
        log.info("channel %s taken over (epoch %d)", fresh.channel_id, fresh.epoch)
        return fresh

    def held(self) -> dict[int, int]:
        """row id -> epoch of every channel held here (the cluster checks them)."""
        return {live.row_id: live.epoch for live in self.channels.values()}

    async def release_to(self, row_id: int, host: str) -> None:
        """Another host asks for channel ``row_id`` (a resume there): hand it over.

        As :meth:`release`: the session ends (``session_replaced``), then the
        meter and the new holder are written in one fenced write. A closing
        channel stays here (its settlement is in flight); the asking host
        sees it closing and answers its client so.
        """
        assert self.cluster is not None
        live = next((c for c in self.channels.values() if c.row_id == row_id), None)
        if live is None:
            return
        async with live.lock:
            if self.channels.get(live.channel_id) is not live or live.released:
                return
            if live.core.state not in SETTLEABLE:
                return
            session, live.session = live.session, None
            if session is not None:
                session.replaced()
            live.disconnected_at = live.disconnected_at or time.time()
            await self._write_with_meter(
                live,
                [
                    ("UPDATE channels SET bill = ?, disconnected_at = ? WHERE id = ?",
                     (live.meter.bill, live.disconnected_at, live.row_id)),
                    self.cluster.hand_op(row_id, host),
                ],
            )
            live.released = True
            self.drop(live)
        log.info("channel %s handed to host %s", live.channel_id, host)

    def lost(self, row_id: int) -> None:
        """Another host took channel ``row_id`` (the fence or the lease check said so).

        Whatever this host wrote of it is durable or was refused whole; its
        session ends with ``session_replaced`` and the channel is forgotten here.
        """
        live = next((c for c in self.channels.values() if c.row_id == row_id), None)
        if live is None or live.released:
            return
        live.released = True
        session, live.session = live.session, None
        if session is not None:
            session.replaced()
        self.drop(live)

    async def adopt(self, row_id: int) -> LiveChannel | None:
        """The leader takes a channel whose host died (its lease ran out) and holds it.

        Its settlement duty then settles it after the resume grace, from now,
        unless its viewer resumes it somewhere first.
        """
        assert self.cluster is not None
        holding = await self.cluster.holding(row_id)
        if holding is None or (holding.holder_alive and holding.holder is not None):
            return None
        if await self.cluster.take(row_id, holding.epoch) is None:
            return None  # another host took it first
        rows = await self.store.fetch("SELECT * FROM channels WHERE id = ?", (row_id,))
        live = self._restore(rows[0])
        live.disconnected_at = time.time()
        if live.core.state in LIVE_STATES and live.channel_id not in self.channels:
            self.hold(live)
            log.info("adopted channel %s of a dead host (epoch %d)", live.channel_id, live.epoch)
        return live

