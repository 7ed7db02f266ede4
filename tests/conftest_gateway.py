"""Fixtures for gateway tests: real media (PyAV), a real gateway with its
embedded node on 127.0.0.1 port 0, and a small protocol-level test viewer.

``Viewer`` is the test's own client: it speaks protocol.md through the pure
``ClientChannel`` over a real WebSocket and funds from the node's faucet
wallet over real JSON-RPC, so tests can send exactly the (bad) messages they
need. The shipped player (``player play``) is exercised by the end-to-end
tests as a separate process.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import coincurve
import pytest
import websockets
from helpers_chain import get_transaction
from helpers_stack import Stack

from gateway.chain.rpc import RpcClient
from gateway.chain.watch import btc_to_sat
from gateway.config import Config
from gateway.media.catalog import add_publisher, publish
from gateway.media.sample import synthesize_music, synthesize_video
from gateway.protocol.channel import ClientChannel
from gateway.protocol.messages import (
    Chunk,
    Closed,
    Due,
    Error,
    Paid,
    Ready,
    ServerHello,
    Stream,
    Terms,
    encode,
    parse_server_message,
)
from gateway.protocol.scripts import address_to_script_pubkey, script_pubkey_to_address
from gateway.protocol.transactions import Outpoint
from gateway.server import Gateway

#: Two publishers so settlements split; regtest payout addresses of fixed keys.
PUBLISHERS = {
    "studio": script_pubkey_to_address(bytes.fromhex("0014" + "11" * 20), "regtest"),
    "label": script_pubkey_to_address(bytes.fromhex("0020" + "22" * 32), "regtest"),
}


@pytest.fixture(scope="session")
def sample_media(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A media dir with a short video (free 3 s, 300 sat/s) and a song (free 2 s, 150.5 sat/s)."""
    media = tmp_path_factory.mktemp("media")
    for pid, address in PUBLISHERS.items():
        add_publisher(media, pid, pid.title(), address)
    video, song = media / "clip.mp4", media / "song.m4a"
    synthesize_video(video, 12)
    synthesize_music(song, 8)
    publish(media, video, item_id="clip", title="Clip", publisher="studio",
            rate_msat=300_000, free_ms=3000)
    publish(media, song, item_id="song", title="Song", publisher="label",
            rate_msat=150_500, free_ms=2000)
    return media


def gateway_config(tmp_path: Path, media: Path, **limits: Any) -> Config:
    """A config for a test gateway: ports 0, temp data dir, blocks on request."""
    config = Config()
    config.datadir = tmp_path / "gw"
    config.media = media
    config.port = 0
    config.rpc_port = 0
    config.block_interval = 0
    config.settle_interval_s = 0.2
    config.limits.resume_grace_s = 1
    for name, value in limits.items():
        setattr(config.limits, name, value)
    return config


@pytest.fixture
def media_copy(sample_media: Path, tmp_path: Path) -> Path:
    """A private copy of the sample media (tests may edit its catalog)."""
    target = tmp_path / "media"
    shutil.copytree(sample_media, target)
    return target


@pytest.fixture
async def gateway_factory(tmp_path: Path, media_copy: Path) -> AsyncIterator[Any]:
    """Start gateways (in-process, embedded node, port 0) with config overrides.

    ``await gateway_factory(limits={...}, **config)``; all are stopped at teardown.
    """
    started: list[Gateway] = []

    async def start(limits: dict[str, Any] | None = None, **overrides: Any) -> Gateway:
        config = gateway_config(tmp_path, media_copy, **(limits or {}))
        for name, value in overrides.items():
            setattr(config, name, value)
        gw = Gateway(config)
        await gw.start()
        started.append(gw)
        return gw

    try:
        yield start
    finally:
        for gw in reversed(started):
            await gw.stop()


@pytest.fixture
async def gateway(gateway_factory: Any) -> Gateway:
    """A running gateway with its embedded node (in-process), on port 0."""
    return await gateway_factory()


@pytest.fixture
async def stack_factory(tmp_path: Path, media_copy: Path) -> AsyncIterator[Any]:
    """Start ``gateway serve`` stacks (:class:`helpers_stack.Stack`); all stop at teardown.

    ``await stack_factory(*extra_serve_args)``.
    """
    stacks: list[Stack] = []

    async def make(*extra: str) -> Stack:
        stack = Stack(tmp_path, media_copy, *extra)
        await stack.start()
        stacks.append(stack)
        return stack

    try:
        yield make
    finally:
        for stack in stacks:
            stack.stop()


def ws_url(gw: Gateway) -> str:
    """The gateway's ``/paystream/2`` URL."""
    return f"ws://127.0.0.1:{gw.port}/paystream/2"


def node_rpc(gw: Gateway) -> RpcClient:
    """A wallet RPC client to the gateway's embedded node (the demo faucet)."""
    return RpcClient(gw.node.rpc_url, cookie_path=gw.node.cookie_path)


