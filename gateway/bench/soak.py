"""``gateway bench --soak MINUTES``: a long run with churn and abuse, then every satoshi checked.

Theory of operation
-------------------

The coordinator starts ``gateway node`` and ``gateway serve`` as processes,
as ``gateway bench`` does (:func:`gateway.bench.start_stack`), and runs
every client in its own event loop:

* ``--viewers`` honest viewers, each a :class:`~gateway.protocol.channel.ClientChannel`
  (the player's core: it checks every ``due`` against its own bill, section
  7) over a real WebSocket. A viewer opens and funds a channel, plays at
  media rate (it pays chunk *i* when chunk *i* is wanted), and at random
  moments (about one a minute) drops its socket without a close handshake
  and resumes (section 5) — sometimes with a ``pay`` in flight —, drops it
  for good (the gateway settles after ``resume_grace_s``), sends ``close``
  (section 8) and opens a new channel, or sends ``stop``. Channels are
  funded in batches (one wallet transaction for every open of the moment).
* abusive clients (one per twenty viewers), each in a loop: sockets that
  never say ``hello``; unknown ``type``s, text that is not JSON, binary
  frames; messages with unknown fields of every JSON type (section 1: they
  are ignored); on a funded channel of their own, ``pay`` with a bad
  signature, a replayed ``seq``, a raised balance, less than the ``due``
  asks (section 7: recorded, ``paid``, the same ``due`` again), and then
  either ``close`` or silence on the unpaid ``due`` (the gateway closes the
  socket after ``unpaid_timeout_s``). Each attempt's answer is compared
  with protocol.md section 9 and counted.

A block is mined every few seconds (the channels fund with min_conf 0; the
blocks confirm fundings and settlements). The gateway's RSS is sampled
throughout. At the end every viewer closes what it holds, blocks are mined
until the settler has finished, and the store is read
(:func:`gateway.ledger.list_channels`):

* every channel is ``closed`` or ``refunded``;
* each channel's stored balance is exactly the last balance its client
  signed (a client closes only once the gateway acknowledged its last
  increment, so the two must agree);
* no honest viewer got an ``error`` or lost its connection unasked;
* every abusive attempt got the answer section 9 gives;
* RSS is flat: from the middle of the run to its end it grew at most
  :data:`RSS_STEADY_GROWTH` of the mid-run figure plus
  :data:`RSS_STEADY_SLACK` (start, peak and end are reported too).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import coincurve
import websockets
from bitcoin.core import CMutableTransaction, CTransaction, CTxOut

from gateway.bench.load import OUTPUTS_PER_FUNDING_TX
from gateway.chain.rpc import RpcClient
from gateway.ledger import list_channels
from gateway.protocol.channel import ClientChannel
from gateway.protocol.errors import ErrorCode
from gateway.protocol.messages import (
    Chunk,
    Closed,
    Due,
    End,
    Error,
    Funding,
    Hello,
    Message,
    Paid,
    Pay,
    Play,
    Ready,
    ServerHello,
    Stop,
    Stream,
    Terms,
    encode,
    parse_server_message,
)
from gateway.protocol.scripts import address_to_script_pubkey
from gateway.protocol.transactions import Outpoint, sign_payment

#: From the middle of the run to its end RSS may grow this fraction of the
#: mid-run figure, plus :data:`RSS_STEADY_SLACK` bytes (allocator noise), and
#: still count as flat.
RSS_STEADY_GROWTH = 0.10
RSS_STEADY_SLACK = 8 << 20
#: Seconds a dropped viewer waits before it resumes (well inside the grace).
RESUME_DELAY = (0.2, 2.0)
#: The gateway's resume grace in the soak: dropped-for-good channels settle
#: this long after their socket went.
RESUME_GRACE_S = 20
#: The gateway's limits on silent sockets, short so that the abuse of each is
#: seen many times, long enough that a loaded box does not trip an honest
#: viewer (it says hello at once and pays every 2 s): at 2 and 5 s a run
#: beside other work on 2 cores did (docs/performance.md, "Soak").
HANDSHAKE_TIMEOUT_S = 5.0
UNPAID_TIMEOUT_S = 10.0
#: Seconds between blocks during the run, and while the settler finishes.
BLOCK_EVERY_S = 10.0
DRAIN_BLOCK_EVERY_S = 1.0
#: Viewers connecting (hello, open or resume, until ready) at the same time.
OPEN_CONCURRENCY = 100
#: The soak's item: 2 s chunks of 2 KiB at 50 sat/s, no free allowance, so
#: every chunk is paid (paced as audio: a pay per viewer every 2 s).
CHUNK_MS = 2000
CHUNK_BYTES = 2048
RATE_MSAT = 50_000
#: Chunks in the soak's item (an ``end`` comes every this many chunks: play again).
ITEM_CHUNKS = 60
EXPIRY_S = 6 * 3600
#: Outputs per funding transaction.
MAX_OUTPUTS = OUTPUTS_PER_FUNDING_TX


@dataclass
class SoakOptions:
    """The ``gateway bench --soak`` flags, checked."""

    minutes: float = 10.0
    viewers: int = 1000
    abusers: int | None = None  # None: one per twenty viewers, at least two
    seed: int = 0
    workdir: Path | None = None

    @property
    def abuser_count(self) -> int:
        """Abusive clients running at once."""
        return self.abusers if self.abusers is not None else max(2, self.viewers // 20)


@dataclass
class _Stats:
    sessions: int = 0
    channels: int = 0
    resumes: int = 0
    drops: int = 0  # dropped then resumed
    drops_in_flight: int = 0  # of which with a pay in flight
    abandons: int = 0  # dropped for good: settled after the grace
    closes: int = 0
    stops: int = 0
    paid_chunks: int = 0
    increments: int = 0
    honest_errors: list[str] = field(default_factory=list)
    abuse: dict[str, Counter[str]] = field(default_factory=dict)
    abuse_unexpected: list[str] = field(default_factory=list)

    def abused(self, kind: str, got: str, expected: bool) -> None:
        self.abuse.setdefault(kind, Counter())[got] += 1
        if not expected:
            self.abuse_unexpected.append(f"{kind}: got {got}")


class HonestError(Exception):
    """Something an honest viewer must never see."""


class _Funder:
    """Funds every channel opened at the same moment in one wallet transaction."""

    def __init__(self, rpc: RpcClient, value: int) -> None:
        self.rpc, self.value = rpc, value
        self._pending: list[tuple[bytes, asyncio.Future[Outpoint]]] = []
        self._lock = asyncio.Lock()
        self._flush: asyncio.Task[None] | None = None

    async def fund(self, script: bytes) -> Outpoint:
        fut: asyncio.Future[Outpoint] = asyncio.get_running_loop().create_future()
        self._pending.append((script, fut))
        if self._flush is None or self._flush.done():
            self._flush = asyncio.create_task(self._run())
        return await fut

    async def _run(self) -> None:
        await asyncio.sleep(0.2)  # let the opens of this moment join
        async with self._lock:  # the wallet would give two batches the same coins
            while self._pending:
                batch, self._pending = self._pending[:MAX_OUTPUTS], self._pending[MAX_OUTPUTS:]
                try:
                    outpoints = await self._send([s for s, _ in batch])
                except Exception as exc:  # every waiter fails with it
                    for _, fut in batch:
                        if not fut.done():
                            fut.set_exception(exc)
                    continue
                for (_, fut), outpoint in zip(batch, outpoints, strict=True):
                    if not fut.done():
                        fut.set_result(outpoint)

    async def _send(self, scripts: list[bytes]) -> list[Outpoint]:
        template = CMutableTransaction([], [CTxOut(self.value, s) for s in scripts],
                                       nLockTime=0, nVersion=2)
        funded = await self.rpc.call("fundrawtransaction", template.serialize().hex())
        signed = await self.rpc.call("signrawtransactionwithwallet", funded["hex"])
        txid = await self.rpc.call("sendrawtransaction", signed["hex"])
        tx = CTransaction.deserialize(bytes.fromhex(signed["hex"]))
        vout_of = {bytes(out.scriptPubKey): n for n, out in enumerate(tx.vout)}
        return [Outpoint(txid, vout_of[s]) for s in scripts]


class _Soak:
    """What every client of one soak shares."""

    def __init__(self, opts: SoakOptions, url: str, rpc: RpcClient, value: int,
                 change: bytes, until: float) -> None:
        self.opts, self.url, self.rpc, self.value = opts, url, rpc, value
        self.change, self.until = change, until
        self.funder = _Funder(rpc, value)
        self.stats = _Stats()
        #: Every funded channel a client of this soak holds or held, with the
        #: balance it last signed (read at the end).
        self.channels: list[tuple[str, ClientChannel]] = []
        self.open_sem = asyncio.Semaphore(OPEN_CONCURRENCY)
        run_s = opts.minutes * 60
        #: Mean seconds between a viewer's churn events.
        self.event_mean_s = min(60.0, max(5.0, run_s / 5))

    async def connect(self) -> Any:
        return await websockets.connect(self.url, compression=None, max_size=None,
                                        ping_interval=None, open_timeout=60)


async def _recv(ws: Any, timeout: float = 60) -> Message | bytes:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    return raw if isinstance(raw, bytes) else parse_server_message(raw)


async def _hello(ws: Any, **extra: Any) -> ServerHello:
    await ws.send(json.dumps({"type": "hello", "version": 2, "agent": "soak", **extra}))
    hello = await _recv(ws)
    if not isinstance(hello, ServerHello):
        raise HonestError(f"expected hello, got {_name(hello)}")
    return hello


def _name(msg: Message | bytes) -> str:
    if isinstance(msg, Error):
        return f"error {msg.code.value}"
    return "a binary frame" if isinstance(msg, bytes) else msg.type


async def _open_and_fund(soak: _Soak, ws: Any, key: coincurve.PrivateKey,
                         hello: ServerHello, **extra: Any) -> ClientChannel:
    """open → terms → (batched funding) → fund → ready; the channel is ready."""
    channel = ClientChannel(key.secret, hello, budget=soak.value)
    opened = json.loads(encode(channel.open(expiry=int(time.time()) + EXPIRY_S,
                                            change_script=soak.change)))
    await ws.send(json.dumps({**opened, **extra}))
    terms = await _recv(ws)
    if not isinstance(terms, Terms):
        raise HonestError(f"expected terms, got {_name(terms)}")
    channel.accept_terms(terms)
    outpoint = await soak.funder.fund(terms.funding_script)
    await ws.send(encode(channel.fund(outpoint, soak.value)))
    ready = await _until_ready(ws)
    channel.on_ready(ready)
    soak.stats.channels += 1
    soak.channels.append(("honest" if not extra else "abusive", channel))
    return channel


async def _until_ready(ws: Any) -> Ready:
    while True:
        msg = await _recv(ws)
        if isinstance(msg, Ready):
            return msg
        if not isinstance(msg, Funding):
            raise HonestError(f"expected ready, got {_name(msg)}")


# -- honest viewers ---------------------------------------------------------------------


class _Viewer:
    """One honest viewer for the whole soak, through as many channels as it takes."""

    def __init__(self, soak: _Soak, index: int) -> None:
        self.soak = soak
        self.rng = random.Random(soak.opts.seed * 1_000_003 + index)
        self.key = coincurve.PrivateKey()
        self.ws: Any = None
        self.channel: ClientChannel | None = None
        #: The lowest balance the gateway acknowledged (``paid``, ``ready``).
        self.acked: int | None = None
        self.playing = False
        self.t_play = 0.0
        #: A due received and not yet paid (the gateway waits on it).
        self.due: Due | None = None

    async def run(self) -> None:
        soak, stats = self.soak, self.soak.stats
        # Spread the set-up over the first seconds, as an audience arrives.
        await asyncio.sleep(self.rng.uniform(0, min(10.0, soak.opts.minutes * 6)))
        while time.monotonic() < soak.until:
            try:
                await self._attach()
                act_at = time.monotonic() + self.rng.expovariate(1 / soak.event_mean_s)
                in_flight = self.rng.random() < 0.3
                paid_last = await self._play_until(min(act_at, soak.until), pay_then=in_flight)
                if time.monotonic() >= soak.until:
                    break
                await self._churn(paid_last)
            except Exception as exc:  # the gateway's error, a lost socket, a client check
                stats.honest_errors.append(f"{type(exc).__name__}: {exc}")
                self._drop()
                self.channel = None  # do not build on a channel in an unknown state
                await asyncio.sleep(1)
        with contextlib.suppress(Exception):
            await self._finish()

    async def _churn(self, paid_last: bool) -> None:
        stats, r = self.soak.stats, self.rng.random()
        if r < 0.45:  # drop and come back
            stats.drops += 1
            stats.drops_in_flight += paid_last
            self._drop()
            await asyncio.sleep(self.rng.uniform(*RESUME_DELAY))
        elif r < 0.60 and self._settled_up():  # drop for good: the gateway settles it
            stats.abandons += 1
            self._drop()
            self.channel = None
        elif r < 0.85 and self._settled_up():
            await self._close()
        elif self.playing:
            stats.stops += 1
            await self.ws.send(encode(Stop()))
            await self._read_until(End)
            self.playing, self.due = False, None

    def _settled_up(self) -> bool:
        """The gateway acknowledged the last increment signed (nothing lost in flight)."""
        assert self.channel is not None
        return self.acked == self.channel.balance

    def _drop(self) -> None:
        """Lose the connection: no close handshake, whatever was in flight."""
        if self.ws is not None:
            self.ws.transport.abort()
        self.ws, self.playing, self.due = None, False, None

    async def _attach(self) -> None:
        if self.ws is not None and self.channel is not None:
            return
        soak = self.soak
        async with soak.open_sem:
            self.ws = await soak.connect()
            soak.stats.sessions += 1
            hello = await _hello(self.ws)
            if self.channel is None:
                self.key = coincurve.PrivateKey()
                self.channel = await _open_and_fund(soak, self.ws, self.key, hello)
                self.acked = self.channel.balance
            else:
                await self.ws.send(encode(self.channel.resume(hello)))
                ready = await _until_ready(self.ws)
                self.channel.on_ready(ready)
                self.acked = ready.balance
                soak.stats.resumes += 1

    async def _play_until(self, deadline: float, *, pay_then: bool) -> bool:
        """Play and pay at media rate until ``deadline``; True if a pay is then in flight.

        A ``due`` not yet paid at ``deadline`` is kept (the gateway waits on
        it) and paid by the next call; it is signed only when it is sent.
        """
        channel = self.channel
        assert channel is not None
        if not self.playing:
            await self._play()
        while True:
            if self.due is None:
                msg = await _recv(self.ws)
                if not isinstance(msg, Due):
                    self._on(msg)
                    if isinstance(msg, End):
                        await self._play()
                    continue
                channel.meter.check_due(msg)  # OverchargeError: asked too much
                self.due = msg
            due = self.due
            # Chunk i is wanted at t_play + i * D; the reserve (index -1) at once.
            pay_at = self.t_play + max(0, due.index) * due.duration_ms / 1000
            await asyncio.sleep(max(0.0, min(pay_at, deadline) - time.monotonic()))
            if pay_at >= deadline and not pay_then:
                return False
            self.due = None
            await self.ws.send(encode(channel.pay_due(due)))
            if pay_at >= deadline:
                return True

    async def _play(self) -> None:
        self.due = None
        await self.ws.send(encode(Play(media="bench")))
        stream = await self._read_until(Stream)
        assert self.channel is not None
        self.channel.on_stream(stream)
        self.playing, self.t_play = True, time.monotonic()

    def _on(self, msg: Message | bytes) -> None:
        channel, stats = self.channel, self.soak.stats
        assert channel is not None
        if isinstance(msg, Paid):
            channel.on_paid(msg)
            self.acked = msg.balance
            stats.increments += 1
        elif isinstance(msg, Chunk):
            channel.on_chunk(msg)
            if msg.index >= 0:
                stats.paid_chunks += 1
        elif isinstance(msg, Due):
            # Sent before the gateway read our stop, close or play: moot, but
            # never more than our own figure (section 7).
            channel.meter.check_due(msg)
        elif isinstance(msg, bytes | End | Stream | Closed):
            pass
        else:
            raise HonestError(f"unexpected {_name(msg)}")

    async def _read_until(self, kind: type[Any]) -> Any:
        while True:
            msg = await _recv(self.ws)
            if isinstance(msg, kind):
                return msg
            self._on(msg)

    async def _close(self) -> None:
        assert self.channel is not None
        await self.ws.send(encode(self.channel.close()))
        closed = await self._read_until(Closed)
        self.channel.on_closed(closed)
        self.soak.stats.closes += 1
        with contextlib.suppress(Exception):
            await self.ws.close()
        self.ws, self.channel, self.playing, self.due = None, None, False, None

    async def _finish(self) -> None:
        """The run is over: close what we hold (after the last increment is acknowledged)."""
        if self.channel is None:
            if self.ws is not None:
                await self.ws.close()
            return
        try:
            await self._attach()
            give_up = time.monotonic() + 30
            while not self._settled_up() and time.monotonic() < give_up:
                # A lost increment: the next due takes it again (section 7).
                await self._play_until(time.monotonic() + CHUNK_MS / 1000, pay_then=False)
            await self._close()
        except Exception as exc:
            self.soak.stats.honest_errors.append(f"closing: {type(exc).__name__}: {exc}")


# -- abusive clients ------------------------------------------------------------------------

#: Unknown fields, one of each JSON type (section 1: ignored).
UNKNOWN_FIELDS: dict[str, Any] = {
    "x_null": None, "x_bool": True, "x_int": 7, "x_float": 1.5, "x_string": "s",
    "x_array": [1, "two", None], "x_object": {"a": {"b": []}},
}


async def _abuse_idle(soak: _Soak) -> tuple[str, bool]:
    """A socket that never says hello: closed with 1008 after handshake_timeout_s."""
    ws = await soak.connect()
    try:
        await asyncio.wait_for(ws.wait_closed(), 60)
    except TimeoutError:
        return "left open", False
    finally:
        ws.transport.abort()
    code = ws.close_code
    return f"closed {code}", code == 1008


async def _abuse_junk(soak: _Soak, frame: str | bytes) -> tuple[str, bool]:
    """After hello, a frame section 1 refuses: non-fatal ``bad_message``."""
    ws = await soak.connect()
    try:
        await _hello(ws)
        await ws.send(frame)
        answer = await _recv(ws)
        ok = isinstance(answer, Error) and answer.code is ErrorCode.BAD_MESSAGE and not answer.fatal
        # Still served afterwards: a second hello is out of order, not fatal.
        await ws.send(encode(Hello(version=2, agent="soak")))
        again = await _recv(ws)
        ok = ok and isinstance(again, Error) and again.code is ErrorCode.BAD_STATE
        return _name(answer), ok
    finally:
        ws.transport.abort()


async def _abuse_unknown_fields(soak: _Soak) -> tuple[str, bool]:
    """hello and open with unknown fields of every JSON type: hello, terms; then leave."""
    ws = await soak.connect()
    try:
        hello = await _hello(ws, **UNKNOWN_FIELDS)
        channel = ClientChannel(coincurve.PrivateKey().secret, hello, budget=soak.value)
        opened = json.loads(encode(channel.open(expiry=int(time.time()) + EXPIRY_S,
                                                change_script=soak.change)))
        await ws.send(json.dumps({**opened, **UNKNOWN_FIELDS}))
        terms = await _recv(ws)
        return ("hello, terms" if isinstance(terms, Terms) else f"hello, {_name(terms)}",
                isinstance(terms, Terms))
    finally:
        ws.transport.abort()  # the unfunded channel is abandoned (closed, nothing paid)


async def _abuse_payer(soak: _Soak, rng: random.Random) -> list[tuple[str, str, bool]]:
    """A funded channel paid wrongly, then closed or left silent on its due."""
    results: list[tuple[str, str, bool]] = []
    ws = await soak.connect()
    try:
        hello = await _hello(ws)
        channel = await _open_and_fund(soak, ws, coincurve.PrivateKey(), hello, x_abuse=True)
        template = channel._template
        assert template is not None and channel.value is not None
        await ws.send(json.dumps({"type": "play", "media": "bench", **UNKNOWN_FIELDS}))
        stream = await _recv(ws)
        if not isinstance(stream, Stream):
            return [("unknown_fields_play", _name(stream), False)]
        channel.on_stream(stream)
        due = await _recv(ws)
        if not isinstance(due, Due):
            return [("payer", f"expected due, got {_name(due)}", False)]
        balance = channel.value - due.total

        async def answer(pay: dict[str, Any]) -> Message | bytes:
            await ws.send(json.dumps(pay))
            return await _recv(ws)

        wrong = sign_payment(template, coincurve.PrivateKey().secret, balance)
        got = await answer(json.loads(encode(Pay(seq=channel.seq + 1, balance=balance,
                                                 sig=wrong))))
        results.append(("bad_signature", _name(got), isinstance(got, Error)
                        and got.code is ErrorCode.BAD_SIGNATURE and not got.fatal))
        # Less than the due: recorded and acknowledged, then the same due (section 7).
        low = channel.pay(due.total - 1)
        got = await answer({**json.loads(encode(low)), **UNKNOWN_FIELDS})
        again = await _recv(ws) if isinstance(got, Paid) else got
        ok = (isinstance(got, Paid) and got.balance == low.balance
              and isinstance(again, Due) and again.total == due.total)
        results.append(("lower_amount", "paid, same due" if ok else
                        f"{_name(got)}, {_name(again)}", ok))
        got = await answer(json.loads(encode(low)))  # the same seq again
        results.append(("replayed_seq", _name(got), isinstance(got, Error)
                        and got.code is ErrorCode.SEQ_NOT_INCREASING))
        raised = channel.value - due.total + 2
        got = await answer(json.loads(encode(_raised_pay(channel, raised))))
        results.append(("balance_increased", _name(got), isinstance(got, Error)
                        and got.code is ErrorCode.BALANCE_INCREASED))
        if rng.random() < 0.5:
            await ws.send(encode(channel.close()))
            while not isinstance(await _recv(ws), Closed):
                pass
            results.append(("close_after_abuse", "closed", True))
        else:
            # Silent on its own unpaid due: closed after unpaid_timeout_s.
            try:
                while True:
                    await _recv(ws, timeout=120)
            except websockets.exceptions.ConnectionClosed:
                results.append(("silent_on_due", f"closed {ws.close_code}", True))
            except TimeoutError:
                results.append(("silent_on_due", "left open", False))
        return results
    finally:
        ws.transport.abort()


def _raised_pay(channel: ClientChannel, balance: int) -> Pay:
    """A well-signed increment whose balance is above the last recorded one."""
    template = channel._template
    assert template is not None
    return Pay(seq=channel.seq + 1, balance=balance,
               sig=sign_payment(template, channel._privkey, balance))


async def _abuser(soak: _Soak, index: int) -> None:
    rng = random.Random(soak.opts.seed * 7_000_003 + index)
    stats = soak.stats
    kinds: dict[str, Callable[[], Awaitable[tuple[str, bool]]]] = {
        "idle_socket": lambda: _abuse_idle(soak),
        "unknown_type": lambda: _abuse_junk(soak, json.dumps({"type": "frobnicate"})),
        "not_json": lambda: _abuse_junk(soak, "{not json"),
        "binary_frame": lambda: _abuse_junk(soak, b"\x00\x01"),
        "unknown_fields": lambda: _abuse_unknown_fields(soak),
    }
    await asyncio.sleep(rng.uniform(0, 5))
    while time.monotonic() < soak.until:
        kind = rng.choice([*kinds, "payer", "payer"])
        try:
            if kind == "payer":
                for sub, got, ok in await _abuse_payer(soak, rng):
                    stats.abused(sub, got, ok)
            else:
                got, ok = await kinds[kind]()
                stats.abused(kind, got, ok)
        except (OSError, TimeoutError, websockets.exceptions.WebSocketException,
                HonestError) as exc:
            stats.abused(kind, f"{type(exc).__name__}", False)
        await asyncio.sleep(rng.uniform(0.1, 1.0))


# -- the run ----------------------------------------------------------------------------


async def run_soak(opts: SoakOptions, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run one soak and return its figures and checks (``checks``; ``ok`` if all hold)."""
    from gateway.bench import BenchError, bench_workdir, raise_fd_limit, stop_processes

    say = log or (lambda text: None)
    if opts.viewers + opts.abuser_count + 512 > raise_fd_limit():
        raise BenchError(f"{opts.viewers} viewers need more file descriptors (ulimit -Hn)")
    workdir = bench_workdir(opts.workdir, "paystream-soak-")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        return await _run(opts, workdir, procs, say)
    finally:
        stop_processes(procs)
        if opts.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def _value(opts: SoakOptions) -> int:
    """A channel value that covers a whole run of media at the soak's rate, and the reserve."""
    media_sat = math.ceil(RATE_MSAT * opts.minutes * 60 / 1000)
    return max(20_000, 2 * media_sat + 10_000)


