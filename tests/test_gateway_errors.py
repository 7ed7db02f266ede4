"""Every protocol.md section 9 error the gateway sends, over a real socket,
with the session and channel state unchanged afterwards (the client can go
on with a correct message)."""

from __future__ import annotations

import asyncio
import json
import time

import coincurve
import pytest
import websockets
from conftest_gateway import Viewer, node_rpc, ws_url
from helpers_chain import get_transaction

from gateway.protocol.channel import resume_digest
from gateway.protocol.messages import (
    FEATURE_PAY_BINARY,
    Closed,
    Error,
    Paid,
    Pay,
    Play,
    Ready,
    Resume,
    ServerHello,
    Stream,
    Terms,
    encode,
    encode_pay_binary,
)
from gateway.protocol.signatures import sign_digest
from gateway.protocol.transactions import PaymentTemplate, sign_payment


async def _error(viewer: Viewer, code: str, *, fatal: bool = False) -> Error:
    msg = await viewer.expect(Error)
    assert msg.code == code, msg
    assert msg.fatal is fatal, msg
    return msg


def _row(gw, row_id):
    return dict(gw.store.read("SELECT * FROM channels WHERE id = ?", (row_id,))[0])


def _state(gw, viewer):
    live = gw.channels[viewer.channel.outpoint.channel_id]
    return live.core.snapshot(), _row(gw, live.row_id), live.durable_paid


def _template(viewer: Viewer) -> PaymentTemplate:
    ch = viewer.channel
    return PaymentTemplate(ch.script, ch.outpoint, ch.value, ch.change_script)


async def _paying_viewer(gw) -> Viewer:
    """A ready viewer that has paid once (seq 1)."""
    viewer = Viewer(ws_url(gw), node_rpc(gw))
    await viewer.connect()
    await viewer.open_and_fund()
    await viewer.send(viewer.channel.pay(1000))
    paid = await viewer.expect(Paid)
    viewer.channel.on_paid(paid)
    return viewer


async def _send_pay(viewer: Viewer, pay: Pay, wire: str) -> None:
    """``pay`` as JSON or as the binary frame (protocol.md section 5a)."""
    await viewer.send_raw(encode_pay_binary(pay) if wire == "binary" else encode(pay))


def _binary_pay(kind: int, seq: int, balance: int, sig: bytes) -> bytes:
    return bytes([kind]) + seq.to_bytes(8, "big") + balance.to_bytes(8, "big") + sig


async def test_malformed_frames_are_bad_message_and_not_fatal(gateway):
    viewer = await _paying_viewer(gateway)
    before = _state(gateway, viewer)
    sig = sign_payment(_template(viewer), viewer.key.secret, viewer.channel.value - 1100)
    for frame in ["not json", "[1]", '{"type": "nope"}', b"\x00binary",
                  '{"type": "pay", "seq": 2.0, "balance": 1, "sig": "00"}',
                  '{"type": "pay", "seq": true, "balance": 1, "sig": "00"}',
                  '{"type": "pay", "seq": 2, "balance": 1, "sig": "ABCD"}',
                  # Binary pays (section 5a): short, another kind, out of range, long sig.
                  b"", _binary_pay(1, 2, 1000, b"")[:16],
                  _binary_pay(2, 2, viewer.channel.value - 1100, sig),
                  _binary_pay(1, 2**53, viewer.channel.value - 1100, sig),
                  _binary_pay(1, 2, 2**64 - 1, sig),
                  _binary_pay(1, 2, viewer.channel.value - 1100, sig + b"\x00" * 100)]:
        await viewer.send_raw(frame)
        await _error(viewer, "bad_message")
    assert _state(gateway, viewer) == before
    # The channel still takes a correct payment.
    await viewer.send(viewer.channel.pay(1100))
    assert (await viewer.expect(Paid)).paid == 1100


@pytest.mark.parametrize("path, version", [("/paystream/2", 3), ("/paystream/1", 1)])
async def test_unsupported_version_is_fatal(gateway, path, version):
    # A version 1 client, on version 1's path, learns which version to speak.
    async with websockets.connect(f"ws://127.0.0.1:{gateway.port}{path}") as ws:
        await ws.send(json.dumps({"type": "hello", "version": version, "agent": "x"}))
        answer = json.loads(await ws.recv())
        assert answer["code"] == "unsupported_version" and answer["fatal"] is True
        assert "this is version 2" in answer["message"]
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 5)


