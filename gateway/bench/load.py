"""The load generator of ``gateway bench``: many viewers in one process.

Run by :mod:`gateway.bench` as ``python -m gateway.bench.load``; it is driven
over stdin/stdout with one JSON object per line, so that the coordinator can
time the gateway (a separate process) against a window every load generator
agrees on. ``time.monotonic()`` is CLOCK_MONOTONIC, the same clock in every
process on the machine.

Theory of operation
-------------------

1. The first stdin line is the configuration (:class:`LoadConfig` as JSON).
2. Set-up, not timed: every viewer connects, says ``hello`` and ``open``s a
   cltv channel (protocol.md section 4). All funding outputs then go into a
   few transactions with many outputs each, funded and signed by the node's
   wallet (``fundrawtransaction`` + ``signrawtransactionwithwallet``), so a
   thousand channels cost a handful of RPC calls; ``min_conf`` is 0, so each
   ``fund`` is answered by ``ready``. Each viewer then pre-signs its
   increments (T3 signatures for the totals its ``due`` messages will ask,
   section 7), so that during the run the load generator spends its CPU on
   I/O, not on ECDSA. Prints ``{"event": "ready", ...}``.
3. ``{"cmd": "go", "start": t, "window": [a, b]}``: every viewer sends
   ``play`` at ``start`` and pays each ``due`` — at once (throughput mode),
   or when the chunk is wanted (paced mode: chunk *i* at ``t0 + i*D``, with
   ``t0`` spread over the first chunk so that viewers do not pay in step).
   Events in ``[a, b]`` are counted; at ``b`` viewers stop paying. Prints
   ``{"event": "done", ...}`` with counters and raw samples (seconds).
4. ``{"cmd": "close"}``: every viewer sends ``close`` (at most
   ``close_concurrency`` at a time) and waits for ``closed``. Prints
   ``{"event": "closed", ...}`` with the settlement txids.
5. EOF or ``{"cmd": "exit"}``: close the sockets and exit.

The hot path parses server messages with :func:`json.loads` and a dispatch on
``type`` rather than the full validating parser: this process measures the
gateway, and the shipped player (``player``) is where the client-side checks
live. Set-up does use the full parser and :class:`ClientChannel`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import json
import random
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import coincurve
import websockets
from bitcoin.core import CMutableTransaction, CTransaction, CTxOut
from websockets.asyncio.client import ClientConnection
from websockets.frames import Frame, Opcode
from websockets.protocol import Event

from gateway.chain.rpc import RpcClient
from gateway.protocol import metering
from gateway.protocol.channel import ClientChannel
from gateway.protocol.messages import (
    FEATURE_PAY_BINARY,
    Paid,
    Pay,
    Ready,
    ServerHello,
    Terms,
    encode,
    encode_pay_binary,
    parse_server_message,
)
from gateway.protocol.scripts import address_to_script_pubkey
from gateway.protocol.transactions import Outpoint, PaymentTemplate, sign_payment

T = TypeVar("T")

#: Outputs per funding transaction: P2WSH outputs are 172 WU each, so 1,500
#: stay well under the 400,000 WU standardness limit.
OUTPUTS_PER_FUNDING_TX = 1500
#: Channel lifetime asked in ``open``: well inside the default window.
EXPIRY_S = 6 * 3600
#: Viewers doing set-up round trips at the same time.
SETUP_CONCURRENCY = 200
#: Viewers set up one at a time first, each funded by its own wallet
#: transaction: hello→ready of a viewer alone, with and without the wallet.
SOLO_VIEWERS = 10


@dataclass
class LoadConfig:
    """What one load-generator process runs (sent by the coordinator)."""

    url: str
    rpc_url: str
    rpc_cookie: str
    viewers: int
    media: str
    #: Price of chunk k is ``ceil(k * rate_msat * chunk_ms / 1e6)`` sat in total
    #: (protocol.md section 7 with free_ms 0); checked against ``stream``.
    rate_msat: int
    chunk_ms: int
    paced: bool
    #: Increments signed ahead per viewer; beyond them a viewer signs live.
    presign: int
    close_concurrency: int = 256
    seed: int = 0
    #: A file every load generator locks while it funds: the node's wallet
    #: would give two of them the same coins between fund and broadcast.
    funding_lock: str = ""
    #: Send each ``pay`` as the binary frame when the gateway offers it
    #: (protocol.md section 5a); False: JSON, as an older client does.
    pay_binary: bool = True


def total_due(k: int, rate_msat: int, chunk_ms: int) -> int:
    """Sat of media paid before the k-th chunk (1-based), section 7 (no free time)."""
    return metering.total_due(0, rate_msat, k * chunk_ms)


@dataclass
class _Counters:
    chunks: int = 0
    bytes: int = 0
    increments: int = 0
    latency: list[float] = field(default_factory=list)
    lateness: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    live_signed: int = 0


class BenchViewer:
    """One viewer: a WebSocket, a channel and its pre-signed increments."""

    def __init__(self, index: int, cfg: LoadConfig, counters: _Counters) -> None:
        self.index = index
        self.cfg = cfg
        self.c = counters
        self.key = coincurve.PrivateKey()
        self.ws: Any = None
        self.channel: ClientChannel | None = None
        self.terms: Terms | None = None
        self.template: PaymentTemplate | None = None
        self.value = 0
        #: The reserve paid at set-up (``ready.exit_fee``).
        self.reserve = 0
        #: Pre-encoded ``pay`` frames: presigned[k-1] pays the k-th chunk.
        self.presigned: list[tuple[int, str | bytes]] = []
        #: The gateway offered the binary ``pay`` and the run uses it.
        self.pay_binary = False
        self.paid_chunks = 0  # dues paid so far (k of the next pay is this + 1)
        self.seq = 0
        self.pay_sent_at = 0.0
        self.want_at = 0.0  # paced: when the chunk just paid for is wanted
        self.t0 = 0.0
        self.window = (0.0, 0.0)
        self.stopping = False
        #: A paced pay waiting for its chunk time; close() cancels it.
        self._timer: asyncio.TimerHandle | None = None
        self.expect_media = False  # the next binary frame is a paid media chunk
        self.closed: asyncio.Future[dict[str, Any]] | None = None
        self.hello_to_ready = 0.0
        self.t_hello = 0.0
        self.t_ready = 0.0

    # -- set-up (not timed) ------------------------------------------------------

    async def connect_and_open(self, change_script: bytes) -> None:
        """Connect, ``hello``, ``open`` → ``terms``; time the round trips."""
        t_hello = self.t_hello = time.monotonic()
        self.ws = await websockets.connect(
            self.cfg.url, compression=None, max_size=None, ping_interval=None,
            open_timeout=60, create_connection=_FastConnection,
        )
        await self.ws.send(json.dumps({"type": "hello", "version": 2, "agent": "bench"}))
        hello = parse_server_message(await self.ws.recv())
        if not isinstance(hello, ServerHello):
            raise RuntimeError(f"viewer {self.index}: expected hello, got {hello}")
        t_hello_done = time.monotonic()
        self.pay_binary = self.cfg.pay_binary and FEATURE_PAY_BINARY in hello.features
        self.channel = ClientChannel(self.key.secret, hello, budget=hello.limits.max_value)
        t_open = time.monotonic()
        await self.ws.send(
            encode(self.channel.open(expiry=int(time.time()) + EXPIRY_S,
                                     change_script=change_script))
        )
        terms = parse_server_message(await self.ws.recv())
        if not isinstance(terms, Terms):
            raise RuntimeError(f"viewer {self.index}: expected terms, got {terms}")
        self.channel.accept_terms(terms)
        self.terms = terms
        # hello→ready counts the protocol's own round trips (hello, open, fund);
        # the wait for the shared funding transaction is set-up, not latency.
        self.hello_to_ready = (t_hello_done - t_hello) + (time.monotonic() - t_open)

    async def fund(self, outpoint: Outpoint, value: int) -> None:
        """``fund`` → ``ready`` (min_conf 0), then pre-sign the increments."""
        assert self.channel is not None
        t_fund = time.monotonic()
        await self.ws.send(encode(self.channel.fund(outpoint, value)))
        ready = parse_server_message(await self.ws.recv())
        if not isinstance(ready, Ready):
            raise RuntimeError(f"viewer {self.index}: expected ready, got {ready}")
        self.t_ready = time.monotonic()
        self.hello_to_ready += self.t_ready - t_fund
        self.channel.on_ready(ready)
        self.value = value
        self.template = self.channel._template  # the T3 template ClientChannel built
        # The reserve (the viewer's own exit fee, section 3) is paid first, in
        # the set-up: the timed run then pays for media only.
        self.reserve = ready.exit_fee
        if self.reserve:
            await self.ws.send(encode(self.channel.pay(self.reserve)))
            paid = parse_server_message(await self.ws.recv())
            if not isinstance(paid, Paid):
                raise RuntimeError(f"viewer {self.index}: expected paid, got {paid}")

    def presign(self) -> None:
        """Sign the increments for the first ``presign`` chunks (section 3)."""
        for k in range(1, self.cfg.presign + 1):
            self.presigned.append(self._sign(k))

    def _sign(self, k: int) -> tuple[int, str | bytes]:
        assert self.template is not None
        total = self.reserve + total_due(k, self.cfg.rate_msat, self.cfg.chunk_ms)
        balance = self.value - total
        sig = sign_payment(self.template, self.key.secret, balance)
        pay = Pay(seq=k + 1, balance=balance, sig=sig)
        return total, encode_pay_binary(pay) if self.pay_binary else encode(pay)

    # -- the timed run -------------------------------------------------------------

    async def run(self, start: float, window: tuple[float, float], spread: float) -> None:
        """Play from ``start`` and pay every ``due`` until the window closes.

        The timed run is driven by callbacks from the connection
        (:class:`_FastConnection`): each server frame is handled as it is
        parsed, and each ``pay`` is written at once, instead of a ``recv``
        future, a task wake-up and a ``send`` context per message. That cut
        the load generator's CPU at 10,000 paced viewers by about a fifth
        (0.41 cores against 0.50-0.56): on a small box, CPU the gateway being
        measured does not get.
        """
        self.window = window
        self.t0 = start + spread
        loop = asyncio.get_running_loop()
        self.closed = loop.create_future()
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        self.ws.on_frame = self._on_frame
        self.ws.on_lost = self._on_lost
        self._send(json.dumps({"type": "play", "media": self.cfg.media}))
        with contextlib.suppress(Exception):  # close() reports how it ended
            await asyncio.shield(self.closed)

    def _send(self, frame: str | bytes) -> None:
        if isinstance(frame, bytes):
            self.ws.protocol.send_binary(frame)
        else:
            self.ws.protocol.send_text(frame.encode())
        self.ws.send_data()

    def _on_lost(self) -> None:
        if self.closed is not None and not self.closed.done():
            self.closed.set_exception(RuntimeError("connection closed"))

    def _on_frame(self, frame: Frame) -> None:
        c, cfg = self.c, self.cfg
        lo, hi = self.window
        now = time.monotonic()
        if frame.opcode is Opcode.BINARY:
            if self.expect_media and lo <= now <= hi:
                c.chunks += 1
                c.bytes += len(frame.data)
                if self.pay_sent_at:
                    c.latency.append(now - self.pay_sent_at)
                if cfg.paced and self.want_at:
                    c.lateness.append(now - self.want_at)
            self.pay_sent_at = 0.0
            self.expect_media = False
            return
        msg = json.loads(bytes(frame.data))  # bytes(b) is b: no copy
        kind = msg["type"]
        if kind == "due":
            self._on_due(msg, now)
        elif kind == "chunk":
            self.expect_media = msg["index"] >= 0
        elif kind == "paid":
            if lo <= now <= hi:
                c.increments += 1
        elif kind == "stream":
            if msg["rate_msat"] != cfg.rate_msat or msg["free_ms"] != 0:
                c.errors["stream_terms"] = c.errors.get("stream_terms", 0) + 1
        elif kind == "end":
            if not self.stopping:  # the item ran out: play it again
                self._send(json.dumps({"type": "play", "media": cfg.media}))
        elif kind == "closed":
            if self.closed is not None and not self.closed.done():
                self.closed.set_result(msg)
        elif kind == "error":
            code = str(msg.get("code"))
            c.errors[code] = c.errors.get(code, 0) + 1
            if msg.get("fatal"):
                self._on_lost()

    def _on_due(self, msg: dict[str, Any], now: float) -> None:
        c, cfg = self.c, self.cfg
        if now >= self.window[1] or self.stopping:
            self.stopping = True
            return  # the window is over: stop paying, wait for close
        k = self.paid_chunks + 1
        if k <= len(self.presigned):
            total, frame = self.presigned[k - 1]
        elif self.reserve + total_due(k, cfg.rate_msat, cfg.chunk_ms) > self.value - 546:
            c.errors["channel_exhausted"] = c.errors.get("channel_exhausted", 0) + 1
            self.stopping = True  # the channel is spent: a bigger --presign funds more
            return
        else:
            total, frame = self._sign(k)
            c.live_signed += 1
        if total != msg["total"]:
            c.errors["due_mismatch"] = c.errors.get("due_mismatch", 0) + 1
            self.stopping = True
            return
        if cfg.paced:
            # Chunk k-1 (0-based) is wanted at t0 + (k-1)*D; pay then.
            self.want_at = self.t0 + (k - 1) * cfg.chunk_ms / 1000
            delay = self.want_at - time.monotonic()
            if delay > 0:
                self._timer = asyncio.get_running_loop().call_later(delay, self._pay, k, frame)
                return
        self._pay(k, frame)

    def _pay(self, k: int, frame: str | bytes) -> None:
        self._timer = None
        if self.stopping or (self.cfg.paced and self.want_at >= self.window[1]):
            self.stopping = True  # wanted after the window, or closing
            return
        self.paid_chunks = k
        self.pay_sent_at = time.monotonic()
        self._send(frame)

    async def close(self) -> tuple[float, float, dict[str, Any]]:
        """``close`` → ``closed``: (sent at, answered at, closed message).

        A viewer waiting for its next chunk time stops waiting: the settle
        figure must not include that wait.
        """
        assert self.closed is not None
        self.stopping = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        sent = time.monotonic()
        self._send(json.dumps({"type": "close"}))
        closed = await asyncio.wait_for(self.closed, 120)
        return sent, time.monotonic(), closed


class _FastConnection(ClientConnection):
    """websockets' client connection that hands data frames to ``on_frame``.

    Set-up uses ``recv`` as usual; the timed run sets ``on_frame`` (see
    :meth:`BenchViewer.run`). The gateway never fragments a message, so a
    frame is a whole message.
    """

    on_frame: Callable[[Frame], None] | None = None
    on_lost: Callable[[], None] | None = None

    def process_event(self, event: Event) -> None:
        """A whole text or binary message goes to ``on_frame`` once it is set."""
        if (
            self.on_frame is not None
            and isinstance(event, Frame)
            and event.fin
            and event.opcode in (Opcode.TEXT, Opcode.BINARY)
        ):
            self.on_frame(event)
            return
        super().process_event(event)

    def connection_lost(self, exc: Exception | None) -> None:
        """As websockets does, then tell the viewer."""
        super().connection_lost(exc)
        if self.on_lost is not None:
            self.on_lost()


# -- funding many channels cheaply ------------------------------------------------------


async def fund_all(
    rpc: RpcClient, viewers: list[BenchViewer], value: int, lock_path: str = ""
) -> None:
    """One wallet transaction per ``OUTPUTS_PER_FUNDING_TX`` funding outputs.

    With ``lock_path``, under an exclusive ``flock`` of that file (released
    when it closes), so that load generators sharing the wallet take turns.
    """
    with open(lock_path, "a") if lock_path else contextlib.nullcontext() as lock:
        if lock is not None:
            await asyncio.to_thread(fcntl.flock, lock, fcntl.LOCK_EX)
        await _fund_groups(rpc, viewers, value)


async def _fund_groups(rpc: RpcClient, viewers: list[BenchViewer], value: int) -> None:
    for first in range(0, len(viewers), OUTPUTS_PER_FUNDING_TX):
        group = viewers[first : first + OUTPUTS_PER_FUNDING_TX]
        outputs = []
        for v in group:
            assert v.terms is not None
            outputs.append(CTxOut(value, v.terms.funding_script))
        template = CMutableTransaction([], outputs, nLockTime=0, nVersion=2)
        funded = await rpc.call("fundrawtransaction", template.serialize().hex())
        signed = await rpc.call("signrawtransactionwithwallet", funded["hex"])
        if not signed.get("complete"):
            raise RuntimeError("the node's wallet could not sign the funding transaction")
        txid = await rpc.call("sendrawtransaction", signed["hex"])
        tx = CTransaction.deserialize(bytes.fromhex(signed["hex"]))
        vout_of = {bytes(out.scriptPubKey): n for n, out in enumerate(tx.vout)}
        sem = asyncio.Semaphore(SETUP_CONCURRENCY)
        await asyncio.gather(*(
            _limited(sem, v.fund(Outpoint(txid, vout_of[_funding_script(v)]), value))
            for v in group
        ))


def _funding_script(v: BenchViewer) -> bytes:
    assert v.terms is not None
    return v.terms.funding_script


async def _limited(sem: asyncio.Semaphore, coro: Awaitable[T]) -> T:
    async with sem:
        return await coro


# -- the process ---------------------------------------------------------------------


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE to the hard limit (a socket per viewer); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def channel_value(cfg: LoadConfig, min_value: int) -> int:
    """Enough for every pre-signed increment and then some, above ``min_value``."""
    need = total_due(cfg.presign * 4 + 64, cfg.rate_msat, cfg.chunk_ms) + 10_000
    return max(min_value, need)


async def _main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    cfg = LoadConfig(**json.loads(await reader.readline()))
    raise_fd_limit()
    counters = _Counters()
    viewers = [BenchViewer(i, cfg, counters) for i in range(cfg.viewers)]
    rpc = RpcClient(cfg.rpc_url, cookie_path=cfg.rpc_cookie)
    try:
        t_setup = time.monotonic()
        change = address_to_script_pubkey(await rpc.call("getnewaddress"), "regtest")
        sem = asyncio.Semaphore(SETUP_CONCURRENCY)
        solo = viewers[:SOLO_VIEWERS]
        value = 0
        for v in solo:
            await v.connect_and_open(change)
            assert v.channel is not None
            value = value or channel_value(cfg, v.channel.hello.limits.min_value)
            await fund_all(rpc, [v], value, cfg.funding_lock)
        await asyncio.gather(
            *(_limited(sem, v.connect_and_open(change)) for v in viewers[SOLO_VIEWERS:])
        )
        await fund_all(rpc, viewers[SOLO_VIEWERS:], value, cfg.funding_lock)
        t_funded = time.monotonic()
        for v in viewers:
            v.presign()
            # Pre-signing takes seconds: let the loop answer the gateway's
            # heartbeat pings meanwhile, or the gateway drops the viewers.
            await asyncio.sleep(0)
        # As the gateway does (server.tune_gc): a full collection over every
        # viewer's objects would show up as latency that is not the gateway's.
        gc.collect()
        gc.freeze()
        gc.set_threshold(50_000, 20, 100)
        _emit({
            "event": "ready",
            "viewers": len(viewers),
            "value": value,
            "setup_s": t_funded - t_setup,
            "presign_s": time.monotonic() - t_funded,
            "hello_to_ready": [round(v.hello_to_ready, 6) for v in viewers[SOLO_VIEWERS:]],
            "solo_hello_to_ready": [round(v.hello_to_ready, 6) for v in solo],
            "solo_with_wallet": [round(v.t_ready - v.t_hello, 6) for v in solo],
        })
        tasks: list[asyncio.Task[None]] = []
        rng = random.Random(cfg.seed)
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd["cmd"] == "go":
                start, window = cmd["start"], tuple(cmd["window"])
                spread = cfg.chunk_ms / 1000 if cfg.paced else 0.0
                tasks = [
                    asyncio.create_task(v.run(start, window, rng.uniform(0, spread)))
                    for v in viewers
                ]
                await asyncio.sleep(max(0.0, window[1] - time.monotonic()) + 0.05)
                _emit({
                    "event": "done",
                    **{k: val for k, val in asdict(counters).items()
                       if k not in ("latency", "lateness")},
                    "latency": [round(x, 6) for x in counters.latency],
                    "lateness": [round(x, 6) for x in counters.lateness],
                })
            elif cmd["cmd"] == "close":
                csem = asyncio.Semaphore(cfg.close_concurrency)
                results = await asyncio.gather(
                    *(_limited(csem, v.close()) for v in viewers), return_exceptions=True
                )
                ok = [r for r in results if isinstance(r, tuple)]
                _emit({
                    "event": "closed",
                    "first_sent": min((r[0] for r in ok), default=0.0),
                    "last_closed": max((r[1] for r in ok), default=0.0),
                    "closed": len(ok),
                    "failed": len(results) - len(ok),
                    "txids": [r[2]["txid"] for r in ok if r[2].get("txid")],
                    "paid": sum(int(r[2].get("paid", 0)) for r in ok),
                })
            elif cmd["cmd"] == "exit":
                break
        for task in tasks:
            task.cancel()
    finally:
        await asyncio.gather(
            *(v.ws.close() for v in viewers if v.ws is not None), return_exceptions=True
        )
        await rpc.close()


def main() -> None:
    """Entry point of ``python -m gateway.bench.load``."""
    import uvloop

    try:
        # As the gateway: the stock loop cost the load generator a third more
        # CPU per chunk, taken from the box the gateway is measured on.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_main())
    except Exception as exc:  # reported to the coordinator, which fails with it
        _emit({"event": "error", "message": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)


if __name__ == "__main__":
    main()
