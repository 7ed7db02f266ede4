"""Funding outputs of live channels, checked against the best chain.

Theory of operation (protocol.md sections 6 and 8)
--------------------------------------------------

A channel takes payments and streams media only while its funding output is
unspent on the best chain with at least ``min_conf`` confirmations. The chain
follower (``gateway/chain/watch.py``) reports new blocks and reorgs; on each,
:meth:`FundingDuty.check` asks the node about every funding that may have
changed, in ONE batched ``gettxout`` (a stock RPC: no transaction index):

* channels waiting for confirmations (``funding``), at every block;
* ready channels whose funding was shallower than the settle depth, at every
  block (below that depth only a reorg can move it);
* every funded channel, after a reorg.

and moves each channel as its funding requires:

==================================  =========================================
the node says                       the channel
==================================  =========================================
unspent, ``>= min_conf``            ``funding`` → ``ready`` (session: ``ready``)
unspent, ``< min_conf``             ``ready`` → ``funding`` (session:
                                    ``funding_lost``, media stops, then
                                    ``funding`` progress and ``ready`` again)
spent in a block the follower saw   left to settlement: our settlement, or
                                    the client's refund (``settlement.py``)
spent in the mempool                unchanged: a settlement or refund pending
gone (none of the above)            ``ready`` → ``funding`` at once; ``void``
                                    once still gone ``settle_confirmations``
                                    blocks later: the funding transaction was
                                    double-spent (session: fatal
                                    ``funding_spent``)
==================================  =========================================

A session that accepts a funding or resumes a channel asks for one channel
at once (:meth:`FundingDuty.check_one`), so ``ready`` never waits for a block.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

from gateway.chain.rpc import RpcError, RpcException
from gateway.chain.watch import ChainFollower, btc_to_sat
from gateway.ledger import Ledger, LiveChannel
from gateway.protocol.channel import ServerState

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FundingStatus:
    """What the node says of a funding output now."""

    #: Confirmations while unspent (0: in the mempool); None when not unspent.
    confirmations: int | None
    value: int | None = None
    script_pubkey: bytes | None = None
    #: Not unspent, but spent by a mempool transaction (``gettxout`` without
    #: the mempool still has it): a settlement or refund is pending.
    spent_in_mempool: bool = False


def status_of(with_mempool: Any, without_mempool: Any) -> FundingStatus:
    """Read two ``gettxout`` answers (with and without the mempool) of one output."""
    if isinstance(with_mempool, dict):
        return FundingStatus(
            int(with_mempool.get("confirmations", 0)),
            btc_to_sat(with_mempool["value"]),
            bytes.fromhex(with_mempool["scriptPubKey"]["hex"]),
        )
    return FundingStatus(None, spent_in_mempool=isinstance(without_mempool, dict))


async def funding_status(rpc: Any, txid: str, vout: int) -> FundingStatus:
    """Ask the node about one output (``gettxout`` twice, in one batch)."""
    answers = await rpc.batch([("gettxout", [txid, vout, True]), ("gettxout", [txid, vout, False])])
    for answer in answers:
        if isinstance(answer, RpcError):
            raise answer
    return status_of(*answers)


class FundingDuty:
    """Keeps each live channel's state in step with its funding output."""

    def __init__(
        self,
        *,
        rpc: Any,
        follower: ChainFollower,
        ledger: Ledger,
        min_conf: int,
        settle_depth: int,
    ) -> None:
        self.rpc = rpc
        self.follower = follower
        self.ledger = ledger
        self.min_conf = min_conf
        self.settle_depth = settle_depth
        #: Set by the follower's callbacks: what the next round must look at.
        self._new_block = False
        self._reorg = False
        self._lock = asyncio.Lock()

    def on_block(self, height: int) -> None:
        """Follower callback: a new tip."""
        self._new_block = True

    def on_reorg(self, fork: int) -> None:
        """Follower callback: blocks above ``fork`` were disconnected."""
        self._reorg = True

    @property
    def pending(self) -> bool:
        """A block or reorg came since the last round."""
        return self._new_block or self._reorg

    async def round(self) -> None:
        """Check the channels that the blocks since the last round may have moved."""
        reorg, self._reorg, self._new_block = self._reorg, False, False
        wanted = [
            live
            for live in self.ledger.watched_fundings()
            if (
                reorg
                or live.core.state is ServerState.FUNDING
                or live.funding_conf is None
                or live.funding_conf < self.settle_depth
            )
        ]
        await self.check(wanted)

    async def check(self, channels: list[LiveChannel]) -> None:
        """Ask the node about ``channels``' fundings (one batch) and act on the answers."""
        if not channels:
            return
        calls: list[tuple[str, list[Any]]] = []
        for live in channels:
            outpoint = live.core.outpoint
            assert outpoint is not None
            calls.append(("gettxout", [outpoint.txid, outpoint.vout, True]))
            calls.append(("gettxout", [outpoint.txid, outpoint.vout, False]))
        try:
            answers = await self.rpc.batch(calls)
        except RpcException:
            log.warning("funding check failed; will retry at the next block", exc_info=True)
            self._new_block = True
            return
        async with self._lock:
            for i, live in enumerate(channels):
                pair = answers[2 * i : 2 * i + 2]
                if any(isinstance(a, RpcError) for a in pair):
                    continue
                await self.apply(live, status_of(*pair))

    async def check_one(self, live: LiveChannel) -> FundingStatus:
        """Check one channel now (``fund`` accepted, ``resume``); its funding status."""
        outpoint = live.core.outpoint
        assert outpoint is not None
        status = await funding_status(self.rpc, outpoint.txid, outpoint.vout)
        async with self._lock:
            await self.apply(live, status)
        return status

    async def apply(self, live: LiveChannel, status: FundingStatus) -> None:
        """Move ``live`` as ``status`` requires (the table in the module docstring)."""
        core = live.core
        outpoint = core.outpoint
        assert outpoint is not None
        async with live.lock:
            if live.released or core.state not in (ServerState.FUNDING, ServerState.READY):
                return
            conf = status.confirmations
            height = self.follower.height
            if conf is not None:
                live.gone_since = None
                live.funding_seen = height
                changed = conf != live.funding_conf
                live.funding_conf = conf
                if core.state is ServerState.FUNDING and conf >= self.min_conf:
                    core.confirm()
                    await self.ledger.state(live)
                    log.info("channel %s funded (%d confirmations)", live.channel_id, conf)
                    changed = True
                elif core.state is ServerState.READY and conf < self.min_conf:
                    await self._lose(live, f"{conf} confirmations")
                    return
                if changed:
                    live.funding_changed.set()
                return
            shallow = live.funding_conf is not None and live.funding_conf < self.settle_depth
            live.funding_conf = None
            if status.spent_in_mempool or self.follower.spent(outpoint.txid, outpoint.vout):
                return  # a settlement or the client's refund: settlement.py follows it
            if live.gone_since is None:
                # Gone since the block after it was last seen, when it was
                # looked at every block (shallow); else from now (a reorg).
                seen = live.funding_seen
                live.gone_since = seen + 1 if shallow and seen is not None else height
            if height - live.gone_since + 1 >= self.settle_depth:
                core.void()
                await self.ledger.state(live, closed_at=time.time())
                log.warning("channel %s void: its funding was double-spent", live.channel_id)
                live.funding_changed.set()
                if live.session is not None:
                    live.session.channel_void()
            elif core.state is ServerState.READY:
                await self._lose(live, "not in the UTXO set nor the mempool")
            else:
                live.funding_changed.set()

    async def _lose(self, live: LiveChannel, why: str) -> None:
        core = live.core
        core.unconfirm()
        await self.ledger.state(live)
        log.warning("channel %s lost its funding confirmations (%s)", live.channel_id, why)
        live.funding_changed.set()
        if live.session is not None:
            live.session.funding_lost()
