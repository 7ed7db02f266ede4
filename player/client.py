"""The asyncio viewer: open or resume a channel, pay per chunk, write media, close.

Theory of operation
-------------------

:class:`Player` is the I/O around :class:`gateway.protocol.channel.ClientChannel`
(the pure client state machine): it moves protocol.md messages over one
WebSocket, funds through a :class:`~player.wallet.Wallet`, and keeps every
channel in a :class:`~player.keystore.Keystore` so a later run can resume it
(section 5) or refund it alone (section 2). One :meth:`Player.play` call is
one session::

    connect, hello ─► resume a stored channel of this gateway (section 5 proof)
                  └─► or open ─► terms ─► [multisig: refund ─► refund_signed]
                        ─► fund ─► funding… ─► ready
    play ─► stream ─► (chunk + binary | due ─► pay | paid)… ─► end
    close ─► closed                (or just disconnect with keep_open)

Money rules (design.md, protocol.md section 7):

- every ``due`` is checked by the channel's :class:`ClientMeter` against the
  advertised rate and the media received, never more than one chunk ahead;
  an overcharge is answered with ``close`` and :class:`OverchargeDetected`;
- an increment is stored durably (fsync'd) *before* its ``pay`` is sent;
- a channel is never funded above the viewer's budget, and never pays past it.

:meth:`Player.stop` (the CLI wires it to SIGINT) ends the session cleanly:
``close``, then wait for ``closed`` with a timeout.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, BinaryIO, Final, TypeVar
from urllib.parse import urlsplit

import websockets
from bitcoin.core import CTransaction
from websockets.asyncio.client import ClientConnection

from gateway.chain.rpc import RpcException
from gateway.protocol.channel import (
    DEFAULT_MAX_FEERATE,
    ClientChannel,
    LocalProtocolError,
    resume_digest,
)
from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.protocol.messages import (
    FEATURE_PAY_BINARY,
    Chunk,
    Closed,
    Due,
    End,
    Error,
    Fund,
    Funding,
    Hello,
    Interval,
    Limits,
    Message,
    Paid,
    Pay,
    Play,
    Ready,
    RefundSigned,
    Resume,
    ServerHello,
    ServerMessage,
    Stream,
    Terms,
    WebrtcAnswer,
    encode,
    encode_pay_binary,
    parse_server_message,
)
from gateway.protocol.metering import OverchargeError
from gateway.protocol.scripts import ChannelKind, ChannelScript, is_height_expiry
from gateway.protocol.settlement import exit_vbytes
from gateway.protocol.signatures import sign_digest
from gateway.protocol.transactions import DUST_LIMIT, Outpoint, build_refund, parse_tx
from player.keystore import ChannelState, Keystore, StoredChannel
from player.wallet import FundingTx, Wallet, WalletError
from player.webrtc import WebrtcReceiver

__all__ = [
    "AGENT",
    "DEFAULT_BUDGET",
    "DEFAULT_EXPIRY_S",
    "REFUND_FEERATE",
    "ExpirySpec",
    "GatewayError",
    "OverchargeDetected",
    "PlayResult",
    "Playback",
    "Player",
    "PlayerError",
    "Progress",
    "check_gateway_url",
    "format_feerate",
    "parse_expiry",
    "refund_channel",
    "restore_channel",
]

AGENT: Final = "paystream-player/0.1"
#: Default budget and channel value (sat).
DEFAULT_BUDGET: Final = 100_000
#: Seconds of media the player pays for ahead of real-time playback.
DEFAULT_BUFFER_S: Final = 10.0
#: Default expiry: about a day ahead (within ``hello.limits``).
DEFAULT_EXPIRY_S: Final = 24 * 3600
#: Fee rate of the refund transactions signed in advance (sat/vB).
REFUND_FEERATE: Final = 2
#: Slack kept inside ``min_expiry_s`` so the gateway, checking a moment later, still accepts.
_EXPIRY_SLACK_S: Final = 120
#: Seconds per block when converting a height expiry (protocol.md section 6).
_BLOCK_S: Final = 600
#: Largest media frame accepted (a 2 s chunk of high-rate video stays far below).
_MAX_FRAME: Final = 64 * 1024 * 1024


class PlayerError(Exception):
    """A failure to report to the viewer as one line (bad URL, gateway error...)."""


class GatewayError(PlayerError):
    """The gateway answered with a protocol.md section 9 ``error``."""

    def __init__(self, error: Error) -> None:
        super().__init__(f"gateway error {error.code}: {error.message}")
        self.code = error.code
        self.fatal = error.fatal


class OverchargeDetected(PlayerError):
    """The gateway asked more than section 7 allows; the channel was closed, nothing signed."""


# -- expiry ---------------------------------------------------------------------

_DURATION = re.compile(r"(\d+)([smhd]?)")
_UNITS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True)
class ExpirySpec:
    """``--expiry``: ``seconds`` from now, or an absolute block ``height``."""

    seconds: int | None = None
    height: int | None = None

    def resolve(self, limits: Limits, *, now: int, tip_height: int | None) -> int:
        """The ``open.expiry`` to propose, inside the gateway's advertised window.

        With neither field set: about :data:`DEFAULT_EXPIRY_S` ahead, moved
        into ``min_expiry_s``..``max_expiry_s``. An explicit value outside the
        window is a :class:`PlayerError` (the gateway would answer ``bad_expiry``).
        """
        lo = max(limits.min_expiry_s, limits.settle_margin_s) + _EXPIRY_SLACK_S
        hi = limits.max_expiry_s
        if self.height is not None:
            if tip_height is None:
                raise PlayerError("a height expiry needs --wallet-rpc to read the tip height")
            seconds = (self.height - tip_height) * _BLOCK_S
            if not lo <= seconds <= hi:
                raise PlayerError(
                    f"expiry height {self.height} is {seconds} s away (tip {tip_height}); "
                    f"the gateway accepts {lo}..{hi} s"
                )
            return self.height
        if self.seconds is None:
            seconds = min(max(DEFAULT_EXPIRY_S, lo), hi)
            if seconds < lo:
                raise PlayerError(f"the gateway's expiry window {lo}..{hi} s is empty")
        else:
            seconds = self.seconds
            if not lo <= seconds <= hi:
                raise PlayerError(
                    f"expiry {seconds} s is outside the gateway's window {lo}..{hi} s"
                )
        return now + seconds


def parse_expiry(text: str) -> ExpirySpec:
    """Parse ``--expiry``: ``6h``, ``90m``, ``2d``, ``3600`` (seconds) or ``h:HEIGHT``."""
    text = text.strip().lower()
    if text.startswith("h:"):
        digits = text[2:]
        if not digits.isdigit() or not 0 < int(digits) < 500_000_000:
            raise ValueError(f"bad height expiry {text!r}: expected h:HEIGHT below 500000000")
        return ExpirySpec(height=int(digits))
    match = _DURATION.fullmatch(text)
    if match is None or int(match[1]) <= 0:
        raise ValueError(f"bad expiry {text!r}: expected e.g. 6h, 90m, 2d, 3600 or h:HEIGHT")
    return ExpirySpec(seconds=int(match[1]) * _UNITS[match[2]])


def check_gateway_url(url: str) -> str:
    """``url`` if it is a ``ws://``/``wss://`` URL with a host, else :class:`PlayerError`."""
    try:
        parts = urlsplit(url)
        ok = parts.scheme in ("ws", "wss") and bool(parts.hostname)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        ok = False
    if not ok:
        raise PlayerError(f"bad gateway URL {url!r}: expected ws://HOST:PORT/paystream/2")
    return url