async def test_out_of_order_is_bad_state(gateway):
    async with websockets.connect(ws_url(gateway)) as ws:
        await ws.send(json.dumps({"type": "play", "media": "clip"}))
        assert json.loads(await ws.recv())["code"] == "bad_state"
    viewer = Viewer(ws_url(gateway), node_rpc(gateway))
    await viewer.connect()
    for msg in [Play(media="clip"), Pay(seq=1, balance=0, sig=b"\x30")]:
        await viewer.send(msg)
        await _error(viewer, "bad_state")
    await viewer.send_raw({"type": "fund", "txid": "00" * 32, "vout": 0})
    await _error(viewer, "bad_state")
    await viewer.send_raw({"type": "stop"})
    await _error(viewer, "bad_state")
    await viewer.send_raw({"type": "hello", "version": 2, "agent": "again"})
    await _error(viewer, "bad_state")
    # Still usable: open and fund work after all that.
    assert isinstance(await viewer.open_and_fund(), Ready)
    await viewer.send_raw({"type": "stop"})  # nothing plays
    await _error(viewer, "bad_state")


async def test_open_errors_bad_key_bad_expiry_bad_script(gateway):
    viewer = Viewer(ws_url(gateway), node_rpc(gateway))
    hello = await viewer.connect()
    key = coincurve.PrivateKey().public_key.format().hex()
    p2wpkh = "0014" + "11" * 20
    later = int(time.time()) + 6 * 3600
    cases = [
        ({"client_pubkey": "02" + "ff" * 32, "expiry": later, "change_script": p2wpkh}, "bad_key"),
        ({"client_pubkey": key, "expiry": int(time.time()) - 10, "change_script": p2wpkh},
         "bad_expiry"),
        ({"client_pubkey": key, "expiry": later + hello.limits.max_expiry_s,
          "change_script": p2wpkh}, "bad_expiry"),
        ({"client_pubkey": key, "expiry": later, "change_script": "6a"}, "bad_script"),
        ({"client_pubkey": key, "expiry": later, "change_script": ""}, "bad_script"),
    ]
    for fields, code in cases:
        await viewer.send_raw({"type": "open", **fields})
        await _error(viewer, code)
    assert gateway.store.read("SELECT count(*) FROM channels")[0][0] == 0
    await viewer.send_raw({"type": "open", "client_pubkey": key, "expiry": later,
                           "change_script": p2wpkh})
    assert isinstance(await viewer.expect(Terms), Terms)


