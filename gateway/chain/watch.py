"""Follow the best chain through JSON-RPC, block by block, as a stock node allows.

Theory of operation
-------------------

A stock ``bitcoind`` answers ``getrawtransaction`` for a confirmed
transaction only with ``-txindex`` or the block's hash, so nothing here asks
the node where a transaction is. Instead the follower reads every block of
the best chain once (``getblock HASH 2``) and remembers, for what it was told
to watch, what it saw:

* **txids** (settlements, refunds): the block that confirmed each one;
* **outpoints** (funding outputs): the transaction that spent each one, and in
  which block;
* **scripts** (a funding address, protocol.md section 5 ``fund`` without a
  txid): the first output paying it, in a block or in the mempool.

It follows the best chain *by hash*: every poll asks ``getbestblockhash``; a
new tip is walked back with ``getblockheader`` (``previousblockhash``) until a
block it already followed is found. Blocks it followed above that fork point
were disconnected (a reorg): what it learned from them is forgotten and the
``on_reorg`` callbacks hear the fork height, so that the gateway re-checks
fundings (a funding that lost confirmations puts its channel back to waiting)
and settlements (a settlement that vanished is rebroadcast). Then the new
blocks are read in order.

Confirmations are counted from the follower's own tip: ``tip - height + 1``.
The gateway persists the last block it followed (``checkpoint``) and starts
the next run a few blocks below it, so a settlement confirmed or a funding
spent while the gateway was down is seen on restart.

RPCs used: ``getblockchaininfo``, ``getbestblockhash``, ``getblockhash``,
``getblockheader``, ``getblock`` (verbosity 2), and, only while a script is
watched, ``getrawmempool`` and ``getrawtransaction`` of mempool transactions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from gateway.periodic import Periodic

log = logging.getLogger(__name__)

#: Blocks remembered by hash to find the fork point of a reorg. A reorg deeper
#: than this rescans from the oldest remembered block.
REORG_WINDOW = 288
#: Blocks re-read below the stored checkpoint at start: a reorg while the
#: gateway was down is found as any other.
RESTART_MARGIN = 6


@dataclass(frozen=True, slots=True)
class SeenOutput:
    """An output paying a watched script: where it is and what it pays."""

    txid: str
    vout: int
    value: int
    height: int | None  # None while in the mempool


@dataclass(frozen=True, slots=True)
class InBlock:
    """Where the best chain confirmed something: the block's height and hash."""

    height: int
    block_hash: str


@dataclass(frozen=True, slots=True)
class Spend:
    """A watched outpoint spent in a block of the best chain, by ``txid``."""

    txid: str
    block: InBlock


def btc_to_sat(value: Any) -> int:
    """Bitcoin Core's JSON amounts (BTC, 8 decimals) to satoshi, exactly."""
    return int((Decimal(str(value)) * 100_000_000).to_integral_value())


