"""The gateway over a real socket with its real embedded node: open, fund,
free chunks, paid chunks, close and settlement (protocol.md sections 4-8)."""

from __future__ import annotations

import pytest
from conftest_gateway import Viewer, node_rpc, ws_url
from helpers_chain import get_transaction


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
    # The reserve first, then 12 s at 300 sat/s with 3 s free, rounded up once
    # at the end.
    reserve = viewer.channel.exit_fee
    assert 0 < reserve == ready.exit_fee
    media = -(-(sum(c.duration_ms for c in chunks) - 3000) * 300_000 // 1_000_000)
    assert paid == reserve + media
    closed = await viewer.close_channel()
    assert closed.paid == paid and closed.exit_fee == reserve and closed.txid is not None
    await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
    tx = await get_transaction(rpc, closed.txid)
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
    # The clip streams its 3 free seconds, then waits for a pay: a stream is
    # on, so more than 0.5 s without a client message does not close it.
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
    from gateway.protocol.messages import Closed, Funding, Ready

    gw = await gateway_factory(limits={"min_conf": 1})
    rpc = node_rpc(gw)

    async def fund_unconfirmed(viewer):
        terms = await viewer.open_channel()
        outpoint, value = await viewer.pay_funding_address(terms, 20_000)
        await viewer.send(viewer.channel.fund(outpoint, value))
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


async def test_a_close_right_after_a_pay_still_delivers_what_it_paid_for(gateway):
    """``pay`` and ``close`` in one breath: the chunk the pay covers goes out
    before ``closed``, so the bill covers only media sent (sections 7, 8)."""
    from gateway.protocol.messages import Chunk, Closed, Due, Paid, Play, Stream

    rpc = node_rpc(gateway)
    viewer = Viewer(ws_url(gateway), rpc)
    await viewer.connect()
    await viewer.open_and_fund()
    channel = viewer.channel
    await viewer.send(Play(media="clip"))
    channel.on_stream(await viewer.expect(Stream))
    while True:  # the reserve, then the free seconds, up to the first paid chunk's due
        due = await viewer.expect(Due)
        if due.index >= 0:
            break
        await viewer.send(channel.pay_due(due))
    await viewer.send(channel.pay_due(due))
    await viewer.send(channel.close())  # not waiting for `paid`
    after = []
    while not after or not isinstance(after[-1], Closed):
        after.append(await viewer.recv())
    closed = after[-1]
    assert any(isinstance(m, Paid) for m in after)
    assert any(isinstance(m, Chunk) and m.index == due.index for m in after), after
    assert closed.paid == channel.paid
    await rpc.close()