async def test_refund_and_funding_errors(gateway):
    rpc = node_rpc(gateway)
    viewer = Viewer(ws_url(gateway), rpc)
    await viewer.connect()
    # cltv: refund is bad_state; fund of unknown/mismatching/small outputs.
    from gateway.protocol.channel import ClientChannel

    viewer.channel = ClientChannel(viewer.key.secret, viewer.hello, budget=50_000)
    change = bytes.fromhex("0014" + "22" * 20)
    await viewer.send(viewer.channel.open(expiry=int(time.time()) + 6 * 3600,
                                          change_script=change))
    terms = await viewer.expect(Terms)
    viewer.channel.accept_terms(terms)
    await viewer.send_raw({"type": "refund", "tx": "00", "value": 20000})
    await _error(viewer, "bad_state")
    await viewer.send_raw({"type": "fund", "txid": "ab" * 32, "vout": 0})
    await _error(viewer, "funding_not_found")
    other = await rpc.call("sendtoaddress", await rpc.call("getnewaddress"), "0.001")
    await viewer.send_raw({"type": "fund", "txid": other, "vout": 0})
    await _error(viewer, "funding_mismatch")
    small = await rpc.call("sendtoaddress", terms.funding_address, "0.00005")
    raw = await get_transaction(rpc, small)
    vout = next(o["n"] for o in raw["vout"] if o["scriptPubKey"]["address"] ==
                terms.funding_address)
    await viewer.send_raw({"type": "fund", "txid": small, "vout": vout})
    await _error(viewer, "value_out_of_range")
    # A spent output: the faucet's own earlier transaction output, now spent.
    spent_tx = await get_transaction(rpc, other)
    spent = spent_tx["vin"][0]
    await viewer.send_raw({"type": "fund", "txid": spent["txid"], "vout": spent["vout"]})
    await _error(viewer, "funding_spent")
    row = gateway.store.read("SELECT state, channel_id FROM channels")[0]
    assert (row["state"], row["channel_id"]) == ("open", None)

    # multisig: fund before refund is bad_state; garbage T2 is bad_refund;
    # a refund value outside the limits is value_out_of_range.
    ms = Viewer(ws_url(gateway), rpc)
    await ms.connect()
    ms.channel = ClientChannel(ms.key.secret, ms.hello, budget=50_000)
    await ms.send(ms.channel.open(expiry=int(time.time()) + 6 * 3600, change_script=change,
                                  kind="multisig"))
    ms.channel.accept_terms(await ms.expect(Terms))
    await ms.send_raw({"type": "fund", "txid": other, "vout": 0})
    await _error(ms, "bad_state")
    await ms.send_raw({"type": "refund", "tx": "deadbeef", "value": 20000})
    await _error(ms, "bad_refund")
    await ms.send_raw({"type": "refund", "tx": "deadbeef", "value": 10**12})
    await _error(ms, "value_out_of_range")
    await rpc.close()


@pytest.mark.parametrize("wire", ["json", "binary"])
async def test_payment_errors_leave_channel_unchanged(gateway, wire):
    viewer = await _paying_viewer(gateway)
    ch = viewer.channel
    template = _template(viewer)
    before = _state(gateway, viewer)
    value = ch.value
    good_balance = value - 2000
    low_s = sign_payment(template, viewer.key.secret, good_balance)

    def high_s(sig: bytes) -> bytes:
        # Flip S to n - S: same signature, non-canonical (BIP146 LOW_S).
        from gateway.protocol.signatures import split_sighash

        der, sighash = split_sighash(sig)
        r_len = der[3]
        r = der[4:4 + r_len]
        s = int.from_bytes(der[6 + r_len:], "big")
        n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
        s_bytes = (n - s).to_bytes(33, "big").lstrip(b"\x00")
        if s_bytes[0] & 0x80:
            s_bytes = b"\x00" + s_bytes
        body = b"\x02" + bytes([len(r)]) + r + b"\x02" + bytes([len(s_bytes)]) + s_bytes
        return b"\x30" + bytes([len(body)]) + body + bytes([sighash])

    cases = [
        (Pay(seq=1, balance=good_balance, sig=low_s), "seq_not_increasing"),
        (Pay(seq=2, balance=ch.balance + 1, sig=low_s), "balance_increased"),
        (Pay(seq=2, balance=100, sig=low_s), "value_out_of_range"),
        (Pay(seq=2, balance=good_balance, sig=high_s(low_s)), "non_canonical_signature"),
        (Pay(seq=2, balance=good_balance, sig=low_s[:-1] + b"\x01"), "non_canonical_signature"),
        (Pay(seq=2, balance=good_balance - 1, sig=low_s), "bad_signature"),
    ]
    for pay, code in cases:
        await _send_pay(viewer, pay, wire)
        await _error(viewer, code)
        assert _state(gateway, viewer) == before, code
    await viewer.send(Play(media="nope"))
    await _error(viewer, "media_unknown")
    assert _state(gateway, viewer) == before
    await _send_pay(viewer, Pay(seq=2, balance=good_balance, sig=low_s), wire)
    paid = await viewer.expect(Paid)
    assert (paid.seq, paid.paid) == (2, 2000)