# -- fees and restore -------------------------------------------------------------


def format_feerate(rate: Fraction) -> str:
    """A feerate for a person: sat/vB to at most two decimals."""
    return f"{round(float(rate), 2):g}"


def _refund_fee(script: ChannelScript, outpoint: Outpoint, value: int, dest: bytes) -> int:
    """Fee of a refund at :data:`REFUND_FEERATE`, its witness size estimated from the script."""
    base = len(build_refund(script, outpoint, value, dest, 0))
    sig = 1 + 73  # push + DER (max 72) + sighash byte
    if script.kind == ChannelKind.CLTV:
        witness = 1 + sig + 1 + 1 + len(script.witness_script) + 3  # count, sig, <>, script
    else:
        witness = 1 + 1 + 2 * sig + 1 + len(script.witness_script) + 3  # count, <>, 2 sigs, script
    # The segwit marker and flag (2 bytes) count as witness data (BIP141 weight).
    vsize = math.ceil((4 * base + witness + 2) / 4)
    return vsize * REFUND_FEERATE


def _terms_for(rec: StoredChannel, client_pubkey: bytes, network: str) -> Terms:
    script = ChannelScript.make(rec.kind, client_pubkey, rec.server_pubkey, rec.expiry)
    return Terms(
        kind=script.kind,
        server_pubkey=rec.server_pubkey,
        witness_script=script.witness_script,
        funding_address=script.address(network),
        funding_script=script.script_pubkey,
        expiry=rec.expiry,
        exit_fee=rec.exit_fee,
        exit_vbytes=exit_vbytes(script, rec.change_script),
    )


def restore_channel(rec: StoredChannel, privkey: bytes, hello: ServerHello) -> ClientChannel:
    """Rebuild a funded :class:`ClientChannel` from the store, in state ``funding``.

    Replays the pure core's own steps (open, terms, multisig T2, fund) so every
    script and signature is checked again, then restores ``seq``, ``balance``
    and the section 7 bill. The gateway's ``ready`` after a ``resume`` moves it
    to ``ready``.
    """
    if rec.txid is None or rec.vout is None or rec.value is None:
        raise PlayerError(f"channel {rec.id} was never funded")
    # The reserve was accepted when the channel was opened: restore it as is.
    channel = ClientChannel(privkey, hello, budget=rec.value, max_feerate=Fraction(rec.exit_fee))
    channel.open(expiry=rec.expiry, change_script=rec.change_script, kind=rec.kind)
    channel.accept_terms(_terms_for(rec, channel.client_pubkey, rec.network))
    outpoint = Outpoint(rec.txid, rec.vout)
    if rec.kind == ChannelKind.MULTISIG:
        if rec.refund_fee is None or rec.refund_server_sig is None:
            raise PlayerError(f"channel {rec.id} has no signed refund")
        channel.refund_request(
            outpoint, rec.value, dest_script=rec.refund_script, fee=rec.refund_fee
        )
        channel.accept_refund_signed(RefundSigned(sig=rec.refund_server_sig))
    channel.fund(outpoint, rec.value)
    if rec.balance is not None:
        channel.seq, channel.balance = rec.seq, rec.balance
    channel.meter.bill = rec.bill
    return channel


# -- progress and result ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot for the live progress line."""

    status: str  # "funding", "playing", "closing"...
    media: str = ""
    media_ms: int = 0  # media time reached (end of the last chunk received)
    #: Where playback is: the playback clock when pacing (never past
    #: ``media_ms``), else ``media_ms`` (what was written is what was played).
    position_ms: int = 0
    duration_ms: int = 0
    chunks: int = 0
    #: Free media not yet played: the gateway's allowance left for this media
    #: plus the free part of what is received but not yet played (section 7
    #: counts media delivered; the viewer counts media watched).
    free_left_ms: int = 0
    rate_msat: int = 0
    paid: int = 0
    balance: int = 0
    value: int = 0
    confirmations: int = 0
    needed: int = 0


