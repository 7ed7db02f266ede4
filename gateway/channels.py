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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gateway.protocol.channel import ChannelRecord, PaymentRecord, ServerChannel, ServerState
from gateway.protocol.messages import Limits
from gateway.protocol.metering import Quote, ServerMeter
from gateway.protocol.settlement import Batch, ChannelClaim
from gateway.protocol.transactions import Outpoint
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
    #: Its funding was found spent by another transaction (the client's
    #: refund) when its batch was refused: followed until that is deep.
    spent: bool = False
    #: (tip hash, monotonic time) when the settlement duty last followed it.
    followed: tuple[str, float] | None = None
    #: Serialises settlement against payments and other settlement attempts.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: Handed to another worker: this copy must not be settled or paid into.
    released: bool = False
    #: The funding's confirmations when last asked (None: not unspent), the tip
    #: height when it was last seen, and since when it has been gone
    #: (gateway/funding.py).
    funding_conf: int | None = None
    funding_seen: int | None = None
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


def batch_ops(
    batch: Batch,
    lives: Sequence[LiveChannel],
    claims: Sequence[ChannelClaim],
    owners: dict[bytes, str],
) -> list[Op]:
    """Persist a settlement batch BEFORE it is broadcast, so a restart rebroadcasts it.

    ``lives`` and ``claims`` are in the batch's input order; ``owners`` names
    the publisher of each payout script. Besides the transaction and each
    channel's state, what every item earned and paid in fees is kept for the
    dashboard: the channel's share beyond its reserve, split by what each item
    billed, less its part of the fee the server side paid.
    """
    now = time.time()
    ops: list[Op] = [
        (
            "INSERT OR REPLACE INTO settlements(txid, tx, fee, vsize, reserves, channels, "
            "state, created_at) VALUES (?, ?, ?, ?, ?, ?, 'broadcast', ?)",
            (batch.txid, batch.tx.hex(), batch.fee, batch.vsize, batch.reserves,
             len(lives), now),
        ),
    ]
    for spk, amount in batch.server_outputs:
        ops.append(
            (
                "INSERT OR REPLACE INTO payouts(txid, publisher, script, amount) "
                "VALUES (?, ?, ?, ?)",
                (batch.txid, owners.get(spk, "operator"), spk.hex(), amount),
            )
        )
    media_total = sum(c.share - c.reserve for c in claims)
    server_fee = max(0, media_total - sum(a for _, a in batch.server_outputs))
    for live, claim in zip(lives, claims, strict=True):
        core = live.core
        ops.append(
            state_op(
                live.row_id,
                core,
                settle_txid=batch.txid,
                settle_fee=claim.reserve,
                settled_at=now,
            )
        )
        media = claim.share - claim.reserve
        bills = {m: b for m, b in live.media_bill.items() if b > 0}
        bill_sum = sum(bills.values())
        for item, bill in sorted(bills.items()):
            gross = media * bill // bill_sum if bill_sum else 0
            fee = server_fee * gross // media_total if media_total else 0
            ops.append(
                (
                    "INSERT OR REPLACE INTO earnings(txid, channel, media, gross, fee) "
                    "VALUES (?, ?, ?, ?, ?)",
                    (batch.txid, live.row_id, item, gross, fee),
                )
            )
    return ops


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
        exit_fee=row["exit_fee"] or 0,
    )
    core = ServerChannel.restore(record, server_privkey=privkey, limits=limits)
    meter = ServerMeter(
        row["bill"] or 0,
        {d["media"]: d["delivered_ms"] for d in deliveries},
        reserve=core.exit_fee,
    )
    return LiveChannel(
        row_id=row["id"],
        core=core,
        meter=meter,
        media_bill={d["media"]: d["bill"] for d in deliveries},
        durable_paid=core.paid,
        disconnected_at=row["disconnected_at"],
    )
