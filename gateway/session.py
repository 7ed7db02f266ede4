"""One viewer session per WebSocket: drives the pure core, does the I/O.

Theory of operation
-------------------

The session reads one client message at a time (protocol.md section 4) and
answers it; media flows from a separate *streamer* task so that a ``pay`` can
be read while a chunk waits for it. The two tasks meet at two points:

* ``LiveChannel.durable_paid`` — what the store has fsync'd. The streamer
  compares a chunk's ``due`` total with it, never with the core's in-memory
  figure, so no chunk leaves before the increment that pays for it is durable
  (section 7, design.md "Money rules").
* ``_paid_event`` — set by the ``pay`` handler once the increment is
  durable; the streamer then re-checks and sends the chunk, or the same
  ``due`` again for a partial payment (section 7). When the streamer is
  parked on that event, the handler leaves ``paid`` to it, so that ``paid``,
  the ``chunk``, its binary frame and the next ``due`` leave in ONE socket
  write: a write per frame was the largest cost per chunk (``gateway bench``).

Every send goes through ``_send``, which hands all its frames to the
connection without an ``await`` in between and writes them in one go
(:class:`~gateway.wsconn.AiohttpConnection`), so a ``chunk`` text message
and its binary frame are never separated (section 1) and need no lock. A
:class:`~gateway.protocol.errors.ProtocolError` becomes an ``error`` message
(section 9); anything else becomes ``internal`` and its text stays in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.chain.rpc import RpcError, RpcVerifyAlreadyInChain
from gateway.chain.watch import ChainFollower
from gateway.funding import FundingDuty, funding_status
from gateway.ledger import ChannelReleased, Ledger, LiveChannel
from gateway.live.onair import OnAir
from gateway.media.catalog import MediaItem
from gateway.media.library import Library
from gateway.protocol.channel import ServerChannel, ServerState
from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.protocol.messages import (
    FEATURE_PAY_BINARY,
    PROTOCOL_VERSION,
    ChannelKind,
    Chunk,
    Close,
    Closed,
    Due,
    End,
    Fund,
    Funding,
    Hello,
    Limits,
    Message,
    Open,
    Pay,
    Play,
    Refund,
    Resume,
    ServerHello,
    Stop,
    Stream,
    encode,
    parse_client_binary,
    parse_client_message,
)
from gateway.protocol.metering import INIT_SEGMENT
from gateway.protocol.transactions import Outpoint
from gateway.session_live import play_live
from gateway.settlement import Settler
from gateway.wsconn import Connection, ConnectionClosed

log = logging.getLogger(__name__)

AGENT = "paystream-gateway/0.1"
#: Longest a ``close`` waits for the streamer to send what is already paid
#: (a file read, or a live fragment still being cut).
DELIVER_PAID_S = 2.0


class SessionEnd(Exception):
    """Stop reading: the session is over (closed, replaced or fatal error)."""


@dataclass(frozen=True)
class SessionContext:
    """What every session works with, handed in by the gateway's wiring (server.py)."""

    ledger: Ledger
    rpc: Any
    follower: ChainFollower
    funding: FundingDuty
    settler: Settler
    library: Library
    network: str
    limits: Limits
    #: Seconds a session may wait for its funding output before funding_not_found.
    funding_timeout_s: float
    #: Seconds without a message from the client before the socket is closed.
    idle_timeout_s: float
    #: Channels one address may have opened and not funded.
    max_unfunded_per_ip: int
    #: Count a session that said ``hello`` against its address; False: ``busy``.
    admit: Callable[[str], bool]
    #: Seconds a socket may stay without ``hello`` (half-open).
    handshake_timeout_s: float = 10.0
    #: Seconds a session may sit on its own unpaid ``due`` saying nothing.
    unpaid_timeout_s: float = 60.0
    #: The live items on air in this process (None: no live items).
    on_air: OnAir | None = None


