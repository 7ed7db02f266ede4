"""The JSON endpoints a browser page without a node needs (gateway/web/).

``GET /api/chain`` (the tip, median-time-past and what leaving costs now),
``POST /api/refund`` (the gateway relays a channel's refund and nothing
else), ``GET /api/refund`` (a refund's output on chain), ``GET
/api/channel/<id>`` (the funding's state) and the demo faucet's unbroadcast
T1 for multisig channels — against a real gateway and its embedded node.
"""

from __future__ import annotations

import time
from typing import Any

import coincurve
from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxOut, b2lx, lx
from bitcoin.core.script import CScript
from conftest_gateway import Viewer, node_rpc, ws_url
from helpers_chain import get_transaction
from test_dashboard import http
from test_transactions import kernel_verify

from gateway.chain.rpc import RpcInvalidAddressOrKey
from gateway.chain.watch import btc_to_sat
from gateway.protocol.channel import ClientChannel
from gateway.protocol.messages import Terms
from gateway.protocol.scripts import ChannelScript, address_to_script_pubkey
from gateway.protocol.settlement import exit_fee, exit_vbytes
from gateway.protocol.transactions import Outpoint, parse_tx, txid_of

EXAMPLE_KEY = bytes.fromhex("0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798")


async def post_json(gw: Any, path: str) -> tuple[int, Any]:
    """POST ``path``: (status, parsed JSON body)."""
    import json

    status, _, body = await http(gw, path, method="POST")
    return status, json.loads(body)


async def get_json(gw: Any, path: str) -> tuple[int, Any]:
    """GET ``path``: (status, parsed JSON body)."""
    import json

    status, _, body = await http(gw, path)
    return status, json.loads(body)


async def test_chain_says_the_tip_and_what_leaving_costs(gateway):
    """The node's height and median-time-past; the exit of a channel like the page's."""
    rpc = node_rpc(gateway)
    status, chain = await get_json(gateway, "/api/chain")
    info = await rpc.call("getblockchaininfo")
    assert status == 200 and chain["network"] == "regtest"
    assert (chain["height"], chain["median_time"]) == (info["blocks"], info["mediantime"])
    assert chain["feerate"] == 2  # the fee floor: regtest has no estimate
    expiry = int(time.time()) + 86_400
    for kind in ("cltv", "multisig"):
        script = ChannelScript.make(kind, EXAMPLE_KEY, EXAMPLE_KEY, expiry)
        vbytes = exit_vbytes(script, b"\x00\x14" + bytes(20))
        assert chain["exit"][kind] == {"vbytes": vbytes, "fee": exit_fee(vbytes, 2)}
    await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
    status, later = await get_json(gateway, "/api/chain")
    assert later["height"] == chain["height"] + 1
    status, _, _ = await http(gateway, "/api/chain", method="POST")
    assert status == 405
    await rpc.close()


async def test_the_gateway_relays_a_channels_refund_and_nothing_else(gateway):
    """A refund of a channel the gateway never saw funded is known by its script;
    before the expiry the node's refusal comes back; a wallet's tx is never relayed."""
    rpc = node_rpc(gateway)
    viewer = Viewer(ws_url(gateway), rpc)
    hello = await viewer.connect()
    secret = coincurve.PrivateKey().secret
    channel = ClientChannel(secret, hello, budget=20_000)
    change = address_to_script_pubkey(await rpc.call("getnewaddress"), "regtest")
    expiry = int(await rpc.call("getblockcount")) + 14  # a height expiry
    await viewer.send(channel.open(expiry=expiry, change_script=change))
    terms = await viewer.expect(Terms)
    channel.accept_terms(terms)
    # Paid, but never told to the gateway (no `fund`): it knows the channel by its script only.
    outpoint, value = await viewer.pay_funding_address(terms, 20_000)
    await viewer.disconnect()
    channel.fund(outpoint, value)
    refund = channel.cltv_refund(dest_script=change, fee=300)
    assert not gateway.ledger.known_outpoint(outpoint.channel_id)

    status, body = await post_json(gateway, f"/api/refund?tx={refund.hex()}")
    assert status == 409 and body["reason"] == "non-final", body
    other = Outpoint("ab" * 32, 0).channel_id
    status, body = await post_json(gateway, f"/api/refund?tx={refund.hex()}&channel={other}")
    assert status == 400 and "does not spend" in body["error"]
    for bad in ("zz", "0200", refund.hex().upper()):
        status, body = await post_json(gateway, f"/api/refund?tx={bad}")
        assert status == 400, bad

    # A transaction spending a wallet coin alone is no channel's: refused, never relayed.
    coin = (await rpc.call("listunspent"))[0]
    spend = CTransaction(
        [CTxIn(COutPoint(lx(coin["txid"]), coin["vout"]))],
        [CTxOut(btc_to_sat(coin["amount"]) - 1000, CScript(change))], nVersion=2)
    signed = await rpc.call("signrawtransactionwithwallet", spend.serialize().hex())
    status, body = await post_json(gateway, f"/api/refund?tx={signed['hex']}")
    assert status == 404 and "no channel" in body["error"]
    try:
        await rpc.call("getmempoolentry", txid_of(bytes.fromhex(signed["hex"])))
        raise AssertionError("the gateway relayed a transaction of no channel")
    except RpcInvalidAddressOrKey:
        pass
    # Two inputs: not a refund's shape.
    two = CTransaction([CTxIn(COutPoint(lx(outpoint.txid), outpoint.vout))] * 2,
                       [CTxOut(1000, CScript(change))], nVersion=2)
    status, body = await post_json(gateway, f"/api/refund?tx={two.serialize().hex()}")
    assert status == 400 and "one input" in body["error"]

    tip = int(await rpc.call("getblockcount"))
    await rpc.call("generatetoaddress", expiry - tip, await rpc.call("getnewaddress"))
    status, body = await post_json(gateway, f"/api/refund?tx={refund.hex()}")
    assert status == 200 and body == {"txid": txid_of(refund), "channel_id": outpoint.channel_id}
    status, seen = await get_json(gateway, f"/api/refund?txid={body['txid']}")
    assert seen == {"txid": body["txid"], "seen": True, "confirmations": 0,
                    "value": value - 300, "script": change.hex()}
    await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
    status, seen = await get_json(gateway, f"/api/refund?txid={body['txid']}")
    assert seen["confirmations"] == 1
    status, seen = await get_json(gateway, f"/api/refund?txid={'cd' * 32}")
    assert status == 200 and seen["seen"] is False
    status, _ = await get_json(gateway, "/api/refund?txid=nope")
    assert status == 400
    await rpc.close()