class ChainFollower:
    """Polls a node and follows its best chain; see the module docstring."""

    def __init__(self, rpc: Any, *, poll_interval: float = 0.5) -> None:
        self.rpc = rpc
        self.poll_interval = poll_interval
        self.height = -1
        self.best_hash = ""
        #: Median-time-past of the tip (BIP113): what a time expiry is compared with.
        self.median_time = 0
        self.chain = "regtest"
        #: height -> hash of the blocks followed, the last REORG_WINDOW of them.
        self._followed: dict[int, str] = {}
        self._tip_changed = asyncio.Condition()
        self._scripts: dict[str, list[asyncio.Future[SeenOutput]]] = {}
        self._txids: dict[str, InBlock | None] = {}
        self._outpoints: dict[tuple[str, int], Spend | None] = {}
        self._mempool_seen: set[str] = set()
        self._polling = Periodic(
            "chain-follower", poll_interval, self.poll, log=log,
            failure="chain poll failed",  # the node is down or answered garbage
        )
        #: Called with the new tip height after each poll that moved it.
        self.on_block: list[Callable[[int], None]] = []
        #: Called with the fork height when blocks above it were disconnected.
        self.on_reorg: list[Callable[[int], None]] = []

    # -- lifecycle -------------------------------------------------------------

    async def start(self, checkpoint: tuple[int, str] | None = None) -> None:
        """Read the tip, catch up from ``checkpoint``, then poll in the background.

        Without a checkpoint (a new gateway) following starts at the tip:
        nothing the gateway watches can be older than the gateway.
        """
        info = await self.rpc.call("getblockchaininfo")
        self.chain = info["chain"]
        tip = int(info["blocks"])
        start = tip if checkpoint is None else max(0, min(checkpoint[0], tip) - RESTART_MARGIN)
        self._followed = {start: str(await self.rpc.call("getblockhash", start))}
        self.height, self.best_hash = start, self._followed[start]
        await self.poll()
        self._polling.start()

    async def stop(self) -> None:
        """Stop polling."""
        await self._polling.stop()

    # -- what the gateway watches ------------------------------------------------

    def watch_script(self, script_pubkey: bytes) -> asyncio.Future[SeenOutput]:
        """A future resolved by the first output (mempool or block) paying the script."""
        future: asyncio.Future[SeenOutput] = asyncio.get_running_loop().create_future()
        self._scripts.setdefault(script_pubkey.hex(), []).append(future)
        return future

    def unwatch_script(self, script_pubkey: bytes, future: asyncio.Future[SeenOutput]) -> None:
        """Forget a watch (the session ended or timed out)."""
        waiters = self._scripts.get(script_pubkey.hex(), [])
        if future in waiters:
            waiters.remove(future)
        if not waiters:
            self._scripts.pop(script_pubkey.hex(), None)

    def watch_txid(self, txid: str) -> None:
        """Remember the block that confirms ``txid`` from now on."""
        self._txids.setdefault(txid, None)

    def unwatch_txid(self, txid: str) -> None:
        """Stop watching ``txid``."""
        self._txids.pop(txid, None)

    def watch_outpoint(self, txid: str, vout: int) -> None:
        """Remember the transaction that spends ``txid:vout`` in a block, from now on."""
        self._outpoints.setdefault((txid, vout), None)

    def unwatch_outpoint(self, txid: str, vout: int) -> None:
        """Stop watching ``txid:vout``."""
        self._outpoints.pop((txid, vout), None)

    def confirmed(self, txid: str) -> InBlock | None:
        """The best-chain block that confirmed a watched ``txid``, if any."""
        return self._txids.get(txid)

    def spent(self, txid: str, vout: int) -> Spend | None:
        """The best-chain spend of a watched outpoint, if any."""
        return self._outpoints.get((txid, vout))

    def depth(self, block: InBlock) -> int:
        """Confirmations of something in ``block``: ``tip - height + 1``."""
        return self.height - block.height + 1

    async def wait_for_tip(self, after_height: int, timeout: float | None = None) -> int:
        """Wait until the tip is above ``after_height``; return the new height."""
        async with asyncio.timeout(timeout), self._tip_changed:
            await self._tip_changed.wait_for(lambda: self.height > after_height)
        return self.height

    async def wait_for_change(self, best_hash: str, timeout: float | None = None) -> None:
        """Wait until the tip's hash is no longer ``best_hash`` (a block or a reorg)."""
        async with asyncio.timeout(timeout), self._tip_changed:
            await self._tip_changed.wait_for(lambda: self.best_hash != best_hash)

    # -- following ------------------------------------------------------------------

    async def poll(self) -> None:
        """One round: follow the best chain to its tip, then the mempool if a script waits."""
        best = str(await self.rpc.call("getbestblockhash"))
        moved = best != self.best_hash
        if moved:
            await self._follow_to(best)
            info = await self.rpc.call("getblockchaininfo")
            self.median_time = int(info["mediantime"])
        if self._scripts:
            await self._scan_mempool()
        if moved:
            for callback in self.on_block:
                callback(self.height)
            async with self._tip_changed:
                self._tip_changed.notify_all()

    async def _follow_to(self, best: str) -> None:
        """Disconnect what the new best chain does not contain, then connect its blocks."""
        headers: list[dict[str, Any]] = []
        block_hash: str | None = best
        fork = -1  # the height of the last block both chains share
        while block_hash is not None:
            header = await self.rpc.call("getblockheader", block_hash)
            height = int(header["height"])
            if self._followed.get(height) == block_hash:
                fork = height  # the old tip (blocks came), or below it (a reorg)
                break
            headers.append(header)
            if height <= min(self._followed, default=0):
                # Deeper than the window: read everything from there again.
                log.warning("reorg deeper than %d blocks: rescanning", REORG_WINDOW)
                self._followed.clear()
                fork = height - 1
                break
            block_hash = header.get("previousblockhash")
        if self.height > fork:
            self._disconnect_above(fork)
        for header in reversed(headers):
            block = await self.rpc.call("getblock", header["hash"], 2)
            self._connect(block)

    def _disconnect_above(self, fork: int) -> None:
        for height in [h for h in self._followed if h > fork]:
            del self._followed[height]
        for txid, seen in self._txids.items():
            if seen is not None and seen.height > fork:
                self._txids[txid] = None
        for outpoint, spend in self._outpoints.items():
            if spend is not None and spend.block.height > fork:
                self._outpoints[outpoint] = None
        self.height = fork
        self.best_hash = self._followed.get(fork, "")
        log.info("reorg: blocks above height %d were disconnected", fork)
        for callback in self.on_reorg:
            callback(fork)

    def _connect(self, block: dict[str, Any]) -> None:
        height, block_hash = int(block["height"]), str(block["hash"])
        where = InBlock(height, block_hash)
        txids, outpoints = self._txids, self._outpoints
        for tx in block["tx"]:
            txid = tx["txid"]
            if txid in txids:
                txids[txid] = where
            if outpoints:
                for txin in tx["vin"]:
                    key = (txin.get("txid"), txin.get("vout"))
                    if key in outpoints:
                        outpoints[key] = Spend(txid, where)
        if self._scripts:
            self._scan_outputs(block["tx"], height)
        self._followed[height] = block_hash
        self._followed.pop(height - REORG_WINDOW, None)
        self.height, self.best_hash = height, block_hash

    async def _scan_mempool(self) -> None:
        txids = await self.rpc.call("getrawmempool")
        fresh = [t for t in txids if t not in self._mempool_seen]
        self._mempool_seen = set(txids)
        if fresh:
            # Mempool transactions: a stock node answers these without -txindex.
            txs = await self.rpc.batch([("getrawtransaction", [t, True]) for t in fresh])
            self._scan_outputs([t for t in txs if isinstance(t, dict)], None)

    def _scan_outputs(self, txs: list[dict[str, Any]], height: int | None) -> None:
        for tx in txs:
            for out in tx.get("vout", []):
                spk = out.get("scriptPubKey", {}).get("hex", "")
                waiters = self._scripts.pop(spk, None)
                if not waiters:
                    continue
                seen = SeenOutput(tx["txid"], int(out["n"]), btc_to_sat(out["value"]), height)
                for future in waiters:
                    if not future.done():
                        future.set_result(seen)
