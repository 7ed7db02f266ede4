"""Settlement: a background duty, not a reaction to a socket event.

Theory of operation (protocol.md sections 3 and 8; design.md "Lessons")
-----------------------------------------------------------------------

Every ``settle_interval_s`` the duty looks at each live channel:

* ``ready`` and (inside the settle margin, or disconnected for longer than
  ``resume_grace_s``) → settle now, whether or not a viewer is connected;
* ``closing`` → follow the settlement: confirmed → ``closed``; unknown to the
  node → rebroadcast; funding output spent in a block by something else →
  ``refunded`` (the client's refund won).

:meth:`Settler.settle` is idempotent (bitcoinj once re-entered ``close()`` and
never answered): the core returns the same settlement again, and the
transaction is stored durably BEFORE it is broadcast, so a gateway killed in
between rebroadcasts it on restart. The server's share is split among the
publishers of what the channel watched, by what each item billed; outputs
below dust are folded into the operator's payout (section 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from decimal import Decimal
from typing import TYPE_CHECKING

from gateway.chain.rpc import (
    RpcError,
    RpcException,
    RpcInvalidAddressOrKey,
    RpcVerifyAlreadyInChain,
)
from gateway.channels import LIVE_STATES, ChannelReleased, LiveChannel, settlement_ops, state_op
from gateway.protocol.channel import ServerState
from gateway.protocol.messages import Closed
from gateway.protocol.scripts import address_to_script_pubkey
from gateway.store import Op

if TYPE_CHECKING:
    from gateway.server import Gateway

log = logging.getLogger(__name__)

#: Channels looked at between two yields to the event loop in one round.
TICK_SLICE = 256
#: Longest a fee estimate is reused within one block (seconds).
FEERATE_TTL_S = 30.0
#: Longest a closing channel goes unfollowed within one block (seconds).
REFOLLOW_S = 60.0


class Settler:
    """Settles channels on close, after the resume grace, before expiry, on restart."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        self._task: asyncio.Task[None] | None = None
        self._script_cache: dict[str, bytes] = {}
        #: The last fee estimate (sat/vB) and when it was asked (tip hash, monotonic).
        self._feerate: tuple[Decimal, tuple[str, float]] | None = None

    async def start(self) -> None:
        """Run one round now (restart recovery), then keep running in the background."""
        await self.tick()
        self._task = asyncio.create_task(self._run(), name="settler")

    async def stop(self) -> None:
        """Stop the duty (pending work resumes at the next start)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.gw.config.settle_interval_s)
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("settlement round failed; retrying")

    async def tick(self) -> None:
        """One round: fundings moved by new blocks, then every live channel."""
        if self.gw.funding.pending:
            await self.gw.funding.round()
        now = time.time()
        grace = self.gw.limits.resume_grace_s
        for n, live in enumerate(list(self.gw.channels.values()), 1):
            if n % TICK_SLICE == 0:
                # Let sessions run: a pass over 5,000 channels held a worker's
                # loop for 10-23 ms each second (docs/performance.md).
                await asyncio.sleep(0)
            core = live.core
            try:
                if core.state in (ServerState.READY, ServerState.FUNDING):
                    expiring = core.is_expiring(int(now), self.gw.watcher.height)
                    idle = (
                        live.session is None
                        and now - (live.disconnected_at or now) >= grace
                    )
                    if expiring or (idle and core.state is ServerState.READY):
                        await self.settle(live, reason="expiry" if expiring else "disconnect")
                if core.state is ServerState.CLOSING and self._follow_due(live):
                    await self.follow(live)
                if core.state not in LIVE_STATES:
                    self.gw.drop(live)
            except RpcException:
                # The node refused, or did not answer: nothing is lost, the
                # next round tries again (settlements are stored first).
                log.warning("settling %s failed; will retry", live.channel_id, exc_info=True)
            except ChannelReleased:  # handed to another worker while we waited for it
                pass

    def _follow_due(self, live: LiveChannel) -> bool:
        """Follow a settlement at each new tip, and every ``REFOLLOW_S`` otherwise.

        Only a block can confirm it; the timer is for a rebroadcast after the
        node dropped it. Following every channel on every round cost an RPC per
        closing channel per second, competing with the broadcasts of a wave of
        closes (``gateway bench``, settle figure).
        """
        if self._fresh(live.followed, REFOLLOW_S):
            return False
        live.followed = self._stamp()
        return True

    def _stamp(self) -> tuple[str, float]:
        return self.gw.watcher.best_hash, time.monotonic()

    def _fresh(self, stamp: tuple[str, float] | None, ttl: float) -> bool:
        """``stamp`` (see :meth:`_stamp`) is from this tip and younger than ``ttl`` s."""
        return (
            stamp is not None
            and stamp[0] == self.gw.watcher.best_hash
            and time.monotonic() - stamp[1] < ttl
        )

    async def feerate(self) -> Decimal:
        """sat/vB for a settlement: the node's estimate, never below the floor.

        Kept until the next block or for ``FEERATE_TTL_S``: the estimate moves
        with blocks, and one ``estimatesmartfee`` per settlement was half the
        RPC calls of a wave of closes (``gateway bench``, settle figure).
        """
        if self._feerate is not None and self._fresh(self._feerate[1], FEERATE_TTL_S):
            return self._feerate[0]
        stamp = self._stamp()
        rate = await self._estimate()
        self._feerate = (rate, stamp)
        return rate

    async def _estimate(self) -> Decimal:
        floor = Decimal(str(self.gw.config.fee_floor))
        try:
            answer = await self.gw.rpc.call("estimatesmartfee", 2)
        except RpcError:
            return floor
        rate = answer.get("feerate") if isinstance(answer, dict) else None
        if rate is None:
            return floor
        return max(floor, Decimal(str(rate)) * 100_000_000 / 1000)  # BTC/kvB → sat/vB

    def _script(self, address: str) -> bytes:
        script = self._script_cache.get(address)
        if script is None:
            script = address_to_script_pubkey(address, self.gw.network)
            self._script_cache[address] = script
        return script

    def payouts(self, live: LiveChannel) -> tuple[list[tuple[bytes, int]], dict[bytes, str]]:
        """(script, weight) per publisher by what its items billed in this channel."""
        catalog = self.gw.catalog
        weights: dict[bytes, int] = {}
        owner: dict[bytes, str] = {}
        for media, bill in sorted(live.media_bill.items()):
            item = catalog.items.get(media)
            publisher = catalog.publishers.get(item.publisher) if item else None
            if publisher is None or bill <= 0:
                continue  # removed from the catalog: its share goes to the operator
            try:
                script = self._script(publisher.address)
            except ValueError:
                log.warning("publisher %s has a bad payout address", publisher.id)
                continue
            weights[script] = weights.get(script, 0) + bill
            owner[script] = publisher.id
        return sorted(weights.items()), owner

    async def settle(self, live: LiveChannel, *, reason: str) -> Closed:
        """Settle ``live`` now (idempotent); answer the ``closed`` message."""
        async with live.lock:
            if live.released:
                raise ChannelReleased(live.channel_id)
            core = live.core
            if core.state in (ServerState.READY, ServerState.FUNDING):
                payouts, owner = self.payouts(live)
                feerate = await self.feerate()
                settlement = core.settle(payouts, self.gw.operator_script, feerate)
                ops: list[Op] = live.meter_ops(self.gw.publisher_of)
                if settlement is not None:
                    live.settle_tx = settlement.tx
                    for script, amount in settlement.outputs:
                        if script == core.change_script and amount == core.balance:
                            continue  # output 0, the client's
                        ops.append(
                            (
                                "INSERT OR REPLACE INTO payouts(channel, publisher, script, "
                                "amount, txid) VALUES (?, ?, ?, ?, ?)",
                                (
                                    live.row_id,
                                    owner.get(script, "operator"),
                                    script.hex(),
                                    amount,
                                    settlement.txid,
                                ),
                            )
                        )
                await self.gw.store.write(settlement_ops(live, settlement, ops))
                log.info(
                    "settled %s (%s): paid %d, txid %s",
                    live.channel_id,
                    reason,
                    core.paid,
                    settlement.txid if settlement else None,
                )
                if settlement is None:
                    self.gw.drop(live)
                else:
                    self.gw.watcher.watch_txid(settlement.txid)
                    await self._broadcast(live)
        if reason != "close" and live.session is not None:
            await live.session.channel_settled()
        return core.closed_message()

    async def _broadcast(self, live: LiveChannel) -> None:
        assert live.settle_tx is not None
        try:
            await self.gw.rpc.call("sendrawtransaction", live.settle_tx.hex())
        except RpcVerifyAlreadyInChain:
            pass
        except RpcError as exc:
            # Stored already; follow() rebroadcasts or finds the refund.
            log.warning("broadcast of %s refused: %s", live.core.settlement_txid, exc)

    async def follow(self, live: LiveChannel) -> None:
        """Follow a broadcast settlement through the best chain (section 8).

        Confirmed ``settle_confirmations`` deep → ``closed``; the funding spent
        by another transaction (the client's refund) that deep → ``refunded``;
        confirmed less deep, or waiting in the mempool → wait; neither in a
        block nor in the mempool (dropped, or reorged out and not re-added) →
        broadcast again. Blocks come from the follower, never a txid index.
        """
        core = live.core
        txid = core.settlement_txid
        outpoint = core.outpoint
        assert txid is not None and outpoint is not None
        follower = self.gw.watcher
        depth = self.gw.settle_depth
        seen = follower.confirmed(txid)
        if seen is not None:
            if follower.depth(seen) >= depth:
                core.mark_closed()
                await self.gw.store.write(
                    [
                        state_op(
                            live.row_id,
                            core,
                            confirmed_height=seen.height,
                            closed_at=time.time(),
                        )
                    ]
                )
                log.info("settlement %s of %s confirmed", txid, live.channel_id)
            return
        spend = follower.spent(outpoint.txid, outpoint.vout)
        if spend is not None and spend.txid != txid:
            if follower.depth(spend.block) >= depth:
                core.mark_refunded()
                await self.gw.store.write([state_op(live.row_id, core, closed_at=time.time())])
                log.info("channel %s was refunded by %s", live.channel_id, spend.txid)
            return
        if await self._in_mempool(txid):
            return
        await self._broadcast(live)

    async def _in_mempool(self, txid: str) -> bool:
        try:
            await self.gw.rpc.call("getmempoolentry", txid)
        except RpcInvalidAddressOrKey:  # -5: not in the mempool
            return False
        return True
