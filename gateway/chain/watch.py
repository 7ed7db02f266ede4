"""Follow the chain through JSON-RPC: the tip, outputs paying watched scripts,
and spends of watched outpoints.

Only Bitcoin Core RPCs are used (``getblockchaininfo``, ``getblock`` with
verbosity 2, ``getrawmempool``, ``getrawtransaction``), so the same code
follows the embedded node or any ``bitcoind`` without a wallet. The gateway
uses it for ``fund`` without a txid (PROTOCOL.md section 5: watch
``funding_address`` and take the first output that pays it), for funding
confirmations (section 6, ``funding``), and for settlement confirmations and
refund detection (section 8).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeenOutput:
    """An output paying a watched script: where it is and what it pays."""

    txid: str
    vout: int
    value: int
    height: int | None  # None while in the mempool


def btc_to_sat(value: Any) -> int:
    """Bitcoin Core's JSON amounts (BTC, 8 decimals) to satoshi, exactly."""
    from decimal import Decimal

    return int((Decimal(str(value)) * 100_000_000).to_integral_value())


class ChainWatcher:
    """Polls a node and wakes whoever waits for the tip or a watched script."""

    def __init__(self, rpc: Any, *, poll_interval: float = 0.5) -> None:
        self.rpc = rpc
        self.poll_interval = poll_interval
        self.height = -1
        self.best_hash = ""
        #: Median-time-past of the tip (BIP113): what a time expiry is compared with.
        self.median_time = 0
        self.chain = "regtest"
        self._tip_changed = asyncio.Condition()
        self._scripts: dict[str, list[asyncio.Future[SeenOutput]]] = {}
        self._mempool_seen: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        self.on_block: list[Callable[[int], None]] = []

    async def start(self) -> None:
        """Read the tip once (so ``height`` is valid), then poll in the background."""
        await self._refresh_tip()
        self._task = asyncio.create_task(self._run(), name="chain-watcher")

    async def stop(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def wait_for_tip(self, after_height: int, timeout: float | None = None) -> int:
        """Wait until the tip is above ``after_height``; return the new height."""
        async with asyncio.timeout(timeout), self._tip_changed:
            await self._tip_changed.wait_for(lambda: self.height > after_height)
        return self.height

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

    async def confirmations(self, txid: str) -> int | None:
        """Confirmations of ``txid`` (0 in the mempool), None if the node does not know it."""
        status = await self.tx_status(txid)
        return None if status is None else status[0]

    async def tx_status(self, txid: str) -> tuple[int, str | None] | None:
        """(confirmations, block hash or None in the mempool); None if the node does not know it."""
        try:
            info = await self.rpc.call("getrawtransaction", txid, True)
        except Exception as exc:  # RpcError -5: not in mempool or chain
            if getattr(exc, "code", None) == -5:
                return None
            raise
        return int(info.get("confirmations", 0)), info.get("blockhash")

    async def _run(self) -> None:
        while True:
            try:
                await self.poll()
            except asyncio.CancelledError:
                raise
            except Exception:  # the node is down or answered garbage: keep trying
                log.warning("chain poll failed", exc_info=True)
            await asyncio.sleep(self.poll_interval)

    async def poll(self) -> None:
        """One round: new blocks, then (only while watching scripts) the mempool."""
        previous = self.height
        await self._refresh_tip()
        if self._scripts and previous >= 0:
            for height in range(max(previous + 1, self.height - 5), self.height + 1):
                block_hash = await self.rpc.call("getblockhash", height)
                block = await self.rpc.call("getblock", block_hash, 2)
                self._scan(block["tx"], height)
        if self._scripts:
            txids = await self.rpc.call("getrawmempool")
            fresh = [t for t in txids if t not in self._mempool_seen]
            self._mempool_seen = set(txids)
            if fresh:
                txs = await self.rpc.batch([("getrawtransaction", [t, True]) for t in fresh])
                self._scan([t for t in txs if isinstance(t, dict)], None)
        if self.height != previous:
            for callback in self.on_block:
                callback(self.height)
            async with self._tip_changed:
                self._tip_changed.notify_all()

    async def _refresh_tip(self) -> None:
        info = await self.rpc.call("getblockchaininfo")
        self.height = int(info["blocks"])
        self.best_hash = info["bestblockhash"]
        self.median_time = int(info["mediantime"])
        self.chain = info["chain"]

    def _scan(self, txs: list[dict[str, Any]], height: int | None) -> None:
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