async def _run(opts: SoakOptions, workdir: Path, procs: list[subprocess.Popen[bytes]],
               say: Callable[[str], None]) -> dict[str, Any]:
    from gateway.bench import BenchOptions, _health, rss_bytes, start_stack, write_media

    write_media(workdir / "media", BenchOptions(chunk_bytes=CHUNK_BYTES, chunk_ms=CHUNK_MS,
                                                rate_msat=RATE_MSAT), chunks=ITEM_CHUNKS)
    sessions = 2 * (opts.viewers + opts.abuser_count) + 256
    say("starting the node and the gateway")
    stack = await start_stack(workdir, procs, gateway_toml=(
        f"max_sessions_per_ip = {sessions}\n"
        f"max_unfunded_per_ip = {sessions}\n"
        f"handshake_timeout_s = {HANDSHAKE_TIMEOUT_S}\n"
        f"unpaid_timeout_s = {UNPAID_TIMEOUT_S}\n"
        "settle_interval_s = 1.0\n"
        "settle_window_s = 2.0\n"
        f"[limits]\nmin_conf = 0\nresume_grace_s = {RESUME_GRACE_S}\n"
    ))
    rpc = RpcClient(stack.rpc_url, cookie_path=stack.cookie)
    try:
        address = await rpc.call("getnewaddress")
        change = address_to_script_pubkey(address, "regtest")
        run_s = opts.minutes * 60
        t0 = time.monotonic()
        soak = _Soak(opts, stack.ws_url, rpc, _value(opts), change, t0 + run_s)
        rss: list[tuple[float, int]] = []
        #: (channels held in memory, sessions) at each RSS sample (/api/health).
        held: list[tuple[int, int]] = []
        stop_side = asyncio.Event()

        async def sample() -> None:
            every = max(1.0, min(5.0, run_s / 60))
            while not stop_side.is_set():
                rss.append((time.monotonic() - t0, rss_bytes(stack.gateway.pid)))
                health = await asyncio.to_thread(_health, stack.info["web"])
                held.append((health["channels"], health["sessions"]))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop_side.wait(), every)

        async def mine(every: float) -> None:
            while not stop_side.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop_side.wait(), every)
                await rpc.call("generatetoaddress", 1, address)

        say(f"soaking: {opts.viewers} viewers, {opts.abuser_count} abusive clients, "
            f"{opts.minutes:g} min")
        sides = [asyncio.create_task(sample()), asyncio.create_task(mine(BLOCK_EVERY_S))]
        viewers = [_Viewer(soak, i) for i in range(opts.viewers)]
        clients = [asyncio.create_task(v.run()) for v in viewers]
        clients += [asyncio.create_task(_abuser(soak, i)) for i in range(opts.abuser_count)]
        await asyncio.gather(*clients)
        t_run = time.monotonic() - t0
        finish_s = time.monotonic() - soak.until
        stop_side.set()
        await asyncio.gather(*sides)
        rss_end = rss_bytes(stack.gateway.pid)
        rss.append((t_run, rss_end))

        say("letting the settler finish (mining as it goes)")
        t_drain = time.monotonic()
        db = workdir / "gw" / "gateway.db"
        deadline = t_drain + RESUME_GRACE_S + 180
        while True:
            rows = list_channels(db)
            if all(r["state"] in ("closed", "refunded") for r in rows):
                break
            if time.monotonic() > deadline:
                break
            await rpc.call("generatetoaddress", 1, address)
            await asyncio.sleep(DRAIN_BLOCK_EVERY_S)
        drain_s = time.monotonic() - t_drain
    finally:
        await rpc.close()
    report = _report(opts, soak, rows, rss, t_run, drain_s, finish_s)
    report["held"] = {"channels_peak": max(c for c, _ in held),
                      "channels_end": held[-1][0], "sessions_peak": max(s for _, s in held)}
    return report