async def test_binary_pay_is_offered_and_records_what_json_pay_records(gateway):
    """Two channels paid the same increments, one in JSON, one in binary: the same records."""
    json_viewer, binary_viewer = await _paying_viewer(gateway), await _paying_viewer(gateway)
    assert FEATURE_PAY_BINARY in binary_viewer.hello.features
    last: dict[str, Pay] = {}
    for total in (1500, 2600, 2600 + 546):
        for viewer, wire in ((json_viewer, "json"), (binary_viewer, "binary")):
            pay = last[wire] = viewer.channel.pay(total)
            await _send_pay(viewer, pay, wire)
            paid = await viewer.expect(Paid)
            assert (paid.seq, paid.balance, paid.paid) == (pay.seq, pay.balance, total)
            viewer.channel.on_paid(paid)
    for viewer, wire in ((json_viewer, "json"), (binary_viewer, "binary")):
        snapshot, row, durable_paid = _state(gateway, viewer)
        assert durable_paid == 2600 + 546
        assert (row["seq"], row["value"] - row["balance"], row["state"]) == (4, 2600 + 546, "ready")
        assert row["sig"] == last[wire].sig.hex()
        assert (snapshot.seq, snapshot.balance) == (4, row["balance"])
    # Both close and settle alike: the binary one's signature is a valid T3 input.
    for viewer in (json_viewer, binary_viewer):
        await viewer.send(viewer.channel.close())
        closed = await viewer.expect(Closed)
        assert (closed.paid, closed.balance) == (2600 + 546, viewer.channel.value - 2600 - 546)


async def test_resume_errors_and_session_replaced(gateway):
    viewer = await _paying_viewer(gateway)
    cid = viewer.channel.outpoint.channel_id
    other = Viewer(ws_url(gateway), node_rpc(gateway))
    hello = await other.connect()
    await other.send(Resume(channel_id="cd" * 32 + ":0", proof=b"\x30\x06\x02\x01\x01\x02\x01\x01"))
    await _error(other, "channel_unknown")
    wrong = sign_digest(coincurve.PrivateKey().secret, resume_digest(cid, hello.nonce))
    await other.send(Resume(channel_id=cid, proof=wrong))
    await _error(other, "bad_signature")
    before = _state(gateway, viewer)
    assert before[0].seq == 1
    # The rightful key (as a second device would hold it) takes the channel over.
    proof = sign_digest(viewer.key.secret, resume_digest(cid, hello.nonce))
    await other.send(Resume(channel_id=cid, proof=proof))
    ready = await other.expect(Ready)
    assert ready.paid == 1000
    await _error(viewer, "session_replaced", fatal=True)
    # The first session is gone; the new one owns the channel.
    assert gateway.channels[cid].session is not None
    await other.send_raw({"type": "close"})
    closed = await other.expect(Closed)
    assert closed.paid == 1000
    third = Viewer(ws_url(gateway), node_rpc(gateway))
    hello3 = await third.connect()
    await third.send(Resume(channel_id=cid,
                            proof=sign_digest(viewer.key.secret, resume_digest(cid, hello3.nonce))))
    await _error(third, "channel_closed", fatal=True)


async def test_busy_limits(gateway_factory):
    gw = await gateway_factory(max_unfunded_per_ip=1, max_sessions_per_ip=3)
    key = coincurve.PrivateKey().public_key.format().hex()
    opening = {"type": "open", "client_pubkey": key, "expiry": int(time.time()) + 6 * 3600,
               "change_script": "0014" + "11" * 20}
    a, b = Viewer(ws_url(gw), node_rpc(gw)), Viewer(ws_url(gw), node_rpc(gw))
    await a.connect()
    await b.connect()
    await a.send_raw(opening)
    await a.expect(Terms)
    await b.send_raw(opening)
    await _error(b, "busy")
    c = Viewer(ws_url(gw), node_rpc(gw))
    await c.connect()
    async with websockets.connect(ws_url(gw)) as ws:
        # Sessions count once past hello (hardening issue, item 1).
        await ws.send(json.dumps({"type": "hello", "version": 2, "agent": "t"}))
        answer = json.loads(await ws.recv())
        assert answer["code"] == "busy" and answer["fatal"] is True
    # When a's session ends, b may open.
    await a.disconnect()
    await asyncio.sleep(0.2)
    await b.send_raw(opening)
    assert isinstance(await b.expect(Terms), Terms)


