"""A channel as the gateway holds it: the pure core plus what the I/O layer
needs around it (its store row id, its meter, its live session).

The ledger (:mod:`gateway.ledger.ledger`) makes every change of it durable;
nothing here touches the store.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.protocol.channel import ServerChannel, ServerState
from gateway.protocol.messages import Closed
from gateway.protocol.metering import Quote, ServerMeter


class SessionHandle(Protocol):
    """What the ledger, the funding duty and the settlement duty tell a channel's session.

    Each returns at once: the session says goodbye in the background, so no
    client ever holds up a hand-over or a settlement (gateway/session.py).
    """

    def replaced(self) -> None:
        """Another session or worker took the channel: fatal ``session_replaced``."""

    def funding_lost(self) -> None:
        """A reorg took the funding's confirmations: ``funding_lost``, media stops."""

    def channel_void(self) -> None:
        """The funding was double-spent: fatal ``funding_spent``."""

    def tell_closed(self, closed: Closed) -> None:
        """The duty or the operator closed the channel: ``closed``."""


#: States in which a channel is loaded at start and watched by the settlement duty.
LIVE_STATES = (ServerState.FUNDING, ServerState.READY, ServerState.CLOSING)
#: States in which a channel's funding is watched (gateway/funding.py).
FUNDED_STATES = (ServerState.FUNDING, ServerState.READY)


class ChannelReleased(RuntimeError):
    """The channel was handed to another worker (gateway/handover.py): not ours to settle."""


@dataclass(eq=False)
class LiveChannel:
    """One channel at the gateway: core state machine, meter and owner session."""

    row_id: int  # the store's id and the BIP32 index of K2 (gateway/keys.py)
    core: ServerChannel
    meter: ServerMeter = field(default_factory=ServerMeter)
    #: Bill per media (msat*ms/s): splits the server's share among publishers.
    media_bill: dict[str, int] = field(default_factory=dict)
    #: Paid (sat) as durably stored: the only figure that may release a chunk
    #: (protocol.md section 7: persist before paid or any chunk it pays for).
    durable_paid: int = 0
    session: SessionHandle | None = None
    disconnected_at: float | None = None
    #: Its funding was found spent by another transaction (the client's
    #: refund) when its batch was refused: followed until that is deep.
    spent: bool = False
    #: (tip hash, monotonic time) when the settlement duty last followed it.
    followed: tuple[str, float] | None = None
    #: Serialises settlement against payments and other settlement attempts.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Handed to another worker: this copy must not be settled or paid into.
    released: bool = False
    #: The epoch of this host's holding (PostgreSQL; gateway/ledger/cluster.py):
    #: every write of the channel is fenced by it.
    epoch: int = 0
    #: The funding's confirmations when last asked (None: not unspent), the tip
    #: height when it was last seen, and since when it has been gone
    #: (gateway/funding.py).
    funding_conf: int | None = None
    funding_seen: int | None = None
    gone_since: int | None = None
    #: Set whenever the funding duty moved the channel or its confirmations.
    funding_changed: asyncio.Event = field(default_factory=asyncio.Event)
    #: Media whose delivery row changed since it was last written.
    dirty_media: set[str] = field(default_factory=set)

    @property
    def channel_id(self) -> str:
        """``txid:vout`` (a live channel is always funded)."""
        cid = self.core.channel_id
        assert cid is not None
        return cid

    def summary(self) -> dict[str, Any]:
        """What the operator's dashboard lists for a live channel."""
        core = self.core
        return {
            "channel_id": self.channel_id,
            "row_id": self.row_id,
            "state": core.state.value,
            "kind": core.kind,
            "value": core.value,
            "paid": core.paid,
            "expiry": core.expiry,
            "connected": self.session is not None,
        }

    def commit_chunk(self, quote: Quote) -> None:
        """A quoted chunk was sent: move the meter (flushed with the next write)."""
        self.meter.commit(quote)
        if quote.index >= 0:
            self.media_bill[quote.media] = (
                self.media_bill.get(quote.media, 0) + quote.rate_msat * quote.charged_ms
            )
            self.dirty_media.add(quote.media)
