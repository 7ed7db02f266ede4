"""The channel ledger: the only code that reads or writes channel state.

Theory of operation
-------------------

The ledger holds this process's live channels (:class:`LiveChannel`, keyed
by ``txid:vout``) and makes each change of them durable through its store,
a group-committing SQLite file (:mod:`gateway.ledger.store`) that a second
backend can replace: everything above the ledger — sessions, the funding
and settlement duties, the web pages and the operator's commands — speaks
to the ledger, never to a database.

A change is recorded in one call, and the call returns once it is durable
(fsync'd): the caller then commits the change to the core, sends what it
pays for, or goes on. The ledger never decides anything about money: the
pure core (:mod:`gateway.protocol`) decides, the ledger records, then the
core commits (protocol.md section 7: an increment is durable before
anything it pays for leaves).

The events, in a channel's life::

    opened ─► refund_signed ─► funded ─► state (confirm, lose, void)
        │                          └─► paid … ─► meter_flushed (session end)
        └─► abandoned                        └─► closing ─► batch_stored
                                                   ─► batch_abandoned
                                                   ─► batch_confirmed / refunded

Nothing on the per-payment path reads the database first: the live
channels are in memory and writes carry what changed (design.md, "Traps").

With ``gateway serve --workers N`` each worker's ledger holds its share of
the channels; :meth:`Ledger.take_over` and :meth:`Ledger.release` hand a
channel from one worker to another through the supervisor
(:mod:`gateway.handover`).

On PostgreSQL (``--store postgresql://…``) several gateway hosts share the
ledger: each holds its share of the channels, and every write of a held
channel is fenced by the channel's epoch (:mod:`gateway.ledger.cluster`). A
write refused by the fence means another host took the channel over: the
ledger drops it and its session hears ``session_replaced``.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from gateway.handover import WorkerRole
from gateway.keys import MasterKey
from gateway.ledger.handoff import HandOver
from gateway.ledger.live import (
    FUNDED_STATES,
    LIVE_STATES,
    ChannelReleased,
    LiveChannel,
)
from gateway.ledger.pg_store import Fenced, PgStore, is_postgres
from gateway.ledger.reports import Reports
from gateway.ledger.store import Op, Store

if TYPE_CHECKING:
    from gateway.ledger.cluster import Cluster
from gateway.protocol.channel import (
    ChannelRecord,
    PaymentRecord,
    ServerChannel,
    ServerState,
)
from gateway.protocol.messages import Limits
from gateway.protocol.metering import ServerMeter
from gateway.protocol.settlement import Batch, ChannelClaim
from gateway.protocol.transactions import Outpoint

__all__ = ["ChainWatch", "ChannelReleased", "Ledger", "LiveChannel", "list_channels"]

log = logging.getLogger(__name__)



class ChainWatch(Protocol):
    """What the ledger tells the chain follower about the channels it holds."""

    def watch_outpoint(self, txid: str, vout: int) -> None:
        """Follow spends of a funding output."""

    def unwatch_outpoint(self, txid: str, vout: int) -> None:
        """Stop following a funding output."""

    def watch_txid(self, txid: str) -> None:
        """Follow the block that confirms a settlement."""

    def unwatch_txid(self, txid: str) -> None:
        """Stop following a settlement."""


def _state_op(row_id: int, core: ServerChannel, **extra: Any) -> Op:
    columns = {"state": core.state.value, **extra}
    assignments = ", ".join(f"{name} = ?" for name in columns)
    return (f"UPDATE channels SET {assignments} WHERE id = ?", (*columns.values(), row_id))


class Ledger(HandOver):
    """This process's channels and every change of them, made durable (module docstring)."""

    def __init__(
        self,
        store: Store | PgStore,
        master: MasterKey,
        *,
        publisher_of: Callable[[], dict[str, str]],
        worker: WorkerRole | None = None,
        cluster: Cluster | None = None,
    ) -> None:
        self.store = store
        #: Set on PostgreSQL: this host among the hosts sharing the ledger.
        self.cluster = cluster
        #: The read side for pages and operators (gateway/ledger/reports.py).
        self.reports = Reports(store)
        self.master = master
        self.worker = worker
        #: media id -> publisher id, for the deliveries rows (the catalog's view).
        self._publisher_of = publisher_of
        #: The channels this process holds, by ``txid:vout``.
        self.channels: dict[str, LiveChannel] = {}
        self.limits: Limits | None = None
        self.watch: ChainWatch | None = None
        self._next_index = 1
        self._unfunded: Counter[str] = Counter()

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Open the store's writer."""
        await self.store.start()

    async def close(self) -> None:
        """Finish pending writes and close the store."""
        await self.store.close()

    def load(self, limits: Limits, watch: ChainWatch) -> list[LiveChannel]:
        """Hold every live channel stored (this worker's share); the ones loaded.

        A session that was live when the gateway stopped starts its resume
        grace from now (protocol.md section 8).
        """
        self.limits, self.watch = limits, watch
        if self.cluster is not None:  # this host's channels (before a restart)
            rows = self.store.read(
                "SELECT * FROM channels WHERE holder = ? ORDER BY id", (self.cluster.host_id,)
            )
        else:
            rows = self.store.read("SELECT * FROM channels ORDER BY id")
        largest = rows[-1]["id"] if rows else 0
        worker = self.worker
        self._next_index = worker.first_id_above(largest) if worker else largest + 1
        now = time.time()
        live_states = {s.value for s in LIVE_STATES}
        for row in rows:
            if row["state"] not in live_states or not row["channel_id"]:
                continue
            if worker is not None and not worker.holds_at_start(row["id"]):
                continue
            live = self._restore(row)
            live.disconnected_at = live.disconnected_at or now
            self.hold(live)
        log.info("loaded %d live channels", len(self.channels))
        return list(self.channels.values())

    def hold(self, live: LiveChannel) -> None:
        """Hold a funded channel here; the chain follower watches its funding and settlement."""
        self.channels[live.channel_id] = live
        outpoint = live.core.outpoint
        assert outpoint is not None and self.watch is not None
        self.watch.watch_outpoint(outpoint.txid, outpoint.vout)
        if live.core.settlement_txid is not None:
            self.watch.watch_txid(live.core.settlement_txid)

    def drop(self, live: LiveChannel) -> None:
        """Stop holding ``live`` (it ended, or went to another worker)."""
        if self.channels.get(live.channel_id) is live:
            del self.channels[live.channel_id]
        outpoint = live.core.outpoint
        if outpoint is not None and self.watch is not None:
            self.watch.unwatch_outpoint(outpoint.txid, outpoint.vout)
        if live.core.settlement_txid is not None and self.watch is not None:
            self.watch.unwatch_txid(live.core.settlement_txid)

    def watched_fundings(self) -> list[LiveChannel]:
        """The held channels whose funding is watched (waiting, or ready)."""
        return [c for c in self.channels.values() if c.core.state in FUNDED_STATES]

    # -- opening ----------------------------------------------------------------

    async def next_index(self) -> int:
        """A fresh channel index: store row id and K2's BIP32 child (gateway/keys.py)."""
        if self.cluster is not None:  # the database's sequence: unique across hosts
            return await self.cluster.next_index()
        index = self._next_index
        # Workers allocate ids ≡ their index (mod N): no two derive one key.
        self._next_index += self.worker.count if self.worker else 1
        return index

    def channel_key(self, index: int) -> bytes:
        """K2's private key for channel ``index``."""
        return self.master.channel_key(index)[0]

    def unfunded_opens(self, peer: str) -> int:
        """Channels opened from ``peer`` and not funded yet."""
        return self._unfunded[peer]

    def take_unfunded_slot(self, peer: str, limit: int) -> bool:
        """Count one more unfunded open from ``peer`` if it has fewer than ``limit``.

        Checked and counted at once, before anything is awaited: concurrent
        opens from one address cannot all pass the check (give the slot back
        with ``note_unfunded(peer, -1)``).
        """
        if self._unfunded[peer] >= limit:
            return False
        self._unfunded[peer] += 1
        return True

    def note_unfunded(self, peer: str, delta: int) -> None:
        """Count an unfunded open from ``peer`` (+1) or its end (-1)."""
        self._unfunded[peer] += delta
        if self._unfunded[peer] <= 0:
            del self._unfunded[peer]

    async def opened(self, row_id: int, core: ServerChannel, peer: str) -> None:
        """An ``open`` was accepted: the row (and so K2's index) is durable before ``terms``.

        A restart can always re-derive the key of an address a client funds.
        """
        await self.store.write(
            [
                (
                    "INSERT INTO channels(id, kind, client_pubkey, server_pubkey, expiry, "
                    "change_script, network, state, created_at, client_addr, exit_fee, "
                    "funding_script) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        row_id,
                        core.kind,
                        core.script.client_pubkey.hex(),
                        core.script.server_pubkey.hex(),
                        core.expiry,
                        core.change_script.hex(),
                        core.network,
                        core.state.value,
                        time.time(),
                        peer,
                        core.exit_fee,
                        core.script.script_pubkey.hex(),
                    ),
                )
            ]
        )

    async def refund_signed(self, row_id: int, core: ServerChannel, tx: bytes, value: int) -> None:
        """Multisig: the T2 the gateway signed (protocol.md section 5, ``refund``)."""
        assert core.refund_outpoint is not None
        await self.store.write(
            [
                _state_op(
                    row_id,
                    core,
                    refund_tx=tx.hex(),
                    refund_value=value,
                    refund_outpoint=core.refund_outpoint.channel_id,
                )
            ]
        )

    async def abandoned(self, row_id: int, core: ServerChannel) -> None:
        """An unfunded channel closed (``closed`` with nothing to settle)."""
        await self.store.write([_state_op(row_id, core, closed_at=time.time())])

    async def expire_unfunded(self, opened_before: float) -> None:
        """Abandon channels opened before ``opened_before`` and never funded.

        Their sessions ended without a trace (a crash): no session can fund
        or resume them any more (protocol.md section 5: only a funded channel
        resumes). The rows stay, so their key indexes are never used again.
        """
        await self.store.write(
            [
                (
                    "UPDATE channels SET state = 'closed', closed_at = ? "
                    "WHERE state IN ('open', 'refund_signed') AND channel_id IS NULL "
                    "AND created_at < ?",
                    (time.time(), opened_before),
                )
            ]
        )

    async def funded(self, row_id: int, core: ServerChannel) -> LiveChannel:
        """The funding output was accepted: durable, then held here."""
        live = LiveChannel(
            row_id=row_id, core=core, meter=ServerMeter(reserve=core.exit_fee), durable_paid=0
        )
        ops = [
            _state_op(
                row_id,
                core,
                channel_id=core.channel_id,
                value=core.value,
                balance=core.balance,
                funded_at=time.time(),
            )
        ]
        if self.cluster is not None:  # held here from its funding on, at epoch 1
            ops.append(self.cluster.claim_op(row_id))
            live.epoch = 1
        await self.store.write(ops)
        self.hold(live)
        return live

    def known_outpoint(self, channel_id: str) -> bool:
        """True if a stored channel (in any state) is funded by ``channel_id``."""
        return bool(self.store.read("SELECT 1 FROM channels WHERE channel_id = ?", (channel_id,)))

    # -- state, payments, the meter ------------------------------------------------

    async def state(self, live: LiveChannel, **extra: Any) -> None:
        """The core moved (confirm, lose its funding, void...): record its state."""
        await self._write_held([live], [_state_op(live.row_id, live.core, **extra)])

    async def paid(self, live: LiveChannel, record: PaymentRecord) -> None:
        """Make an accepted increment durable, with the meter (the hot path).

        One UPDATE for the increment and the bill: the statements run on the
        event loop's thread, beside the store's fsync thread.
        """
        await self._write_with_meter(
            live,
            [
                (
                    "UPDATE channels SET seq = ?, balance = ?, sig = ?, bill = ? WHERE id = ?",
                    (record.seq, record.balance, record.sig.hex(), live.meter.bill, live.row_id),
                )
            ],
        )
        live.durable_paid = record.paid

    async def meter_flushed(self, live: LiveChannel, disconnected_at: float | None) -> None:
        """A session ended: the meter (free chunks since the last pay) and when it left.

        The resume grace (section 8) runs from this durable timestamp.
        """
        await self._write_with_meter(
            live,
            [
                ("UPDATE channels SET bill = ? WHERE id = ?", (live.meter.bill, live.row_id)),
                (
                    "UPDATE channels SET disconnected_at = ? WHERE id = ?",
                    (disconnected_at, live.row_id),
                ),
            ],
        )

    async def _write_with_meter(self, live: LiveChannel, ops: list[Op]) -> None:
        """Write ``ops`` with the delivery rows changed since the last write.

        A media stays marked changed until a write carrying it is durable, so
        a failed write loses no delivery (it goes with the next one).
        """
        written = set(live.dirty_media)
        live.dirty_media.clear()
        try:
            await self._write_held([live], [*ops, *self._delivery_ops(live, written)])
        except BaseException:
            live.dirty_media |= written
            raise

    async def _write_held(self, lives: Sequence[LiveChannel], ops: list[Op]) -> None:
        """Write ``ops`` about channels held here: fenced when hosts share the ledger.

        A write the fence refuses (another host took one of ``lives`` over)
        takes effect in no part; those channels are dropped here, their
        sessions told ``session_replaced``, and :class:`Fenced` is raised.
        """
        if self.cluster is None:
            await self.store.write(ops)
            return
        fences = [self.cluster.fence_op(live.row_id, live.epoch) for live in lives]
        try:
            await self.store.write([*fences, *ops])
        except Fenced:
            for live in lives:
                self.lost(live.row_id)
            raise

    def _delivery_ops(self, live: LiveChannel, media_changed: set[str]) -> list[Op]:
        ops: list[Op] = []
        delivered = live.meter.delivered_ms
        publisher_of = self._publisher_of()
        for media in sorted(media_changed):
            ops.append(
                (
                    "INSERT INTO deliveries(channel, media, publisher, delivered_ms, bill) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(channel, media) DO UPDATE SET "
                    "delivered_ms = excluded.delivered_ms, bill = excluded.bill",
                    (
                        live.row_id,
                        media,
                        publisher_of.get(media, ""),
                        delivered.get(media, 0),
                        live.media_bill.get(media, 0),
                    ),
                )
            )
        return ops

    # -- settlement ------------------------------------------------------------------

    async def closing(self, live: LiveChannel) -> None:
        """No more payments: the meter and the closing state, before ``closed`` is said."""
        await self._write_with_meter(
            live,
            [
                ("UPDATE channels SET bill = ? WHERE id = ?", (live.meter.bill, live.row_id)),
                _state_op(live.row_id, live.core, closing_at=time.time()),
            ],
        )

    async def closed_unsettled(self, live: LiveChannel) -> None:
        """A closing channel with nothing to broadcast: the client refunds at expiry."""
        await self._write_held([live], [_state_op(live.row_id, live.core, closed_at=time.time())])

    async def batch_stored(
        self,
        batch: Batch,
        lives: Sequence[LiveChannel],
        claims: Sequence[ChannelClaim],
        owners: dict[bytes, str],
    ) -> None:
        """A settlement batch, stored BEFORE it is broadcast, so a restart rebroadcasts it.

        ``lives`` and ``claims`` are in the batch's input order; ``owners``
        names the publisher of each payout script. Besides the transaction
        and each channel's state, what each item earned and paid in fees is
        kept for the dashboard: the channel's share beyond its reserve, split
        by what each item billed, less its part of the fee the server side paid.
        """
        now = time.time()
        ops: list[Op] = [
            (
                "INSERT INTO settlements(txid, tx, fee, vsize, reserves, channels, "
                "state, created_at) VALUES (?, ?, ?, ?, ?, ?, 'broadcast', ?) "
                "ON CONFLICT(txid) DO UPDATE SET tx = excluded.tx, fee = excluded.fee, "
                "vsize = excluded.vsize, reserves = excluded.reserves, "
                "channels = excluded.channels, state = excluded.state, "
                "created_at = excluded.created_at",
                (batch.txid, batch.tx.hex(), batch.fee, batch.vsize, batch.reserves,
                 len(lives), now),
            ),
        ]
        for spk, amount in batch.server_outputs:
            ops.append(
                (
                    "INSERT INTO payouts(txid, publisher, script, amount) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT(txid, script) DO UPDATE SET publisher = excluded.publisher, "
                    "amount = excluded.amount",
                    (batch.txid, owners.get(spk, "operator"), spk.hex(), amount),
                )
            )
        media_total = sum(c.share - c.reserve for c in claims)
        server_fee = max(0, media_total - sum(a for _, a in batch.server_outputs))
        for live, claim in zip(lives, claims, strict=True):
            ops.append(
                _state_op(
                    live.row_id,
                    live.core,
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
                        "INSERT INTO earnings(txid, channel, media, gross, fee) "
                        "VALUES (?, ?, ?, ?, ?) ON CONFLICT(txid, channel, media) DO UPDATE "
                        "SET gross = excluded.gross, fee = excluded.fee",
                        (batch.txid, live.row_id, item, gross, fee),
                    )
                )
        await self._write_held(lives, ops)
        if self.watch is not None:
            self.watch.watch_txid(batch.txid)

    async def batch_abandoned(self, txid: str, lives: Sequence[LiveChannel]) -> None:
        """The node refused the batch for good: never broadcast again; its channels settle anew."""
        await self._write_held(
            lives,
            [
                ("UPDATE settlements SET state = 'abandoned' WHERE txid = ?", (txid,)),
                *(_state_op(live.row_id, live.core, settle_txid=None) for live in lives),
            ]
        )
        if self.watch is not None:
            self.watch.unwatch_txid(txid)

    async def batch_confirmed(self, txid: str, height: int, lives: Sequence[LiveChannel]) -> None:
        """The batch is as deep as a settlement must be: its channels are closed."""
        now = time.time()
        await self._write_held(
            lives,
            [
                (
                    "UPDATE settlements SET state = 'confirmed', confirmed_height = ? "
                    "WHERE txid = ?",
                    (height, txid),
                ),
                *(
                    _state_op(live.row_id, live.core, confirmed_height=height, closed_at=now)
                    for live in lives
                ),
            ]
        )
        if self.watch is not None:
            self.watch.unwatch_txid(txid)

    async def refunded(self, live: LiveChannel) -> None:
        """The client's refund spent the funding output (that deep)."""
        await self._write_held([live], [_state_op(live.row_id, live.core, closed_at=time.time())])

    def broadcast_batches(self, *, held_only: bool = False) -> dict[str, bytes]:
        """Stored batches not yet confirmed nor abandoned: txid -> transaction.

        ``held_only``: when hosts share the ledger, only those of channels held here.
        """
        if held_only and self.cluster is not None:
            txids = {c.core.settlement_txid for c in self.channels.values()}
            found = {t: self.batch_tx(t) for t in txids if t is not None}
            return {t: tx for t, tx in found.items() if tx is not None}
        return {
            row["txid"]: bytes.fromhex(row["tx"])
            for row in self.store.read("SELECT txid, tx FROM settlements WHERE state = 'broadcast'")
        }

    def batch_tx(self, txid: str) -> bytes | None:
        """The stored transaction of batch ``txid``, if it is still to be followed."""
        rows = self.store.read(
            "SELECT tx FROM settlements WHERE txid = ? AND state = 'broadcast'", (txid,)
        )
        return bytes.fromhex(rows[0]["tx"]) if rows else None

    # -- the chain checkpoint ---------------------------------------------------------

    def checkpoint(self) -> tuple[int, str] | None:
        """The last block the chain follower read (height, hash), if any."""
        rows = self.store.read("SELECT value FROM meta WHERE key = ?", (self._checkpoint_key,))
        if not rows:
            return None
        height, _, block_hash = str(rows[0]["value"]).partition(":")
        return int(height), block_hash

    async def save_checkpoint(self, height: int, block_hash: str) -> None:
        """Remember the last block read (where the next start reads from)."""
        value = f"{height}:{block_hash}"
        await self.store.write(
            [
                (
                    "INSERT INTO meta(key, value) VALUES (?, ?) "
                    "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                    (self._checkpoint_key, value),
                )
            ]
        )

    @property
    def _checkpoint_key(self) -> str:
        # Each host follows the chain through its own node client: its own checkpoint.
        if self.cluster is None:
            return "chain_checkpoint"
        return f"chain_checkpoint:{self.cluster.host_id}"

    # -- hand-over between workers (gateway/handover.py) --------------------------------

    def load_stored(self, channel_id: str) -> LiveChannel | None:
        """A copy of a channel this process does not hold, as stored (any state).

        A closed one, so that ``resume`` gets ``channel_closed``; in a worker,
        a live one held by another worker, to check a ``resume`` before
        :meth:`take_over`.
        """
        rows = self.store.read("SELECT * FROM channels WHERE channel_id = ?", (channel_id,))
        return self._restore(rows[0]) if rows else None

    def _restore(self, row: Any) -> LiveChannel:
        """Rebuild a :class:`LiveChannel` from its row (restart recovery, section 8)."""
        assert self.limits is not None
        deliveries = self.store.read(
            "SELECT media, delivered_ms, bill FROM deliveries WHERE channel = ?", (row["id"],)
        )
        outpoint = Outpoint.parse(row["channel_id"]) if row["channel_id"] else None
        refund = Outpoint.parse(row["refund_outpoint"]) if row["refund_outpoint"] else None
        record = ChannelRecord(
            state=ServerState(row["state"]),
            kind=row["kind"],
            client_pubkey=bytes.fromhex(row["client_pubkey"]),
            expiry=row["expiry"],
            change_script=bytes.fromhex(row["change_script"]),
            network=row["network"],
            outpoint=outpoint,
            value=row["value"],
            refund_outpoint=refund,
            refund_value=row["refund_value"],
            seq=row["seq"],
            balance=row["balance"] if row["balance"] is not None else row["value"],
            sig=bytes.fromhex(row["sig"]) if row["sig"] else None,
            settlement_txid=row["settle_txid"],
            exit_fee=row["exit_fee"] or 0,
        )
        core = ServerChannel.restore(
            record, server_privkey=self.channel_key(row["id"]), limits=self.limits
        )
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
            epoch=row["epoch"] if self.cluster is not None else 0,
        )

    # -- what the web pages and the operator read ----------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        """Commits and writes of this process's store (group commit: writes / commits)."""
        return {"commits": self.store.commits, "requests": self.store.requests}


def list_channels(db: Path | str) -> list[dict[str, Any]]:
    """Every stored channel, read-only (``gateway channels`` beside a running gateway).

    ``db``: the SQLite file, or a ``postgresql://`` URL of the shared ledger.
    """
    if isinstance(db, str) and is_postgres(db):
        store = PgStore(db, name="paystream-channels")
        try:
            return [
                dict(r)
                for r in store.read(
                    "SELECT id, channel_id, kind, state, value, balance, seq, expiry, "
                    "settle_txid, holder FROM channels ORDER BY id"
                )
            ]
        finally:
            asyncio.run(store.close())
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        rows = conn.execute(
            "SELECT id, channel_id, kind, state, value, balance, seq, expiry, settle_txid "
            "FROM channels ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    return [dict(r) for r in rows]
