"""The node's view of the chain: stored blocks, the active chain, the UTXO index.

Order of writes for every block (mined here, ``generateblock``,
``submitblock``):

1. write-ahead: the block's row is committed to node.sqlite as ``PENDING``;
2. ``kernel.process_block`` judges it (Bitcoin Core's consensus);
3. one transaction moves the UTXO index, the txindex, the undo records, the
   tip and the mempool to the kernel's new tip (``follow_kernel``); a block
   the kernel refused is deleted instead.

Only after step 3 does anything reach RPC: every query reads ``active`` and
``utxos``, never the kernel's tip, so no answer shows a tip that a kill -9
could take back. ``PENDING`` rows left by a crash were never reported and are
deleted on start.

The kernel writes its chainstate only when closed, so after a crash it
reopens behind (at its last flush). ``open`` replays the stored blocks it
lacks, or wipes its directories and replays from genesis when it is on
another branch or cannot open. ``flush`` (close and reopen, every
``FLUSH_INTERVAL`` blocks) bounds that replay.

Reorgs come from the kernel too: the kernel has no ``invalidateblock``, so
invalidating a block on the active chain wipes the kernel and replays the
stored chain up to the block's parent, then the other stored branches (the
kernel then activates the most-work valid one, as Core's ``InvalidateBlock``
followed by ``ActivateBestChain`` does). ``follow_kernel`` disconnects blocks
with their undo records (Core's ``DisconnectBlock``) and connects the new
branch, all in one transaction.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bitcoin.core import CBlock

from gateway.chain.kernel import Kernel, KernelError
from gateway.chain.node import store
from gateway.chain.node.common import Coin, Outpoint, block_work
from gateway.chain.node.index import UtxoIndex
from gateway.chain.node.store import INVALID, PENDING, VALID, BlockInfo

log = logging.getLogger(__name__)

#: Blocks connected between two kernel flushes: a crash replays at most these.
FLUSH_INTERVAL = 100
#: Bitcoin Core's median-time-past window (BIP113).
MTP_WINDOW = 11
#: Parsed blocks kept for the next reads: python-bitcoinlib's ``CBlock``
#: is slow to parse (docs/performance.md, "One transaction model"), and a new
#: block is read right after it is stored (connecting it, then ``getblock``).
RECENT_BLOCKS = 32
_REPLAY_BATCH = 100


class ChainError(Exception):
    """node.sqlite and the kernel disagree in a way the node cannot repair."""


@dataclass
class ChainUpdate:
    """A move of the active chain: blocks disconnected (tip first), then connected."""

    disconnected: list[CBlock] = field(default_factory=list)
    connected: list[CBlock] = field(default_factory=list)


OnUpdate = Callable[[ChainUpdate], None]


class ChainState:
    """Stored blocks, active chain and UTXO index of ``netdir``, kept in step with the kernel.

    Mutating methods must be called by one task at a time (the node's lock)
    and must run to completion (the node shields them from cancellation):
    a kernel call left running in a thread would otherwise move the kernel
    under a state that no longer follows it.
    """

    def __init__(self, netdir: Path, *, txindex: bool = False) -> None:
        self.netdir = netdir
        self.txindex_enabled = txindex
        self._db: sqlite3.Connection | None = None
        self._kernel: Kernel | None = None
        self.headers: dict[bytes, BlockInfo] = {}
        self.children: dict[bytes, list[bytes]] = {}
        self.invalid: set[bytes] = set()
        self.active: list[bytes] = []
        self.index = UtxoIndex()
        #: The index's coins (shared, not copied): outpoint -> coin.
        self.utxos = self.index.utxos
        #: Outpoints of ``utxos`` paying the wallet.
        self.wallet_utxos = self.index.wallet_utxos
        self.blocks_since_flush = 0
        self._mtp: dict[bytes, int] = {}
        self._recent: OrderedDict[bytes, CBlock] = OrderedDict()

    # -- storage -------------------------------------------------------------

    @property
    def db(self) -> sqlite3.Connection:
        """The node.sqlite connection."""
        if self._db is None:
            raise ChainError("the chain state is closed")
        return self._db

    @property
    def kernel(self) -> Kernel:
        """The kernel (raises once closed)."""
        if self._kernel is None:
            raise ChainError("the chain state is closed")
        return self._kernel

    def open_db(self) -> None:
        """Open node.sqlite (the wallet needs it before the chain is loaded)."""
        self._db = store.open_db(self.netdir)

    async def open(self) -> None:
        """Load the stored chain and bring the kernel to its tip (replaying if needed)."""
        db = self.db
        wipe = store.meta(db, "kernel_wipe") is not None
        if not wipe:
            try:
                self._kernel = await asyncio.to_thread(Kernel, self.netdir)
            except KernelError as exc:
                log.warning("the kernel's chainstate cannot open (%s): rebuilding it", exc)
                wipe = True
        if wipe:
            await self.wipe_kernel()
        with db:
            db.execute("DELETE FROM blocks WHERE status=?", (PENDING,))
        if db.execute("SELECT 1 FROM blocks LIMIT 1").fetchone() is None:
            self._import_kernel_chain()
        self._load()
        await self._sync_kernel(wiped=wipe)

    def _import_kernel_chain(self) -> None:
        """First start, or a node.sqlite from before the blocks table: take the kernel's chain."""
        kernel = self.kernel
        rows = []
        for height in range(kernel.tip_height + 1):
            raw = kernel.block_at(height)
            block = CBlock.deserialize(raw)
            rows.append(
                (block.GetHash(), height, block.hashPrevBlock, VALID, len(block.vtx), raw)
            )
        if len(rows) > 1:
            log.info("importing %d blocks from the kernel into node.sqlite", len(rows) - 1)
        with self.db:
            self.db.executemany(
                "INSERT INTO blocks (hash, height, prev, status, ntx, raw) VALUES (?,?,?,?,?,?)",
                rows,
            )
            self.db.execute("DELETE FROM utxos")
            self.db.execute("DROP TABLE IF EXISTS txindex")
            store.set_meta(self.db, "tip", rows[0][0])
        self._load()
        # Connect the imported blocks: the undo records and the index come from them.
        self._follow(rows[-1][0], lambda update: None)

    def _load(self) -> None:
        """(Re)load the in-memory view from node.sqlite (the durable truth)."""
        db = self.db
        self.headers.clear()
        self.children.clear()
        self.invalid.clear()
        self._mtp.clear()
        for block_hash, height, prev, header, ntx, status in store.load_headers(db):
            parent = self.headers.get(prev)
            work = block_work(int.from_bytes(header[72:76], "little"))
            chainwork = work + (parent.chainwork if parent else 0)
            self.add_header(BlockInfo(block_hash, height, prev, header, ntx, chainwork, status))
        tip = store.meta(db, "tip")
        active: list[bytes] = []
        cursor = bytes(tip) if tip is not None else None
        while cursor is not None and cursor in self.headers:
            active.append(cursor)
            info = self.headers[cursor]
            cursor = info.prev if info.height > 0 else None
        self.active = active[::-1]
        self.index.load(
            db, txindex=self.txindex_enabled,
            active_blocks=lambda: (self.block(h) for h in self.active[1:]),
        )

    @property
    def txindex(self) -> dict[bytes, bytes] | None:
        """txid -> block hash with ``-txindex``, else None."""
        return self.index.txindex

    @property
    def owns(self) -> Callable[[bytes], bool]:
        """Whether a script pays the wallet (the node sets it before ``open``)."""
        return self.index.owns

    @owns.setter
    def owns(self, value: Callable[[bytes], bool]) -> None:
        self.index.owns = value

    def add_header(self, info: BlockInfo) -> None:
        """Remember a judged block (and its place among its parent's children)."""
        self.headers[info.hash] = info
        if info.height > 0:
            self.children.setdefault(info.prev, []).append(info.hash)
        if info.status == INVALID:
            self.invalid.add(info.hash)

    async def close(self) -> None:
        """Flush the kernel (close is its only flush) and close node.sqlite."""
        if self._kernel is not None:
            kernel, self._kernel = self._kernel, None
            await asyncio.to_thread(kernel.close)
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- queries -------------------------------------------------------------

    @property
    def tip_height(self) -> int:
        """Height of the active chain's tip."""
        return len(self.active) - 1

    @property
    def tip_hash(self) -> bytes:
        """Hash of the active chain's tip (internal byte order)."""
        return self.active[-1]

    @property
    def tip(self) -> BlockInfo:
        """The tip's ``BlockInfo``."""
        return self.headers[self.active[-1]]

    def is_active(self, block_hash: bytes) -> bool:
        """True when ``block_hash`` is on the active chain."""
        info = self.headers.get(block_hash)
        return (
            info is not None
            and info.height < len(self.active)
            and self.active[info.height] == block_hash
        )

    def is_invalid(self, block_hash: bytes) -> bool:
        """True when the block or one of its ancestors was marked by ``invalidateblock``."""
        if not self.invalid:
            return False
        floor = min(self.headers[h].height for h in self.invalid)
        cursor = block_hash
        while cursor not in self.invalid:
            info = self.headers.get(cursor)
            if info is None or info.height <= floor:
                return False
            cursor = info.prev
        return True

    def invalid_closure(self) -> set[bytes]:
        """The marked blocks and all their descendants."""
        out: set[bytes] = set()
        for block_hash in self.invalid:
            out.add(block_hash)
            out.update(self.descendants(block_hash))
        return out

    def confirmations(self, info: BlockInfo) -> int:
        """Core's depth of a block: from 1 at the tip, -1 off the active chain."""
        return self.tip_height - info.height + 1 if self.is_active(info.hash) else -1

    def raw_block(self, block_hash: bytes) -> bytes:
        """Stored bytes of a known block."""
        return store.raw_block(self.db, block_hash)

    def has_undo(self, block_hash: bytes) -> bool:
        """True when the block was connected at some time (it has an undo record)."""
        return store.undo_record(self.db, block_hash) is not None

    def block(self, block_hash: bytes) -> CBlock:
        """A stored block, parsed (the node stored it: it needs no canonical check)."""
        block = self._recent.get(block_hash)
        if block is None:
            block = CBlock.deserialize(self.raw_block(block_hash))
            self.remember(block)
        else:
            self._recent.move_to_end(block_hash)
        return block

    def remember(self, block: CBlock) -> None:
        """Keep a stored block parsed for the next reads (a ``CBlock`` never changes)."""
        self._recent[block.GetHash()] = block
        while len(self._recent) > RECENT_BLOCKS:
            self._recent.popitem(last=False)

    def median_time_past(self, block_hash: bytes | None = None) -> int:
        """BIP113 median of the 11 block times ending at ``block_hash`` (default: tip)."""
        key = self.tip_hash if block_hash is None else block_hash
        cached = self._mtp.get(key)
        if cached is not None:
            return cached
        times: list[int] = []
        cursor: bytes | None = key
        while cursor is not None and len(times) < MTP_WINDOW:
            info = self.headers[cursor]
            times.append(info.time)
            cursor = info.prev if info.height > 0 else None
        times.sort()
        self._mtp[key] = times[len(times) // 2]
        return self._mtp[key]

    def descendants(self, block_hash: bytes) -> list[bytes]:
        """Every stored block built on ``block_hash``, parents before children."""
        out: list[bytes] = []
        todo = list(self.children.get(block_hash, ()))
        while todo:
            child = todo.pop()
            out.append(child)
            todo.extend(self.children.get(child, ()))
        return sorted(out, key=lambda h: self.headers[h].height)

    # -- the kernel ----------------------------------------------------------

    async def wipe_kernel(self) -> None:
        """Delete the kernel's directories and open an empty one (genesis only).

        A mark in node.sqlite makes a crash in the middle finish the job on
        the next start: half-deleted LevelDB directories are never opened.
        """
        if self._db is not None:
            with self._db:
                store.set_meta(self._db, "kernel_wipe", 1)

        def wipe() -> Kernel:
            if self._kernel is not None:
                self._kernel.close()
            for name in ("blocks", "chainstate"):
                shutil.rmtree(self.netdir / name, ignore_errors=True)
            return Kernel(self.netdir)

        self._kernel = None
        self._kernel = await asyncio.to_thread(wipe)

    async def flush(self) -> None:
        """Write the kernel's chainstate to disk (close and reopen it)."""

        def reopen() -> Kernel:
            self.kernel.close()
            return Kernel(self.netdir)

        kernel = await asyncio.to_thread(reopen)
        self._kernel = kernel
        self.blocks_since_flush = 0
        if kernel.tip_hash != self.tip_hash:
            raise ChainError("the kernel reopened at another tip than the one it flushed")
        if store.meta(self.db, "kernel_wipe") is not None:
            with self.db:
                self.db.execute("DELETE FROM meta WHERE key='kernel_wipe'")

    async def feed(self, hashes: Iterable[bytes]) -> None:
        """Give stored blocks to the kernel in order; it judges and may reorg."""
        todo = list(hashes)
        for start in range(0, len(todo), _REPLAY_BATCH):
            raws = [self.raw_block(h) for h in todo[start : start + _REPLAY_BATCH]]
            await asyncio.to_thread(self._process_all, raws)

    def _process_all(self, raws: list[bytes]) -> None:
        kernel = self.kernel
        for raw in raws:
            accepted, reason = kernel.process_block(raw)
            if not accepted and reason and not reason.startswith("inconclusive"):
                log.error("the kernel refused a stored block on replay: %s", reason)

    async def _sync_kernel(self, *, wiped: bool) -> None:
        """Bring a freshly opened kernel to the stored active chain."""
        kernel = self.kernel
        k_height, k_tip = kernel.tip_height, kernel.tip_hash
        # The chain to replay stops before a block marked invalid (a crash
        # between invalidateblock's mark and its reorg finishes it here).
        valid = len(self.active)
        for height, block_hash in enumerate(self.active):
            if block_hash in self.invalid:
                valid = height
                break
        target = self.active[:valid]
        if k_height < len(target) and target[k_height] == k_tip and valid == len(self.active):
            todo = target[k_height + 1 :]
        else:
            if not wiped:
                log.warning("the kernel is on another branch than node.sqlite: rebuilding it")
                await self.wipe_kernel()
            todo = target[1:]
            wiped = True
        if todo:
            log.info("replaying %d stored blocks into the kernel", len(todo))
            await self.feed(todo)
        if wiped:
            await self.feed(self.side_blocks(set(target)))
        if self.kernel.tip_hash != self.tip_hash:
            self._follow(self.kernel.tip_hash, lambda update: None)
        if wiped or len(todo) >= FLUSH_INTERVAL:
            await self.flush()

    def side_blocks(self, exclude: set[bytes]) -> list[bytes]:
        """Stored valid blocks off ``exclude``, parents first."""
        skip = exclude | self.invalid_closure()
        return [
            h for h, info in sorted(self.headers.items(), key=lambda item: item[1].height)
            if h not in skip and info.height > 0
        ]

    def unknown_ancestors(self, block_hash: bytes) -> list[bytes]:
        """Stored ancestors of ``block_hash`` (inclusive) the kernel lacks, oldest first."""
        out: list[bytes] = []
        cursor = block_hash
        while not self.kernel.knows(cursor):
            out.append(cursor)
            cursor = self.headers[cursor].prev
        return out[::-1]

    # -- following the kernel ------------------------------------------------

    def follow_kernel(self, on_update: OnUpdate) -> ChainUpdate | None:
        """Move the index to the kernel's tip in one transaction; None if it is already there.

        ``on_update`` runs inside the transaction, after ``active`` and
        ``utxos`` have moved, so that the mempool's changes commit with it.
        """
        if self.kernel.tip_hash == self.tip_hash:
            return None
        return self._follow(self.kernel.tip_hash, on_update)

    def _follow(self, target: bytes, on_update: OnUpdate) -> ChainUpdate:
        branch: list[bytes] = []
        cursor = target
        while not self.is_active(cursor):
            info = self.headers.get(cursor)
            if info is None:
                raise ChainError(f"block {cursor[::-1].hex()} is not in node.sqlite")
            branch.append(cursor)
            cursor = info.prev
        fork = self.headers[cursor].height
        update = ChainUpdate()
        changes: dict[Outpoint, Coin | None] = {}
        db = self.db
        try:
            with db:
                for block_hash in reversed(self.active[fork + 1 :]):
                    block = self.block(block_hash)
                    self.index.disconnect(db, block, changes)
                    update.disconnected.append(block)
                del self.active[fork + 1 :]
                for block_hash in reversed(branch):
                    block = self.block(block_hash)
                    info = self.headers[block_hash]
                    undo = self.index.connect(db, block, info.height, changes)
                    info.status = VALID
                    db.execute(
                        "UPDATE blocks SET undo=?, status=? WHERE hash=?",
                        (undo, VALID, block_hash),
                    )
                    self.active.append(block_hash)
                    update.connected.append(block)
                self.index.write(db, changes)
                store.set_meta(db, "tip", self.tip_hash)
                on_update(update)
        except BaseException:
            self._load()  # memory back to what node.sqlite holds
            raise
        self.blocks_since_flush += len(branch)
        return update