def _report(opts: SoakOptions, soak: _Soak, rows: list[dict[str, Any]],
            rss: list[tuple[float, int]], run_s: float, drain_s: float,
            finish_s: float) -> dict[str, Any]:
    stats = soak.stats
    by_id = {r["channel_id"]: r for r in rows if r["channel_id"]}
    states = Counter(r["state"] for r in rows)
    mismatches = []
    for who, channel in soak.channels:
        assert channel.outpoint is not None
        cid = channel.outpoint.channel_id
        row = by_id.get(cid)
        signed = channel.balance if channel.balance is not None else channel.value
        stored = None if row is None else (row["balance"] if row["balance"] is not None
                                           else row["value"])
        if stored != signed:
            mismatches.append(f"{who} {cid}: signed {signed}, stored {stored}")
    ours = {ch.outpoint.channel_id for _, ch in soak.channels if ch.outpoint is not None}
    strangers = sorted(set(by_id) - ours)
    mid = min(rss, key=lambda s: abs(s[0] - run_s / 2))[1]
    start, end, peak = rss[0][1], rss[-1][1], max(b for _, b in rss)
    steady = end - mid
    checks = {
        "every channel closed or refunded": set(states) <= {"closed", "refunded"},
        "stored balance = last signed, every channel": not mismatches and not strangers,
        "no honest viewer saw an error": not stats.honest_errors,
        "every abusive attempt got section 9's answer": not stats.abuse_unexpected,
        "rss flat": steady <= RSS_STEADY_GROWTH * mid + RSS_STEADY_SLACK,
    }
    mb = 1 / 2**20
    return {
        "viewers": opts.viewers,
        "abusive_clients": opts.abuser_count,
        "minutes": opts.minutes,
        "run_s": round(run_s, 1),
        "finish_s": round(finish_s, 1),
        "drain_s": round(drain_s, 1),
        "sessions": stats.sessions,
        "channels": stats.channels,
        "resumes": stats.resumes,
        "drops": stats.drops,
        "drops_with_pay_in_flight": stats.drops_in_flight,
        "abandoned": stats.abandons,
        "closes": stats.closes,
        "stops": stats.stops,
        "paid_chunks": stats.paid_chunks,
        "increments": stats.increments,
        "store": {
            "channels": len(rows),
            "states": dict(states),
            "settlements": len({r["settle_txid"] for r in rows if r["settle_txid"]}),
            "paid_sat": sum(r["value"] - r["balance"] for r in rows
                            if r["balance"] is not None and r["value"] is not None),
        },
        "abuse": {k: dict(v) for k, v in sorted(stats.abuse.items())},
        "rss_mb": {
            "start": round(start * mb, 1), "peak": round(peak * mb, 1),
            "mid": round(mid * mb, 1), "end": round(end * mb, 1),
            "growth": round((end - start) * mb, 1), "steady_growth": round(steady * mb, 1),
            "samples": len(rss),
        },
        "honest_errors": stats.honest_errors[:20],
        "honest_error_count": len(stats.honest_errors),
        "abuse_unexpected": stats.abuse_unexpected[:20],
        "mismatches": (mismatches + [f"not ours: {c}" for c in strangers])[:20],
        "checks": checks,
        "ok": all(checks.values()),
    }