@dataclass(frozen=True, slots=True)
class PlayResult:
    """How a :meth:`Player.play` session ended.

    ``reason``: ``finished`` (the stream ended), ``max_chunks``, ``duration``,
    ``stopped`` (:meth:`Player.stop`), ``output_closed`` (writing media
    failed, e.g. the pipe's reader quit), ``budget`` (the next chunk would pass
    the budget) or ``gateway_closed`` (the gateway settled first, e.g. expiry).
    """

    reason: str
    channel: StoredChannel
    resumed: bool
    chunks: int
    media_ms: int
    paid: int
    balance: int
    closed: bool
    closed_txid: str | None
    #: ``closed.settle_by``: when a pending settlement goes out (None: broadcast,
    #: or nothing will be).
    settle_by: int | None = None


# -- playback ---------------------------------------------------------------------

#: Seconds between two progress reports of the playback clock while pacing.
PROGRESS_TICK_S: Final = 0.25


class Playback:
    """Where playback of one stream is, and how much free media it has left.

    The gateway counts the free allowance in media *delivered* (protocol.md
    section 7) and sends free chunks as fast as it can, so it is used up
    long before the viewer has watched it. The progress line follows the
    viewer instead: when pacing, playback runs at real time from the first
    chunk received (never past what was received); without pacing, what was
    written counts as played. Free media left is the gateway's allowance
    still to deliver plus the free part of what is received but not yet
    played (a chunk's free part is its beginning: section 7 charges only the
    part beyond the allowance).
    """

    def __init__(self, *, paced: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.paced = paced
        self._now = clock
        #: (clock reading, media ms) at the first chunk received; None before it.
        self.clock: tuple[float, int] | None = None
        #: End of the last chunk received (media ms).
        self.received_to = 0
        #: The gateway's free allowance for this media not yet delivered (ms).
        self.free_undelivered = 0
        # (start, duration, free part) of received chunks not yet fully played.
        self._spans: collections.deque[tuple[int, int, int]] = collections.deque()

    def on_stream(self, stream: Stream) -> None:
        """A ``stream``: the gateway's allowance left for its media."""
        self.free_undelivered = max(0, stream.free_ms - stream.free_used_ms)

    def on_chunk(self, start_ms: int, duration_ms: int) -> None:
        """A media chunk was received (and written)."""
        if self.clock is None:
            self.clock = (self._now(), start_ms)
        free = min(duration_ms, self.free_undelivered)
        self.free_undelivered -= free
        if free:
            self._spans.append((start_ms, duration_ms, free))
        self.received_to = start_ms + duration_ms

    def clock_ms(self) -> float | None:
        """The playback clock (media ms, may run past what was received); None before media."""
        if self.clock is None:
            return None
        started, at_ms = self.clock
        return at_ms + (self._now() - started) * 1000

    def position(self) -> int:
        """Media ms played: the clock, capped at what was received (or, unpaced, all of it)."""
        clock = self.clock_ms()
        if not self.paced or clock is None:
            return self.received_to
        return min(self.received_to, int(clock))

    def free_left(self, position: int | None = None) -> int:
        """Free media ms not yet played at ``position`` (default: :meth:`position`)."""
        at = self.position() if position is None else position
        while self._spans and at >= self._spans[0][0] + self._spans[0][1]:
            self._spans.popleft()  # played to its end: none of its free part is left
        unplayed = sum(free - min(free, max(0, at - start)) for start, _, free in self._spans)
        return self.free_undelivered + unplayed


# -- the player ------------------------------------------------------------------


_M = TypeVar("_M", bound=Message)


class _Stopped(Exception):
    """Internal: :meth:`Player.stop` was called while waiting."""


class _Timeout(PlayerError):
    """Internal: no frame from the gateway in time."""


class Player:
    """One viewer of one gateway. Drive it with :meth:`play`; stop it with :meth:`stop`.

    ``out`` receives the media (initialization segment, then chunks in
    order); None discards it. ``wallet`` is needed to fund a new channel, not
    to resume one. ``on_progress`` is called with a :class:`Progress` on
    every change.
    """

    def __init__(
        self,
        url: str,
        store: Keystore,
        *,
        wallet: Wallet | None = None,
        budget: int = DEFAULT_BUDGET,
        kind: ChannelKind = ChannelKind.CLTV,
        expiry: ExpirySpec | None = None,
        new_channel: bool = False,
        out: BinaryIO | None = None,
        on_progress: Callable[[Progress], None] | None = None,
        reply_timeout: float = 30.0,
        close_timeout: float = 10.0,
        funding_timeout: float | None = None,
        buffer_s: float | None = DEFAULT_BUFFER_S,
        resume_budget: int | None = None,
        on_resume: Callable[[StoredChannel, ClientChannel], None] | None = None,
        max_feerate: Fraction = DEFAULT_MAX_FEERATE,
        on_terms: Callable[[ClientChannel, Terms], None] | None = None,
        webrtc: WebrtcReceiver | None = None,
    ) -> None:
        self.url = check_gateway_url(url)
        if budget < 1:
            raise PlayerError(f"budget {budget} sat is not positive")
        if kind not in tuple(ChannelKind):
            raise PlayerError(f"unknown channel kind {kind!r}: use cltv or multisig")
        self.store = store
        self.wallet = wallet
        self.budget = budget
        self.kind = kind
        self.expiry = expiry or ExpirySpec()
        self.new_channel = new_channel
        self.out = out
        self.on_progress = on_progress
        self.reply_timeout = reply_timeout
        self.close_timeout = close_timeout
        self.funding_timeout = funding_timeout
        #: Pay for a chunk only while less than this much media is buffered
        #: ahead of real-time playback (None: pay as fast as chunks come).
        self.buffer_s = buffer_s
        #: On a resumed channel: the most this session pays more (None: its balance).
        self.resume_budget = resume_budget
        #: Called with a stored channel about to be resumed (restored, nothing sent
        #: yet): to say so, or to refuse it by raising :class:`PlayerError`.
        self.on_resume = on_resume
        #: The highest feerate (sat/vB) a new channel's exit may be quoted at
        #: (protocol.md section 3): above it the player does not fund.
        self.max_feerate = max_feerate
        #: Called with a new channel's accepted terms before any money moves:
        #: to say what the session costs, or to refuse by raising :class:`PlayerError`.
        self.on_terms = on_terms
        #: Receive a live item over WebRTC (protocol.md section 11) instead of chunks.
        self.webrtc = webrtc
        self._playback = Playback(paced=buffer_s is not None)
        self._stop = asyncio.Event()
        self._ws: ClientConnection | None = None
        #: This connection's gateway offered the binary ``pay`` (protocol.md section 5a).
        self.pay_binary = False
        #: ``pay`` frames sent as binary, for the tests and the curious.
        self.binary_pays = 0
        self._progress = Progress(status="connecting")

    # -- control ------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the running session to end cleanly (``close`` and wait for ``closed``)."""
        self._stop.set()

    def _report(self, **changes: object) -> None:
        self._progress = dataclasses.replace(self._progress, **changes)  # type: ignore[arg-type]
        if self.on_progress is not None:
            self.on_progress(self._progress)

    # -- wire -----------------------------------------------------------------------

    async def _connect(self) -> ClientConnection:
        try:
            return await websockets.connect(
                self.url,
                compression=None,  # media does not compress (design.md, "Traps")
                max_size=_MAX_FRAME,
                open_timeout=self.reply_timeout,
                user_agent_header=AGENT,
            )
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException) as exc:
            raise PlayerError(
                f"cannot connect to {self.url}: {exc or type(exc).__name__}"
            ) from None

    async def _send(self, msg: Message) -> None:
        assert self._ws is not None
        frame: str | bytes
        if self.pay_binary and isinstance(msg, Pay):
            frame = encode_pay_binary(msg)  # no hex, no JSON (protocol.md section 5a)
            self.binary_pays += 1
        else:
            frame = encode(msg)
        try:
            await self._ws.send(frame)
        except websockets.exceptions.ConnectionClosed:
            raise PlayerError("the gateway closed the connection") from None

    async def _recv(
        self, timeout: float | None, *, stoppable: bool = True
    ) -> ServerMessage | bytes:
        """The next message (parsed) or binary frame; :class:`_Stopped` on :meth:`stop`."""
        assert self._ws is not None
        if stoppable and self._stop.is_set():
            raise _Stopped
        recv = asyncio.ensure_future(self._ws.recv())
        waiters: set[asyncio.Future[Any]] = {recv}
        stop = asyncio.ensure_future(self._stop.wait()) if stoppable else None
        if stop is not None:
            waiters.add(stop)
        try:
            done, _ = await asyncio.wait(
                waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            # Also on our own cancellation: leave no reader behind. websockets'
            # recv() is cancellation-safe, so no message is lost.
            if stop is not None:
                stop.cancel()
            if not recv.done():
                recv.cancel()
        if recv not in done:
            if stop is not None and stop in done:
                raise _Stopped
            raise _Timeout(f"no answer from the gateway within {timeout:g} s")
        try:
            frame = recv.result()
        except websockets.exceptions.ConnectionClosed:
            raise PlayerError("the gateway closed the connection") from None
        if isinstance(frame, bytes):
            return frame
        try:
            return parse_server_message(frame)
        except ProtocolError as exc:
            raise PlayerError(f"the gateway sent a bad message: {exc.message}") from None

    async def _expect(self, kind: type[_M], *, stoppable: bool = True) -> _M:
        msg = await self._recv(self.reply_timeout, stoppable=stoppable)
        if isinstance(msg, Error):
            raise GatewayError(msg)
        if not isinstance(msg, kind):
            got = "a binary frame" if isinstance(msg, bytes) else repr(msg.type)
            raise PlayerError(f"expected {kind.type!r} from the gateway, got {got}")
        return msg

    async def _hello(self) -> ServerHello:
        await self._send(Hello(version=2, agent=AGENT))
        hello = await self._expect(ServerHello)
        self.pay_binary = FEATURE_PAY_BINARY in hello.features
        return hello

    # -- session ---------------------------------------------------------------------

    async def play(
        self,
        media: str,
        *,
        start_ms: int | None = 0,
        max_chunks: int | None = None,
        duration_ms: int | None = None,
        keep_open: bool = False,
    ) -> PlayResult:
        """Watch ``media`` on a resumed or new channel until it ends or a limit is hit.

        ``start_ms`` None: where this channel left ``media`` off (a resumed
        channel), else the beginning. ``max_chunks``/``duration_ms`` stop
        after that much media. The channel is then closed (``close``, wait
        for ``closed``) unless ``keep_open``, which just disconnects so a
        later run resumes it. Raises :class:`PlayerError` (and subclasses)
        with a one-line message.
        """
        try:
            channel, rec, resumed = await self._attach()
            assert self._ws is not None
            if start_ms is None:
                start_ms = self.store.position(rec.id, media) if resumed else 0
            return await self._stream(
                channel, rec, resumed, media, start_ms, max_chunks, duration_ms, keep_open
            )
        except _Stopped:
            raise PlayerError("interrupted before the stream started") from None
        finally:
            if self._ws is not None:
                await self._ws.close()
                self._ws = None

    async def _attach(self) -> tuple[ClientChannel, StoredChannel, bool]:
        """Connect and get a ready channel: resume a stored one, else open and fund one."""
        self._ws = await self._connect()
        hello = await self._hello()
        if not self.new_channel:
            for rec in self.store.resumable(self.url, hello.network):
                if self._expired(rec, hello.limits):
                    continue
                ready = await self._try_resume(rec, hello)
                if ready is not None:
                    return (*ready, True)
                # A failed resume used up this session (section 4): start another.
                await self._ws.close()
                self._ws = await self._connect()
                hello = await self._hello()
        channel, rec = await self._open(hello)
        return channel, rec, False

    def _expired(self, rec: StoredChannel, limits: Limits) -> bool:
        # Height expiries are left to the gateway (`channel_expiring`): no tip here.
        return (
            not is_height_expiry(rec.expiry) and time.time() >= rec.expiry - limits.settle_margin_s
        )

    async def _try_resume(
        self, rec: StoredChannel, hello: ServerHello
    ) -> tuple[ClientChannel, StoredChannel] | None:
        """Resume ``rec`` (section 5); None if the gateway no longer takes it."""
        try:
            channel = restore_channel(rec, self.store.privkey, hello)
        except (ProtocolError, LocalProtocolError, ValueError) as exc:
            raise PlayerError(
                f"channel {rec.id}: the stored channel is inconsistent: {exc}"
            ) from None
        if self.resume_budget is not None:  # a cap on what this session pays more
            channel.budget = min(channel.budget, channel.paid + self.resume_budget)
        if self.on_resume is not None:
            self.on_resume(rec, channel)
        channel_id = rec.channel_id
        assert channel_id is not None
        proof = sign_digest(self.store.privkey, resume_digest(channel_id, hello.nonce))
        self._report(status="resuming", value=rec.value or 0, balance=channel.balance or 0)
        await self._send(Resume(channel_id=channel_id, proof=proof))
        try:
            ready = await self._wait_ready(channel)
        except GatewayError as exc:
            if exc.code in (
                ErrorCode.CHANNEL_UNKNOWN,
                ErrorCode.CHANNEL_CLOSED,
                ErrorCode.CHANNEL_EXPIRING,
            ):
                # The gateway settled it or will: only our refund may remain.
                self.store.update(rec.id, state=ChannelState.CLOSED)
                return None
            raise
        return channel, self.store.update(rec.id, state=ChannelState.READY, value=ready.value)

    async def _wait_ready(self, channel: ClientChannel, *, after_loss: bool = False) -> Ready:
        """Wait for ``ready`` through ``funding`` progress messages.

        ``after_loss``: after ``funding_lost``, where a ``pay`` already in
        flight is answered ``bad_state`` and the stream's last frames may
        still arrive: both are passed over.
        """
        deadline = None if self.funding_timeout is None else time.monotonic() + self.funding_timeout
        while True:
            timeout = (
                self.reply_timeout if deadline is None else max(0.0, deadline - time.monotonic())
            )
            msg = await self._recv(None if deadline is None else timeout)
            if after_loss and (
                isinstance(msg, bytes | Chunk | Due | Paid)
                or (isinstance(msg, Error) and msg.code is ErrorCode.BAD_STATE)
            ):
                continue
            if isinstance(msg, Error):
                raise GatewayError(msg)
            if isinstance(msg, Funding):
                self._report(status="funding", confirmations=msg.confirmations, needed=msg.needed)
                continue
            if isinstance(msg, Ready):
                try:
                    channel.on_ready(msg)
                except ProtocolError as exc:
                    raise PlayerError(
                        f"the gateway's ready does not match: {exc.message}"
                    ) from None
                self._report(
                    status="ready", value=msg.value, balance=channel.balance or 0, paid=channel.paid
                )
                return msg
            got = "a binary frame" if isinstance(msg, bytes) else repr(msg.type)
            raise PlayerError(f"expected 'ready' from the gateway, got {got}")

    async def _open(self, hello: ServerHello) -> tuple[ClientChannel, StoredChannel]:
        """Open, fund and wait for a new channel (sections 4-6)."""
        wallet = self.wallet
        if wallet is None:
            raise PlayerError(
                f"no open channel with {self.url} to resume; "
                "pass --wallet-rpc and --wallet-cookie to fund a new one"
            )
        limits = hello.limits
        # The channel's value is the budget, never silently another figure.
        value = self.budget
        smallest = max(limits.min_value, DUST_LIMIT)  # (the budget may cap a resumed one)
        if not smallest <= value <= limits.max_value:
            above = value > limits.max_value
            limit = limits.max_value if above else smallest
            raise PlayerError(
                f"budget {value} sat is {'above' if above else 'below'} the gateway's "
                f"{'largest' if above else 'smallest'} channel, {limit} sat: "
                f"use --budget {limit} or {'less' if above else 'more'}"
            )
        try:
            network = await wallet.network()
            if network != hello.network:
                raise PlayerError(f"the wallet is on {network}, the gateway on {hello.network}")
            tip = await wallet.tip_height()
            expiry = self.expiry.resolve(limits, now=int(time.time()), tip_height=tip)
            dest = await wallet.new_output_script(hello.network)
            # The feerate bound is checked below, after the terms' own checks
            # (exit_vbytes is ours), so its refusal can say what was quoted.
            channel = ClientChannel(
                self.store.privkey, hello, budget=value, max_feerate=Fraction(2**64)
            )
            await self._send(channel.open(expiry=expiry, change_script=dest, kind=self.kind))
            terms = await self._expect(Terms)
            try:
                channel.accept_terms(terms)
            except ProtocolError as exc:
                raise PlayerError(f"refusing the gateway's terms: {exc.message}") from None
            channel.max_feerate = self.max_feerate
            if channel.quoted > self.max_feerate:
                raise PlayerError(
                    f"the gateway quotes leaving at {format_feerate(channel.quoted)} sat/vB "
                    f"(exit fee {terms.exit_fee} sat for {terms.exit_vbytes} vB), above "
                    f"--max-feerate {format_feerate(self.max_feerate)}: not funding"
                )
            if not channel.reserve_fits(value):
                raise PlayerError(
                    f"the gateway's exit fee is {terms.exit_fee} sat: a {value}-sat channel "
                    "could get its change back only by a refund after expiry; "
                    "use a larger --budget"
                )
            if self.on_terms is not None:
                self.on_terms(channel, terms)
            rec = self.store.add_channel(
                gateway_url=self.url,
                network=hello.network,
                kind=self.kind,
                server_pubkey=terms.server_pubkey,
                expiry=expiry,
                change_script=dest,
                refund_script=dest,
                exit_fee=terms.exit_fee,
            )
            self._report(status="funding", value=value, balance=value)
            if self.kind == ChannelKind.CLTV:
                rec = await self._fund_cltv(wallet, channel, rec, terms, value, dest)
            else:
                rec = await self._fund_multisig(wallet, channel, rec, terms, value, dest)
        except WalletError as exc:
            raise PlayerError(str(exc)) from None
        try:
            await self._wait_ready(channel)
        except _Stopped:
            raise PlayerError(
                f"interrupted while channel {rec.id} was funding; run again to resume it"
            ) from None
        return channel, self.store.update(rec.id, state=ChannelState.READY)

    async def _fund_cltv(
        self,
        wallet: Wallet,
        channel: ClientChannel,
        rec: StoredChannel,
        terms: Terms,
        value: int,
        dest: bytes,
    ) -> StoredChannel:
        """cltv: sign T1 and our own refund, store both, then broadcast T1 and ``fund``.

        Stored before broadcast: a crash at any point leaves either an
        unspent wallet or a channel whose refund ``player refund`` holds.
        """
        funding = await wallet.build_funding_tx(terms.funding_script, value, segwit_only=False)
        op = funding.outpoint
        fund = channel.fund(op, value, tx=funding.tx)
        assert channel.script is not None
        fee = _refund_fee(channel.script, op, value, dest)
        signed = channel.cltv_refund(dest_script=dest, fee=fee)
        return await self._store_then_broadcast(
            wallet, rec, funding, fund, refund_fee=fee, signed_refund=signed
        )

    async def _store_then_broadcast(
        self,
        wallet: Wallet,
        rec: StoredChannel,
        funding: FundingTx,
        fund: Fund,
        **refund: Any,
    ) -> StoredChannel:
        """Store T1 with its signed refund, THEN broadcast T1 and send ``fund``.

        In this order no crash leaves the budget at an output the player
        cannot refund: before the broadcast the coins never left the wallet.
        """
        op = funding.outpoint
        rec = self.store.update(
            rec.id,
            txid=op.txid,
            vout=op.vout,
            value=funding.value,
            funding_tx=funding.tx,
            state=ChannelState.REFUND_SIGNED,
            **refund,
        )
        try:
            await wallet.broadcast(funding.tx)
        except RpcException as exc:
            raise PlayerError(f"broadcasting the funding transaction failed: {exc}") from None
        rec = self.store.update(rec.id, state=ChannelState.FUNDING)
        await self._send(fund)
        return rec

    async def _fund_multisig(
        self,
        wallet: Wallet,
        channel: ClientChannel,
        rec: StoredChannel,
        terms: Terms,
        value: int,
        dest: bytes,
    ) -> StoredChannel:
        """multisig: sign T1, get T2 signed and check it, store it; only then broadcast T1."""
        funding = await wallet.build_funding_tx(terms.funding_script, value)
        op = funding.outpoint
        assert channel.script is not None
        fee = _refund_fee(channel.script, op, value, dest)
        await self._send(channel.refund_request(op, value, dest_script=dest, fee=fee))
        refund_signed = await self._expect(RefundSigned)
        try:
            signed_t2 = channel.accept_refund_signed(refund_signed)
        except ProtocolError as exc:
            raise PlayerError(f"refusing the gateway's refund signature: {exc.message}") from None
        return await self._store_then_broadcast(
            wallet,
            rec,
            funding,
            channel.fund(op, value, tx=funding.tx),
            refund_fee=fee,
            refund_server_sig=refund_signed.sig,
            signed_refund=signed_t2,
        )

    # -- streaming -------------------------------------------------------------------

    async def _stream(
        self,
        channel: ClientChannel,
        rec: StoredChannel,
        resumed: bool,
        media: str,
        start_ms: int,
        max_chunks: int | None,
        duration_ms: int | None,
        keep_open: bool,
    ) -> PlayResult:
        chunks = media_ms = received_ms = 0
        playback = self._playback = Playback(paced=self.buffer_s is not None)
        pending: Chunk | None = None
        reason = ""
        self._report(status="playing", media=media)
        # While pacing, the playback clock moves between messages: report it.
        ticker = (
            asyncio.create_task(self._tick(playback), name="progress")
            if self.buffer_s is not None and self.on_progress is not None
            else None
        )
        try:
            offer = await self.webrtc.offer() if self.webrtc is not None else None
            await self._send(Play(media=media, start_ms=start_ms, webrtc=offer))
            while not reason:
                msg = await self._recv(None)
                if isinstance(msg, bytes):
                    if pending is None:
                        raise PlayerError("the gateway sent media without a chunk message")
                    if len(msg) != pending.size:
                        raise PlayerError(
                            f"chunk {pending.index}: {len(msg)} bytes, announced {pending.size}"
                        )
                    if self.out is not None:
                        try:
                            self.out.write(msg)
                        except OSError:
                            # The reader went away (e.g. `| ffplay -` quit): stop cleanly.
                            self.out = None
                            reason = "output_closed"
                            continue
                    if pending.index >= 0:
                        playback.on_chunk(pending.start_ms, pending.duration_ms)
                        chunks += 1
                        received_ms += pending.duration_ms
                        media_ms = pending.start_ms + pending.duration_ms
                        # Received (free or paid for): a later run goes on from here.
                        self.store.record_position(rec.id, media, media_ms)
                        position = playback.position()
                        self._report(
                            media_ms=media_ms,
                            chunks=chunks,
                            position_ms=position,
                            free_left_ms=playback.free_left(position),
                        )
                    pending = None
                    if max_chunks is not None and chunks >= max_chunks:
                        reason = "max_chunks"
                    elif duration_ms is not None and received_ms >= duration_ms:
                        reason = "duration"
                    continue
                if pending is not None:
                    raise PlayerError(
                        f"expected the media of chunk {pending.index}, got {msg.type!r}"
                    )
                if isinstance(msg, Stream):
                    channel.on_stream(msg)
                    playback.on_stream(msg)
                    self._report(
                        media=msg.media,
                        duration_ms=msg.duration_ms,
                        rate_msat=msg.rate_msat,
                        free_left_ms=playback.free_left(),
                    )
                elif isinstance(msg, Chunk):
                    bill = channel.meter.bill
                    channel.on_chunk(msg)
                    if channel.meter.bill != bill:
                        self.store.record_bill(rec.id, channel.meter.bill)
                    pending = msg
                elif isinstance(msg, WebrtcAnswer) and self.webrtc is not None:
                    await self.webrtc.accept(msg.sdp)
                elif isinstance(msg, Interval):
                    # A live interval flows over WebRTC: metered as a chunk (section 11).
                    bill = channel.meter.bill
                    channel.on_chunk(msg)
                    if channel.meter.bill != bill:
                        self.store.record_bill(rec.id, channel.meter.bill)
                    chunks += 1
                    received_ms += msg.duration_ms
                    media_ms = msg.start_ms + msg.duration_ms
                    self._report(media_ms=media_ms, chunks=chunks)
                    if max_chunks is not None and chunks >= max_chunks:
                        reason = "max_chunks"
                    elif duration_ms is not None and received_ms >= duration_ms:
                        reason = "duration"
                elif isinstance(msg, Due):
                    await self._pace(playback)
                    if not await self._pay(channel, rec, msg):
                        reason = "budget"
                elif isinstance(msg, Paid):
                    channel.on_paid(msg)
                elif isinstance(msg, End):
                    reason = "finished"
                    if msg.reason == "finished":  # the next run starts over
                        self.store.record_position(rec.id, media, 0)
                elif isinstance(msg, Closed):
                    # The gateway settled first (expiry, section 8).
                    channel.on_closed(msg)
                    rec = self._record_closed(rec, msg)
                    return self._result("gateway_closed", rec, resumed, chunks, media_ms, msg)
                elif isinstance(msg, Error) and msg.code is ErrorCode.FUNDING_LOST:
                    # A reorg took the funding back (section 8): the stream
                    # stopped; play on from here once it is confirmed again.
                    channel.on_funding_lost()
                    self._report(status="funding lost: waiting for confirmations")
                    await self._wait_ready(channel, after_loss=True)
                    self._report(status="playing")
                    await self._send(Play(media=media, start_ms=media_ms))
                elif isinstance(msg, Error):
                    raise GatewayError(msg)
                else:
                    raise PlayerError(f"unexpected {msg.type!r} from the gateway while playing")
        except _Stopped:
            reason = "stopped"
        except OverchargeError as exc:
            # Section 5: a client that finds the gateway overcharging sends close.
            with contextlib.suppress(PlayerError, _Stopped):
                await self._close(channel, rec)
            raise OverchargeDetected(f"{exc.message}; closed the channel") from None
        except ProtocolError as exc:
            raise PlayerError(f"the gateway broke the protocol: {exc.message}") from None
        finally:
            if ticker is not None:
                ticker.cancel()
            if self.webrtc is not None:
                await self.webrtc.close()
        # A spent channel is closed; one that only reached this run's cap stays open.
        if keep_open and (reason != "budget" or channel.budget < (channel.value or 0)):
            self._report(status="disconnected")
            return self._result(reason, self.store.get(rec.id), resumed, chunks, media_ms, None)
        closed = await self._close(channel, rec)
        return self._result(reason, self.store.get(rec.id), resumed, chunks, media_ms, closed)

    async def _tick(self, playback: Playback) -> None:
        """Report the playback clock's position and free media left, a few times a second."""
        while True:
            await asyncio.sleep(PROGRESS_TICK_S)
            if playback.clock is not None:
                position = playback.position()
                self._report(position_ms=position, free_left_ms=playback.free_left(position))

    async def _pace(self, playback: Playback) -> None:
        """Wait until playback is within ``buffer_s`` of the media received.

        The viewer pays per second watched, not per second downloaded: a
        player that paid as fast as the gateway sends would have paid for the
        whole film when the viewer stops after a minute.
        """
        clock_ms = playback.clock_ms()
        if self.buffer_s is None or clock_ms is None:
            return
        wait_s = (playback.received_to - clock_ms) / 1000 - self.buffer_s
        if wait_s > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), wait_s)
            if self._stop.is_set():
                raise _Stopped

    async def _pay(self, channel: ClientChannel, rec: StoredChannel, due: Due) -> bool:
        """Check and pay ``due``; False if it would pass the budget (nothing signed)."""
        assert channel.value is not None
        if due.total <= channel.paid:
            # Section 7: the gateway lacks our last increment (lost in flight before a
            # reconnect; `ready` showed a higher balance). Send that same signed
            # increment again: nothing new is signed.
            last = self.store.get(rec.id)
            if last.sig is None or last.balance is None:
                raise PlayerError(f"the gateway asks {due.total} sat, already paid")
            await self._send(Pay(seq=last.seq, balance=last.balance, sig=last.sig))
            return True
        channel.meter.check_due(due)  # OverchargeError first: never report it as "budget"
        balance = channel.value - due.total
        if due.total > channel.budget or balance < 0 or 0 < balance < DUST_LIMIT:
            return False
        try:
            pay = channel.pay_due(due)  # checks the due again, signs, bills the chunk
        except LocalProtocolError as exc:
            raise PlayerError(f"cannot pay {due.total} sat: {exc}") from None
        # Durable BEFORE sending: a crash never makes us sign this seq again.
        self.store.record_payment(
            rec.id, seq=pay.seq, balance=pay.balance, sig=pay.sig, bill=channel.meter.bill
        )
        await self._send(pay)
        self._report(paid=channel.paid, balance=pay.balance)
        return True

    async def _close(self, channel: ClientChannel, rec: StoredChannel) -> Closed:
        """``close``, then wait for ``closed`` (skipping media still in flight)."""
        self._report(status="closing")
        self.store.update(rec.id, state=ChannelState.CLOSING)
        await self._send(channel.close())
        deadline = time.monotonic() + self.close_timeout
        while True:
            try:
                msg = await self._recv(max(0.0, deadline - time.monotonic()), stoppable=False)
            except _Timeout:
                raise PlayerError(
                    f"no 'closed' from the gateway within {self.close_timeout:g} s; "
                    "it settles the channel on its own"
                ) from None
            if isinstance(msg, Closed):
                channel.on_closed(msg)
                self._record_closed(rec, msg)
                self._report(status="closed")
                return msg
            if isinstance(msg, Error) and msg.fatal:
                raise GatewayError(msg)
            # chunks, dues and paid already in flight: nothing more is paid.

    def _record_closed(self, rec: StoredChannel, closed: Closed) -> StoredChannel:
        """Store what ``closed`` says will happen on chain (protocol.md sections 6 and 8).

        Broadcast (``txid``): ``settling`` until ``player status`` has checked
        it and our node shows it confirmed. Waiting for its batch
        (``settle_by``): ``pending``. Neither: nothing will be broadcast, the
        value comes back only by our refund after expiry (``unsettled``).
        """
        if closed.txid is not None:
            state = ChannelState.SETTLING
        elif closed.settle_by is not None:
            state = ChannelState.PENDING
        else:
            state = ChannelState.UNSETTLED
        return self.store.update(
            rec.id, state=state, closing_txid=closed.txid, settle_by=closed.settle_by
        )

    def _result(
        self,
        reason: str,
        rec: StoredChannel,
        resumed: bool,
        chunks: int,
        media_ms: int,
        closed: Closed | None,
    ) -> PlayResult:
        return PlayResult(
            reason=reason,
            channel=rec,
            resumed=resumed,
            chunks=chunks,
            media_ms=media_ms,
            paid=rec.paid,
            balance=rec.balance if rec.balance is not None else (rec.value or 0),
            closed=closed is not None,
            closed_txid=None if closed is None else closed.txid,
            settle_by=None if closed is None else closed.settle_by,
        )


