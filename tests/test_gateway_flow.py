"""The gateway over a real socket with its real embedded node: open, fund,
free chunks, paid chunks, close and settlement (PROTOCOL.md sections 4-8)."""

from __future__ import annotations

import pytest
from conftest_gateway import Viewer, node_rpc, ws_url


@pytest.mark.parametrize("kind", ["cltv", "multisig"])
async def test_stream_free_then_paid_then_close_settles(gateway, kind):
    rpc = node_rpc(gateway)
    viewer = Viewer(ws_url(gateway), rpc)
    await viewer.connect()
    ready = await viewer.open_and_fund(kind=kind)
    assert ready.paid == 0
    stream = await viewer.play_and_pay("clip")
    assert stream.free_ms == 3000
    chunks = [c for c, _ in viewer.media if c.index >= 0]
    assert len(chunks) == stream.chunks
    paid = viewer.channel.paid
    # 12 s at 300 sat/s with 3 s free, rounded up once at the end.
    assert paid == -(-(sum(c.duration_ms for c in chunks) - 3000) * 300_000 // 1_000_000)
    closed = await viewer.close_channel()
    assert closed.paid == paid and closed.txid is not None
    await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
    tx = await rpc.call("getrawtransaction", closed.txid, True)
    assert tx["confirmations"] == 1
    await rpc.close()


async def test_a_silent_session_is_closed_but_a_playing_one_is_not(gateway_factory):
    import asyncio

    import websockets

    gw = await gateway_factory(idle_timeout_s=0.5)
    rpc = node_rpc(gw)
    silent = Viewer(ws_url(gw), rpc)
    await silent.connect()
    playing = Viewer(ws_url(gw), rpc)
    await playing.connect()
    await playing.open_and_fund()
    # free media (3 s of the clip) plays with no client message for > 0.5 s
    await playing.send_raw({"type": "play", "media": "clip"})
    with pytest.raises(websockets.ConnectionClosed) as closed:
        await silent.recv(timeout=5)
    assert closed.value.rcvd.code == 1000 and closed.value.rcvd.reason == "idle"
    await asyncio.sleep(1.0)
    assert playing.ws.state is websockets.State.OPEN
    await rpc.close()


async def test_waiting_for_confirmations_still_reads_close_then_a_block_makes_ready(
    gateway_factory,
):
    """With min_conf 1, ``fund`` by txid answers ``funding`` and waits beside the
    message loop (section 6): ``close`` is answered at once, and a block makes the
    other viewer's channel ``ready``."""
    import time

    from gateway.chain.watch import btc_to_sat
    from gateway.protocol.channel import ClientChannel
    from gateway.protocol.messages import Closed, Funding, Ready, Terms
    from gateway.protocol.scripts import address_to_script_pubkey
    from gateway.protocol.transactions import Outpoint

    gw = await gateway_factory(limits={"min_conf": 1})
    rpc = node_rpc(gw)

    async def fund_unconfirmed(viewer):
        viewer.channel = ClientChannel(viewer.key.secret, viewer.hello, budget=viewer.budget)
        change = address_to_script_pubkey(await rpc.call("getnewaddress"), "regtest")
        await viewer.send(viewer.channel.open(expiry=int(time.time()) + 6 * 3600,
                                              change_script=change))
        terms = await viewer.expect(Terms)
        viewer.channel.accept_terms(terms)
        txid = await rpc.call("sendtoaddress", terms.funding_address, "0.0002")
        raw = await rpc.call("getrawtransaction", txid, True)
        vout = next(o["n"] for o in raw["vout"]
                    if o["scriptPubKey"]["hex"] == terms.funding_script.hex())
        value = btc_to_sat(raw["vout"][vout]["value"])
        await viewer.send(viewer.channel.fund(Outpoint(txid, vout), value))
        funding = await viewer.expect(Funding)
        assert (funding.confirmations, funding.needed) == (0, 1)

    leaving, staying = Viewer(ws_url(gw), rpc), Viewer(ws_url(gw), rpc)
    for viewer in (leaving, staying):
        await viewer.connect()
        await fund_unconfirmed(viewer)
    await leaving.send_raw({"type": "close"})
    closed = await leaving.expect(Closed, timeout=5)  # no block was mined meanwhile
    assert closed.txid is None and closed.paid == 0
    await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
    ready = await staying.expect(Ready, timeout=20)
    assert ready.paid == 0
    await rpc.close()
