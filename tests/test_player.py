"""The Python player: keystore, wallet funding on the real embedded node, the message loop.

The gateway here is :class:`FakeGateway`, a deliberately small FAKE that speaks
protocol.md over real WebSockets on 127.0.0.1:0 using the real pure core
(``ServerChannel``, ``ServerMeter``) but no chain, no store and no settlement:
it reads the funding output from ``fund.tx``, answers ``close`` with
``closed`` (``txid`` null) and can be told to overcharge, or to settle at
``close`` with a settlement built by the real core (never broadcast) that its
``GET /api/channel/<id>`` serves, possibly tampered. The real gateway is
covered by the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
import stat
import sys
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import coincurve
import pytest
import websockets
from bitcoin.core import CMutableTransaction
from helpers_chain import get_transaction
from websockets.asyncio.server import ServerConnection, serve

from gateway.chain.rpc import RpcClient
from gateway.protocol.channel import ServerChannel
from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.protocol.messages import (
    Chunk,
    Close,
    Closed,
    Due,
    End,
    Error,
    Fund,
    Hello,
    Limits,
    Message,
    Open,
    Pay,
    Play,
    Ready,
    Refund,
    Resume,
    ServerHello,
    Stream,
    encode,
    parse_client_message,
)
from gateway.protocol.metering import ServerMeter
from gateway.protocol.scripts import ChannelScript
from gateway.protocol.settlement import build_batch
from gateway.protocol.transactions import Outpoint, find_funding_output, parse_tx, txid_of
from player import cli
from player.client import (
    ExpirySpec,
    GatewayError,
    Player,
    PlayerError,
    Progress,
    check_gateway_url,
    parse_expiry,
    refund_channel,
    restore_channel,
)
from player.keystore import ChannelState, Keystore, KeystoreError
from player.wallet import Wallet, is_segwit_script

CHUNK_MS = 1000
# 2.5 sat/s: chunk prices round up, so the client's exact bill is exercised.
RATE_MSAT = 2_500
FREE_MS = 2_000


def _limits(**overrides: int) -> Limits:
    values = {
        "min_value": 1_000,
        "max_value": 10_000_000,
        "min_expiry_s": 600,
        "max_expiry_s": 7 * 86_400,
        "min_conf": 0,
        "settle_margin_s": 60,
        "resume_grace_s": 120,
    } | overrides
    return Limits(**values)


@dataclass
class FakeGateway:
    """A FAKE gateway for the player's tests (see the module docstring)."""

    chunks: int = 6
    limits: Limits = field(default_factory=_limits)
    tip_height: int = 0
    overcharge_at: int | None = None  # chunk index whose `due` asks 1 sat too much
    delay: float = 0.0  # seconds between chunks
    rate_msat: int = RATE_MSAT
    answer_close: bool = True  # False: `close` goes unanswered
    drop_pay_at: int | None = None  # chunk index whose `pay` is lost: the fake disconnects
    #: Prices the reserve; 0 (no reserve) keeps these tests about the media's metering.
    feerate: Fraction = Fraction(0)
    #: Settle at `close` (a batch of one, built by the real core, never broadcast) and
    #: name it in `closed`; the channel API serves it after this edit of its outputs.
    settle: bool = False
    tamper: Any = None
    #: ``GET /api/channel/<id>`` answers, by channel id.
    api: dict[str, Any] = field(default_factory=dict)
    privkey: bytes = field(default_factory=lambda: coincurve.PrivateKey().secret)
    channels: dict[str, ServerChannel] = field(default_factory=dict)
    meters: dict[str, ServerMeter] = field(default_factory=dict)
    received: list[Message] = field(default_factory=list)
    #: Media ids ``GET /api/catalog`` lists ("missing" is streamed as media_unknown).
    catalog: tuple[str, ...] = ("film",)
    #: Requests for ``GET /api/catalog``.
    catalog_requests: int = 0
    url: str = ""

    async def __aenter__(self) -> FakeGateway:
        self._server = await serve(
            self._handler, "127.0.0.1", 0, compression=None, process_request=self._http
        )
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}/paystream/2"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self._server.wait_closed()

    def _http(self, ws: ServerConnection, request: Any) -> Any:
        """``GET /api/catalog`` (and ``/api/channel/<id>``) as the real gateway answers
        them; WebSockets elsewhere."""
        if request.path.startswith("/api/channel/"):
            answer = self.api.get(request.path.removeprefix("/api/channel/"))
            if answer is None:
                return ws.respond(404, "no such channel")
            response = ws.respond(200, json.dumps(answer))
            response.headers["Content-Type"] = "application/json"
            return response
        if request.path != "/api/catalog":
            return None
        self.catalog_requests += 1
        items = [
            {"id": media, "title": "Fake", "publisher": "fake", "rate": self.rate_msat / 1000,
             "rate_msat": self.rate_msat, "free_seconds": FREE_MS / 1000,
             "duration_ms": self.chunks * CHUNK_MS, "mime": "video/mp4"}
            for media in self.catalog
        ]
        response = ws.respond(200, json.dumps(items))
        response.headers["Content-Type"] = "application/json"
        return response

    def received_of(self, kind: type[Message]) -> list[Any]:
        """Messages of one type the fake received, in order."""
        return [m for m in self.received if isinstance(m, kind)]

    def _closed(self, channel: ServerChannel) -> Closed:
        """``closed``: txid null; or, with ``settle``, the settlement built now."""
        txid = None
        if self.settle and channel.channel_id is not None:
            channel.close()
            claim = channel.claim()
            assert claim is not None
            batch = build_batch([claim], b"\x00\x14" + b"\x33" * 20, self.feerate).batch
            assert batch is not None
            tx = CMutableTransaction.from_tx(parse_tx(batch.tx))
            if self.tamper is not None:
                self.tamper(tx)
            raw = bytes(tx.serialize())
            txid = txid_of(raw)
            channel.settled_in(txid)
            self.api[channel.channel_id] = {
                "channel_id": channel.channel_id, "state": "closing", "value": channel.value,
                "paid": channel.paid, "balance": channel.balance, "exit_fee": channel.exit_fee,
                "settle_by": None,
                "settlement": {"txid": txid, "tx": raw.hex(), "fee": None, "vsize": None,
                               "input_values": [channel.value], "state": "broadcast",
                               "confirmations": None},
            }
        return Closed(
            txid=txid, paid=channel.paid, balance=channel.balance or 0, exit_fee=channel.exit_fee
        )

    @staticmethod
    def media(index: int) -> bytes:
        """The fake media bytes of chunk ``index`` (-1: the init segment)."""
        return f"<chunk {index}>".encode() * 3

    async def _handler(self, ws: ServerConnection) -> None:
        inbox: asyncio.Queue[Message] = asyncio.Queue()

        async def reader() -> None:
            async for frame in ws:
                msg = parse_client_message(frame)
                self.received.append(msg)
                await inbox.put(msg)

        # The session ends when either side is done: the fake never waits on a closed socket.
        tasks = {asyncio.create_task(reader()), asyncio.create_task(self._session(ws, inbox))}
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in done:
            if not isinstance(task.exception(), websockets.exceptions.ConnectionClosed | None):
                raise task.exception()  # type: ignore[misc]

    async def _session(self, ws: ServerConnection, inbox: asyncio.Queue[Message]) -> None:
        async def send(msg: Message | bytes) -> None:
            await ws.send(msg if isinstance(msg, bytes) else encode(msg))

        nonce = os.urandom(32)
        assert isinstance(await inbox.get(), Hello)
        await send(
            ServerHello(version=2, agent="fake", network="regtest", nonce=nonce, limits=self.limits)
        )
        channel: ServerChannel | None = None
        now = int(time.time())
        while True:
            msg = await inbox.get()
            try:
                if isinstance(msg, Open):
                    channel = ServerChannel.open(
                        msg,
                        server_privkey=self.privkey,
                        limits=self.limits,
                        network="regtest",
                        now=now,
                        tip_height=self.tip_height,
                        feerate=self.feerate,
                    )
                    await send(channel.terms())
                elif isinstance(msg, Refund):
                    assert channel is not None
                    await send(channel.sign_refund(msg))
                elif isinstance(msg, Fund):
                    assert channel is not None and msg.tx is not None
                    vout, value = find_funding_output(msg.tx, channel.script.script_pubkey)
                    outpoint = Outpoint(txid_of(msg.tx), vout)
                    channel.accept_funding(outpoint, value, channel.script.script_pubkey)
                    self.channels[outpoint.channel_id] = channel
                    self.meters[outpoint.channel_id] = ServerMeter(reserve=channel.exit_fee)
                    await send(channel.confirm())
                elif isinstance(msg, Resume):
                    if msg.channel_id not in self.channels:
                        raise ProtocolError(ErrorCode.CHANNEL_UNKNOWN, "no such channel")
                    channel = self.channels[msg.channel_id]
                    await send(
                        channel.check_resume(msg, nonce=nonce, now=now, tip_height=self.tip_height)
                    )
                elif isinstance(msg, Play):
                    assert channel is not None and channel.channel_id is not None
                    if not await self._stream(send, inbox, channel, msg):
                        return
                elif isinstance(msg, Close) and self.answer_close:
                    assert channel is not None
                    await send(self._closed(channel))
                    return
                elif not isinstance(msg, Close):
                    raise ProtocolError(ErrorCode.BAD_STATE, f"fake: unexpected {msg.type}")
            except ProtocolError as exc:
                await send(Error.from_exception(exc))

    async def _stream(
        self, send: Any, inbox: asyncio.Queue[Message], channel: ServerChannel, play: Play
    ) -> bool:
        """Stream ``play.media``; False once the session closed."""
        assert channel.channel_id is not None
        meter = self.meters[channel.channel_id]
        media = play.media
        if media == "missing":
            await send(Error(code=ErrorCode.MEDIA_UNKNOWN, message="no such media", fatal=False))
            return True
        await send(
            Stream(
                media=media,
                title="Fake",
                mime="video/mp4",
                rate_msat=self.rate_msat,
                free_ms=FREE_MS,
                free_used_ms=meter.free_used_ms(media, FREE_MS),
                duration_ms=self.chunks * CHUNK_MS,
                chunks=self.chunks,
            )
        )
        first = min(play.start_ms // CHUNK_MS, self.chunks)
        for index in [-1, *range(first, self.chunks)]:
            quote = meter.quote(
                media,
                index,
                0 if index < 0 else CHUNK_MS,
                rate_msat=self.rate_msat,
                free_ms=FREE_MS,
            )
            asked = quote.total + (1 if index == self.overcharge_at else 0)
            while channel.paid < quote.total or not inbox.empty():
                if channel.paid < quote.total:
                    await send(Due(total=asked, media=media, index=index, duration_ms=CHUNK_MS))
                msg = await inbox.get()
                if isinstance(msg, Pay):
                    if index == self.drop_pay_at:
                        self.drop_pay_at = None
                        return False  # the increment is lost in flight with the connection
                    try:
                        channel.commit_payment(
                            channel.receive_payment(
                                msg, now=int(time.time()), tip_height=self.tip_height
                            )
                        )
                    except ProtocolError as exc:
                        await send(Error.from_exception(exc))
                        continue
                    await send(channel.paid_message())
                elif isinstance(msg, Close) and self.answer_close:
                    await send(self._closed(channel))
                    return False
            data = self.media(index)
            await send(
                Chunk(
                    media=media,
                    index=index,
                    start_ms=max(0, index) * CHUNK_MS,
                    duration_ms=0 if index < 0 else CHUNK_MS,
                    size=len(data),
                )
            )
            await send(data)
            meter.commit(quote)
            if self.delay:
                await asyncio.sleep(self.delay)
        await send(End(media=media, reason="finished"))
        return True


# -- helpers ---------------------------------------------------------------------


def _expected_stream(chunks: int) -> bytes:
    return b"".join(FakeGateway.media(i) for i in range(-1, chunks))


def _honest_total(chunks_paid_through: int, rate_msat: int = RATE_MSAT) -> int:
    """Section 7 total (sat) once chunks 0..n are delivered (first FREE_MS free)."""
    charged_ms = max(0, (chunks_paid_through + 1) * CHUNK_MS - FREE_MS)
    return -(-rate_msat * charged_ms // 1_000_000)


def _player(gw: FakeGateway, data_dir: Path, wallet: Wallet | None, **options: Any) -> Player:
    store = Keystore(data_dir)
    return Player(gw.url, store, wallet=wallet, **options)


async def _mine(rpc: RpcClient, blocks: int) -> int:
    address = await rpc.call("getnewaddress")
    await rpc.call("generatetoaddress", blocks, address)
    return int(await rpc.call("getblockcount"))


# -- keystore ----------------------------------------------------------------------


def test_keystore_is_private_and_keeps_k1(tmp_path: Path) -> None:
    data_dir = tmp_path / "player"
    with Keystore(data_dir) as store:
        k1 = store.privkey
        assert len(store.pubkey) == 33
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    for path in data_dir.iterdir():
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, path
    with Keystore(data_dir) as store:
        assert store.privkey == k1
    with Keystore(tmp_path / "other") as other:
        assert other.privkey != k1


def _stored_cltv_channel(store: Keystore, *, value: int = 50_000) -> int:
    server_pubkey = coincurve.PrivateKey().public_key.format(compressed=True)
    rec = store.add_channel(
        gateway_url="ws://gw/paystream/2",
        network="regtest",
        kind="cltv",
        server_pubkey=server_pubkey,
        expiry=int(time.time()) + 86_400,
        change_script=b"\x00\x14" + b"\x11" * 20,
        refund_script=b"\x00\x14" + b"\x11" * 20,
    )
    store.update(rec.id, txid="ab" * 32, vout=1, value=value, state=ChannelState.READY)
    return rec.id


def _hello() -> ServerHello:
    return ServerHello(
        version=2, agent="t", network="regtest", nonce=os.urandom(32), limits=_limits()
    )


def test_keystore_payment_state_survives_reload_and_never_goes_back(tmp_path: Path) -> None:
    with Keystore(tmp_path) as store:
        cid = _stored_cltv_channel(store)
        store.record_payment(cid, seq=1, balance=49_000, sig=b"\x30sig", bill=7)
        store.record_payment(cid, seq=2, balance=48_000, sig=b"\x30sig2", bill=9)
    with Keystore(tmp_path) as store:
        rec = store.get(cid)
        assert (rec.seq, rec.balance, rec.sig, rec.bill, rec.paid) == (
            2,
            48_000,
            b"\x30sig2",
            9,
            2_000,
        )
        with pytest.raises(KeystoreError, match="not above"):
            store.record_payment(cid, seq=2, balance=47_000, sig=b"x", bill=9)
        with pytest.raises(KeystoreError, match="above the stored"):
            store.record_payment(cid, seq=3, balance=48_001, sig=b"x", bill=9)
        with pytest.raises(KeystoreError):
            store.update(cid, seq=1)
        # The rebuilt channel signs the next seq, never a stored one again.
        hello = _hello()
        channel = restore_channel(rec, store.privkey, hello)
        assert (channel.seq, channel.balance, channel.meter.bill) == (2, 48_000, 9)
        channel.on_ready(
            Ready(
                channel_id=rec.channel_id or "",
                value=50_000,
                balance=48_000,
                paid=2_000,
                expiry=rec.expiry,
                exit_fee=0,
            )
        )
        pay = channel.pay(2_500)
        assert (pay.seq, pay.balance) == (3, 47_500)
        store.record_payment(cid, seq=pay.seq, balance=pay.balance, sig=pay.sig, bill=9)
        assert store.find(rec.channel_id or "").seq == 3
        assert store.find("abababab").id == cid
        with pytest.raises(KeystoreError, match="no channel"):
            store.find("cdcdcdcd")


def test_parse_expiry_and_resolve() -> None:
    assert parse_expiry("6h") == ExpirySpec(seconds=21_600)
    assert parse_expiry("90m") == ExpirySpec(seconds=5_400)
    assert parse_expiry("3600") == ExpirySpec(seconds=3_600)
    assert parse_expiry("h:250") == ExpirySpec(height=250)
    for bad in ("", "-5", "6x", "h:", "h:abc", "h:600000000", "0"):
        with pytest.raises(ValueError):
            parse_expiry(bad)
    limits = _limits(min_expiry_s=3600, max_expiry_s=2 * 86_400)
    now = 1_800_000_000
    assert ExpirySpec().resolve(limits, now=now, tip_height=None) == now + 86_400
    short = _limits(min_expiry_s=600, max_expiry_s=7200)
    assert ExpirySpec().resolve(short, now=now, tip_height=None) == now + 7200
    assert ExpirySpec(seconds=7200).resolve(limits, now=now, tip_height=None) == now + 7200
    with pytest.raises(PlayerError, match="outside"):
        ExpirySpec(seconds=600).resolve(limits, now=now, tip_height=None)
    assert ExpirySpec(height=110).resolve(limits, now=now, tip_height=100) == 110
    with pytest.raises(PlayerError, match="1200 s away"):
        ExpirySpec(height=102).resolve(limits, now=now, tip_height=100)
    with pytest.raises(PlayerError, match="wallet-rpc"):
        ExpirySpec(height=110).resolve(limits, now=now, tip_height=None)


def test_gateway_url_is_checked() -> None:
    assert check_gateway_url("ws://127.0.0.1:8080/paystream/2")
    for bad in ("http://host/paystream/2", "ws://", "host:80", "ws://h:99999999/"):
        with pytest.raises(PlayerError, match="bad gateway URL"):
            check_gateway_url(bad)


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out.mp4")
    assert cli.main(["play", "http://x/", "m", "--data-dir", str(tmp_path), "--out", out]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad gateway URL" in err
    assert not os.path.exists(out)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"ws://127.0.0.1:{port}/paystream/2"
    assert cli.main(["play", url, "m", "--data-dir", str(tmp_path), "--out", out]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot connect" in err
    with Keystore(tmp_path) as store:
        _stored_cltv_channel(store)
    assert cli.main(["channels", "--data-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == [
        "id",
        "channel",
        "gateway",
        "kind",
        "value",
        "paid",
        "exit_fee",
        "balance",
        "expiry",
        "state",
        "settlement",
    ]
    assert table[1].split()[:8] == [
        "1",
        "ab" * 32 + ":1",
        "ws://gw/paystream/2",
        "cltv",
        "50000",
        "0",
        "0",
        "50000",
    ]
    assert table[1].split()[-2:] == ["ready", "-"]


# -- playing against the fake gateway, funded on the real embedded node -------------


async def test_play_cltv_pays_the_metered_total_and_closes(
    node: Any, rpc: RpcClient, tmp_path: Path
) -> None:
    progress: list[Progress] = []
    out = tmp_path / "media.bin"
    async with FakeGateway() as gw:
        wallet = Wallet.connect(node.rpc_url, cookie_path=node.cookie_path)
        with out.open("wb") as f:
            player = _player(
                gw, tmp_path / "p", wallet, budget=20_000, out=f, on_progress=progress.append
            )
            result = await player.play("film")
        await wallet.close()
    assert result.reason == "finished" and result.closed and not result.resumed
    assert result.chunks == 6 and result.media_ms == 6 * CHUNK_MS
    # The fake offers no features (an older gateway): every pay went as JSON.
    assert not player.pay_binary and player.binary_pays == 0
    assert out.read_bytes() == _expected_stream(6)
    assert result.paid == _honest_total(5) == 10
    assert result.balance == 20_000 - 10
    rec = result.channel
    # The fake's `closed` names no settlement and no settle_by: nothing is broadcast.
    assert rec.state == ChannelState.UNSETTLED and rec.value == 20_000 and rec.seq >= 1
    # The funding output is real and pays exactly the budget to the channel script.
    txout = await rpc.call("gettxout", rec.txid, rec.vout, True)
    assert int(txout["value"] * 100_000_000) == 20_000
    # Never more than one chunk ahead: each pay follows the chunk before it.
    assert [p.paid for p in progress if p.status == "playing"][-1] == 10
    assert min(p.free_left_ms for p in progress if p.status == "playing") == 0
    gw_channel = gw.channels[rec.channel_id or ""]
    assert (gw_channel.seq, gw_channel.balance) == (rec.seq, rec.balance)


async def test_cltv_refund_rejected_before_expiry_accepted_after(
    node: Any, rpc: RpcClient, tmp_path: Path
) -> None:
    tip = int(await rpc.call("getblockcount"))
    expiry = tip + 4  # 2400 s away: inside the fake's window
    async with FakeGateway(tip_height=tip) as gw:
        wallet = Wallet.connect(node.rpc_url, cookie_path=node.cookie_path)
        player = _player(gw, tmp_path, wallet, budget=5_000, expiry=ExpirySpec(height=expiry))
        result = await player.play("film", max_chunks=1, keep_open=True)
        assert result.reason == "max_chunks" and not result.closed
        rec = result.channel
        assert rec.state == ChannelState.READY and rec.expiry == expiry
        with pytest.raises(PlayerError, match=f"not valid before its expiry \\(block {expiry + 1}"):
            await refund_channel(player.store, wallet, rec)
        await _mine(rpc, expiry - 1 - tip)  # tip = expiry - 1: the next block is `expiry`
        with pytest.raises(PlayerError, match="not valid before"):
            await refund_channel(player.store, wallet, rec)
        await _mine(rpc, 1)  # the next block is expiry + 1: nLockTime is satisfied
        txid = await refund_channel(player.store, wallet, rec)
        await _mine(rpc, 1)
        await wallet.close()
    assert await rpc.call("gettxout", rec.txid, rec.vout, True) is None
    refund = await get_transaction(rpc, txid)
    assert refund["confirmations"] == 1 and refund["locktime"] == expiry
    assert player.store.get(rec.id).state == ChannelState.REFUNDED
    with pytest.raises(PlayerError, match="already refunded"):
        await refund_channel(player.store, wallet, player.store.get(rec.id))


async def test_multisig_t2_signed_before_t1_broadcast_and_refund_cli(
    node: Any, rpc: RpcClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tip = int(await rpc.call("getblockcount"))
    expiry = tip + 3
    async with FakeGateway(tip_height=tip) as gw:
        wallet = Wallet.connect(node.rpc_url, cookie_path=node.cookie_path)
        player = _player(
            gw, tmp_path, wallet, budget=30_000, kind="multisig", expiry=ExpirySpec(height=expiry)
        )
        result = await player.play("film", max_chunks=4)
        await wallet.close()
    assert result.reason == "max_chunks" and result.closed
    assert result.paid == _honest_total(3) == 5
    kinds = [type(m) for m in gw.received if isinstance(m, Refund | Fund)]
    assert kinds == [Refund, Fund]
    rec = result.channel
    # T1 spends only segwit outputs, each input signed with a witness.
    t1 = parse_tx(rec.funding_tx or b"")
    assert len(t1.wit.vtxinwit) == len(t1.vin) > 0
    for txin in t1.vin:
        prev = await get_transaction(rpc, txin.prevout.hash[::-1].hex())
        spk = bytes.fromhex(prev["vout"][txin.prevout.n]["scriptPubKey"]["hex"])
        assert is_segwit_script(spk)
    script = ChannelScript.make("multisig", player.store.pubkey, rec.server_pubkey, expiry)
    assert find_funding_output(rec.funding_tx or b"", script.script_pubkey) == (rec.vout, 30_000)
    assert (await rpc.call("gettxout", rec.txid, rec.vout, True)) is not None  # broadcast
    # The stored T2 (signed by the gateway, then by us) refunds alone after expiry.
    args = [
        "refund",
        "1",
        "--data-dir",
        str(tmp_path),
        "--wallet-rpc",
        node.rpc_url,
        "--wallet-cookie",
        str(node.cookie_path),
    ]
    assert await asyncio.to_thread(cli.main, args) == 1
    assert "not valid before its expiry" in capsys.readouterr().err
    await _mine(rpc, expiry - tip)
    assert await asyncio.to_thread(cli.main, args) == 0
    assert "refund broadcast in" in capsys.readouterr().out
    await _mine(rpc, 1)
    assert await rpc.call("gettxout", rec.txid, rec.vout, True) is None


async def test_overcharge_closes_exits_3_and_never_signs_it(
    node: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with FakeGateway(overcharge_at=3) as gw:
        args = [
            "play",
            gw.url,
            "film",
            "--budget",
            "20000",
            "--out",
            str(tmp_path / "m"),
            "--data-dir",
            str(tmp_path),
            "--wallet-rpc",
            node.rpc_url,
            "--wallet-cookie",
            str(node.cookie_path),
        ]
        assert await asyncio.to_thread(cli.main, args) == cli.EXIT_OVERCHARGE
    # The error is one line, the last (progress lines come before it: not a terminal).
    err = capsys.readouterr().err.strip().splitlines()
    assert "overcharges" in err[-1] and [e for e in err if e.startswith("player:")] == err[-1:]
    assert gw.received_of(Close), "the player sends close on an overcharge"
    pays = gw.received_of(Pay)
    # Chunk 2 (the first paid one) was paid; chunk 3's inflated due never was.
    assert [20_000 - p.balance for p in pays] == [_honest_total(2)]
    with Keystore(tmp_path) as store:
        (rec,) = store.channels()
        assert rec.state == ChannelState.UNSETTLED and rec.paid == _honest_total(2)


async def test_budget_stops_before_paying_past_it(node: Any, tmp_path: Path) -> None:
    # 150 sat per 1 s chunk after 2 free ones: totals 150, 300, 450, then 600 would leave
    # 400 sat, dust, in a 1000 sat channel: the player stops rather than pay 1000.
    async with FakeGateway(rate_msat=150_000) as gw:
        wallet = Wallet.connect(node.rpc_url, cookie_path=node.cookie_path)
        player = _player(gw, tmp_path, wallet, budget=1_000)
        result = await player.play("film")
        await wallet.close()
    assert result.reason == "budget" and result.closed
    assert result.paid == 450 and result.chunks == 5
    assert [1_000 - p.balance for p in gw.received_of(Pay)] == [150, 300, 450]


async def test_resume_continues_the_channel_and_reopens_when_unknown(
    node: Any, tmp_path: Path
) -> None:
    async with FakeGateway() as gw:
        wallet = Wallet.connect(node.rpc_url, cookie_path=node.cookie_path)
        first = await _player(gw, tmp_path, wallet, budget=20_000).play(
            "film", max_chunks=4, keep_open=True
        )
        assert not first.closed and first.paid == _honest_total(3)
        # A later run needs no wallet: it resumes with the section 5 proof.
        second = await _player(gw, tmp_path, None).play("film", start_ms=4_000)
        assert second.resumed and second.channel.id == first.channel.id
        assert second.reason == "finished" and second.closed
        assert second.paid == _honest_total(5)  # the free minute was not granted twice
        assert second.channel.seq > first.channel.seq
        assert len(gw.received_of(Resume)) == 1
        third_dir = tmp_path / "third"
        third = await _player(gw, third_dir, wallet, budget=20_000).play(
            "film", max_chunks=1, keep_open=True
        )
        gw.channels.clear()  # the gateway forgot it: the next run opens a new channel
        fourth = await _player(gw, third_dir, wallet, budget=20_000).play("film", max_chunks=1)
        await wallet.close()
    assert not fourth.resumed and fourth.channel.id != third.channel.id
    with Keystore(third_dir) as store:
        assert store.get(third.channel.id).state == ChannelState.CLOSED


async def test_gateway_error_and_no_wallet(node: Any, tmp_path: Path) -> None:
    async with FakeGateway() as gw:
        with pytest.raises(PlayerError, match="wallet-rpc"):
            await _player(gw, tmp_path, None).play("film")
        wallet = Wallet.connect(node.rpc_url, cookie_path=node.cookie_path)
        with pytest.raises(GatewayError, match="media_unknown") as info:
            await _player(gw, tmp_path, wallet).play("missing")
        assert info.value.code == ErrorCode.MEDIA_UNKNOWN
        # The channel stays resumable: the next run resumes it, unless told not to.
        fresh = await _player(gw, tmp_path, wallet, new_channel=True).play("film", max_chunks=1)
        result = await _player(gw, tmp_path, None).play("film", max_chunks=1)
        await wallet.close()
    assert not fresh.resumed and fresh.channel.id == 2
    assert result.resumed and result.closed and result.channel.id == 1


async def test_sigint_closes_cleanly(node: Any, tmp_path: Path) -> None:
    out = tmp_path / "media.bin"
    async with FakeGateway(chunks=40, delay=0.2) as gw:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "player.cli",
            "play",
            gw.url,
            "film",
            "--out",
            str(out),
            "--data-dir",
            str(tmp_path),
            "--wallet-rpc",
            node.rpc_url,
            "--wallet-cookie",
            str(node.cookie_path),
            stderr=asyncio.subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while len(gw.received_of(Pay)) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    lines = err.decode().splitlines()
    assert lines[-2].startswith("stopped:")
    # The fake broadcasts nothing: the last line says how the value comes back.
    assert lines[-1] == (
        "the gateway broadcasts no settlement: your 100000 sat come back by refund after "
        "expiry with `player refund 1`"
    )
    assert gw.received_of(Close)
    with Keystore(tmp_path) as store:
        (rec,) = store.channels()
        assert rec.state == ChannelState.UNSETTLED
    assert out.read_bytes() == _expected_stream(40)[: out.stat().st_size]


def test_cli_usage_errors_and_progress_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for bad in (["--expiry", "6x"], ["--budget", "-1"], ["--max-chunks", "0"]):
        with pytest.raises(SystemExit) as info:
            cli.main(["play", "ws://h:1/paystream/2", "m", "--data-dir", str(tmp_path), *bad])
        assert info.value.code == 2
    assert "bad expiry '6x'" in capsys.readouterr().err

    class Tty:
        def __init__(self) -> None:
            self.text = ""

        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> None:
            self.text += text

        def flush(self) -> None:
            pass

    tty = Tty()
    line = cli.ProgressLine(tty)  # type: ignore[arg-type]
    line(Progress(status="funding", confirmations=0, needed=1))
    line(
        Progress(
            status="playing",
            media="film",
            media_ms=70_000,
            position_ms=65_000,
            duration_ms=3_600_000,
            free_left_ms=0,
            rate_msat=2_500,
            paid=13,
            balance=19_987,
        )
    )
    line.done()
    shown = tty.text.split("\r\x1b[2K")
    assert shown[1] == "funding: 0/1 confirmations"
    assert shown[2] == (
        "film 1:05/1:00:00  free left 0s  paid 13 sat  balance 19987 sat  rate 2.5 sat/s\n"
    )


async def test_increment_lost_in_flight_is_sent_again_on_resume(node: Any, tmp_path: Path) -> None:
    async with FakeGateway(drop_pay_at=3) as gw:
        wallet = Wallet.connect(node.rpc_url, cookie_path=node.cookie_path)
        with pytest.raises(PlayerError, match="closed the connection"):
            await _player(gw, tmp_path, wallet, budget=20_000).play("film")
        await wallet.close()
        with Keystore(tmp_path) as store:
            (lost,) = store.channels()
        gw_channel = gw.channels[lost.channel_id or ""]
        assert lost.paid == _honest_total(3) and gw_channel.paid == _honest_total(2)
        result = await _player(gw, tmp_path, None).play("film", start_ms=3_000)
    assert result.resumed and result.reason == "finished"
    assert result.paid == _honest_total(5) == gw_channel.paid
    pays = gw.received_of(Pay)
    # The lost increment went out twice, byte for byte; no seq was ever signed twice.
    assert pays[1] == pays[2] and pays[1].seq == lost.seq
    assert [p.seq for p in pays[2:]] == list(range(lost.seq, lost.seq + len(pays) - 2))


async def test_close_waits_for_closed_with_a_timeout(node: Any, tmp_path: Path) -> None:
    async with FakeGateway(answer_close=False) as gw:
        wallet = Wallet.connect(node.rpc_url, cookie_path=node.cookie_path)
        player = _player(gw, tmp_path, wallet, budget=20_000, close_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(PlayerError, match=r"no 'closed' from the gateway within 0\.3 s"):
            await player.play("film", max_chunks=1)
        await wallet.close()
    assert 0.3 <= time.monotonic() - started < 5
    assert gw.received_of(Close)
    (rec,) = player.store.channels()
    assert rec.state == ChannelState.CLOSING


class _WatchedWallet(Wallet):
    """The real wallet, noting what the keystore held when T1 went out."""

    store: Keystore
    at_broadcast: list[Any]

    async def broadcast(self, tx: bytes) -> str:
        self.at_broadcast.append(self.store.get(1))
        return await super().broadcast(tx)


async def test_cltv_t1_and_its_refund_are_stored_before_t1_is_broadcast(
    node: Any, rpc: RpcClient, tmp_path: Path
) -> None:
    """No crash can leave the budget at a channel output the player cannot refund."""
    async with FakeGateway() as gw:
        wallet = _WatchedWallet.connect(node.rpc_url, cookie_path=node.cookie_path)
        assert isinstance(wallet, _WatchedWallet)
        player = _player(gw, tmp_path, wallet, budget=20_000)
        wallet.store, wallet.at_broadcast = player.store, []
        result = await player.play("film", max_chunks=1)
        await wallet.close()
    [before] = wallet.at_broadcast
    assert before.state == ChannelState.REFUND_SIGNED
    assert before.funding_tx is not None and before.signed_refund is not None
    assert txid_of(before.funding_tx) == before.txid == result.channel.txid
    # What was stored is what the node has: the refund spends that very output.
    assert (await rpc.call("gettxout", before.txid, before.vout, True)) is not None
    refund = parse_tx(before.signed_refund)
    assert (refund.vin[0].prevout.hash[::-1].hex(), refund.vin[0].prevout.n) == (
        before.txid,
        before.vout,
    )


# -- everyday mistakes (issue 14) -----------------------------------------------------


def _play_args(gw: FakeGateway, node: Any, tmp_path: Path, media: str, *extra: str) -> list[str]:
    return [
        "play", gw.url, media, "--out", str(tmp_path / "out.bin"), "--data-dir",
        str(tmp_path / "p"), "--wallet-rpc", node.rpc_url, "--wallet-cookie",
        str(node.cookie_path), *extra,
    ]


async def test_an_unknown_media_id_is_refused_before_any_money_moves(
    node: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 14 item 9: the catalog is read first; nothing is opened, funded or written."""
    async with FakeGateway(catalog=("film", "song")) as gw:
        code = await asyncio.to_thread(
            cli.main, _play_args(gw, node, tmp_path, "missing", "--budget", "20000")
        )
        assert gw.catalog_requests == 1
    assert code == cli.EXIT_ERROR
    web = gw.url.replace("ws://", "http://").removesuffix("/paystream/2")
    assert capsys.readouterr().err == (
        f"player: no media 'missing' in the gateway's catalog (it has: film, song); "
        f"see {web}/ or {web}/api/catalog\n"
    )
    assert gw.received == []  # not even a hello
    # No output file, not even the player's data dir (so no channel, no key).
    assert not (tmp_path / "out.bin").exists() and not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ("60000", "budget 60000 sat is above the gateway's largest channel, 50000 sat: "
                  "use --budget 50000 or less"),
        ("999", "budget 999 sat is below the gateway's smallest channel, 1000 sat: "
                "use --budget 1000 or more"),
    ],
)
async def test_a_budget_outside_the_gateways_limits_is_refused_not_clamped(
    node: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], budget: str, message: str
) -> None:
    """Issue 14 item 10: one line naming the limit; no channel is opened or funded."""
    async with FakeGateway(limits=_limits(max_value=50_000)) as gw:
        code = await asyncio.to_thread(
            cli.main, _play_args(gw, node, tmp_path, "film", "--budget", budget)
        )
    assert code == cli.EXIT_ERROR
    assert capsys.readouterr().err == f"player: {message}\n"
    assert not gw.received_of(Open) and not gw.received_of(Fund)
    with Keystore(tmp_path / "p") as store:
        assert store.channels() == []


def test_progress_off_a_terminal_is_plain_lines_every_few_seconds() -> None:
    """Issue 14 item 13: no carriage returns; a line per status, and while playing one
    every ``interval`` seconds."""

    class Pipe:
        def __init__(self) -> None:
            self.text = ""

        def isatty(self) -> bool:
            return False

        def write(self, text: str) -> None:
            self.text += text

        def flush(self) -> None:
            pass

    now = [100.0]
    pipe = Pipe()
    line = cli.ProgressLine(pipe, interval=5.0, clock=lambda: now[0])  # type: ignore[arg-type]
    line(Progress(status="funding", confirmations=0, needed=1))
    playing = Progress(status="playing", media="film", duration_ms=60_000, rate_msat=2_000,
                       balance=20_000)
    for second in range(12):
        now[0] = 101.0 + second
        line(dataclasses.replace(playing, position_ms=second * 1000))
    line.note("a note")
    line(dataclasses.replace(playing, status="closing", position_ms=12_000))
    line.done()
    assert "\r" not in pipe.text and "\x1b" not in pipe.text
    assert pipe.text.splitlines() == [
        "funding: 0/1 confirmations",
        "film 0:00/1:00  free left 0s  paid 0 sat  balance 20000 sat  rate 2 sat/s",
        "film 0:05/1:00  free left 0s  paid 0 sat  balance 20000 sat  rate 2 sat/s",
        "film 0:10/1:00  free left 0s  paid 0 sat  balance 20000 sat  rate 2 sat/s",
        "a note",
        "film 0:12/1:00  free left 0s  paid 0 sat  balance 20000 sat  rate 2 sat/s  [closing]",
    ]


async def _player_process(gw: FakeGateway, node: Any, tmp_path: Path) -> Any:
    """``player play`` as a process whose stderr is a pipe (not a terminal)."""
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "player.cli",
        *_play_args(gw, node, tmp_path, "film", "--budget", "20000", "--no-pace"),
        stderr=asyncio.subprocess.PIPE,
    )


async def test_sigterm_closes_like_ctrl_c_and_progress_shows_in_a_pipe(
    node: Any, tmp_path: Path
) -> None:
    """Issue 14 item 13: killed by ``timeout`` (SIGTERM), the player closes the channel
    and prints its summary; its progress reaches a pipe as plain lines."""
    async with FakeGateway(chunks=40, delay=0.2) as gw:
        proc = await _player_process(gw, node, tmp_path)
        deadline = time.monotonic() + 30
        while len(gw.received_of(Pay)) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 30)
    text = err.decode()
    assert proc.returncode == 0, text
    assert "\r" not in text
    lines = text.splitlines()
    assert any(line.startswith("film 0:0") and "paid" in line for line in lines), text
    assert lines[-2].startswith("stopped:") and lines[-2].endswith("closed")
    assert lines[-1].startswith("the gateway broadcasts no settlement: ")
    assert gw.received_of(Close)
    with Keystore(tmp_path / "p") as store:
        (rec,) = store.channels()
        assert rec.state == ChannelState.UNSETTLED


async def test_a_resumed_channel_is_named_budget_caps_the_run_and_media_goes_on(
    node: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 14 item 11: the player says which channel it resumes and what it holds;
    ``--budget`` caps what the run pays more; the media goes on after the last chunk
    received (nothing paid twice) unless ``--from``; from the start once finished."""
    async with FakeGateway(chunks=10) as gw:

        async def play(*extra: str) -> list[str]:
            args = _play_args(gw, node, tmp_path, "film", "--no-pace", *extra)
            assert await asyncio.to_thread(cli.main, args) == 0
            return capsys.readouterr().err.splitlines()

        await play("--budget", "20000", "--max-chunks", "4", "--keep-open")
        with Keystore(tmp_path / "p") as store:
            (rec,) = store.channels()
            assert rec.paid == _honest_total(3) == 5 and store.position(rec.id, "film") == 4000

        err = await play("--budget", "3", "--keep-open")
        assert err[:2] == [
            "resuming channel 1 (value 20000, paid 5, balance 19995 sat, exit fee 0 sat); "
            "this run pays at most 3 sat",
            "film goes on at 0:04 (--from 0 starts it over)",
        ]
        assert err[-1].startswith("budget: 1 chunks") and err[-1].endswith("still open")
        assert gw.channels[rec.channel_id or ""].paid == _honest_total(4) == 8  # 3 more

        err = await play("--max-chunks", "1", "--keep-open")  # no --budget: its balance
        assert err[:2] == [
            "resuming channel 1 (value 20000, paid 8, balance 19992 sat, exit fee 0 sat)",
            "film goes on at 0:05 (--from 0 starts it over)",
        ]

        err = await play("--budget", "50000", "--from", "0:08", "--keep-open")
        assert err[0] == (
            "resuming channel 1 (value 20000, paid 10, balance 19990 sat, exit fee 0 sat); "
            "this run pays at "
            "most 19990 sat (the channel's balance; --new-channel opens another)"
        )
        assert not any(e.startswith("film goes on") for e in err)
        assert err[-1].startswith("finished: 2 chunks")

        err = await play("--max-chunks", "1")  # played to the end: from the start again
        assert err[0] == (
            "resuming channel 1 (value 20000, paid 15, balance 19985 sat, exit fee 0 sat)"
        )
        assert not any(e.startswith("film goes on") for e in err)
    assert [p.start_ms for p in gw.received_of(Play)] == [0, 4000, 5000, 8000, 0]
    assert len(gw.received_of(Open)) == 1


def test_from_is_a_media_time(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parse = cli._parser().parse_args
    for text, ms in (("0", 0), ("90", 90_000), ("1:30", 90_000), ("1:02:03", 3_723_000),
                     ("2.5", 2_500)):
        assert parse(["play", "ws://h:1/paystream/2", "m", "--from", text]).start_ms == ms
    assert parse(["play", "ws://h:1/paystream/2", "m"]).start_ms is None
    for bad in ("1:60", "1:60:00", "x", "-1", "1::2"):
        with pytest.raises(SystemExit):
            parse(["play", "ws://h:1/paystream/2", "m", "--from", bad])
    assert "bad time '-1'" in capsys.readouterr().err


@pytest.mark.parametrize("tampered", [False, True], ids=["as-built", "one-sat-less-change"])
async def test_play_checks_a_settlement_named_in_closed(
    node: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str], tampered: bool
) -> None:
    """A gateway without a settle window names the settlement in ``closed``: ``player
    play`` checks it at once against the channel API. As built by the core it passes
    (never broadcast by this fake, so the viewer's node does not have it: ``settling``,
    not settled); with our change one sat short the check fails, ``play`` exits 4 and
    the channel is not marked settled."""

    def one_sat_less(tx: CMutableTransaction) -> None:
        tx.vout[0].nValue -= 1  # our change, at our input's index

    async with FakeGateway(
        settle=True, feerate=Fraction(2), tamper=one_sat_less if tampered else None
    ) as gw:
        args = _play_args(gw, node, tmp_path, "film", "--budget", "20000", "--no-pace")
        code = await asyncio.to_thread(cli.main, args)
    lines = capsys.readouterr().err.splitlines()
    with Keystore(tmp_path / "p") as store:
        (rec,) = store.channels()
    (answer,) = gw.api.values()
    txid = answer["settlement"]["txid"]
    assert rec.closing_txid == txid and rec.exit_fee > 0
    assert rec.state == ChannelState.SETTLING
    if tampered:
        assert code == cli.EXIT_BAD_SETTLEMENT
        assert lines[-1] == (
            f"player: channel 1: settlement {txid} FAILS the check: our change output is not "
            "our last signed balance; not marked settled"
        )
    else:
        assert code == 0
        assert lines[-1].startswith(
            f"settled by {txid}, checked: your change of {rec.balance} sat, paid {rec.paid} "
            f"sat (exit fee {rec.exit_fee} sat); it pays "
        )
        assert lines[-1].endswith("; not on your node yet (or our change is already spent)")