# -- refund ------------------------------------------------------------------------


def _refund_locktime(tx: bytes) -> int:
    parsed: CTransaction = parse_tx(tx)
    return int(parsed.nLockTime)


async def refund_channel(store: Keystore, wallet: Wallet, rec: StoredChannel) -> str:
    """Broadcast the refund stored for ``rec`` (protocol.md section 2); return its txid.

    Valid once the expiry has passed (a height expiry: from block
    ``expiry + 1``; a time expiry: once median-time-past exceeds it).
    Raises :class:`PlayerError` with the node's reason otherwise.
    """
    if rec.signed_refund is None:
        raise PlayerError(f"channel {rec.id} has no signed refund (it was never funded)")
    if rec.state == ChannelState.REFUNDED:
        raise PlayerError(f"channel {rec.id} was already refunded in {rec.refund_txid}")
    try:
        txid = await wallet.broadcast(rec.signed_refund)
    except RpcException as exc:
        text = str(exc)
        if "non-final" in text or "locktime" in text.lower():
            expiry = _refund_locktime(rec.signed_refund)
            when = (
                f"block {expiry + 1}"
                if is_height_expiry(expiry)
                else time.strftime("median-time-past %Y-%m-%d %H:%M:%S UTC", time.gmtime(expiry))
            )
            raise PlayerError(
                f"channel {rec.id}: the refund is not valid before its expiry ({when})"
            ) from None
        if "missingorspent" in text or "missing-inputs" in text:
            raise PlayerError(
                f"channel {rec.id}: the funding output is already spent (settled or refunded)"
            ) from None
        raise PlayerError(f"channel {rec.id}: refund rejected: {text}") from None
    store.update(rec.id, state=ChannelState.REFUNDED, refund_txid=txid)
    return txid