async def test_channel_api_says_whether_the_funding_is_unspent(gateway):
    """``funding``: unspent (with its confirmations) while the channel holds it."""
    rpc = node_rpc(gateway)
    viewer = Viewer(ws_url(gateway), rpc)
    await viewer.connect()
    ready = await viewer.open_and_fund()
    status, answer = await get_json(gateway, f"/api/channel/{ready.channel_id}")
    assert status == 200 and answer["funding"] == {"unspent": True, "confirmations": 0}
    await rpc.call("generatetoaddress", 2, await rpc.call("getnewaddress"))
    status, answer = await get_json(gateway, f"/api/channel/{ready.channel_id}")
    assert answer["funding"] == {"unspent": True, "confirmations": 2}
    await viewer.play_and_pay("clip", chunks=1)  # the reserve is paid
    closed = await viewer.close_channel()
    status, answer = await get_json(gateway, f"/api/channel/{ready.channel_id}")
    assert answer["funding"] == {"unspent": False, "confirmations": None}  # settlement: mempool
    assert closed.txid is not None and answer["settlement"]["txid"] == closed.txid
    await rpc.close()


async def test_faucet_signs_a_t1_it_does_not_broadcast_for_a_multisig_channel(gateway):
    """broadcast=0: T1 pays the funding script from a segwit output, valid, not sent;
    a multisig channel gets no broadcast T1 (its refund is not signed yet)."""
    rpc = node_rpc(gateway)
    viewer = Viewer(ws_url(gateway), rpc)
    await viewer.connect()
    terms = await viewer.open_channel(kind="multisig")
    address = terms.funding_address
    status, body = await post_json(gateway,
                                   f"/api/faucet?address={address}&amount=20000&broadcast=2")
    assert status == 400
    status, body = await post_json(gateway, f"/api/faucet?address={address}&amount=20000")
    assert status == 400 and "broadcast=0" in body["error"]  # T1 before T2: never
    status, body = await post_json(gateway,
                                   f"/api/faucet?address={address}&amount=20000&broadcast=0")
    assert status == 200, body
    tx = bytes.fromhex(body["tx"])
    assert body["txid"] == txid_of(tx) and body["amount"] == 20_000
    parsed = parse_tx(tx)
    out = parsed.vout[body["vout"]]
    assert bytes(out.scriptPubKey) == terms.funding_script and out.nValue == 20_000
    try:
        await rpc.call("getmempoolentry", body["txid"])
        raise AssertionError("T1 was broadcast")
    except RpcInvalidAddressOrKey:
        pass
    # Its one input is a segwit output (its txid is fixed), and its signature is valid.
    [txin] = parsed.vin
    assert not txin.scriptSig and parsed.wit.vtxinwit[0].scriptWitness.stack
    prev = await get_transaction(rpc, b2lx(txin.prevout.hash))
    spent = prev["vout"][txin.prevout.n]
    assert spent["scriptPubKey"]["hex"].startswith("0014")
    assert kernel_verify(tx, [(bytes.fromhex(spent["scriptPubKey"]["hex"]),
                               btc_to_sat(spent["value"]))])
    status, _ = await post_json(gateway, f"/api/faucet?address={address}&amount=20000")
    assert status == 409
    await viewer.disconnect()
    await rpc.close()