def format_report(r: dict[str, Any]) -> str:
    """The soak's figures and checks for people."""
    rss, store = r["rss_mb"], r["store"]
    rows = [
        ("soak", f"{r['viewers']} viewers + {r['abusive_clients']} abusive clients, "
                 f"{r['run_s']} s run ({r['finish_s']} s of it closing), "
                 f"{r['drain_s']} s more to settle"),
        ("sessions", f"{r['sessions']} ({r['channels']} channels opened, {r['resumes']} resumes)"),
        ("churn", f"{r['drops']} drops ({r['drops_with_pay_in_flight']} with a pay in flight), "
                  f"{r['abandoned']} abandoned, {r['closes']} closes, {r['stops']} stops"),
        ("paid", f"{r['paid_chunks']} paid chunks, {r['increments']} increments "
                 f"acknowledged"),
        ("store", f"{store['channels']} channels {store['states']}, "
                  f"{store['settlements']} settlements, {store['paid_sat']} sat paid"),
        ("held", f"{r['held']['channels_peak']} channels in memory at most "
                 f"({r['held']['channels_end']} at the end of the run), "
                 f"{r['held']['sessions_peak']} sessions at most"),
        ("gateway rss", f"start {rss['start']} MB, peak {rss['peak']} MB, mid {rss['mid']} MB, "
                        f"end {rss['end']} MB (growth {rss['growth']} MB, "
                        f"{rss['steady_growth']} MB since mid-run; {rss['samples']} samples)"),
    ]
    for kind, got in r["abuse"].items():
        rows.append((f"abuse {kind}", ", ".join(f"{k}: {v}" for k, v in got.items())))
    for name, ok in r["checks"].items():
        rows.append(("check", f"{'ok  ' if ok else 'FAIL'} {name}"))
    for what in ("honest_errors", "abuse_unexpected", "mismatches"):
        for line in r[what]:
            rows.append((what.replace("_", " "), line))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
