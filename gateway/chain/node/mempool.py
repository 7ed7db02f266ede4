"""The mempool: acceptance policy, persistence, and how it follows the chain.

Acceptance checks run in Bitcoin Core's order and with its reject reasons
(validation.cpp ``PreChecks``/``PolicyScriptChecks``, policy.cpp): decode
(-22), context-free checks, standardness (version, size, output types, dust,
one OP_RETURN), finality for the next block (BIP113 median-time-past), BIP68
sequence locks, inputs present and unspent in chain or mempool (-25; -26
``txn-mempool-conflict`` for a mempool double spend: no replacement), coinbase
maturity, value balance, min relay fee 1 sat/vB, relay policy on signatures
and finally every input through ``pbk.ScriptPubkey.verify`` with all
consensus flags.

Each accepted transaction is committed to node.sqlite before the RPC that
sent it answers, and removed in the same transaction as the block that mines
or conflicts it: a kill -9 keeps exactly the mempool that RPCs reported. On
start the saved transactions are re-validated in their order, as Core's
``LoadMempool`` does with ``mempool.dat``.

After a reorg the transactions of the disconnected blocks go back in first,
then the previous mempool, each re-validated against the new tip (Core's
``MaybeUpdateMempoolForReorg``, disconnected ones bypassing the fee floor as
Core's ``bypass_limits`` does); what no longer fits is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

from bitcoin.core import CTransaction

from gateway.chain.blocks import COIN, block_txids
from gateway.chain.kernel import ScriptVerifyError, prepare_transaction
from gateway.chain.kernel import verify_input as kernel_verify_input
from gateway.chain.node.chainstate import ChainState, ChainUpdate
from gateway.chain.node.common import (
    COINBASE_MATURITY,
    MAX_MONEY,
    MIN_RELAY_FEE_PER_KVB,
    RPC_DESERIALIZATION_ERROR,
    RPC_VERIFY_ALREADY_IN_CHAIN,
    RPC_VERIFY_ERROR,
    RPC_VERIFY_REJECTED,
    Coin,
    NodeRpcError,
    Outpoint,
    TxRejected,
    btc,
)
from gateway.chain.node.fees import FeeEstimator
from gateway.chain.node.policy import check_input_policy, dust_threshold
from gateway.chain.node.wallet import script_type
from gateway.protocol.tx import decode_canonical, measure, witness_stack

log = logging.getLogger(__name__)

MAX_STANDARD_TX_WEIGHT = 400_000
MIN_STANDARD_TX_NONWITNESS_SIZE = 65
MAX_OP_RETURN_RELAY = 83
LOCKTIME_THRESHOLD = 500_000_000
SEQUENCE_FINAL = 0xFFFFFFFF
SEQUENCE_DISABLE_FLAG = 1 << 31
SEQUENCE_TYPE_FLAG = 1 << 22
SEQUENCE_MASK = 0xFFFF


@dataclass(slots=True)
class MempoolEntry:
    """An accepted unconfirmed transaction, with its ids and sizes worked out once."""

    tx: CTransaction
    txid: bytes
    wtxid: bytes
    vsize: int
    weight: int
    fee: int
    time: int
    height: int
    parents: set[bytes] = field(default_factory=set)


class Mempool:
    """Unconfirmed transactions in acceptance order (a valid topological order)."""

    def __init__(self, chain: ChainState, clock: Callable[[], int], fees: FeeEstimator) -> None:
        self.chain = chain
        self.clock = clock
        self.fees = fees
        self.entries: dict[bytes, MempoolEntry] = {}
        #: outpoint -> txid of the mempool transaction spending it.
        self.spent: dict[Outpoint, bytes] = {}
        self._seq = 0

    # -- queries -------------------------------------------------------------

    def lookup_coin(self, outpoint: Outpoint) -> Coin | None:
        """An unspent output of the chain or of a mempool transaction."""
        coin = self.chain.utxos.get(outpoint)
        if coin is not None:
            return coin
        entry = self.entries.get(outpoint[0])
        if entry is not None and outpoint[1] < len(entry.tx.vout):
            out = entry.tx.vout[outpoint[1]]
            return Coin(out.nValue, bytes(out.scriptPubKey), self.chain.tip_height + 1, False)
        return None

    def children(self, txid: bytes) -> list[bytes]:
        """Mempool transactions spending an output of ``txid``."""
        return sorted({c for o, c in self.spent.items() if o[0] == txid})

    # -- acceptance ----------------------------------------------------------

    def check(
        self, tx: CTransaction, max_fee_rate: Decimal | None, *, bypass_limits: bool = False
    ) -> MempoolEntry:
        """Run every mempool check on ``tx``; return the entry it would get.

        Raises ``TxRejected`` with Bitcoin Core's code and reason.
        """
        chain = self.chain
        sizes = measure(tx)
        txid = sizes.txid
        # CheckTransaction (consensus, context-free)
        if not tx.vin:
            raise TxRejected(RPC_VERIFY_REJECTED, "bad-txns-vin-empty")
        if not tx.vout:
            raise TxRejected(RPC_VERIFY_REJECTED, "bad-txns-vout-empty")
        if tx.is_coinbase():
            raise TxRejected(RPC_VERIFY_REJECTED, "coinbase")
        total_out = 0
        for out in tx.vout:
            if out.nValue < 0:
                raise TxRejected(RPC_VERIFY_REJECTED, "bad-txns-vout-negative")
            if out.nValue > MAX_MONEY:
                raise TxRejected(RPC_VERIFY_REJECTED, "bad-txns-vout-toolarge")
            total_out += out.nValue
            if total_out > MAX_MONEY:
                raise TxRejected(RPC_VERIFY_REJECTED, "bad-txns-txouttotal-toolarge")
        outpoints = [(i.prevout.hash, i.prevout.n) for i in tx.vin]
        if len(set(outpoints)) != len(outpoints):
            raise TxRejected(RPC_VERIFY_REJECTED, "bad-txns-inputs-duplicate")
        # IsStandardTx (policy)
        if not 1 <= tx.nVersion <= 3:
            raise TxRejected(RPC_VERIFY_REJECTED, "version")
        if sizes.weight > MAX_STANDARD_TX_WEIGHT:
            raise TxRejected(RPC_VERIFY_REJECTED, "tx-size")
        if sizes.base_size < MIN_STANDARD_TX_NONWITNESS_SIZE:
            raise TxRejected(RPC_VERIFY_REJECTED, "tx-size-small")
        data_outputs = 0
        for out in tx.vout:
            script = bytes(out.scriptPubKey)
            kind = script_type(script)
            if kind == "nulldata":
                data_outputs += 1
                if len(script) > MAX_OP_RETURN_RELAY:
                    raise TxRejected(RPC_VERIFY_REJECTED, "scriptpubkey")
            elif kind in ("nonstandard", "witness_unknown", "multisig", "pubkey"):
                raise TxRejected(RPC_VERIFY_REJECTED, "scriptpubkey")
            elif out.nValue < dust_threshold(script):
                raise TxRejected(RPC_VERIFY_REJECTED, "dust")
        if data_outputs > 1:
            raise TxRejected(RPC_VERIFY_REJECTED, "multi-op-return")
        # IsFinalTx for the next block, with BIP113 median-time-past.
        next_height = chain.tip_height + 1
        mtp = chain.median_time_past()
        if tx.nLockTime != 0:
            limit = next_height if tx.nLockTime < LOCKTIME_THRESHOLD else mtp
            if tx.nLockTime >= limit and any(i.nSequence != SEQUENCE_FINAL for i in tx.vin):
                raise TxRejected(RPC_VERIFY_REJECTED, "non-final")
        if txid in self.entries:
            raise TxRejected(RPC_VERIFY_ALREADY_IN_CHAIN, "txn-already-in-mempool")
        # Inputs: in the chain or in the mempool, and not spent by the mempool.
        spent: list[Coin] = []
        parents: set[bytes] = set()
        for outpoint in outpoints:
            if outpoint in self.spent:
                raise TxRejected(RPC_VERIFY_REJECTED, "txn-mempool-conflict")
            coin = self.lookup_coin(outpoint)
            if coin is None:
                if any((txid, n) in chain.utxos for n in range(len(tx.vout))):
                    raise TxRejected(RPC_VERIFY_ALREADY_IN_CHAIN, "txn-already-known")
                raise TxRejected(RPC_VERIFY_ERROR, "bad-txns-inputs-missingorspent")
            if outpoint[0] in self.entries:
                parents.add(outpoint[0])
            if coin.coinbase and next_height - coin.height < COINBASE_MATURITY:
                raise TxRejected(
                    RPC_VERIFY_REJECTED,
                    "bad-txns-premature-spend-of-coinbase",
                    f"tried to spend coinbase at depth {next_height - coin.height}",
                )
            spent.append(coin)
        # BIP68 relative lock-times (CheckSequenceLocksAtTip).
        if tx.nVersion >= 2:
            self._check_sequence_locks(tx, spent, next_height, mtp)
        total_in = sum(c.value for c in spent)
        if total_in < total_out:
            raise TxRejected(
                RPC_VERIFY_REJECTED,
                "bad-txns-in-belowout",
                f"value in ({btc(total_in):.8f}) < value out ({btc(total_out):.8f})",
            )
        fee = total_in - total_out
        vsize = sizes.vsize
        min_fee = vsize * MIN_RELAY_FEE_PER_KVB // 1000
        if fee < min_fee and not bypass_limits:
            raise TxRejected(RPC_VERIFY_REJECTED, "min relay fee not met", f"{fee} < {min_fee}")
        if max_fee_rate is not None and max_fee_rate > 0:
            max_fee = int(max_fee_rate * COIN) * vsize // 1000
            if fee > max_fee:
                raise TxRejected(RPC_VERIFY_ERROR, "max-fee-exceeded")
        # Relay policy on signatures, then consensus scripts through the kernel.
        for index, (txin, coin) in enumerate(zip(tx.vin, spent, strict=True)):
            check_input_policy(coin.script, bytes(txin.scriptSig), witness_stack(tx, index))
        spent_outputs = [(c.script, c.value) for c in spent]
        try:
            ktx, txdata, _ = prepare_transaction(sizes.serialized, spent_outputs)
            for index in range(len(spent_outputs)):
                kernel_verify_input(ktx, index, spent_outputs, txdata=txdata)
        except ScriptVerifyError as exc:
            raise TxRejected(RPC_VERIFY_REJECTED, exc.reason) from exc
        except ValueError as exc:
            raise TxRejected(RPC_DESERIALIZATION_ERROR, "TX decode failed", str(exc)) from exc
        return MempoolEntry(
            tx, txid, sizes.wtxid, vsize, sizes.weight, fee, self.clock(), chain.tip_height,
            parents,
        )

    def _check_sequence_locks(
        self, tx: CTransaction, spent: list[Coin], next_height: int, mtp: int
    ) -> None:
        chain = self.chain
        min_height = -1
        min_time = -1
        for txin, coin in zip(tx.vin, spent, strict=True):
            if txin.nSequence & SEQUENCE_DISABLE_FLAG:
                continue
            value = txin.nSequence & SEQUENCE_MASK
            if txin.nSequence & SEQUENCE_TYPE_FLAG:
                base_height = max(0, min(coin.height, next_height) - 1)
                base = chain.median_time_past(chain.active[base_height])
                min_time = max(min_time, base + (value << 9) - 1)
            else:
                min_height = max(min_height, coin.height + value - 1)
        if min_height >= next_height or min_time >= mtp:
            raise TxRejected(RPC_VERIFY_REJECTED, "non-BIP68-final")

    def _insert(self, entry: MempoolEntry) -> None:
        txid = entry.txid
        self.entries[txid] = entry
        for txin in entry.tx.vin:
            self.spent[(txin.prevout.hash, txin.prevout.n)] = txid

    def _persist(self, entry: MempoolEntry) -> None:
        self._seq += 1
        self.chain.db.execute(
            "INSERT OR REPLACE INTO mempool VALUES (?, ?, ?, ?)",
            (entry.txid, self._seq, bytes(entry.tx.serialize()), entry.time),
        )

    def add(self, entry: MempoolEntry) -> None:
        """Add a checked entry; it is on disk when this returns."""
        with self.chain.db:
            self._persist(entry)
        self._insert(entry)

    def accept(self, tx: CTransaction, max_fee_rate: Decimal | None = None) -> MempoolEntry:
        """Check and add ``tx`` (the caller holds the node's lock)."""
        entry = self.check(tx, max_fee_rate)
        self.add(entry)
        return entry

    def load(self) -> None:
        """Re-validate the saved transactions in their order (Core's ``LoadMempool``)."""
        db = self.chain.db
        rows = db.execute("SELECT txid, raw, time FROM mempool ORDER BY seq").fetchall()
        dropped: list[tuple[bytes]] = []
        for txid, raw, when in rows:
            try:
                entry = self.check(decode_canonical(bytes(raw)), None)
            except (NodeRpcError, ValueError) as exc:
                log.info("dropping saved mempool transaction: %s", exc)
                dropped.append((bytes(txid),))
                continue
            entry.time = when
            self._insert(entry)
        self._seq = max((s for (s,) in db.execute("SELECT seq FROM mempool")), default=0)
        if dropped:
            with db:
                db.executemany("DELETE FROM mempool WHERE txid=?", dropped)

    def forget_saved(self) -> None:
        """Start empty, as bitcoind with ``-persistmempool=0`` does."""
        with self.chain.db as db:
            db.execute("DELETE FROM mempool")

    # -- following the chain -------------------------------------------------

    def _evict(self, txid: bytes, removed: list[bytes]) -> None:
        entry = self.entries.pop(txid, None)
        if entry is None:
            return
        removed.append(txid)
        for child, other in list(self.entries.items()):
            if txid in other.parents:
                self._evict(child, removed)

    def _rebuild_spent(self) -> None:
        self.spent = {
            (txin.prevout.hash, txin.prevout.n): txid
            for txid, entry in self.entries.items()
            for txin in entry.tx.vin
        }
        for entry in self.entries.values():
            entry.parents &= self.entries.keys()

    def on_chain_update(self, update: ChainUpdate) -> None:
        """Follow a move of the chain (runs inside the chain's transaction)."""
        if update.disconnected:
            self._after_reorg(update)
            return
        removed: list[bytes] = []
        for block in update.connected:
            rates: list[int] = []
            spent: set[Outpoint] = set()
            for tx, txid in zip(block.vtx[1:], block_txids(block)[1:], strict=True):
                entry = self.entries.pop(txid, None)
                if entry is not None:
                    removed.append(txid)
                    rates.append(entry.fee * 1000 // entry.vsize)
                spent.update((i.prevout.hash, i.prevout.n) for i in tx.vin)
            self.fees.record(block.GetHash(), rates)
            for outpoint in spent:
                other = self.spent.get(outpoint)
                if other is not None and other in self.entries:
                    self._evict(other, removed)  # a conflict, and what spends it
            self._rebuild_spent()
        self.chain.db.executemany("DELETE FROM mempool WHERE txid=?", [(t,) for t in removed])

    def _after_reorg(self, update: ChainUpdate) -> None:
        for block in update.disconnected:
            self.fees.forget(block.GetHash())
        candidates = [
            (tx, txid, True)
            for block in reversed(update.disconnected)
            for tx, txid in zip(block.vtx[1:], block_txids(block)[1:], strict=True)
        ] + [(entry.tx, entry.txid, False) for entry in self.entries.values()]
        times = {txid: entry.time for txid, entry in self.entries.items()}
        self.entries = {}
        self.spent = {}
        db = self.chain.db
        db.execute("DELETE FROM mempool")
        for tx, txid, from_block in candidates:
            if txid in self.entries:
                continue
            try:
                entry = self.check(tx, None, bypass_limits=from_block)
            except NodeRpcError:
                continue
            entry.time = times.get(txid, entry.time)
            self._insert(entry)
            self._persist(entry)
