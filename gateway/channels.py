"""Channels as the gateway holds them: the pure core plus what the I/O layer
needs around it (its store row, its meter, its live session), and the SQL
that makes each change durable.

Every write here is a list of ``(sql, params)`` ops handed to
:meth:`gateway.store.Store.write`; nothing on the per-payment path reads the
database first (design.md, "Traps": no read-before-write).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.protocol.channel import ChannelRecord, PaymentRecord, ServerChannel, ServerState
from gateway.protocol.messages import Limits
from gateway.protocol.metering import Quote, ServerMeter
from gateway.protocol.transactions import Outpoint, Settlement
from gateway.store import Op

if TYPE_CHECKING:
    from gateway.session import Session

#: States in which a channel is loaded at start and watched by the settlement duty.
LIVE_STATES = (ServerState.FUNDING, ServerState.READY, ServerState.CLOSING)
#: States in which a channel's funding is watched (gateway/funding.py).
FUNDED_STATES = (ServerState.FUNDING, ServerState.READY)


class ChannelReleased(RuntimeError):
    """The channel was handed to another worker (gateway/workers.py): not ours to settle."""


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
    session: Session | None = None
    disconnected_at: float | None = None
    settle_tx: bytes | None = None
    #: (tip hash, monotonic time) when the settlement duty last followed it.
    followed: tuple[str, float] | None = None
    #: Serialises settlement against payments and other settlement attempts.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Handed to another worker: this copy must not be settled or paid into.
    released: bool = False
    #: The funding's confirmations when last asked (None: not unspent), and the
    #: tip height since which it has been gone (gateway/funding.py).
    funding_conf: int | None = None
    gone_since: int | None = None
    #: Set whenever the funding duty moved the channel or its confirmations.
    funding_changed: asyncio.Event = field(default_factory=asyncio.Event)
    _dirty_media: set[str] = field(default_factory=set)

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
            self._dirty_media.add(quote.media)

    def meter_ops(self, publisher_of: dict[str, str]) -> list[Op]:
        """Ops that persist the meter (bill and per-media delivery) changed so far."""
        ops: list[Op] = [
            ("UPDATE channels SET bill = ? WHERE id = ?", (self.meter.bill, self.row_id)),
            *self._delivery_ops(publisher_of),
        ]
        return ops

    def _delivery_ops(self, publisher_of: dict[str, str]) -> list[Op]:
        ops: list[Op] = []
        delivered = self.meter.delivered_ms
        for media in sorted(self._dirty_media):
            ops.append(
                (
                    "INSERT INTO deliveries(channel, media, publisher, delivered_ms, bill) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(channel, media) DO UPDATE SET "
                    "delivered_ms = excluded.delivered_ms, bill = excluded.bill",
                    (
                        self.row_id,
                        media,
                        publisher_of.get(media, ""),
                        delivered.get(media, 0),
                        self.media_bill.get(media, 0),
                    ),
                )
            )
        self._dirty_media.clear()
        return ops

    def payment_ops(self, record: PaymentRecord, publisher_of: dict[str, str]) -> list[Op]:
        """Ops that make an accepted increment durable, with the meter."""
        # One UPDATE for the increment and the bill: the hot path's statements
        # run in the store's writer thread, which competes for the GIL.
        return [
            (
                "UPDATE channels SET seq = ?, balance = ?, sig = ?, bill = ? WHERE id = ?",
                (record.seq, record.balance, record.sig.hex(), self.meter.bill, self.row_id),
            ),
            *self._delivery_ops(publisher_of),
        ]


def state_op(row_id: int, core: ServerChannel, **extra: Any) -> Op:
    """Persist the core's lifecycle state (and extra columns) for ``row_id``."""
    columns = {"state": core.state.value, **extra}
    assignments = ", ".join(f"{name} = ?" for name in columns)
    return (f"UPDATE channels SET {assignments} WHERE id = ?", (*columns.values(), row_id))


def funded_op(live: LiveChannel) -> Op:
    """Persist the funding outpoint and value (protocol.md ``fund``)."""
    core = live.core
    return state_op(
        live.row_id,
        core,
        channel_id=core.channel_id,
        value=core.value,
        balance=core.balance,
        funded_at=time.time(),
    )


def settlement_ops(live: LiveChannel, settlement: Settlement | None, payouts: list[Op]) -> list[Op]:
    """Persist a settlement BEFORE it is broadcast, so a restart rebroadcasts it."""
    core = live.core
    extra: dict[str, Any] = {"settled_at": time.time()}
    if settlement is not None:
        extra.update(
            settle_txid=settlement.txid, settle_tx=settlement.tx.hex(), settle_fee=settlement.fee
        )
    else:
        extra["closed_at"] = time.time()
    return [state_op(live.row_id, core, **extra), *payouts]


def restore(row: Any, deliveries: list[Any], *, privkey: bytes, limits: Limits) -> LiveChannel:
    """Rebuild a :class:`LiveChannel` from its store row (restart recovery, section 8)."""
    outpoint = Outpoint.parse(row["channel_id"]) if row["channel_id"] else None
    refund_outpoint = Outpoint.parse(row["refund_outpoint"]) if row["refund_outpoint"] else None
    record = ChannelRecord(
        state=ServerState(row["state"]),
        kind=row["kind"],
        client_pubkey=bytes.fromhex(row["client_pubkey"]),
        expiry=row["expiry"],
        change_script=bytes.fromhex(row["change_script"]),
        network=row["network"],
        outpoint=outpoint,
        value=row["value"],
        refund_outpoint=refund_outpoint,
        refund_value=row["refund_value"],
        seq=row["seq"],
        balance=row["balance"] if row["balance"] is not None else row["value"],
        sig=bytes.fromhex(row["sig"]) if row["sig"] else None,
        settlement_txid=row["settle_txid"],
    )
    core = ServerChannel.restore(record, server_privkey=privkey, limits=limits)
    meter = ServerMeter(row["bill"] or 0, {d["media"]: d["delivered_ms"] for d in deliveries})
    return LiveChannel(
        row_id=row["id"],
        core=core,
        meter=meter,
        media_bill={d["media"]: d["bill"] for d in deliveries},
        durable_paid=core.paid,
        disconnected_at=row["disconnected_at"],
        settle_tx=bytes.fromhex(row["settle_tx"]) if row["settle_tx"] else None,
    )
