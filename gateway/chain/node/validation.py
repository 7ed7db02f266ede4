"""New blocks, ``invalidateblock`` and ``reconsiderblock`` (Core's validation.cpp entry points).

Every path ends the same way: the kernel decides which chain is best, and
``ChainState.follow_kernel`` moves the index, the undo records, the tip and
the mempool there in one transaction. See ``chainstate`` for the write order.
"""

from __future__ import annotations

import asyncio
import logging

from bitcoin.core import CBlock

from gateway.chain.blocks import header_bytes
from gateway.chain.node import store
from gateway.chain.node.chainstate import FLUSH_INTERVAL, ChainState, OnUpdate
from gateway.chain.node.common import RPC_DATABASE_ERROR, NodeRpcError, block_work
from gateway.chain.node.store import INVALID, PENDING, VALID, BlockInfo

log = logging.getLogger(__name__)


class BlockValidator:
    """Feeds blocks to the kernel through node.sqlite and follows its decisions."""

    def __init__(self, chain: ChainState, on_update: OnUpdate) -> None:
        self.chain = chain
        self.on_update = on_update

    async def submit(self, block: CBlock) -> tuple[str, str | None]:
        """Process a new block; return ``(outcome, reason)``.

        ``outcome`` is ``connected`` (on the active chain now), ``side``
        (stored on a branch with no more work: Core's ``inconclusive``),
        ``duplicate``, ``duplicate-invalid``, ``duplicate-inconclusive`` or
        ``refused`` (with the kernel's reason; the block is not kept).
        """
        chain = self.chain
        block_hash = block.GetHash()
        known = chain.headers.get(block_hash)
        if known is not None:
            if chain.is_invalid(block_hash):
                return "duplicate-invalid", None
            return ("duplicate" if chain.is_active(block_hash) else "duplicate-inconclusive"), None
        parent = chain.headers.get(block.hashPrevBlock)
        if parent is None:
            return "refused", "prev-blk-not-found"
        if chain.is_invalid(parent.hash):
            return "refused", "bad-prevblk"
        raw = bytes(block.serialize())
        db = chain.db
        with db:  # write-ahead: the kernel never holds a block node.sqlite lacks
            db.execute(
                "INSERT OR REPLACE INTO blocks (hash, height, prev, status, ntx, raw)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (block_hash, parent.height + 1, block.hashPrevBlock, PENDING, len(block.vtx), raw),
            )
        await chain.feed(chain.unknown_ancestors(parent.hash))
        _, reason = await asyncio.to_thread(chain.kernel.process_block, raw)
        kernel = chain.kernel
        connected = kernel.height_of(block_hash) is not None
        side = not connected and reason is not None and reason.startswith("inconclusive")
        if connected or side:
            chain.remember(block)
            chain.add_header(
                BlockInfo(
                    block_hash, parent.height + 1, block.hashPrevBlock, header_bytes(block),
                    len(block.vtx), parent.chainwork + block_work(block.nBits), VALID,
                )
            )
            if side:
                with db:
                    db.execute("UPDATE blocks SET status=? WHERE hash=?", (VALID, block_hash))
        else:
            with db:
                db.execute("DELETE FROM blocks WHERE hash=? AND status=?", (block_hash, PENDING))
        chain.follow_kernel(self.on_update)
        if chain.blocks_since_flush >= FLUSH_INTERVAL:
            await chain.flush()
        if connected:
            return "connected", None
        if side:
            return "side", reason
        return "refused", reason or "rejected"

    async def invalidate(self, block_hash: bytes) -> None:
        """Mark a stored block invalid and leave its branch (Core's ``InvalidateBlock``)."""
        chain = self.chain
        info = chain.headers[block_hash]
        if info.height == 0:
            raise NodeRpcError(RPC_DATABASE_ERROR, "genesis block cannot be invalidated")
        was_active = chain.is_active(block_hash)
        db = chain.db
        with db:
            db.execute("UPDATE blocks SET status=? WHERE hash=?", (INVALID, block_hash))
        info.status = INVALID
        chain.invalid.add(block_hash)
        if not was_active:
            return  # the kernel never gets a block built on it, so never switches to it
        keep = chain.active[: info.height]
        await chain.wipe_kernel()
        await chain.feed(keep[1:])
        await chain.feed(chain.side_blocks(set(keep)))
        chain.follow_kernel(self.on_update)
        await chain.flush()

    async def reconsider(self, block_hash: bytes) -> None:
        """Clear invalid marks around a block and let the best chain win (``ReconsiderBlock``).

        Like Core's ``ResetBlockFailureFlags``, the marks of the block, of its
        descendants and of its ancestors go. Its branch then reaches the
        kernel after the blocks it already has: with equal work the current
        tip stays (the kernel's first-seen rule), with more work it wins.
        """
        chain = self.chain
        ancestors: list[bytes] = []
        cursor = block_hash
        while True:
            ancestors.append(cursor)
            info = chain.headers[cursor]
            if info.height == 0:
                break
            cursor = info.prev
        subtree = chain.descendants(block_hash)
        cleared = [h for h in (*ancestors, *subtree) if h in chain.invalid]
        if cleared:
            db = chain.db
            with db:
                db.executemany(
                    "UPDATE blocks SET status=? WHERE hash=?", [(VALID, h) for h in cleared]
                )
            for h in cleared:
                chain.invalid.discard(h)
                chain.headers[h].status = VALID
        todo = [h for h in [*chain.unknown_ancestors(block_hash), *subtree]
                if not chain.is_invalid(h)]
        await chain.feed(todo)
        chain.follow_kernel(self.on_update)
        if store.meta(chain.db, "kernel_wipe") is not None:
            await chain.flush()