class Viewer:
    """A test viewer: one WebSocket, one ``ClientChannel``, explicit steps."""

    def __init__(self, url: str, rpc: RpcClient, *, budget: int = 50_000) -> None:
        self.url = url
        self.rpc = rpc
        self.budget = budget
        self.key = coincurve.PrivateKey()
        self.ws: Any = None
        self.hello: ServerHello | None = None
        self.channel: ClientChannel | None = None
        self.media: list[tuple[Chunk, bytes]] = []
        self.log: list[Any] = []

    async def connect(self) -> ServerHello:
        """Connect and exchange ``hello``."""
        self.ws = await websockets.connect(self.url, compression=None, max_size=None)
        await self.send_raw({"type": "hello", "version": 2, "agent": "test-viewer"})
        hello = await self.recv()
        assert isinstance(hello, ServerHello), hello
        self.hello = hello
        return hello

    async def send(self, msg: Any) -> None:
        """Send a protocol message."""
        await self.ws.send(encode(msg))

    async def send_raw(self, obj: Any) -> None:
        """Send any JSON value (or a raw str/bytes frame)."""
        await self.ws.send(obj if isinstance(obj, (str, bytes)) else json.dumps(obj))

    async def recv(self, timeout: float = 20) -> Any:
        """The next text message, parsed (a chunk's binary frame is kept with it)."""
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(raw, str), "binary frame without a chunk message"
        msg = parse_server_message(raw)
        self.log.append(msg)
        if isinstance(msg, Chunk):
            data = await asyncio.wait_for(self.ws.recv(), timeout)
            assert isinstance(data, bytes) and len(data) == msg.size
            self.media.append((msg, data))
            if self.channel is not None:
                self.channel.on_chunk(msg)
        return msg

    async def expect(self, kind: type, timeout: float = 20) -> Any:
        """Read until a message of ``kind`` (fail on an ``error``)."""
        while True:
            msg = await self.recv(timeout)
            if isinstance(msg, kind):
                return msg
            if isinstance(msg, Error) and kind is not Error:
                raise AssertionError(f"unexpected error {msg}")

    async def open_channel(self, *, kind: str = "cltv") -> Terms:
        """open → terms: the channel exists, unfunded (change goes to a faucet address)."""
        assert self.hello is not None
        self.channel = ClientChannel(self.key.secret, self.hello, budget=self.budget)
        change = address_to_script_pubkey(await self.rpc.call("getnewaddress"), "regtest")
        await self.send(self.channel.open(expiry=int(time.time()) + 6 * 3600,
                                          change_script=change, kind=kind))
        terms = await self.expect(Terms)
        self.channel.accept_terms(terms)
        return terms

    async def pay_funding_address(self, terms: Terms, value: int) -> tuple[Outpoint, int]:
        """cltv: the faucet wallet pays ``funding_address`` (unconfirmed); the output."""
        txid = await self.rpc.call("sendtoaddress", terms.funding_address, f"{value / 1e8:.8f}")
        raw = await get_transaction(self.rpc, txid)
        vout = next(o["n"] for o in raw["vout"]
                    if o["scriptPubKey"]["hex"] == terms.funding_script.hex())
        return Outpoint(txid, vout), btc_to_sat(raw["vout"][vout]["value"])

    async def open_and_fund(self, *, kind: str = "cltv", value: int = 20_000) -> Ready:
        """open → terms → (refund) → fund from the faucet wallet → ready."""
        terms = await self.open_channel(kind=kind)
        assert self.channel is not None
        if kind == "cltv":
            outpoint, value = await self.pay_funding_address(terms, value)
            await self.send(self.channel.fund(outpoint, value))
        else:
            tx, vout = await self._multisig_t1(terms.funding_script, value)
            from gateway.protocol.transactions import txid_of

            outpoint = Outpoint(txid_of(tx), vout)
            await self.send(self.channel.refund_request(
                outpoint, value, dest_script=self.channel.change_script, fee=500))
            from gateway.protocol.messages import RefundSigned

            self.channel.accept_refund_signed(await self.expect(RefundSigned))
            await self.send(self.channel.fund(outpoint, value, tx=tx))
        ready = await self.expect(Ready)
        self.channel.on_ready(ready)
        return ready

    async def _multisig_t1(self, funding_script: bytes, value: int) -> tuple[bytes, int]:
        from bitcoin.core import CMutableTransaction, CTxOut

        unsigned = CMutableTransaction([], [CTxOut(value, funding_script)], nLockTime=0,
                                       nVersion=2)
        funded = await self.rpc.call("fundrawtransaction", unsigned.serialize().hex())
        signed = await self.rpc.call("signrawtransactionwithwallet", funded["hex"])
        tx = bytes.fromhex(signed["hex"])
        from gateway.protocol.transactions import find_funding_output

        vout, _ = find_funding_output(tx, funding_script)
        return tx, vout

    async def play_and_pay(self, media: str, *, chunks: int | None = None) -> Stream:
        """``play`` then pay every ``due`` until ``chunks`` media chunks arrived (or end)."""
        from gateway.protocol.messages import End, Play

        assert self.channel is not None
        await self.send(Play(media=media))
        stream = await self.expect(Stream)
        self.channel.on_stream(stream)
        got = 0
        while chunks is None or got < chunks:
            msg = await self.recv()
            if isinstance(msg, Due):
                await self.send(self.channel.pay_due(msg))
            elif isinstance(msg, Paid):
                self.channel.on_paid(msg)
            elif isinstance(msg, Chunk) and msg.index >= 0:
                got += 1
            elif isinstance(msg, End):
                break
            elif isinstance(msg, Error):
                raise AssertionError(f"unexpected error {msg}")
        return stream

    async def close_channel(self) -> Closed:
        """``close`` → ``closed``."""
        assert self.channel is not None
        await self.send(self.channel.close())
        closed = await self.expect(Closed)
        self.channel.on_closed(closed)
        return closed

    async def disconnect(self) -> None:
        """Drop the socket without ``close``."""
        if self.ws is not None:
            await self.ws.close()


async def resume(viewer: Viewer, old: Viewer, timeout: float = 20) -> Ready:
    """``old``'s channel resumed on ``viewer``'s (connected) session."""
    viewer.key, viewer.channel = old.key, old.channel
    await viewer.send(viewer.channel.resume(viewer.hello))
    ready = await viewer.expect(Ready, timeout)
    viewer.channel.on_ready(ready)
    return ready