class Session:
    """The gateway's side of one WebSocket (protocol.md section 4)."""

    def __init__(self, ctx: SessionContext, ws: Connection, peer: str) -> None:
        self.ctx = ctx
        self.ws = ws
        self.peer = peer
        self.nonce = secrets.token_bytes(32)
        self._hello = False
        #: Counted against its address by the server (``SessionContext.admit``).
        self.admitted = False
        #: A channel opened here but not yet funded (store row id, core).
        self._pending: tuple[int, ServerChannel] | None = None
        self.live: LiveChannel | None = None
        self._paid_event = asyncio.Event()
        #: The streamer waits on _paid_event for a due (see _stream_media).
        self._parked = False
        #: Set each time the streamer parks on a due (``close`` waits for it).
        self._parked_again = asyncio.Event()
        #: ``paid`` messages left by the pay handler for the parked streamer to send.
        self._paid_out: list[Message | bytes] = []
        self._stream: asyncio.Task[None] | None = None
        self._streaming_media: str | None = None
        self._funding: asyncio.Task[None] | None = None
        self._closed = False
        self._last_rx = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        #: Fires ``funding_timeout_s`` after ``open`` if nothing funded the channel.
        self._fund_deadline: asyncio.TimerHandle | None = None
        self._idle_close: asyncio.Task[None] | None = None
        self._goodbye: asyncio.Task[None] | None = None
        #: Notices sent from outside the message loop (funding lost, void).
        self._background: set[asyncio.Future[None]] = set()
        #: The last channel this session had, for the log (:meth:`channel_label`).
        self._label = "none"

    # -- I/O ---------------------------------------------------------------------

    async def _send(self, *frames: Message | bytes | str) -> None:
        """Send ``frames`` in order, none of another sender's between them (section 1).

        Messages and ``str`` go as text frames, ``bytes`` as binary frames.
        """
        await self.ws.send(
            [f if isinstance(f, bytes | str) else encode(f) for f in frames]
        )

    async def _send_error(self, exc: ProtocolError) -> None:
        log.info("error %s to %s (channel %s)", exc.code.value, self.peer, self.channel_label())
        await self._send(_json(exc.to_wire()))

    def channel_label(self) -> str:
        """The session's channel for the log: its id, "unfunded" or "none"."""
        if self.live is not None:
            return self.live.channel_id
        self._label = self._label if self._pending is None else "unfunded"
        return self._label

    async def run(self) -> None:
        """Serve the socket until it closes; then hand the channel to settlement."""
        try:
            await self._loop()
        except ConnectionClosed:
            pass
        finally:
            await self._cleanup()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            # A socket that never says hello holds a half-open slot: not for long.
            async with asyncio.timeout(self.ctx.handshake_timeout_s):
                raw = await self.ws.recv()
        except TimeoutError:
            await self.ws.close(1008, "no hello")
            return
        self._watchdog = loop.call_later(
            min(self.ctx.idle_timeout_s, self.ctx.unpaid_timeout_s), self._idle_check
        )
        while True:
            self._last_rx = loop.time()
            try:
                await self._handle(raw)
            except ProtocolError as exc:
                await self._send_error(exc)
                if exc.fatal:
                    await self.ws.close(1008, exc.code.value)
                    return
            except SessionEnd:
                return
            except ConnectionClosed:
                raise
            except Exception:
                log.exception("session %s failed", self.peer)
                await self._send_error(
                    ProtocolError(ErrorCode.INTERNAL, "the gateway failed; nothing was recorded")
                )
            raw = await self.ws.recv()

    def _idle_check(self) -> None:
        """Close a session silent for ``idle_timeout_s``, unless media is playing.

        A stream parked on the client's unpaid ``due`` is not playing: after
        ``unpaid_timeout_s`` of silence (found within twice that) the socket
        closes, and the channel takes the disconnect path (resume grace, then
        settlement).

        One timer per session, moved only when it fires: a timeout around
        every ``recv`` cost a timer per message (``gateway bench``).
        """
        loop = asyncio.get_running_loop()
        idle = self.ctx.idle_timeout_s
        if self._parked:
            # Waiting on its own unpaid due: not playing (hardening issue, item 1).
            deadline = self._last_rx + self.ctx.unpaid_timeout_s
        elif self._stream is not None and not self._stream.done():
            deadline = loop.time() + idle  # free media plays without client messages
        else:
            deadline = self._last_rx + idle
        now = loop.time()
        if now >= deadline:
            self._idle_close = loop.create_task(self.ws.close(1000, "idle"))
        else:
            # Looked at again within unpaid_timeout_s, in case a stream parks
            # on a due meanwhile: one timer per session, not one per message.
            self._watchdog = loop.call_at(
                min(deadline, now + self.ctx.unpaid_timeout_s), self._idle_check
            )

    async def _handle(self, raw: str | bytes) -> None:
        # A binary frame is the compact `pay` (protocol.md section 5a).
        msg = parse_client_binary(raw) if isinstance(raw, bytes) else parse_client_message(raw)
        if not self._hello:
            if not isinstance(msg, Hello):
                raise ProtocolError(ErrorCode.BAD_STATE, "the first message must be hello")
            if not self.ctx.admit(self.peer):
                raise ProtocolError(
                    ErrorCode.BUSY, "too many sessions from this address", fatal=True
                )
            self.admitted = True
            self._hello = True
            await self._send(
                ServerHello(
                    version=PROTOCOL_VERSION,
                    agent=AGENT,
                    network=self.ctx.network,
                    nonce=self.nonce,
                    limits=self.ctx.limits,
                    features=(FEATURE_PAY_BINARY,),
                )
            )
            return
        handler = _HANDLERS.get(type(msg))
        if handler is None:  # a second hello
            raise ProtocolError(ErrorCode.BAD_STATE, f"{msg.type} is out of order")
        await handler(self, msg)

    # -- opening and funding (protocol.md sections 4, 5) ---------------------------

    def _no_channel_yet(self, what: str) -> None:
        if self._pending is not None or self.live is not None:
            raise ProtocolError(ErrorCode.BAD_STATE, f"{what}: this session already has a channel")

    async def _on_open(self, msg: Open) -> None:
        self._no_channel_yet("open")
        ledger = self.ctx.ledger
        # Counted before the first await, so concurrent opens cannot all pass.
        if not ledger.take_unfunded_slot(self.peer, self.ctx.max_unfunded_per_ip):
            raise ProtocolError(ErrorCode.BUSY, "too many unfunded channels from this address")
        try:
            row_id = await ledger.next_index()
            core = ServerChannel.open(
                msg,
                server_privkey=ledger.channel_key(row_id),
                limits=self.ctx.limits,
                network=self.ctx.network,
                now=int(time.time()),
                tip_height=self.ctx.follower.height,
                feerate=await self.ctx.settler.feerate(),
            )
            # The row (and so K2's index) is durable before K2 is revealed.
            await ledger.opened(row_id, core, self.peer)
        except BaseException:
            ledger.note_unfunded(self.peer, -1)
            raise
        self._pending = (row_id, core)
        loop = asyncio.get_running_loop()
        self._fund_deadline = loop.call_later(self.ctx.funding_timeout_s, self._fund_overdue)
        await self._send(core.terms())

    def _fund_overdue(self) -> None:
        """No funding ``funding_timeout_s`` after ``open``: the channel is abandoned.

        A funding under way gets its own timeout first; then it is checked again.
        So an unfunded channel lives at most two timeouts (ledger.expire_unfunded
        sweeps what a crash left).
        """
        if self._pending is None or self._closed:
            return
        if self._funding is not None:
            loop = asyncio.get_running_loop()
            self._fund_deadline = loop.call_later(self.ctx.funding_timeout_s, self._fund_overdue)
            return
        self._track(self._abandon_unfunded())

    async def _abandon_unfunded(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._drop_pending()
            await self._send_error(
                ProtocolError(
                    ErrorCode.FUNDING_NOT_FOUND,
                    "the channel was not funded in time; open another",
                    fatal=True,
                )
            )
            await self.ws.close(1008, ErrorCode.FUNDING_NOT_FOUND.value)

    async def _drop_pending(self) -> ServerChannel | None:
        """Abandon this session's unfunded channel, if any: closed, nothing to settle."""
        if self._pending is None:
            return None
        row_id, core = self._pending
        self._pending = None
        self.ctx.ledger.note_unfunded(self.peer, -1)
        core.abandon()
        await self.ctx.ledger.abandoned(row_id, core)
        return core

    def _pending_core(self, what: str) -> tuple[int, ServerChannel]:
        if self._pending is None:
            raise ProtocolError(ErrorCode.BAD_STATE, f"{what} needs an open channel first")
        return self._pending

    async def _on_refund(self, msg: Refund) -> None:
        row_id, core = self._pending_core("refund")
        answer = core.sign_refund(msg)
        await self.ctx.ledger.refund_signed(row_id, core, msg.tx, msg.value)
        await self._send(answer)

    async def _on_fund(self, msg: Fund) -> None:
        row_id, core = self._pending_core("fund")
        if self._funding is not None:
            raise ProtocolError(ErrorCode.BAD_STATE, "fund is already being processed")
        # Every check the message allows comes first: a tx that does not fund
        # this channel is refused before anything reaches the node (section 5).
        claim = core.resolve_fund(msg)
        if claim.outpoint is None or (claim.tx is None and msg.txid is None):
            # Watch funding_address, or (multisig) T2's outpoint: beside the loop.
            self._funding = asyncio.create_task(
                self._beside_loop(self._watch_funding(row_id, core))
            )
            return
        if claim.tx is not None:
            await self._broadcast_funding(claim.tx)
        await self._accept_funding(row_id, core, claim.outpoint, known=claim.tx is not None)

    async def _broadcast_funding(self, tx: bytes) -> None:
        """Relay the client's T1 (it pays this channel: resolve_fund said so)."""
        try:
            await self.ctx.rpc.call("sendrawtransaction", tx.hex())
        except RpcVerifyAlreadyInChain:
            pass
        except RpcError as exc:
            code = ErrorCode.FUNDING_NOT_FOUND
            if "conflict" in exc.message or "missingorspent" in exc.message:
                code = ErrorCode.FUNDING_SPENT
            raise ProtocolError(code, f"the node refused fund.tx: {exc.message}") from None

    async def _accept_funding(
        self, row_id: int, core: ServerChannel, outpoint: Outpoint, *, known: bool = False
    ) -> None:
        """The funding output ``outpoint`` exists unspent: the channel is funded.

        Asked with ``gettxout`` (a stock node answers it without a transaction
        index). Not unspent: ``funding_spent`` when the transaction is known
        (the client sent it, or the mempool has it), else ``funding_not_found``
        — a stock node cannot tell an unknown output from one spent long ago.
        """
        status = await funding_status(self.ctx.rpc, outpoint.txid, outpoint.vout)
        if status.confirmations is None:
            if known or status.spent_in_mempool or await self._in_mempool(outpoint.txid):
                raise ProtocolError(
                    ErrorCode.FUNDING_SPENT, f"{outpoint.channel_id} is already spent"
                )
            raise ProtocolError(
                ErrorCode.FUNDING_NOT_FOUND,
                f"the node has no unspent output {outpoint.channel_id}",
            )
        ledger = self.ctx.ledger
        if outpoint.channel_id in ledger.channels or ledger.known_outpoint(outpoint.channel_id):
            raise ProtocolError(ErrorCode.FUNDING_MISMATCH, "that output funds another channel")
        assert status.value is not None and status.script_pubkey is not None
        core.accept_funding(outpoint, status.value, status.script_pubkey)
        live = await self.ctx.ledger.funded(row_id, core)
        self._pending = None
        self.ctx.ledger.note_unfunded(self.peer, -1)
        self.live = live
        self._label = live.channel_id
        live.session = self
        log.info("channel %s funded: %d sat, from %s", live.channel_id, core.value, self.peer)
        await self.ctx.funding.apply(live, status)
        await self._until_ready(live)

    async def _in_mempool(self, txid: str) -> bool:
        try:
            await self.ctx.rpc.call("getmempoolentry", txid)
        except RpcError:
            return False
        return True

    async def _until_ready(self, live: LiveChannel) -> None:
        """``ready`` now, or wait for ``min_conf`` beside the message loop (section 6).

        Waiting inside the loop would leave ``close`` unread until a block
        came; a wait already in the background task just goes on.
        """
        background = self._funding is not None and self._funding is asyncio.current_task()
        if background or live.core.state is not ServerState.FUNDING:
            await self._await_ready(live)
        else:
            self._funding = asyncio.create_task(self._beside_loop(self._await_ready(live)))

    async def _beside_loop(self, work: Awaitable[None]) -> None:
        """Run a funding step as ``_funding``; a failure is sent as ``error`` (section 9)."""
        try:
            await work
        except ProtocolError as exc:
            await self._send_error(exc)
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("funding step of session %s failed", self.peer)
            with contextlib.suppress(ConnectionClosed):
                await self._send_error(
                    ProtocolError(ErrorCode.INTERNAL, "the gateway failed while funding")
                )
        finally:
            if self._funding is asyncio.current_task():
                self._funding = None

    async def _watch_funding(self, row_id: int, core: ServerChannel) -> None:
        try:
            if core.kind == ChannelKind.MULTISIG:
                assert core.refund_outpoint is not None
                outpoint = await self._poll_outpoint(core.refund_outpoint)
            else:
                spk = core.script.script_pubkey
                future = self.ctx.follower.watch_script(spk)
                try:
                    async with asyncio.timeout(self.ctx.funding_timeout_s):
                        seen = await future
                finally:
                    self.ctx.follower.unwatch_script(spk, future)
                outpoint = Outpoint(seen.txid, seen.vout)
        except TimeoutError:
            raise ProtocolError(
                ErrorCode.FUNDING_NOT_FOUND, "nothing paid funding_address in time"
            ) from None
        await self._accept_funding(row_id, core, outpoint)

    async def _poll_outpoint(self, outpoint: Outpoint) -> Outpoint:
        async with asyncio.timeout(self.ctx.funding_timeout_s):
            while True:
                out = await self.ctx.rpc.call("gettxout", outpoint.txid, outpoint.vout, True)
                if out is not None:
                    return outpoint
                await asyncio.sleep(self.ctx.follower.poll_interval)

    async def _await_ready(self, live: LiveChannel) -> None:
        """``funding`` at each new confirmation until the funding duty says ready.

        The duty (gateway/funding.py) moves the channel; this only reports.
        """
        needed = self.ctx.limits.min_conf
        core = live.core
        outpoint = core.outpoint
        assert outpoint is not None
        told: int | None = None
        while True:
            live.funding_changed.clear()  # before looking: a change meanwhile wakes the wait
            if core.state is not ServerState.FUNDING or live.session is not self:
                break
            confirmations = live.funding_conf or 0
            if confirmations != told:
                told = confirmations
                await self._send(
                    Funding(
                        txid=outpoint.txid,
                        vout=outpoint.vout,
                        confirmations=confirmations,
                        needed=needed,
                    )
                )
            await live.funding_changed.wait()
        if core.state is ServerState.READY and live.session is self:
            await self._send(core.ready())

    # -- resume (section 5) ----------------------------------------------------------

    async def _on_resume(self, msg: Resume) -> None:
        self._no_channel_yet("resume")
        ledger = self.ctx.ledger
        live = ledger.channels.get(msg.channel_id) or ledger.load_stored(msg.channel_id)
        if live is None:
            raise ProtocolError(ErrorCode.CHANNEL_UNKNOWN, "the gateway has no such channel")
        now, height = int(time.time()), self.ctx.follower.height
        if ledger.shared and ledger.channels.get(live.channel_id) is not live:
            # Another worker (or host) may hold it: check the resume on the
            # stored copy first, so that a bad proof cannot take the channel
            # from its session (gateway/workers.py, gateway/ledger/cluster.py).
            live.core.check_resume(msg, nonce=self.nonce, now=now, tip_height=height)
            live = await self.ctx.ledger.take_over(live)
        live.core.check_resume(msg, nonce=self.nonce, now=now, tip_height=height)
        old = live.session
        live.session = self
        live.disconnected_at = None
        self.live = live
        self._label = live.channel_id
        log.info("channel %s resumed from %s", live.channel_id, self.peer)
        if old is not None and old is not self:
            old.replaced()
        # The funding output must still be there (a reorg, a double spend)
        # before anything flows on it again (section 5).
        # `funding` progress instead of `ready` until it is deep enough again.
        await self.ctx.funding.check_one(live)
        if live.core.state is ServerState.VOID:
            raise ProtocolError(
                ErrorCode.CHANNEL_CLOSED, "the channel's funding was double-spent", fatal=True
            )
        await self._until_ready(live)

    def funding_lost(self) -> None:
        """The funding duty took the channel back to ``funding`` (a reorg): tell the client.

        Media stops at once; ``funding`` progress and ``ready`` follow when the
        funding is back (protocol.md section 8, ``funding_lost``).
        """
        if self.live is None or self._closed:
            return
        if self._stream is not None:
            self._stream.cancel()
        self._track(self._say_funding_lost(self.live))

    async def _say_funding_lost(self, live: LiveChannel) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._stop_stream()  # no `end`: funding_lost says the stream stopped
            await self._send_error(
                ProtocolError(
                    ErrorCode.FUNDING_LOST,
                    "a reorg took the funding's confirmations: no media until it is back",
                )
            )
            if self._funding is None:
                self._funding = asyncio.create_task(self._beside_loop(self._await_ready(live)))

    def channel_void(self) -> None:
        """The funding was double-spent: fatal ``funding_spent``, the socket closes."""
        if self.live is None or self._closed:
            return
        self._closed = True
        if self._stream is not None:
            self._stream.cancel()
        self._track(self._say_void())

    async def _say_void(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._stop_stream()
            await self._send_error(
                ProtocolError(
                    ErrorCode.FUNDING_SPENT,
                    "the funding transaction was double-spent: the channel is void",
                    fatal=True,
                )
            )
            await self.ws.close(1008, "funding_spent")

    def _track(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def replaced(self) -> None:
        """Another session (or worker) took our channel: fatal ``session_replaced`` (section 5).

        From the return the channel is no longer ours: our cleanup will not
        touch it, and our streamer is cancelled, so it sends and meters
        nothing more (it stops at its next ``await``). The goodbye (a ``paid``
        left for the streamer, the error, the close handshake) goes on in the
        background: a client that has stopped reading must not hold up the
        one that resumed, nor a hand-over between workers.
        """
        self.live = None
        if self._stream is not None:
            self._stream.cancel()
        self._goodbye = asyncio.create_task(self._say_replaced())

    async def _say_replaced(self) -> None:
        await self._stop_stream()
        with contextlib.suppress(ConnectionClosed):
            await self._send_error(
                ProtocolError(ErrorCode.SESSION_REPLACED, "another session resumed this channel")
            )
            await self.ws.close(1008, "session_replaced")

    # -- streaming (sections 6, 7) -------------------------------------------------------

    def _ready_live(self, what: str) -> LiveChannel:
        live = self.live
        if live is None or live.core.state is not ServerState.READY:
            raise ProtocolError(ErrorCode.BAD_STATE, f"{what} needs a ready channel")
        return live

    async def _on_play(self, msg: Play) -> None:
        live = self._ready_live("play")
        if live.core.is_expiring(int(time.time()), self.ctx.follower.height):
            raise ProtocolError(
                ErrorCode.CHANNEL_EXPIRING, "the channel is inside its settle margin"
            )
        live_item = self.ctx.library.current().live.get(msg.media)
        if live_item is not None:  # live pay-per-view (section 11)
            await play_live(self, live, live_item, msg)
            return
        if msg.webrtc is not None:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "play.webrtc is for live items only")
        item = self.ctx.library.item(msg.media)
        if item is None:
            raise ProtocolError(ErrorCode.MEDIA_UNKNOWN, f"no media {msg.media!r} in the catalog")
        if msg.start_ms > item.duration_ms:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, "play.start_ms is past the end of the media")
        await self._stop_stream(send_end=True)
        first = next(
            (c.index for c in item.chunks if c.start_ms + c.duration_ms > msg.start_ms),
            len(item.chunks),
        )
        # The rate is fixed at play: a rate change applies to new plays only.
        await self._send(
            Stream(
                media=item.id,
                title=item.title,
                mime=item.mime,
                rate_msat=item.rate_msat,
                free_ms=item.free_ms,
                free_used_ms=live.meter.free_used_ms(item.id, item.free_ms),
                duration_ms=item.duration_ms,
                chunks=len(item.chunks),
            )
        )
        self._streaming_media = item.id
        self._stream = asyncio.create_task(self._stream_media(live, item, first))

    async def _stream_media(self, live: LiveChannel, item: MediaItem, first: int) -> None:
        out: list[Message | bytes] = []
        # The initialization segment first: free, but due for the channel's
        # reserve until the client paid it (section 7).
        parts = [(INIT_SEGMENT, 0, 0)]
        parts += [(c.index, c.start_ms, c.duration_ms) for c in item.chunks[first:]]
        try:
            for index, start_ms, duration_ms in parts:
                quote = live.meter.quote(
                    item.id, index, duration_ms, rate_msat=item.rate_msat, free_ms=item.free_ms
                )
                if out and live.durable_paid >= quote.total:
                    await self._send(*out)  # free or paid ahead: flow control per chunk
                    out = []
                while live.durable_paid < quote.total:
                    out.append(
                        Due(total=quote.total, media=item.id, index=index, duration_ms=duration_ms)
                    )
                    await self._send(*out)
                    out = await self._wait_paid()
                    if live.core.state is not ServerState.READY:
                        await self._send(*out)
                        return  # settled meanwhile (expiry): no more chunks
                data = self.ctx.library.cached_chunk(item, index)
                if data is None:
                    # A file read waits: send what is held first, so a ``paid``
                    # never waits behind it (a later one would overtake it).
                    await self._send(*out)
                    out = []
                    data = await self.ctx.library.read_chunk(item, index)
                out += [
                    Chunk(
                        media=item.id,
                        index=index,
                        start_ms=start_ms,
                        duration_ms=duration_ms,
                        size=len(data),
                    ),
                    data,
                ]
                live.commit_chunk(quote)
            self._streaming_media = None
            await self._send(*out, End(media=item.id, reason="finished"))
        except ConnectionClosed:
            pass

    async def _wait_paid(self) -> list[Message | bytes]:
        """Park until a ``pay`` is durable; its ``paid`` (if left to us) opens the next write."""
        self._paid_event.clear()
        self._parked = True
        self._parked_again.set()
        try:
            await self._paid_event.wait()
        finally:
            self._parked = False
        paid, self._paid_out = self._paid_out, []
        return paid

    async def _stop_stream(self, *, send_end: bool = False, deliver_paid: bool = False) -> None:
        task, media = self._stream, self._streaming_media
        if task is None or task.done():
            self._stream, self._streaming_media = None, None
            return
        if deliver_paid and self._paid_event.is_set():
            # A pay woke the streamer (it may not have run yet): what it paid
            # for goes out before the channel closes, until it parks on the
            # next due, so the bill covers only media sent (section 7).
            self._parked_again.clear()
            parked = asyncio.ensure_future(self._parked_again.wait())
            await asyncio.wait({task, parked}, timeout=DELIVER_PAID_S,
                               return_when=asyncio.FIRST_COMPLETED)
            parked.cancel()
        self._stream, self._streaming_media = None, None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        if self._paid_out:  # left for the streamer, which never woke
            paid, self._paid_out = self._paid_out, []
            await self._send(*paid)
        if send_end and media is not None:
            await self._send(End(media=media, reason="stopped"))

    async def _on_stop(self, msg: Stop) -> None:
        self._ready_live("stop")
        if self._stream is None or self._stream.done():
            raise ProtocolError(ErrorCode.BAD_STATE, "nothing is playing")
        await self._stop_stream(send_end=True)

    async def _on_pay(self, msg: Pay) -> None:
        live = self._ready_live("pay")
        core = live.core
        async with live.lock:
            if live.released:  # handed to another worker while this pay waited
                raise ProtocolError(ErrorCode.SESSION_REPLACED, "the channel moved")
            # The core decides, the ledger records, then the core commits:
            # a payment that did not become durable changes nothing.
            record = core.receive_payment(
                msg, now=int(time.time()), tip_height=self.ctx.follower.height
            )
            try:
                await self.ctx.ledger.paid(live, record)
            except ChannelReleased:
                # Another host took the channel over: the fence refused this
                # increment whole and our session hears session_replaced.
                log.warning("pay on %s refused: another gateway holds the channel",
                            live.channel_id)
                return
            core.commit_payment(record)
        if self._parked:
            # The streamer sends it, before the chunk it pays for, in one write.
            self._paid_out.append(core.paid_message())
        else:
            await self._send(core.paid_message())
        self._paid_event.set()

    async def _on_close(self, msg: Close) -> None:
        if self.live is None and self._pending is None:
            raise ProtocolError(ErrorCode.BAD_STATE, "close needs a channel")
        await self._stop_stream(deliver_paid=True)
        if self._funding is not None:
            self._funding.cancel()
        if self.live is not None:
            try:
                closed = await self.ctx.settler.close(self.live, reason="close")
            except ChannelReleased:  # another host holds it now: session_replaced is said
                return
        else:
            core = await self._drop_pending()  # nothing funded: closed, txid null
            assert core is not None
            closed = core.closed_message()
        await self._send(closed)
        self._closed = True
        await self.ws.close(1000, "closed")
        raise SessionEnd

    def tell_closed(self, closed: Closed) -> None:
        """The duty or the operator closed our channel: say ``closed`` and end.

        In the background: a client that stopped reading must not hold up
        the settlement duty nor the operator.
        """
        if self.live is None or self._closed:
            return
        self._closed = True
        if self._stream is not None:
            self._stream.cancel()
        self._paid_event.set()
        self._track(self._say_closed(closed))

    async def _say_closed(self, closed: Closed) -> None:
        with contextlib.suppress(ConnectionClosed):
            await self._stop_stream()
            await self._send(closed)
            await self.ws.close(1000, "closed")

    async def _cleanup(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        # The socket may be gone with a ``paid`` still left for the stream: its
        # send fails, and must not skip the channel's release below (found by
        # the soak: the channel stayed held by a dead session, never settled).
        with contextlib.suppress(ConnectionClosed):
            await self._stop_stream()
        if self._funding is not None:
            self._funding.cancel()
        if self._fund_deadline is not None:
            self._fund_deadline.cancel()
        try:
            # Only a funded channel resumes (section 5): one left unfunded here
            # can never be funded through the gateway again.
            await self._drop_pending()
        except Exception:
            log.exception("could not abandon the unfunded channel of %s", self.peer)
        live = self.live
        if live is not None and live.session is self:
            live.session = None
            live.disconnected_at = time.time()
            # Flush the meter (free chunks since the last pay) and start the
            # resume grace (section 8) from a durable timestamp.
            try:
                await self.ctx.ledger.meter_flushed(live, live.disconnected_at)
            except Exception:
                log.exception("could not record the end of session %s", self.peer)


def _json(obj: dict[str, object]) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))


_HANDLERS: dict[type[Message], Any] = {
    Open: Session._on_open,
    Refund: Session._on_refund,
    Fund: Session._on_fund,
    Resume: Session._on_resume,
    Play: Session._on_play,
    Pay: Session._on_pay,
    Stop: Session._on_stop,
    Close: Session._on_close,
}
