"""Reorgs and vanished outputs, made real with ``invalidateblock`` (protocol.md
sections 4 and 8): the gateway follows the best chain by hash.

* a funding reorged out: the session is told (``funding_lost``), no media
  flows until the funding is confirmed again, then ``ready`` and media again;
* a settlement reorged out: the channel is not ``closed`` on the stale block;
  it confirms again (re-admitted by the node, or broadcast again by the
  gateway when the node forgot it) and only then closes;
* a double-spent funding: the channel is marked ``void`` and never streamed on.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxOut
from bitcoin.core.script import CScript
from conftest_gateway import Viewer, gateway_config, node_rpc, ws_url

from gateway.chain.rpc import RpcClient
from gateway.protocol.channel import resume_digest
from gateway.protocol.messages import (
    Chunk,
    Closed,
    Due,
    Error,
    Funding,
    Paid,
    Play,
    Ready,
    Resume,
    Stream,
)
from gateway.protocol.scripts import address_to_script_pubkey
from gateway.protocol.signatures import sign_digest
from gateway.server import Gateway


async def _mine(rpc: RpcClient, n: int = 1) -> list[str]:
    return list(await rpc.call("generatetoaddress", n, await rpc.call("getnewaddress")))


async def _wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def _state(gw: Gateway, channel_id: str) -> str:
    return str(gw.store.read("SELECT state FROM channels WHERE channel_id = ?",
                             (channel_id,))[0]["state"])


async def _fund_unconfirmed(viewer: Viewer) -> str:
    """open → terms → the faucet pays the address → ``fund``: the funding txid."""
    terms = await viewer.open_channel()
    outpoint, value = await viewer.pay_funding_address(terms, 20_000)
    assert viewer.channel is not None
    await viewer.send(viewer.channel.fund(outpoint, value))
    return outpoint.txid


async def _play_some(viewer: Viewer, chunks: int) -> None:
    """``play`` the clip, paying every ``due``, until ``chunks`` media chunks arrived."""
    assert viewer.channel is not None
    await viewer.send(Play(media="clip"))
    viewer.channel.on_stream(await viewer.expect(Stream))
    got = 0
    while got < chunks:
        msg = await viewer.recv()
        if isinstance(msg, Due):
            await viewer.send(viewer.channel.pay_due(msg))
        elif isinstance(msg, Paid):
            viewer.channel.on_paid(msg)
        elif isinstance(msg, Chunk) and msg.index >= 0:
            got += 1


async def test_a_funding_reorged_out_stops_media_until_it_is_confirmed_again(gateway_factory):
    gw = await gateway_factory(limits={"min_conf": 1})
    rpc = node_rpc(gw)
    viewer = Viewer(ws_url(gw), rpc)
    await viewer.connect()
    funding_txid = await _fund_unconfirmed(viewer)
    assert (await viewer.expect(Funding)).confirmations == 0
    (block,) = await _mine(rpc)
    viewer.channel.on_ready(await viewer.expect(Ready))  # type: ignore[union-attr]
    await _play_some(viewer, 2)

    # The block that confirmed the funding leaves the best chain: the funding
    # is back in the mempool, below min_conf.
    await rpc.call("invalidateblock", block)
    assert funding_txid in await rpc.call("getrawmempool")
    while True:  # what was already in flight may still arrive, then the notice
        msg = await viewer.recv()
        if isinstance(msg, Error):
            break
        if isinstance(msg, Due):
            await viewer.send(viewer.channel.pay_due(msg))  # type: ignore[union-attr]
    assert msg.code == "funding_lost" and not msg.fatal
    cid = viewer.channel.outpoint.channel_id  # type: ignore[union-attr]
    assert gw.channels[cid].core.state.value == "funding" and _state(gw, cid) == "funding"
    viewer.channel.on_funding_lost()  # type: ignore[union-attr]
    # No media flows on it meanwhile, whatever the client asks.
    await viewer.send(Play(media="clip"))
    quiet_until = time.monotonic() + 1.5
    while time.monotonic() < quiet_until:
        try:
            msg = await viewer.recv(timeout=quiet_until - time.monotonic())
        except TimeoutError:
            break
        assert not isinstance(msg, Chunk | Stream), msg
        if isinstance(msg, Error):
            assert msg.code == "bad_state" and not msg.fatal
    # A block confirms the funding again: `ready`, and media flows again.
    await _mine(rpc)
    ready = await viewer.expect(Ready)
    viewer.channel.on_ready(ready)  # type: ignore[union-attr]
    assert ready.channel_id == cid
    await _play_some(viewer, 3)
    await rpc.close()


async def test_a_double_spent_funding_is_void_and_never_streamed_on(gateway_factory):
    gw = await gateway_factory(limits={"min_conf": 1})
    rpc = node_rpc(gw)
    viewer = Viewer(ws_url(gw), rpc)
    await viewer.connect()
    funding_txid = await _fund_unconfirmed(viewer)
    assert (await viewer.expect(Funding)).confirmations == 0
    # The same wallet coin, spent elsewhere and mined first (generateblock takes
    # a transaction that conflicts with the mempool, as Bitcoin Core's does).
    funding = CTransaction.deserialize(
        bytes.fromhex(await rpc.call("getrawtransaction", funding_txid))
    )
    coin = funding.vin[0].prevout
    payee = address_to_script_pubkey(await rpc.call("getnewaddress"), "regtest")
    conflict = CTransaction(
        [CTxIn(COutPoint(coin.hash, coin.n), nSequence=0xFFFFFFFD)],
        [CTxOut(sum(o.nValue for o in funding.vout) - 1_000, CScript(payee))],
        nVersion=2,
    )
    signed = await rpc.call("signrawtransactionwithwallet", conflict.serialize().hex())
    assert signed["complete"]
    await rpc.call("generateblock", await rpc.call("getnewaddress"), [signed["hex"]])
    assert funding_txid not in await rpc.call("getrawmempool")
    # Gone: still waiting; one block later (the settle depth on regtest) void.
    await _mine(rpc)
    error = await viewer.expect(Error)
    assert error.code == "funding_spent" and error.fatal
    cid = f"{funding_txid}:{viewer.channel.outpoint.vout}"  # type: ignore[union-attr]
    await _wait_for(lambda: _state(gw, cid) == "void")
    assert not any(isinstance(m, Ready | Chunk) for m in viewer.log)
    # A resume of it is refused: the channel is over.
    again = Viewer(ws_url(gw), rpc)
    hello = await again.connect()
    proof = sign_digest(viewer.key.secret, resume_digest(cid, hello.nonce))
    await again.send(Resume(channel_id=cid, proof=proof))
    refused = await again.expect(Error)
    assert refused.code == "channel_closed" and refused.fatal
    await rpc.close()


async def test_a_ready_channel_whose_funding_is_double_spent_stops_at_once(gateway_factory):
    # min_conf 0 (regtest's default): media flows on an unconfirmed funding.
    # With a settle depth of 2 its double spend stops the media at once
    # (funding_lost) and voids the channel once the double spend is 2 deep.
    gw = await gateway_factory(settle_confirmations=2)
    rpc = node_rpc(gw)
    viewer = Viewer(ws_url(gw), rpc)
    await viewer.connect()
    funding_txid = await _fund_unconfirmed(viewer)
    viewer.channel.on_ready(await viewer.expect(Ready))  # type: ignore[union-attr]
    await _play_some(viewer, 2)
    funding = CTransaction.deserialize(
        bytes.fromhex(await rpc.call("getrawtransaction", funding_txid))
    )
    coin = funding.vin[0].prevout
    payee = address_to_script_pubkey(await rpc.call("getnewaddress"), "regtest")
    conflict = CTransaction(
        [CTxIn(COutPoint(coin.hash, coin.n), nSequence=0xFFFFFFFD)],
        [CTxOut(sum(o.nValue for o in funding.vout) - 1_000, CScript(payee))],
        nVersion=2,
    )
    signed = await rpc.call("signrawtransactionwithwallet", conflict.serialize().hex())
    await rpc.call("generateblock", await rpc.call("getnewaddress"), [signed["hex"]])
    codes = []
    while "funding_spent" not in codes:
        msg = await viewer.recv()
        if isinstance(msg, Error):
            codes.append(msg.code)
        elif isinstance(msg, Due):
            await viewer.send(viewer.channel.pay_due(msg))  # type: ignore[union-attr]
        if codes == ["funding_lost"]:
            await _mine(rpc)  # one more block: gone that deep, void
            codes.append("mined")
    assert codes[0] == "funding_lost"
    # No media after the notice.
    notice = next(i for i, m in enumerate(viewer.log)
                  if isinstance(m, Error) and m.code == "funding_lost")
    assert not any(isinstance(m, Chunk) for m in viewer.log[notice:])
    await rpc.close()


async def test_a_settlement_reorged_out_confirms_again_before_closed(gateway_factory):
    gw = await gateway_factory(settle_confirmations=2)
    rpc = node_rpc(gw)
    viewer = Viewer(ws_url(gw), rpc)
    await viewer.connect()
    await viewer.open_and_fund()
    await _play_some(viewer, 5)
    closed = await viewer.close_channel()
    assert closed.txid is not None
    cid = viewer.channel.outpoint.channel_id  # type: ignore[union-attr]
    (first,) = await _mine(rpc)
    await asyncio.sleep(1.0)  # one confirmation of two: still closing
    assert _state(gw, cid) == "closing"
    await rpc.call("invalidateblock", first)
    assert closed.txid in await rpc.call("getrawmempool")  # re-admitted, as Core does
    await _mine(rpc)
    await asyncio.sleep(1.0)
    assert _state(gw, cid) == "closing"  # 1 of 2 on the new branch
    (second,) = await _mine(rpc)
    await _wait_for(lambda: _state(gw, cid) == "closed")
    height = gw.store.read("SELECT confirmed_height FROM channels WHERE channel_id = ?",
                           (cid,))[0]["confirmed_height"]
    assert height == (await rpc.call("getblockheader", second))["height"] - 1
    await rpc.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _node(datadir: Path, port: int, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "node", "--datadir", str(datadir),
         "--rpc-port", str(port), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # "cookie: ..." is printed once it serves
        if line.startswith(b"cookie:"):
            return proc
    raise AssertionError(f"gateway node did not start: {proc.wait()}")


async def test_a_settlement_the_node_forgot_is_broadcast_again(tmp_path, media_copy):
    # A bitcoind restarted with -persistmempool=0 after a reorg has forgotten
    # the settlement: only the gateway's rebroadcast brings it back.
    port = _free_port()
    nodedir = tmp_path / "bitcoind"
    node = _node(nodedir, port)
    config = gateway_config(tmp_path, media_copy)
    config.rpc_url = f"http://127.0.0.1:{port}"
    config.rpc_cookie = nodedir / "regtest" / ".cookie"
    config.settle_confirmations = 2
    gw = Gateway(config)
    await gw.start()
    rpc = RpcClient(config.rpc_url, cookie_path=config.rpc_cookie)
    try:
        viewer = Viewer(ws_url(gw), rpc)
        await viewer.connect()
        await viewer.open_and_fund()
        await _mine(rpc)  # the funding confirmed: only the settlement is at stake
        await _play_some(viewer, 5)
        closed = await viewer.close_channel()
        assert isinstance(closed, Closed) and closed.txid is not None
        cid = viewer.channel.outpoint.channel_id  # type: ignore[union-attr]
        (block,) = await _mine(rpc)
        await rpc.call("invalidateblock", block)
        # The duty waits while the node restarts, so that the test sees the
        # node forgot the settlement before the gateway sends it again.
        await gw.settler.stop()
        node.terminate()
        assert node.wait(timeout=30) == 0
        node = _node(nodedir, port, "--no-persistmempool")
        assert closed.txid not in await rpc.call("getrawmempool")
        await gw.settler.start()
        await _wait_for(lambda: closed.txid in _mempool_now(config.rpc_url, nodedir),
                        timeout=90)
        await _mine(rpc, 2)
        await _wait_for(lambda: _state(gw, cid) == "closed")
    finally:
        await rpc.close()
        await gw.stop()
        node.terminate()
        node.wait(timeout=30)


def _mempool_now(url: str, nodedir: Path) -> list[str]:
    """The node's mempool, asked synchronously (a plain HTTP client: the test's own)."""
    import base64
    import json
    import urllib.request

    cookie = (nodedir / "regtest" / ".cookie").read_text()
    request = urllib.request.Request(
        url, data=json.dumps({"id": 1, "method": "getrawmempool", "params": []}).encode(),
        headers={"Authorization": "Basic " + base64.b64encode(cookie.encode()).decode()},
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        return list(json.load(answer)["result"])
