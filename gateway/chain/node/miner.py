"""Block assembly on the node's tip (Bitcoin Core's ``BlockAssembler``, simplified).

Blocks take mempool transactions in acceptance order up to the weight limit;
times are ``max(MTP + 1, now)`` where ``now`` follows ``setmocktime`` (the
kernel refuses headers more than 2 h ahead of the real clock, so mock time
can move block times forward by at most that much). Every block goes through
``BlockValidator.submit``, i.e. node.sqlite first, then the kernel.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bitcoin.core import CBlock, CTransaction, CTxOut
from bitcoin.core.script import CScript

from gateway.chain.blocks import assemble_block, block_subsidy
from gateway.chain.node.chainstate import ChainState
from gateway.chain.node.common import RPC_VERIFY_ERROR, NodeRpcError
from gateway.chain.node.mempool import Mempool
from gateway.chain.node.validation import BlockValidator
from gateway.protocol.tx import txid

#: BIP141 block weight limit, and what the header and coinbase need of it
#: (Bitcoin Core's block assembler reserves 4,000 WU the same way).
MAX_BLOCK_WEIGHT = 4_000_000
BLOCK_RESERVED_WEIGHT = 4_000


class Miner:
    """Assembles and submits blocks paying a given script."""

    def __init__(
        self,
        chain: ChainState,
        mempool: Mempool,
        validator: BlockValidator,
        clock: Callable[[], int],
    ) -> None:
        self.chain = chain
        self.mempool = mempool
        self.validator = validator
        self.clock = clock
        #: Weight limit of the blocks this node assembles (BIP141; tests lower it).
        self.max_block_weight = MAX_BLOCK_WEIGHT

    def next_block_time(self) -> int:
        """``max(MTP + 1, now)``: the earliest valid time, or the clock."""
        return max(self.chain.median_time_past() + 1, self.clock())

    def mempool_block_txs(self) -> list[CTransaction]:
        """Mempool transactions for the next block, within ``max_block_weight``.

        Acceptance order is a valid topological order (parents are accepted
        first), so a transaction is left for a later block when it does not
        fit or when it spends one that was left: a block is never invalid
        (``bad-blk-weight``) and never misses a parent.
        """
        budget = self.max_block_weight - BLOCK_RESERVED_WEIGHT
        chosen: list[CTransaction] = []
        left: set[bytes] = set()
        for entry in self.mempool.entries.values():
            if entry.weight > budget or entry.parents & left:
                left.add(entry.txid)
                continue
            chosen.append(entry.tx)
            budget -= entry.weight
        return chosen

    def assemble(
        self, script: bytes, txs: list[CTransaction], *, block_time: int | None = None,
        fees: int = 0,
    ) -> CBlock:
        """A block on the tip with ``txs`` whose coinbase pays subsidy + ``fees`` to ``script``."""
        chain = self.chain
        height = chain.tip_height + 1
        when = max(chain.median_time_past() + 1, block_time or self.clock())
        outputs = [CTxOut(block_subsidy(height) + fees, CScript(script))]
        block = assemble_block(chain.tip_hash, height, when, txs, outputs)
        extra = 0
        while block.GetHash() in chain.headers:
            # The same parent, time, payee and transactions as a block already
            # stored (mined again after an invalidateblock within one second):
            # an extra nonce in the coinbase makes it a new block, as Core's
            # IncrementExtraNonce does.
            extra += 1
            block = assemble_block(
                chain.tip_hash, height, when, txs, outputs, extra_nonce=extra.to_bytes(4, "little")
            )
        return block

    async def mine(
        self, script: bytes, txs: list[CTransaction], *, block_time: int | None = None,
        fees: int | None = None,
    ) -> CBlock:
        """Assemble, submit and connect one block; -25 with the kernel's reason if refused.

        ``fees`` defaults to the mempool fees of ``txs`` (what Core's
        assembler collects); ``generateblock`` passes 0, as Core builds its
        template from an empty mempool there.
        """
        if fees is None:
            entries = self.mempool.entries
            fees = sum(entry.fee for tx in txs if (entry := entries.get(txid(tx))))
        block = self.assemble(script, txs, block_time=block_time, fees=fees)
        outcome, reason = await self.validator.submit(block)
        if outcome != "connected":
            raise NodeRpcError(RPC_VERIFY_ERROR, f"TestBlockValidity failed: {reason}")
        return block

    async def premine(self, script: bytes, up_to: int) -> None:
        """Mine empty blocks to ``script`` until the chain is ``up_to`` blocks high.

        Times start ``up_to`` seconds in the past so that the premine does not
        push block times ahead of the clock (each block must exceed the median
        of the previous 11); a premine cut short by a crash resumes here.
        """
        start = int(time.time()) - up_to
        while self.chain.tip_height < up_to:
            await self.mine(script, [], block_time=start + self.chain.tip_height + 1)
