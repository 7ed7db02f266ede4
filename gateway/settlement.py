"""Settlement: a background duty that settles channels in batches.

Theory of operation (protocol.md sections 3 and 8; design.md "Lessons")
-----------------------------------------------------------------------

A channel stops taking payments when it *closes*: the client's ``close``,
a disconnect older than ``resume_grace_s``, the settle margin before expiry,
or the operator. :meth:`Settler.close` moves it to ``closing`` (durably) and
queues it; the ``closed`` answer says when its settlement goes out
(``settle_by``). Every ``settle_interval_s`` the duty:

* settles the queue in ONE transaction (``gateway/protocol/settlement.py``)
  once its oldest channel has waited ``settle_window`` — by default one block
  interval, so a settlement misses no block — or at once when a channel is
  inside its settle margin or the operator asks. Each client pays its own
  exit from its reserve; the publishers share the rest in one output each.
  A channel that cannot pay even alone is abandoned: ``closed`` with nothing
  broadcast, and the client refunds after expiry;
* stores the batch BEFORE it is broadcast, so a gateway killed in between
  broadcasts the same transaction on restart;
* when the node refuses a batch (a channel's funding was spent by its
  client's refund, say), leaves out the channels whose funding is gone and
  settles the rest; a refusal it cannot pin on a channel splits the batch
  in two;
* follows every broadcast batch through the best chain: ``settle_depth``
  deep → its channels are ``closed``; a funding spent that deep by another
  transaction → ``refunded``; in neither a block nor the mempool → broadcast
  again.

:meth:`Settler.close` is idempotent (bitcoinj once re-entered ``close()``
and never answered): ``closed`` is always answered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Any

from gateway.chain.rpc import (
    RpcError,
    RpcException,
    RpcInvalidAddressOrKey,
    RpcVerifyAlreadyInChain,
)
from gateway.chain.watch import ChainFollower
from gateway.funding import FundingDuty
from gateway.ledger import LIVE_STATES, SETTLEABLE, ChannelReleased, Ledger, LiveChannel
from gateway.media.library import Library
from gateway.periodic import Periodic
from gateway.protocol.channel import ServerState
from gateway.protocol.messages import Closed
from gateway.protocol.scripts import address_to_script_pubkey
from gateway.protocol.settlement import (
    MAX_BATCH_CHANNELS as MAX_BATCH,
)
from gateway.protocol.settlement import (
    Batch,
    ChannelClaim,
    build_batch,
)

log = logging.getLogger(__name__)

#: Seconds between two sweeps of abandoned unfunded channels.
UNFUNDED_SWEEP_S = 60.0

#: Channels looked at between two yields to the event loop in one round.
TICK_SLICE = 256
#: Longest a fee estimate is reused within one block (seconds).
FEERATE_TTL_S = 30.0
#: Longest a closing channel goes unfollowed within one block (seconds).
REFOLLOW_S = 60.0


@dataclass(frozen=True)
class SettleSettings:
    """How the duty settles: what the operator set, resolved for the network."""

    #: Seconds between rounds.
    interval_s: float
    #: Seconds a closed channel may wait to share a settlement (one block interval).
    window_s: float
    #: Confirmations that make a settlement or refund final (protocol.md section 8).
    depth: int
    #: The lowest feerate a settlement pays (sat/vB).
    fee_floor: Fraction
    #: How long a dropped session's channel stays resumable (section 8).
    resume_grace_s: int
    #: Where the operator's share (and payouts below dust) goes.
    operator_script: bytes
    #: The network publishers' addresses are read on.
    network: str
    #: An unfunded channel older than this has no session left (a session
    #: abandons its own within two funding timeouts): the sweep abandons it.
    unfunded_ttl_s: float = 3600.0


@dataclass
class _Queued:
    live: LiveChannel
    #: Unix time by which its batch goes out (``closed.settle_by``).
    settle_by: float


class Settler:
    """Settles channels on close, after the resume grace, before expiry, on restart."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        rpc: Any,
        follower: ChainFollower,
        funding: FundingDuty,
        library: Library,
        settings: SettleSettings,
    ) -> None:
        self.ledger = ledger
        self.rpc = rpc
        self.follower = follower
        self.funding = funding
        self.library = library
        self.settings = settings
        self._rounds = Periodic(
            "settler", settings.interval_s, self.tick, log=log,
            failure="settlement round failed; retrying", level=logging.ERROR,
        )
        self._script_cache: dict[str, bytes] = {}
        #: The last fee estimate (sat/vB) and when it was asked (tip hash, monotonic).
        self._feerate: tuple[Fraction, tuple[str, float]] | None = None
        self._queue: dict[str, _Queued] = {}
        #: Broadcast batches still followed: txid -> raw transaction.
        self._batches: dict[str, bytes] = {}
        self._batching = asyncio.Lock()
        self._swept = 0.0

    @property
    def window(self) -> float:
        """Seconds a closed channel may wait for others to share its settlement."""
        return self.settings.window_s

    async def start(self) -> None:
        """Load the stored batches, run one round now (restart recovery), then keep running."""
        self._batches.update(self.ledger.broadcast_batches(held_only=True))
        await self._sweep_unfunded()
        await self.tick()
        self._rounds.start()

    async def stop(self) -> None:
        """Stop the duty (pending work resumes at the next start)."""
        await self._rounds.stop()

    async def tick(self) -> None:
        """One round: fundings moved by new blocks, due channels, the queue, the batches."""
        if self.funding.pending:
            await self.funding.round()
        now = time.time()
        if now - self._swept >= UNFUNDED_SWEEP_S:
            await self._sweep_unfunded()
        grace = self.settings.resume_grace_s
        followed: set[str] = set()
        for n, live in enumerate(list(self.ledger.channels.values()), 1):
            if n % TICK_SLICE == 0:
                # Let sessions run: one pass over thousands of channels would
                # hold the loop long enough to show in p99 (docs/performance.md).
                await asyncio.sleep(0)
            core = live.core
            try:
                if core.state in (ServerState.READY, ServerState.FUNDING):
                    expiring = core.is_expiring(int(now), self.follower.height)
                    idle = live.session is None and now - (live.disconnected_at or now) >= grace
                    if expiring or (idle and core.state is ServerState.READY):
                        closed = await self.close(
                            live, reason="expiry" if expiring else "disconnect"
                        )
                        if live.session is not None:
                            live.session.tell_closed(closed)
                elif core.state is ServerState.CLOSING:
                    txid = core.settlement_txid
                    if live.lock.locked():
                        pass  # being closed now: close() queues it with its window
                    elif txid is None and live.channel_id not in self._queue and not live.spent:
                        self._enqueue(live, urgent=True)  # closed before a restart
                    elif txid is not None and txid not in followed and self._follow_due(live):
                        followed.add(txid)
                        await self.follow(txid)
                    elif txid is None and live.spent:
                        await self._follow_refund(live)
                if core.state not in LIVE_STATES:
                    self.ledger.drop(live)
            except RpcException:
                # The node refused, or did not answer: nothing is lost, the
                # next round tries again (batches are stored first).
                log.warning("settling %s failed; will retry", live.channel_id, exc_info=True)
            except ChannelReleased:  # handed to another worker while we waited for it
                pass
        if self._due():
            try:
                await self.settle_queue()
            except RpcException:
                log.warning("settlement batch failed; will retry", exc_info=True)
            except ChannelReleased:  # another host took one: the rest settle next round
                log.warning("a channel of the batch was taken over; settling the rest again")

    async def _sweep_unfunded(self) -> None:
        """Abandon unfunded channels no session holds any more (what a crash left)."""
        self._swept = time.time()
        await self.ledger.expire_unfunded(self._swept - self.settings.unfunded_ttl_s)

    # -- closing -----------------------------------------------------------------

    async def close(self, live: LiveChannel, *, reason: str) -> Closed:
        """No more payments on ``live``: queue its settlement; the ``closed`` answer.

        Idempotent. The meter and the new state are durable before ``closed``
        is answered; the settlement follows within the window (``settle_by``).
        """
        async with live.lock:
            if live.released:
                raise ChannelReleased(live.channel_id)
            core = live.core
            if core.state in (ServerState.READY, ServerState.FUNDING):
                core.close()
                await self.ledger.closing(live)
                log.info("closing %s (%s): paid %d", live.channel_id, reason, core.paid)
            settle_by: float | None = None
            if core.state is ServerState.CLOSING and core.settlement_txid is None:
                urgent = reason in ("expiry", "operator")
                settle_by = self._enqueue(live, urgent=urgent)
        if settle_by is not None and self.window == 0:
            # No window to wait for company: settle now, answer with the txid.
            try:
                await self.settle_queue()
            except ChannelReleased:
                if live.released:
                    raise
                # Another channel of the batch was taken over by another
                # host; this one is queued again and settles next round.
        pending = core.state is ServerState.CLOSING and core.settlement_txid is None
        return core.closed_message(int(settle_by) + 1 if pending and settle_by else None)

    def _enqueue(self, live: LiveChannel, *, urgent: bool) -> float:
        queued = self._queue.get(live.channel_id)
        settle_by = time.time() + (0.0 if urgent else self.window)
        if queued is None:
            queued = self._queue[live.channel_id] = _Queued(live, settle_by)
        queued.settle_by = min(queued.settle_by, settle_by)
        return queued.settle_by

    def settle_by(self, live: LiveChannel) -> int | None:
        """Unix time by which a queued channel's batch goes out; None if not queued."""
        queued = self._queue.get(live.channel_id)
        return None if queued is None else int(queued.settle_by) + 1

    def _due(self) -> bool:
        now = time.time()
        return any(q.settle_by <= now for q in self._queue.values()) or (
            len(self._queue) >= MAX_BATCH
        )

    async def settle_now(self, live: LiveChannel) -> Closed:
        """The operator's settle: close ``live`` and broadcast its batch at once.

        A channel already in a broadcast batch has that batch sent again: an
        operator who settles by hand wants it on the network now. A node that
        cannot be reached raises (``RpcTransportError``); nothing is lost.
        """
        txid = live.core.settlement_txid
        if txid is not None and txid in self._batches:
            await self._broadcast(txid)
            return live.core.closed_message()
        await self.close(live, reason="operator")
        await self.settle_queue()
        closed = live.core.closed_message()
        if live.session is not None:
            # Told in the background: settling never waits on a client.
            live.session.tell_closed(closed)
        return closed

    async def settle_by_hand(self, channel_id: str | None) -> list[dict[str, Any]]:
        """``gateway settle``: one held channel (KeyError if unknown) or every one, now.

        Every one: ready channels are closed and settled in one batch, and
        closing ones have their batch broadcast again. It goes on past a
        channel that failed for want of the node: its item has an ``error``
        instead of a ``txid``. Nothing is lost: it is either still ready (the
        fee estimate failed first) or its settlement is stored and the duty
        broadcasts it again. One named channel raises.
        """
        if channel_id is not None:
            targets = [self.ledger.channels[channel_id]]
        else:
            states = (*SETTLEABLE, ServerState.CLOSING)
            targets = [c for c in self.ledger.channels.values() if c.core.state in states]
        results: list[dict[str, Any]] = []
        for live in targets:
            try:
                closed = await self.settle_now(live)
            except ChannelReleased:  # handed to another worker meanwhile
                continue
            except RpcException as exc:
                if channel_id is not None:
                    raise
                results.append({"channel_id": live.channel_id, "error": str(exc)})
                continue
            results.append({"channel_id": live.channel_id, **closed.to_wire()})
        return results

    async def settle_queue(self) -> None:
        """Settle every queued channel: in batches of up to MAX_BATCH, stored, then broadcast."""
        async with self._batching:
            queued = sorted(self._queue.values(), key=lambda q: q.settle_by)
            self._queue.clear()
            try:
                for start in range(0, len(queued), MAX_BATCH):
                    await self._settle([q.live for q in queued[start : start + MAX_BATCH]])
            except BaseException:
                # The node failed us midway: what is not in a stored batch waits
                # for the next round, as due as it was.
                for q in queued:
                    core = q.live.core
                    if (
                        core.state is ServerState.CLOSING
                        and core.settlement_txid is None
                        and not q.live.released
                    ):
                        self._queue.setdefault(q.live.channel_id, q)
                raise

    async def _settle(self, lives: list[LiveChannel]) -> None:
        claims: list[ChannelClaim] = []
        holders: dict[str, LiveChannel] = {}
        for live in lives:
            if live.released or live.core.state is not ServerState.CLOSING:
                continue
            claim = live.core.claim(self.payouts(live)[0])
            if claim is None:
                await self._abandon(live, "nothing paid")
                continue
            claims.append(claim)
            holders[claim.outpoint.channel_id] = live
        rate = await self.feerate()
        while claims:
            result = build_batch(claims, self.settings.operator_script, rate)
            if result.batch is not None:
                await self._store_and_broadcast(result.batch, claims, holders)
            left = list(result.left_out)
            if result.batch is None:
                # Not even alone: the client refunds after expiry.
                for claim in left:
                    await self._abandon(holders[claim.outpoint.channel_id], "cannot pay its exit")
                return
            claims = left

    async def _abandon(self, live: LiveChannel, why: str) -> None:
        async with live.lock:
            if live.core.state is ServerState.CLOSING and live.core.settlement_txid is None:
                live.core.abandon()
                await self.ledger.closed_unsettled(live)
                log.info("nothing to broadcast for %s (%s): refund after expiry", live.channel_id,
                         why)
        self.ledger.drop(live)

    async def _store_and_broadcast(
        self, batch: Batch, claims: Sequence[ChannelClaim], holders: dict[str, LiveChannel]
    ) -> None:
        in_batch = [holders[outpoint.channel_id] for outpoint in batch.channels]
        claimed = {c.outpoint.channel_id: c for c in claims}
        for live in in_batch:
            live.core.settled_in(batch.txid)
        owners = self._owners(in_batch)
        try:
            await self.ledger.batch_stored(
                batch, in_batch, [claimed[c.channel_id] for c in in_batch], owners
            )
        except BaseException:
            # Not stored, so never broadcast: its channels settle again (the
            # queue takes them back), those another host took excepted.
            for live in in_batch:
                live.core.unsettle()
            raise
        self._batches[batch.txid] = batch.tx
        log.info(
            "settlement %s: %d channel(s), %d vB, fee %d sat (%.2f sat/vB)",
            batch.txid, len(batch.channels), batch.vsize, batch.fee, float(batch.feerate),
        )
        await self._broadcast(batch.txid, in_batch)

    def _owners(self, lives: Sequence[LiveChannel]) -> dict[bytes, str]:
        owners: dict[bytes, str] = {}
        for live in lives:
            owners.update(self.payouts(live)[1])
        owners.setdefault(self.settings.operator_script, "operator")
        return owners

    async def _broadcast(self, txid: str, lives: Sequence[LiveChannel] | None = None) -> None:
        """Send a stored batch to the node; split it when the node refuses it for good."""
        tx = self._batches[txid]
        try:
            await self.rpc.call("sendrawtransaction", tx.hex())
        except RpcVerifyAlreadyInChain:
            pass
        except RpcError as exc:
            if exc.code not in (-25, -26):
                log.warning("broadcast of %s refused: %s", txid, exc)
                return
            lives = list(lives) if lives is not None else self._members(txid)
            log.warning("node refused settlement %s (%s): splitting it", txid, exc.message)
            await self._split(txid, lives)

    def _members(self, txid: str) -> list[LiveChannel]:
        return [c for c in self.ledger.channels.values() if c.core.settlement_txid == txid]

    async def _split(self, txid: str, lives: list[LiveChannel]) -> None:
        """Leave out the channels whose funding is gone; settle the rest again."""
        calls = []
        for live in lives:
            outpoint = live.core.outpoint
            assert outpoint is not None
            calls.append(("gettxout", [outpoint.txid, outpoint.vout, True]))
        answers = await self.rpc.batch(calls)
        gone = [live for live, answer in zip(lives, answers, strict=True) if answer is None]
        if not gone and len(lives) == 1:
            return  # nothing to pin it on: follow() tries the same transaction again
        for live in lives:
            live.core.unsettle()
            live.spent = live in gone
        await self.ledger.batch_abandoned(txid, lives)
        self._batches.pop(txid, None)
        rest = [live for live in lives if live not in gone]
        halves = [rest] if gone else [rest[: len(rest) // 2], rest[len(rest) // 2 :]]
        for half in halves:
            if half:
                await self._settle(half)

    # -- following ----------------------------------------------------------------

    def _follow_due(self, live: LiveChannel) -> bool:
        """Follow a settlement at each new tip, and every ``REFOLLOW_S`` otherwise.

        Only a block can confirm it; the timer is for a rebroadcast after the
        node dropped it. Following every channel on every round cost an RPC per
        closing channel per second, competing with the broadcasts of a wave of
        closes (docs/performance.md, settle figure).
        """
        if self._fresh(live.followed, REFOLLOW_S):
            return False
        live.followed = self._stamp()
        return True

    def _stamp(self) -> tuple[str, float]:
        return self.follower.best_hash, time.monotonic()

    def _fresh(self, stamp: tuple[str, float] | None, ttl: float) -> bool:
        """``stamp`` (see :meth:`_stamp`) is from this tip and younger than ``ttl`` s."""
        return (
            stamp is not None
            and stamp[0] == self.follower.best_hash
            and time.monotonic() - stamp[1] < ttl
        )

    async def follow(self, txid: str) -> None:
        """Follow a broadcast batch through the best chain (section 8).

        Confirmed ``settle_depth`` deep → its channels ``closed``; confirmed
        less deep, or waiting in the mempool → wait; neither in a block nor in
        the mempool (dropped, or reorged out and not re-admitted) → broadcast
        again (a channel whose funding its client's refund spent is then left
        out). Blocks come from the follower, never a txid index.
        """
        follower = self.follower
        members = self._members(txid)
        if txid not in self._batches:  # a batch of a channel adopted from another host
            tx = self.ledger.batch_tx(txid)
            if tx is not None:
                self._batches[txid] = tx
        seen = follower.confirmed(txid)
        if seen is not None:
            if follower.depth(seen) >= self.settings.depth:
                for live in members:
                    live.core.mark_closed()
                await self.ledger.batch_confirmed(txid, seen.height, members)
                self._batches.pop(txid, None)
                log.info("settlement %s confirmed (%d channel(s))", txid, len(members))
            return
        for live in members:
            await self._follow_refund(live)
        if any(live.core.state is ServerState.REFUNDED for live in members):
            return
        if await self._in_mempool(txid):
            return
        if txid in self._batches:
            await self._broadcast(txid, members)

    async def _follow_refund(self, live: LiveChannel) -> None:
        """The funding spent by another transaction (the client's refund) that deep → refunded."""
        outpoint = live.core.outpoint
        assert outpoint is not None
        spend = self.follower.spent(outpoint.txid, outpoint.vout)
        if spend is None or spend.txid == live.core.settlement_txid:
            return
        if self.follower.depth(spend.block) >= self.settings.depth:
            live.core.mark_refunded()
            await self.ledger.refunded(live)
            log.info("channel %s was refunded by %s", live.channel_id, spend.txid)

    async def _in_mempool(self, txid: str) -> bool:
        try:
            await self.rpc.call("getmempoolentry", txid)
        except RpcInvalidAddressOrKey:  # -5: not in the mempool
            return False
        return True

    # -- prices ---------------------------------------------------------------------

    async def feerate(self) -> Fraction:
        """sat/vB for a settlement: the node's estimate, never below the floor.

        Kept until the next block or for ``FEERATE_TTL_S``: the estimate moves
        with blocks, and one ``estimatesmartfee`` per settlement was half the
        RPC calls of a wave of closes (docs/performance.md, settle figure).
        """
        if self._feerate is not None and self._fresh(self._feerate[1], FEERATE_TTL_S):
            return self._feerate[0]
        stamp = self._stamp()
        rate = await self._estimate()
        self._feerate = (rate, stamp)
        return rate

    async def _estimate(self) -> Fraction:
        floor = self.settings.fee_floor
        try:
            answer = await self.rpc.call("estimatesmartfee", 2)
        except RpcError:
            return floor
        rate = answer.get("feerate") if isinstance(answer, dict) else None
        if rate is None:  # "Insufficient data or no feerate found"
            return floor
        return max(floor, Fraction(Decimal(str(rate)) * 100_000_000) / 1000)  # BTC/kvB → sat/vB

    def _script(self, address: str) -> bytes:
        script = self._script_cache.get(address)
        if script is None:
            script = address_to_script_pubkey(address, self.settings.network)
            self._script_cache[address] = script
        return script

    def payouts(self, live: LiveChannel) -> tuple[list[tuple[bytes, int]], dict[bytes, str]]:
        """(script, weight) per publisher by what its items billed in this channel."""
        catalog = self.library.catalog
        weights: dict[bytes, int] = {}
        owner: dict[bytes, str] = {}
        for media, bill in sorted(live.media_bill.items()):
            item = catalog.items.get(media) or catalog.live.get(media)  # live: protocol.md 11
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
