"""The UTXO index, the wallet's share of it, and the optional txid index.

The kernel's C API does not expose its coins view, so the node keeps its own
beside it: ``utxos`` in memory and in node.sqlite's ``utxos`` table, moved by
``connect``/``disconnect`` inside the chain's transaction. Connecting a block
writes its undo record (the coins it spent, like Core's ``CTxUndo`` in the
rev*.dat files); disconnecting reads it back and walks the block's
transactions last to first, as Core's ``DisconnectBlock``, so an output
created and spent inside one block comes and goes correctly.
"""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Callable, Iterable

from bitcoin.core import CBlock

from gateway.chain.blocks import block_hash_hex, block_txids
from gateway.chain.node import store
from gateway.chain.node.common import Coin, Outpoint

Changes = dict[Outpoint, Coin | None]


class UtxoIndexError(Exception):
    """The index and a block disagree (a block spends a coin the index lacks)."""


def parse_undo(data: bytes) -> list[Coin]:
    """The coins of an undo record, in the block's input order."""
    coins: list[Coin] = []
    pos = 0
    while pos < len(data):
        value, height, coinbase = struct.unpack_from("<QIB", data, pos)
        pos += 13
        size = data[pos]
        pos += 1
        if size == 0xFD:
            size = int.from_bytes(data[pos : pos + 2], "little")
            pos += 2
        elif size == 0xFE:
            size = int.from_bytes(data[pos : pos + 4], "little")
            pos += 4
        coins.append(Coin(value, data[pos : pos + size], height, bool(coinbase)))
        pos += size
    return coins


class UtxoIndex:
    """Unspent outputs of the active chain (and, with ``-txindex``, where each tx was mined)."""

    def __init__(self) -> None:
        self.utxos: dict[Outpoint, Coin] = {}
        self.wallet_utxos: set[Outpoint] = set()
        #: txid -> hash of the block it was last connected in (``-txindex`` only).
        self.txindex: dict[bytes, bytes] | None = None
        #: Whether a script belongs to the wallet (set by the node).
        self.owns: Callable[[bytes], bool] = lambda script: False

    def load(
        self, db: sqlite3.Connection, *, txindex: bool,
        active_blocks: Callable[[], Iterable[CBlock]],
    ) -> None:
        """Read the index from node.sqlite; build or drop the txid index as asked."""
        self.utxos.clear()
        self.wallet_utxos.clear()
        for txid, vout, value, script, height, coinbase in db.execute("SELECT * FROM utxos"):
            self.add_coin((bytes(txid), vout), Coin(value, bytes(script), height, bool(coinbase)))
        exists = db.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name='txindex'"
        ).fetchone()
        if not txindex:
            self.txindex = None
            if exists:
                # Like a stock node started without -txindex: no index is kept
                # (and a stale one is not left to be trusted later).
                with db:
                    db.execute("DROP TABLE txindex")
            return
        if exists:
            self.txindex = {bytes(t): bytes(b) for t, b in db.execute("SELECT * FROM txindex")}
            return
        # -txindex on a chain that had none: index the active chain now.
        with db:
            db.execute("CREATE TABLE txindex (txid BLOB PRIMARY KEY, block BLOB NOT NULL)")
            self.txindex = {}
            for block in active_blocks():
                self._index_txs(db, block)

    def add_coin(self, outpoint: Outpoint, coin: Coin) -> None:
        """Add an unspent output (noting it if it pays the wallet)."""
        self.utxos[outpoint] = coin
        if self.owns(coin.script):
            self.wallet_utxos.add(outpoint)

    def _index_txs(self, db: sqlite3.Connection, block: CBlock) -> None:
        if self.txindex is not None:
            block_hash = block.GetHash()
            rows = [(txid, block_hash) for txid in block_txids(block)]
            db.executemany("INSERT OR REPLACE INTO txindex VALUES (?, ?)", rows)
            self.txindex.update(rows)

    def connect(
        self, db: sqlite3.Connection, block: CBlock, height: int, changes: Changes
    ) -> bytes:
        """Apply ``block`` (at ``height``); return its undo record (the coins it spent)."""
        undo = bytearray()
        for tx, txid in zip(block.vtx, block_txids(block), strict=True):
            coinbase = tx.is_coinbase()
            if not coinbase:
                for txin in tx.vin:
                    outpoint = (txin.prevout.hash, txin.prevout.n)
                    coin = self.utxos.pop(outpoint, None)
                    if coin is None:
                        raise UtxoIndexError(f"connected block spends unknown {outpoint}")
                    self.wallet_utxos.discard(outpoint)
                    changes[outpoint] = None
                    undo += coin.serialize()
            for n, out in enumerate(tx.vout):
                if out.scriptPubKey[:1] == b"\x6a":
                    continue  # provably unspendable: never enters the UTXO set
                coin = Coin(out.nValue, bytes(out.scriptPubKey), height, coinbase)
                self.add_coin((txid, n), coin)
                changes[(txid, n)] = coin
        self._index_txs(db, block)
        return bytes(undo)

    def disconnect(self, db: sqlite3.Connection, block: CBlock, changes: Changes) -> None:
        """Undo ``block`` with its undo record, transactions last to first.

        The txindex keeps its entries, as Core's does: a transaction of a
        stale block stays findable there until a new block replaces it.
        """
        record = store.undo_record(db, block.GetHash())
        if record is None:
            raise UtxoIndexError(f"no undo record for block {block_hash_hex(block)}")
        coins = parse_undo(record)
        spent_per_tx: list[list[Coin]] = []
        for tx in block.vtx:
            count = 0 if tx.is_coinbase() else len(tx.vin)
            spent_per_tx.append(coins[:count])
            coins = coins[count:]
        txids = block_txids(block)
        for tx, txid, spent in zip(
            reversed(block.vtx), reversed(txids), reversed(spent_per_tx), strict=True
        ):
            for n in range(len(tx.vout)):
                if self.utxos.pop((txid, n), None) is not None:
                    changes[(txid, n)] = None
                self.wallet_utxos.discard((txid, n))
            for txin, coin in zip(tx.vin if not tx.is_coinbase() else (), spent, strict=True):
                outpoint = (txin.prevout.hash, txin.prevout.n)
                self.add_coin(outpoint, coin)
                changes[outpoint] = coin

    @staticmethod
    def write(db: sqlite3.Connection, changes: Changes) -> None:
        """Write the net effect of connects and disconnects (inside the caller's transaction)."""
        db.executemany(
            "DELETE FROM utxos WHERE txid=? AND vout=?",
            [o for o, c in changes.items() if c is None],
        )
        db.executemany(
            "INSERT OR REPLACE INTO utxos VALUES (?,?,?,?,?,?)",
            [
                (o[0], o[1], c.value, c.script, c.height, int(c.coinbase))
                for o, c in changes.items() if c is not None
            ],
        )
