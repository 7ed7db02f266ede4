"""Settlement as a background duty (protocol.md section 8): after a disconnect
and the resume grace, before expiry without the viewer, across a resume, and
split among publishers (section 3) — each checked in a block mined by the
embedded node, whose blocks libbitcoinkernel validates."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest_gateway import PUBLISHERS, Viewer, node_rpc, resume, ws_url
from helpers_chain import get_transaction

from gateway.chain.watch import btc_to_sat
from gateway.protocol.channel import ClientChannel, ServerState
from gateway.protocol.messages import Closed, Paid, Ready, Terms
from gateway.protocol.scripts import address_to_script_pubkey
from gateway.protocol.transactions import Outpoint


async def _wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def _mine(rpc, n: int = 1) -> None:
    await rpc.call("generatetoaddress", n, await rpc.call("getnewaddress"))


async def _height_channel(gw, rpc, change: bytes, *, paid: int) -> Viewer:
    """A ready 30,000-sat cltv channel expiring 4 blocks ahead, with ``paid`` paid."""
    viewer = Viewer(ws_url(gw), rpc)
    await viewer.connect()
    viewer.channel = ClientChannel(viewer.key.secret, viewer.hello, budget=50_000)
    height = await rpc.call("getblockcount")
    await viewer.send(viewer.channel.open(expiry=height + 4, change_script=change))
    terms = await viewer.expect(Terms)
    viewer.channel.accept_terms(terms)
    txid = await rpc.call("sendtoaddress", terms.funding_address, "0.0003")
    raw = await get_transaction(rpc, txid)
    vout = next(o["n"] for o in raw["vout"]
                if o["scriptPubKey"]["address"] == terms.funding_address)
    await viewer.send(viewer.channel.fund(Outpoint(txid, vout), 30_000))
    viewer.channel.on_ready(await viewer.expect(Ready))
    await viewer.send(viewer.channel.pay(paid))
    viewer.channel.on_paid(await viewer.expect(Paid))
    return viewer


async def _paying_viewer(gw, rpc) -> Viewer:
    """A viewer with a funded channel that has paid for six chunks of the clip."""
    viewer = Viewer(ws_url(gw), rpc)
    await viewer.connect()
    await viewer.open_and_fund()
    await viewer.play_and_pay("clip", chunks=6)
    assert viewer.channel is not None and viewer.channel.paid > 0
    return viewer


async def _settled_outputs(gw, rpc, cid: str) -> tuple[dict, dict[str, int]]:
    """The settlement of ``cid`` once mined: (tx json, {scriptPubKey hex: sat})."""
    def stored_txid():
        row = gw.store.read("SELECT settle_txid FROM channels WHERE channel_id = ?", (cid,))[0]
        return row["settle_txid"]

    # The core leaves READY when it builds the settlement; the row follows at
    # the next commit, before the broadcast (settlement.py).
    await _wait_for(lambda: stored_txid() is not None)
    txid = stored_txid()
    await _mine(rpc)
    tx = await get_transaction(rpc, txid)
    assert tx["confirmations"] >= 1  # in a block the kernel accepted
    assert tx["vin"][0]["txid"] + ":" + str(tx["vin"][0]["vout"]) == cid
    return tx, {o["scriptPubKey"]["hex"]: btc_to_sat(o["value"]) for o in tx["vout"]}


async def test_disconnect_settles_after_grace_and_splits_publishers(gateway):
    rpc = node_rpc(gateway)
    viewer = Viewer(ws_url(gateway), rpc)
    await viewer.connect()
    await viewer.open_and_fund(value=40_000)
    await viewer.play_and_pay("clip")
    await viewer.play_and_pay("song")
    cid = viewer.channel.outpoint.channel_id
    balance = viewer.channel.balance
    live = gateway.channels[cid]
    bills = dict(live.media_bill)
    assert bills["clip"] > 0 and bills["song"] > 0
    await viewer.disconnect()
    # resume_grace_s is 1 in tests: the duty settles about a second later.
    await _wait_for(lambda: live.core.state is not ServerState.READY)
    _, outputs = await _settled_outputs(gateway, rpc, cid)
    change = viewer.channel.change_script.hex()
    assert outputs[change] == balance  # exactly the last signed balance
    studio = address_to_script_pubkey(PUBLISHERS["studio"], "regtest").hex()
    label = address_to_script_pubkey(PUBLISHERS["label"], "regtest").hex()
    share = viewer.channel.value - balance
    fee = share - sum(v for k, v in outputs.items() if k != change)
    assert fee > 0
    # Publishers are paid in proportion to what their items billed.
    payout = outputs[studio] + outputs[label] + outputs.get(gateway.operator_script.hex(), 0)
    assert payout == share - fee
    expected_studio = payout * bills["clip"] // (bills["clip"] + bills["song"])
    assert abs(outputs[studio] - expected_studio) <= 1
    await _wait_for(lambda: cid not in gateway.channels)
    row = gateway.store.read(
        "SELECT state, settle_txid, confirmed_height FROM channels WHERE channel_id = ?", (cid,)
    )[0]
    assert row["state"] == "closed"
    mined = await get_transaction(rpc, row["settle_txid"])
    header = await rpc.call("getblockheader", mined["blockhash"])
    assert row["confirmed_height"] == header["height"]
    await rpc.close()


async def test_resume_in_a_new_session_continues_the_channel(gateway_factory):
    gw = await gateway_factory(limits={"resume_grace_s": 30})
    rpc = node_rpc(gw)
    first = await _paying_viewer(gw, rpc)
    channel = first.channel
    paid_before = channel.paid
    await first.disconnect()
    await asyncio.sleep(0.5)
    second = Viewer(ws_url(gw), rpc)
    await second.connect()
    ready = await resume(second, first)
    assert ready.paid == paid_before
    # Same channel, same free allowance used: the clip's remaining chunks are paid.
    stream = await second.play_and_pay("clip")
    assert stream.free_used_ms == stream.free_ms
    assert channel.paid > paid_before
    closed = await second.close_channel()
    assert closed.paid == channel.paid and closed.txid is not None
    await rpc.close()


async def test_channel_near_expiry_settles_without_the_viewer(gateway_factory):
    gw = await gateway_factory(limits={"settle_margin_s": 600, "min_expiry_s": 600,
                                       "resume_grace_s": 3600})
    rpc = node_rpc(gw)
    change = address_to_script_pubkey(await rpc.call("getnewaddress"), "regtest")
    viewer = await _height_channel(gw, rpc, change, paid=5_000)
    cid = viewer.channel.outpoint.channel_id
    # A connected viewer is told `closed` when the margin is reached...
    await _mine(rpc, 2)
    closed = await viewer.expect(Closed)
    assert closed.paid == 5_000 and closed.txid is not None
    _, outputs = await _settled_outputs(gw, rpc, cid)
    assert outputs[change.hex()] == 25_000

    # ...and a viewer who left long ago (grace 1 h) is settled all the same.
    other = await _height_channel(gw, rpc, change, paid=4_000)
    cid2 = other.channel.outpoint.channel_id
    await other.disconnect()
    await asyncio.sleep(0.3)
    assert gw.channels[cid2].core.state is ServerState.READY  # within its grace
    await _mine(rpc, 2)
    await _wait_for(lambda: gw.channels.get(cid2) is None
                    or gw.channels[cid2].core.state is not ServerState.READY)
    _, outputs = await _settled_outputs(gw, rpc, cid2)
    assert outputs[change.hex()] == 26_000
    await rpc.close()


async def test_nothing_paid_closes_without_a_transaction(gateway):
    rpc = node_rpc(gateway)
    viewer = Viewer(ws_url(gateway), rpc)
    await viewer.connect()
    await viewer.open_and_fund()
    closed = await viewer.close_channel()
    assert closed.txid is None and closed.paid == 0
    await rpc.close()


async def test_restart_reloads_and_settles_due_channels(gateway_factory):
    gw = await gateway_factory(limits={"resume_grace_s": 3600})
    rpc = node_rpc(gw)
    viewer = Viewer(ws_url(gw), rpc)
    await viewer.connect()
    await viewer.open_and_fund()
    await viewer.play_and_pay("clip", chunks=8)
    cid = viewer.channel.outpoint.channel_id
    balance = viewer.channel.balance
    await viewer.disconnect()
    await rpc.close()
    await asyncio.sleep(0.2)
    await gw.stop()
    # Restart with no grace: the reloaded channel is due at once.
    gw2 = await gateway_factory(limits={"resume_grace_s": 0})
    assert cid in gw2.channels or gw2.store.read(
        "SELECT settle_txid FROM channels WHERE channel_id = ?", (cid,))[0]["settle_txid"]
    await _wait_for(lambda: gw2.store.read(
        "SELECT settle_txid FROM channels WHERE channel_id = ?", (cid,))[0]["settle_txid"])
    rpc2 = node_rpc(gw2)
    _, outputs = await _settled_outputs(gw2, rpc2, cid)
    assert outputs[viewer.channel.change_script.hex()] == balance
    await rpc2.close()


async def test_refund_after_expiry_is_recorded_as_refunded(gateway_factory):
    # The gateway is down past the expiry; the viewer refunds alone (section 2);
    # the restarted gateway finds its settlement impossible and records `refunded`.
    limits = {"settle_margin_s": 600, "min_expiry_s": 600, "resume_grace_s": 3600}
    gw = await gateway_factory(limits=limits)
    rpc = node_rpc(gw)
    change = address_to_script_pubkey(await rpc.call("getnewaddress"), "regtest")
    viewer = await _height_channel(gw, rpc, change, paid=5_000)
    cid = viewer.channel.outpoint.channel_id
    await viewer.disconnect()
    await rpc.close()
    await asyncio.sleep(0.2)
    node_dir = gw.node.datadir
    await gw.stop()

    from gateway.chain.node import EmbeddedNode
    from gateway.chain.rpc import RpcClient

    async with (
        EmbeddedNode(node_dir, rpc_port=0) as node,
        RpcClient(node.rpc_url, cookie_path=node.cookie_path) as alone,
    ):
        await _mine(alone, 4)  # tip = expiry: the refund fits the next block
        refund = viewer.channel.cltv_refund(dest_script=change, fee=300)
        await alone.call("sendrawtransaction", refund.hex())
        await _mine(alone, 1)

    gw2 = await gateway_factory(limits=limits)
    await _wait_for(lambda: gw2.store.read(
        "SELECT state FROM channels WHERE channel_id = ?", (cid,))[0]["state"] == "refunded")
    await _wait_for(lambda: cid not in gw2.channels)  # no longer followed


async def test_stopping_the_gateway_says_going_away_and_the_channel_resumes_after(
    gateway_factory,
):
    """A stop (SIGTERM) closes each session with 1001 instead of waiting on it;
    the channel stays in the ledger and resumes on the restarted gateway with
    what was paid (protocol.md section 4)."""
    import websockets

    gw = await gateway_factory(limits={"resume_grace_s": 3600})
    rpc = node_rpc(gw)
    first = await _paying_viewer(gw, rpc)
    paid = first.channel.paid
    stopping = asyncio.create_task(gw.stop())
    with pytest.raises(websockets.ConnectionClosed) as closed:
        while True:
            await first.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001
    await stopping
    await rpc.close()

    again = await gateway_factory(limits={"resume_grace_s": 3600})
    rpc = node_rpc(again)
    second = Viewer(ws_url(again), rpc)
    await second.connect()
    assert (await resume(second, first)).paid == paid
    await rpc.close()
