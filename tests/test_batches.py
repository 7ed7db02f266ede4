"""Settlement economics end to end (protocol.md sections 3 and 8): a real
gateway, its real embedded node mining as a chain does.

* a session that paid less than a settlement costs gets the viewer's change
  back on chain within two blocks of leaving, with exactly the exit fee the
  client agreed to (its reserve) and not a satoshi more; both kinds;
* a session that paid enough settles with a publisher output;
* a hundred channels closing together settle in ONE transaction, valid in
  libbitcoinkernel, with one output per publisher;
* a batch holding a channel its client has already refunded still settles
  the others.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from conftest_gateway import PUBLISHERS, Viewer, node_rpc, ws_url
from helpers_chain import get_transaction

from gateway.chain.kernel import verify_input
from gateway.chain.watch import btc_to_sat
from gateway.protocol.channel import ClientChannel
from gateway.protocol.messages import Closed, Paid, Ready, Terms
from gateway.protocol.scripts import address_to_script_pubkey
from gateway.protocol.transactions import Outpoint
from gateway.server import Gateway


async def _wait_for(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


def _row(gw: Gateway, cid: str) -> dict[str, Any]:
    return dict(gw.store.read("SELECT * FROM channels WHERE channel_id = ?", (cid,))[0])


def _outputs(tx: dict[str, Any]) -> list[tuple[str, int]]:
    return [(o["scriptPubKey"]["hex"], btc_to_sat(o["value"])) for o in tx["vout"]]


def _verify_inputs(tx: dict[str, Any], viewers: list[Viewer]) -> None:
    """Every input of the settlement through libbitcoinkernel, all consensus flags."""
    by_outpoint = {v.channel.outpoint.channel_id: v.channel for v in viewers}  # type: ignore[union-attr]
    spent = []
    for txin in tx["vin"]:
        channel = by_outpoint[f"{txin['txid']}:{txin['vout']}"]
        spent.append((channel.script.script_pubkey, channel.value))
    for index in range(len(spent)):
        verify_input(bytes.fromhex(tx["hex"]), index, spent)


@pytest.mark.parametrize("kind", ["cltv", "multisig"])
async def test_a_short_session_gets_its_change_back_within_two_blocks(gateway_factory, kind):
    # The embedded node mines a block every 2 s while its mempool is not
    # empty; the settle window is one block interval, as on a real chain.
    gw = await gateway_factory(block_interval=2.0)
    assert gw.settle_window == 2.0
    rpc = node_rpc(gw)
    viewer = Viewer(ws_url(gw), rpc)
    await viewer.connect()
    ready = await viewer.open_and_fund(kind=kind)
    reserve = ready.exit_fee
    # Watch only the free part: the reserve is the only thing paid.
    await viewer.play_and_pay("clip", chunks=2)
    assert viewer.channel.paid == reserve > 0  # type: ignore[union-attr]
    left_at = await rpc.call("getblockcount")
    closed = await viewer.close_channel()
    assert closed.paid == closed.exit_fee == reserve
    assert closed.txid is None and closed.settle_by is not None  # in the next batch
    assert closed.settle_by <= time.time() + gw.settle_window + 1
    cid = ready.channel_id
    await _wait_for(lambda: _row(gw, cid)["state"] == "closed")
    row = _row(gw, cid)
    assert row["confirmed_height"] <= left_at + 2, "not within two blocks of leaving"
    tx = await get_transaction(rpc, row["settle_txid"])
    change = viewer.channel.change_script.hex()  # type: ignore[union-attr]
    # Exactly the agreed exit fee, not a satoshi more: the rest comes back.
    assert [amount for spk, amount in _outputs(tx) if spk == change] == [ready.value - reserve]
    _verify_inputs(tx, [viewer])
    await rpc.close()


async def test_a_session_that_paid_enough_pays_its_publisher(gateway_factory):
    gw = await gateway_factory()
    rpc = node_rpc(gw)
    viewer = Viewer(ws_url(gw), rpc)
    await viewer.connect()
    ready = await viewer.open_and_fund()
    await viewer.play_and_pay("clip")  # all of it: 9 s at 300 sat/s beyond the free 3 s
    closed = await viewer.close_channel()
    assert closed.txid is not None
    await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
    tx = await get_transaction(rpc, closed.txid)
    outputs = dict(_outputs(tx))
    studio = address_to_script_pubkey(PUBLISHERS["studio"], "regtest").hex()
    fee = gw.store.read("SELECT fee FROM settlements WHERE txid = ?", (closed.txid,))[0]["fee"]
    assert outputs[studio] == closed.paid - fee >= 546
    assert fee >= ready.exit_fee
    await rpc.close()


async def test_a_hundred_channels_settle_in_one_transaction(gateway_factory):
    # A hundred viewers from one address: the per-address limits made room.
    # The window is wide enough for a slow machine (coverage, a loaded CI) to
    # open and close all hundred inside it.
    gw = await gateway_factory(settle_window_s=40.0, max_sessions_per_ip=200,
                               max_unfunded_per_ip=100)
    rpc = node_rpc(gw)
    viewers = [Viewer(ws_url(gw), rpc) for _ in range(100)]

    async def watch(n: int, viewer: Viewer) -> None:
        await viewer.connect()
        await viewer.open_and_fund()
        await viewer.play_and_pay("clip" if n % 2 else "song", chunks=5)

    for start in range(0, len(viewers), 25):
        await asyncio.gather(*(watch(start + i, v)
                               for i, v in enumerate(viewers[start:start + 25])))
    closes = await asyncio.gather(*(v.close_channel() for v in viewers))
    early = [c for c in closes if c.txid is not None or not c.settle_by]
    assert not early, f"{len(early)} closes not waiting for company: {early[:3]}"
    cids = [v.channel.outpoint.channel_id for v in viewers]  # type: ignore[union-attr]
    await _wait_for(lambda: all(_row(gw, c)["settle_txid"] for c in cids), timeout=80)
    txids = {_row(gw, c)["settle_txid"] for c in cids}
    assert len(txids) == 1, f"{len(txids)} settlements for 100 channels"
    (txid,) = txids
    await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
    tx = await get_transaction(rpc, txid)
    assert tx["confirmations"] == 1 and len(tx["vin"]) == 100
    _verify_inputs(tx, viewers)
    # Each client's change at its input's index; one output per publisher.
    outputs = _outputs(tx)
    for index, txin in enumerate(tx["vin"]):
        viewer = next(v for v in viewers if v.channel.outpoint == Outpoint(txin["txid"], txin["vout"]))  # type: ignore[union-attr]  # noqa: E501
        assert outputs[index] == (viewer.channel.change_script.hex(), viewer.channel.balance)  # type: ignore[union-attr]
    server = outputs[100:]
    studio = address_to_script_pubkey(PUBLISHERS["studio"], "regtest").hex()
    label = address_to_script_pubkey(PUBLISHERS["label"], "regtest").hex()
    scripts = [spk for spk, _ in server]
    assert scripts.count(studio) == 1 and scripts.count(label) == 1
    assert len(scripts) == len(set(scripts))
    await _wait_for(lambda: all(_row(gw, c)["state"] == "closed" for c in cids))
    await rpc.close()


async def _height_viewer(gw: Gateway, rpc: Any, expiry: int) -> Viewer:
    """A ready 30,000-sat cltv channel expiring at height ``expiry``, its reserve paid."""
    viewer = Viewer(ws_url(gw), rpc)
    await viewer.connect()
    viewer.channel = ClientChannel(viewer.key.secret, viewer.hello, budget=50_000)  # type: ignore[arg-type]
    change = address_to_script_pubkey(await rpc.call("getnewaddress"), "regtest")
    await viewer.send(viewer.channel.open(expiry=expiry, change_script=change))
    terms = await viewer.expect(Terms)
    viewer.channel.accept_terms(terms)
    outpoint, value = await viewer.pay_funding_address(terms, 30_000)
    await viewer.send(viewer.channel.fund(outpoint, value))
    viewer.channel.on_ready(await viewer.expect(Ready))
    await viewer.send(viewer.channel.pay(viewer.channel.exit_fee + 2_000))
    viewer.channel.on_paid(await viewer.expect(Paid))
    return viewer


async def test_a_batch_with_a_refunded_channel_still_settles_the_others(gateway_factory):
    limits = {"settle_margin_s": 600, "min_expiry_s": 600, "resume_grace_s": 3600}
    gw = await gateway_factory(limits=limits, settle_window_s=3600.0)
    rpc = node_rpc(gw)
    expiry = await rpc.call("getblockcount") + 5
    viewers = [await _height_viewer(gw, rpc, expiry) for _ in range(4)]
    for viewer in viewers:  # closed, queued for the batch (the window is an hour)
        closed = await viewer.close_channel()
        assert isinstance(closed, Closed) and closed.txid is None
    cids = [v.channel.outpoint.channel_id for v in viewers]  # type: ignore[union-attr]
    node_dir = gw.node.datadir
    await gw.stop()  # down before the batch went out

    # Meanwhile the expiry passes and the first client refunds alone (section 2).
    from gateway.chain.node import EmbeddedNode
    from gateway.chain.rpc import RpcClient

    async with (
        EmbeddedNode(node_dir, rpc_port=0) as node,
        RpcClient(node.rpc_url, cookie_path=node.cookie_path) as alone,
    ):
        await alone.call("generatetoaddress", 5, await alone.call("getnewaddress"))
        first = viewers[0].channel
        assert first is not None
        refund = first.cltv_refund(dest_script=first.change_script, fee=300)
        await alone.call("sendrawtransaction", refund.hex())
        await alone.call("generatetoaddress", 1, await alone.call("getnewaddress"))

    # Back up: the stored queue goes out at once as one batch; the node refuses
    # it (one input is spent); the gateway settles the other three without it.
    gw2 = await gateway_factory(limits=limits, settle_window_s=3600.0)
    rpc2 = node_rpc(gw2)
    await _wait_for(lambda: all(_row(gw2, c)["settle_txid"] for c in cids[1:]))
    txids = {_row(gw2, c)["settle_txid"] for c in cids[1:]}
    assert len(txids) == 1
    (txid,) = txids
    assert txid in await rpc2.call("getrawmempool")
    abandoned = gw2.store.read("SELECT txid FROM settlements WHERE state = 'abandoned'")
    assert len(abandoned) == 1 and abandoned[0]["txid"] != txid
    await rpc2.call("generatetoaddress", 1, await rpc2.call("getnewaddress"))
    tx = await get_transaction(rpc2, txid)
    assert len(tx["vin"]) == 3
    _verify_inputs(tx, viewers[1:])
    await _wait_for(lambda: [_row(gw2, c)["state"] for c in cids]
                    == ["refunded", "closed", "closed", "closed"])
    await rpc2.close()
    await rpc.close()


async def test_a_slow_close_still_waits_for_company(gateway_factory):
    """The duty's round does not settle a channel that a close is still writing.

    The closing write is slowed past one settlement round (a loaded disk):
    the round must leave the channel to ``close``, which queues it with its
    window, and ``closed`` says when (before the fix the round settled it
    alone at once and ``closed`` named a txid).
    """
    gw = await gateway_factory(settle_window_s=30.0)
    viewer = Viewer(ws_url(gw), node_rpc(gw))
    await viewer.connect()
    await viewer.open_and_fund()
    await viewer.play_and_pay("clip", chunks=2)
    write_closing = gw.ledger.closing

    async def slow_closing(live: Any) -> None:
        await asyncio.sleep(gw.config.settle_interval_s * 2.5)
        await write_closing(live)

    gw.ledger.closing = slow_closing  # type: ignore[method-assign]
    closed = await viewer.close_channel()
    assert closed.txid is None and closed.settle_by is not None
    assert closed.settle_by >= time.time() + 20