async def test_channel_expiring_refuses_pay_and_play(gateway_factory):
    # Height expiry, margin 1 block; a slow settlement duty so the refusal is seen.
    gw = await gateway_factory(
        limits={"settle_margin_s": 600, "min_expiry_s": 600}, settle_interval_s=3600
    )
    rpc = node_rpc(gw)
    viewer = Viewer(ws_url(gw), rpc)
    await viewer.connect()
    from gateway.protocol.channel import ClientChannel

    viewer.channel = ClientChannel(viewer.key.secret, viewer.hello, budget=50_000)
    height = await rpc.call("getblockcount")
    change = bytes.fromhex("0014" + "22" * 20)
    await viewer.send(viewer.channel.open(expiry=height + 3, change_script=change))
    terms = await viewer.expect(Terms)
    viewer.channel.accept_terms(terms)
    txid = await rpc.call("sendtoaddress", terms.funding_address, "0.0002")
    raw = await get_transaction(rpc, txid)
    vout = next(o["n"] for o in raw["vout"] if o["scriptPubKey"]["address"] ==
                terms.funding_address)
    await viewer.send(viewer.channel.fund(__import__("gateway.protocol.transactions",
                                                     fromlist=["Outpoint"]).Outpoint(txid, vout),
                                          20_000))
    viewer.channel.on_ready(await viewer.expect(Ready))
    await viewer.send(viewer.channel.pay(1000))
    viewer.channel.on_paid(await viewer.expect(Paid))
    await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
    await gw.watcher.wait_for_tip(height, timeout=10)
    before = _state(gw, viewer)
    await viewer.send(viewer.channel.pay(1500))
    await _error(viewer, "channel_expiring")
    await viewer.send(Play(media="clip"))
    await _error(viewer, "channel_expiring")
    assert _state(gw, viewer) == before
    await rpc.close()


async def test_internal_error_when_the_node_is_down(gateway):
    viewer = Viewer(ws_url(gateway), node_rpc(gateway))
    await viewer.connect()
    from gateway.protocol.channel import ClientChannel

    viewer.channel = ClientChannel(viewer.key.secret, viewer.hello, budget=50_000)
    await viewer.send(viewer.channel.open(expiry=int(time.time()) + 6 * 3600,
                                          change_script=bytes.fromhex("0014" + "22" * 20)))
    viewer.channel.accept_terms(await viewer.expect(Terms))
    await gateway.node.stop()
    await viewer.send_raw({"type": "fund", "txid": "ab" * 32, "vout": 0})
    msg = await _error(viewer, "internal")
    assert "Traceback" not in msg.message and "Rpc" not in msg.message
    row = gateway.store.read("SELECT state FROM channels")[0]
    assert row["state"] == "open"


async def test_http_routes(gateway):
    import urllib.request

    base = f"http://127.0.0.1:{gateway.port}"
    health = json.load(await asyncio.to_thread(urllib.request.urlopen, base + "/api/health"))
    assert health["network"] == "regtest" and health["height"] > 100
    catalog = json.load(await asyncio.to_thread(urllib.request.urlopen, base + "/api/catalog"))
    assert {i["id"] for i in catalog} == {"clip", "song"}
    clip = next(i for i in catalog if i["id"] == "clip")
    assert clip["rate"] == 300 and clip["free_seconds"] == 3 and clip["duration_ms"] > 11_000
    assert clip["mime"].startswith("video/mp4")
    _ = (ServerHello, Stream)


async def test_watched_funding_address_times_out_then_a_fund_by_txid_still_works(
    gateway_factory,
):
    """``fund`` without txid watches funding_address for ``funding_timeout_s``
    (section 5); when nothing comes it answers ``funding_not_found`` and the
    opened channel can still be funded."""
    gw = await gateway_factory(funding_timeout_s=0.5)
    rpc = node_rpc(gw)
    viewer = Viewer(ws_url(gw), rpc)
    await viewer.connect()
    terms = await viewer.open_channel()
    await viewer.send_raw({"type": "fund"})
    err = await _error(viewer, "funding_not_found")
    assert "in time" in err.message
    outpoint, value = await viewer.pay_funding_address(terms, 20_000)
    await viewer.send(viewer.channel.fund(outpoint, value))
    ready = await viewer.expect(Ready)
    assert ready.channel_id == outpoint.channel_id
    await rpc.close()
