"""The channel state machines: every section 9 code they raise, state unchanged."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from fractions import Fraction

import coincurve
import pytest
from helpers_channel import (
    CHANGE_SCRIPT,
    CLIENT_KEY,
    DAY,
    LIMITS,
    NETWORK,
    NONCE,
    NOW,
    OPERATOR_SCRIPT,
    REFUND_SCRIPT,
    SERVER_KEY,
    TIP,
    ChannelPair,
    funding_outpoint,
    hello,
    key,
    to_client,
    to_server,
)

from gateway.protocol.channel import (
    ClientChannel,
    ClientState,
    Event,
    FundingClaim,
    LocalProtocolError,
    ServerChannel,
    ServerState,
    is_expiring,
    resume_digest,
)
from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.protocol.messages import (
    Closed,
    Due,
    Fund,
    Open,
    Paid,
    Pay,
    Ready,
    Refund,
    RefundSigned,
    Resume,
    Terms,
)
from gateway.protocol.metering import OverchargeError
from gateway.protocol.settlement import Batch, build_batch
from gateway.protocol.signatures import SECP256K1_ORDER, sign_digest
from gateway.protocol.transactions import Outpoint, build_refund, sign_payment, txid_of

KINDS = ["cltv", "multisig"]


@contextlib.contextmanager
def raises(code: ErrorCode, channel: ServerChannel | None = None):
    """Expect a ProtocolError with ``code`` and, given a channel, no change to it."""
    before = channel.snapshot() if channel is not None else None
    with pytest.raises(ProtocolError) as info:
        yield info
    assert info.value.code is code, info.value
    if channel is not None:
        assert channel.snapshot() == before


def open_msg(**changes) -> Open:
    base = Open(
        client_pubkey=coincurve.PrivateKey(CLIENT_KEY).public_key.format(),
        expiry=NOW + 7 * DAY,
        change_script=CHANGE_SCRIPT,
    )
    return dataclasses.replace(base, **changes)


def server_open(msg: Open, now: int = NOW, tip: int = TIP) -> ServerChannel:
    return ServerChannel.open(
        msg, server_privkey=SERVER_KEY, limits=LIMITS, network=NETWORK, now=now, tip_height=tip
    )


def settle(channel: ServerChannel) -> Batch | None:
    """What the settlement duty does for one channel: close, claim, settle it alone."""
    channel.close()
    claim = channel.claim([(b"\x00\x14" + b"\x33" * 20, 1)])
    batch = None if claim is None else build_batch([claim], OPERATOR_SCRIPT, Fraction(2)).batch
    if batch is None:
        channel.abandon()
        return None
    channel.settled_in(batch.txid)
    return batch


# -- open ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_full_session(kind):
    pair = ChannelPair(kind=kind)
    assert pair.server.channel_id == funding_outpoint(kind).channel_id
    assert pair.client.state is ClientState.READY
    record = pair.pay(1_000)
    assert (record.seq, record.balance, record.paid) == (1, 99_000, 1_000)
    assert record.channel_id == pair.server.channel_id
    pair.pay(2_000)
    assert pair.server.paid == 2_000 and pair.client.paid == 2_000
    pair.client.close()
    settlement = settle(pair.server)
    assert settlement is not None and pair.server.state is ServerState.CLOSING
    assert settlement.outputs[0] == (CHANGE_SCRIPT, 98_000)
    assert sum(amount for _, amount in settlement.outputs) + settlement.fee == 100_000
    assert settle(pair.server) == settlement  # idempotent: RFC 6979, the same batch
    closed = pair.server.closed_message()
    exit_fee = pair.server.exit_fee
    assert closed == Closed(txid=settlement.txid, paid=2_000, balance=98_000, exit_fee=exit_fee)
    pair.client.on_closed(closed)
    pair.client.check_settlement(settlement.tx, [100_000])
    pair.server.mark_closed()
    assert pair.server.state is ServerState.CLOSED
    with raises(ErrorCode.BAD_STATE, pair.server):
        pair.server.close()
    assert pair.client.state is ClientState.CLOSED


def test_terms_match_client_recomputation():
    channel = server_open(open_msg(kind="multisig"))
    terms = channel.terms()
    assert terms.kind == "multisig" and terms.expiry == NOW + 7 * DAY
    assert terms.funding_script == b"\x00\x20" + hashlib.sha256(terms.witness_script).digest()
    assert terms.funding_address.startswith("bcrt1q")
    assert channel.state is ServerState.OPEN and channel.paid == 0 and channel.channel_id is None


@pytest.mark.parametrize(
    "pubkey",
    [b"", b"\x02" * 32, b"\x04" + b"\x01" * 64, b"\x02" + b"\xff" * 32, b"\x05" + b"\x01" * 32],
)
def test_open_bad_key(pubkey):
    with raises(ErrorCode.BAD_KEY):
        server_open(open_msg(client_pubkey=pubkey))


@pytest.mark.parametrize(
    "expiry",
    [
        NOW + 3_600,  # below min_expiry_s
        NOW + 31 * DAY,  # above max_expiry_s
        NOW - 10,  # past
        0,
        2**32,  # does not fit nLockTime
        TIP + 10,  # height: 6000 s, below min
        TIP + 30 * 144 + 10,  # height: beyond 30 days
        TIP - 5,  # height in the past
    ],
)
def test_open_bad_expiry(expiry):
    with raises(ErrorCode.BAD_EXPIRY):
        server_open(open_msg(expiry=expiry))


def test_open_expiry_inside_margin_is_refused():
    # A window that admits an expiry inside the settle margin: the margin wins.
    limits = dataclasses.replace(LIMITS, min_expiry_s=0, settle_margin_s=7_200)
    with raises(ErrorCode.BAD_EXPIRY) as info:
        ServerChannel.open(
            open_msg(expiry=NOW + 7_000),
            server_privkey=SERVER_KEY,
            limits=limits,
            network=NETWORK,
            now=NOW,
            tip_height=TIP,
        )
    assert "settle margin" in info.value.message


def test_open_height_expiry_accepted():
    channel = server_open(open_msg(expiry=TIP + 144))
    assert channel.expiry == TIP + 144 and channel.terms().expiry == TIP + 144


@pytest.mark.parametrize(
    "script",
    [
        b"",
        b"\x6a" * 10_001,
        b"\x6a\x04abcd",  # OP_RETURN
        b"\x51",  # OP_TRUE
        b"\x00\x14" + b"\x01" * 19,  # truncated P2WPKH
    ],
)
def test_open_bad_script(script):
    with raises(ErrorCode.BAD_SCRIPT):
        server_open(open_msg(change_script=script))


# -- refund and funding --------------------------------------------------------------


def multisig_channel() -> tuple[ServerChannel, ClientChannel]:
    client = ClientChannel(CLIENT_KEY, hello(), budget=10**6)
    server = server_open(
        to_server(client.open(expiry=NOW + 7 * DAY, change_script=CHANGE_SCRIPT, kind="multisig"))
    )
    client.accept_terms(server.terms())
    return server, client


def test_refund_cltv_is_bad_state():
    channel = server_open(open_msg())
    tx = build_refund(channel.script, funding_outpoint(), 50_000, REFUND_SCRIPT, 300)
    with raises(ErrorCode.BAD_STATE, channel):
        channel.sign_refund(Refund(tx=tx, value=50_000))


def test_refund_value_out_of_range_and_bad_refund():
    server, client = multisig_channel()
    refund = client.refund_request(funding_outpoint(), 50_000, dest_script=REFUND_SCRIPT, fee=300)
    for value in (LIMITS.min_value - 1, LIMITS.max_value + 1):
        with raises(ErrorCode.VALUE_OUT_OF_RANGE, server):
            server.sign_refund(dataclasses.replace(refund, value=value))
    with raises(ErrorCode.BAD_REFUND, server):
        server.sign_refund(Refund(tx=b"\x01\x02\x03", value=50_000))
    wrong_locktime = build_refund(
        dataclasses.replace(server.script, expiry=NOW), funding_outpoint(), 50_000, b"\x51", 0
    )
    with raises(ErrorCode.BAD_REFUND, server):
        server.sign_refund(Refund(tx=wrong_locktime, value=50_000))


def test_later_refund_replaces_earlier_and_funding_must_match_it():
    server, client = multisig_channel()
    first = client.refund_request(funding_outpoint("a"), 50_000, dest_script=REFUND_SCRIPT, fee=1)
    client.accept_refund_signed(server.sign_refund(to_server(first)))
    second = client.refund_request(funding_outpoint("b"), 60_000, dest_script=REFUND_SCRIPT, fee=1)
    signed = server.sign_refund(to_server(second))
    assert server.refund_outpoint == funding_outpoint("b") and server.refund_value == 60_000
    t2 = client.accept_refund_signed(signed)
    assert t2 and client.signed_refund == t2
    spk = server.script.script_pubkey
    with raises(ErrorCode.FUNDING_MISMATCH, server):
        server.accept_funding(funding_outpoint("a"), 50_000, spk)  # the replaced T2
    with raises(ErrorCode.FUNDING_MISMATCH, server):
        server.accept_funding(funding_outpoint("b"), 59_999, spk)  # not the refund value
    with raises(ErrorCode.FUNDING_MISMATCH, server):
        server.accept_funding(funding_outpoint("b"), 60_000, b"\x00\x20" + b"\x00" * 32)
    server.accept_funding(funding_outpoint("b"), 60_000, spk)
    assert server.state is ServerState.FUNDING and server.balance == 60_000
    with raises(ErrorCode.BAD_STATE, server):  # refund after fund
        server.sign_refund(to_server(second))


def test_multisig_fund_before_refund_is_bad_state():
    server, _ = multisig_channel()
    with raises(ErrorCode.BAD_STATE, server):
        server.accept_funding(funding_outpoint(), 50_000, server.script.script_pubkey)


def test_cltv_funding_checks():
    channel = server_open(open_msg())
    spk = channel.script.script_pubkey
    with raises(ErrorCode.FUNDING_MISMATCH, channel):
        channel.accept_funding(funding_outpoint(), 50_000, CHANGE_SCRIPT)
    for value in (LIMITS.min_value - 1, LIMITS.max_value + 1):
        with raises(ErrorCode.VALUE_OUT_OF_RANGE, channel):
            channel.accept_funding(funding_outpoint(), value, spk)
    with raises(ErrorCode.BAD_STATE, channel):
        channel.confirm()  # not funded yet
    with raises(ErrorCode.BAD_STATE, channel):
        channel.ready()
    channel.accept_funding(funding_outpoint(), 50_000, spk)
    with raises(ErrorCode.BAD_STATE, channel):
        channel.accept_funding(funding_outpoint(), 50_000, spk)  # twice


# -- pay: section 9 order ---------------------------------------------------------------


def pay_for(pair: ChannelPair, balance: int, seq: int | None = None, privkey=CLIENT_KEY) -> Pay:
    assert pair.client._template is not None
    sig = sign_payment(pair.client._template, privkey, balance)
    return Pay(seq=pair.client.seq + 1 if seq is None else seq, balance=balance, sig=sig)


def receive(pair: ChannelPair, pay: Pay, now: int = NOW, tip: int = TIP):
    """The gateway takes ``pay``: decided, "stored", then committed."""
    record = pair.server.receive_payment(pay, now=now, tip_height=tip)
    pair.server.commit_payment(record)
    return record


def high_s(sig: bytes) -> bytes:
    """The same signature with S replaced by n - S (valid ECDSA, not low-S)."""
    der, sighash = sig[:-1], sig[-1:]
    len_r = der[3]
    r = der[4 : 4 + len_r]
    s = int.from_bytes(der[6 + len_r :], "big")
    s_bytes = (SECP256K1_ORDER - s).to_bytes(33, "big").lstrip(b"\x00")
    if s_bytes[0] & 0x80:
        s_bytes = b"\x00" + s_bytes
    body = b"\x02" + bytes([len(r)]) + r + b"\x02" + bytes([len(s_bytes)]) + s_bytes
    return b"\x30" + bytes([len(body)]) + body + sighash


@pytest.mark.parametrize("kind", KINDS)
def test_pay_errors_leave_channel_unchanged(kind):
    pair = ChannelPair(kind=kind)
    pair.pay(5_000)  # seq 1, balance 95_000
    server = pair.server
    good = pay_for(pair, 90_000)
    with raises(ErrorCode.SEQ_NOT_INCREASING, server):
        receive(pair, dataclasses.replace(good, seq=1))
    with raises(ErrorCode.SEQ_NOT_INCREASING, server):
        receive(pair, dataclasses.replace(good, seq=0))
    with raises(ErrorCode.BALANCE_INCREASED, server):
        receive(pair, pay_for(pair, 95_001))
    with raises(ErrorCode.BALANCE_INCREASED, server):
        receive(pair, pay_for(pair, 100_000))
    for dust in (1, 545):
        with raises(ErrorCode.VALUE_OUT_OF_RANGE, server):
            receive(pair, dataclasses.replace(good, balance=dust))
    with raises(ErrorCode.NON_CANONICAL_SIGNATURE, server):
        receive(pair, dataclasses.replace(good, sig=high_s(good.sig)))
    with raises(ErrorCode.NON_CANONICAL_SIGNATURE, server):
        receive(pair, dataclasses.replace(good, sig=good.sig[:-1] + b"\x01"))  # SIGHASH_ALL
    with raises(ErrorCode.NON_CANONICAL_SIGNATURE, server):
        receive(pair, dataclasses.replace(good, sig=good.sig[:-1] + b"\x82"))  # NONE for >0
    with raises(ErrorCode.NON_CANONICAL_SIGNATURE, server):
        receive(pair, dataclasses.replace(good, sig=b""))
    with raises(ErrorCode.NON_CANONICAL_SIGNATURE, server):
        receive(pair, dataclasses.replace(good, sig=b"\x30\x00\x83"))
    with raises(ErrorCode.BAD_SIGNATURE, server):
        receive(pair, dataclasses.replace(good, balance=89_000))  # signed another balance
    with raises(ErrorCode.BAD_SIGNATURE, server):
        receive(pair, pay_for(pair, 90_000, privkey=key("mallory")))
    # order: the first failing check answers (seq before balance before sig)
    with raises(ErrorCode.SEQ_NOT_INCREASING, server):
        receive(pair, Pay(seq=1, balance=200_000, sig=b""))
    with raises(ErrorCode.BALANCE_INCREASED, server):
        receive(pair, Pay(seq=9, balance=200_000, sig=b""))
    with raises(ErrorCode.VALUE_OUT_OF_RANGE, server):
        receive(pair, Pay(seq=9, balance=10, sig=b""))
    # the client may go on with a correct message (section 9)
    record = receive(pair, good)
    assert (record.seq, record.balance, record.paid) == (2, 90_000, 10_000)


def test_pay_balance_zero_uses_sighash_none():
    pair = ChannelPair(value=50_000)
    record = pair.pay(50_000)
    assert record.balance == 0 and record.sig[-1] == 0x82 and record.paid == 50_000
    settlement = settle(pair.server)
    assert settlement is not None and all(spk != CHANGE_SCRIPT for spk, _ in settlement.outputs)


def test_pay_bad_state_before_ready_and_after_close():
    pair = ChannelPair()
    pay = pay_for(pair, 90_000)
    channel = server_open(open_msg())
    with raises(ErrorCode.BAD_STATE, channel):
        channel.receive_payment(pay, now=NOW, tip_height=TIP)
    channel.accept_funding(funding_outpoint(), 100_000, channel.script.script_pubkey)
    with raises(ErrorCode.BAD_STATE, channel):  # funding, not yet confirmed
        channel.receive_payment(pay, now=NOW, tip_height=TIP)
    with raises(ErrorCode.BAD_STATE, channel):
        channel.paid_message()
    pair.pay(1_000)
    settle(pair.server)
    with raises(ErrorCode.BAD_STATE, pair.server):
        receive(pair, pay)


def test_pay_channel_expiring_time_and_height():
    pair = ChannelPair()
    edge = pair.expiry - LIMITS.settle_margin_s
    pay = pay_for(pair, 90_000)
    with raises(ErrorCode.CHANNEL_EXPIRING, pair.server):
        receive(pair, pay, now=edge)
    assert not pair.server.is_expiring(edge - 1, TIP)
    receive(pair, pay, now=edge - 1)

    height = ChannelPair(expiry=TIP + 144)
    margin_blocks = 6  # ceil(3600 / 600)
    pay = pay_for(height, 90_000)
    # next block TIP' + 1 >= expiry - 6  <=>  TIP' >= expiry - 7
    with raises(ErrorCode.CHANNEL_EXPIRING, height.server):
        receive(height, pay, tip=TIP + 144 - margin_blocks - 1)
    receive(height, pay, tip=TIP + 144 - margin_blocks - 2)


@pytest.mark.parametrize(
    ("expiry", "margin", "now", "tip", "expected"),
    [
        (NOW + 100, 100, NOW, TIP, True),
        (NOW + 101, 100, NOW, TIP, False),
        (TIP + 2, 600, NOW, TIP, True),  # next block TIP+1 >= TIP+2-1
        (TIP + 3, 600, NOW, TIP, False),
        (TIP + 3, 601, NOW, TIP, True),  # ceil(601/600) = 2 blocks
        (TIP + 1, 0, NOW, TIP, True),
    ],
)
def test_is_expiring(expiry, margin, now, tip, expected):
    assert is_expiring(expiry, margin, now, tip) is expected


# -- resume -----------------------------------------------------------------------------


def resume_msg(channel_id: str, nonce: bytes = NONCE, privkey: bytes = CLIENT_KEY) -> Resume:
    return Resume(
        channel_id=channel_id, proof=sign_digest(privkey, resume_digest(channel_id, nonce))
    )


@pytest.mark.parametrize("kind", KINDS)
def test_resume(kind):
    pair = ChannelPair(kind=kind)
    pair.pay(3_000)
    assert pair.server.channel_id is not None
    new_nonce = bytes(range(32))
    resume = to_server(pair.client.resume(hello(new_nonce)))
    before = pair.server.snapshot()
    ready = pair.server.check_resume(resume, nonce=new_nonce, now=NOW, tip_height=TIP)
    assert pair.server.snapshot() == before
    assert ready == Ready(
        channel_id=pair.server.channel_id,
        value=100_000,
        balance=97_000,
        paid=3_000,
        expiry=pair.expiry,
        exit_fee=0,
    )
    pair.client.on_ready(ready)
    pair.pay(4_000)
    assert pair.server.seq == 2


def test_resume_errors_in_order():
    pair = ChannelPair()
    server = pair.server
    cid = server.channel_id
    assert cid is not None

    def check(msg, nonce=NONCE, now=NOW):
        return server.check_resume(msg, nonce=nonce, now=now, tip_height=TIP)

    with raises(ErrorCode.CHANNEL_UNKNOWN, server):
        check(resume_msg(funding_outpoint("other").channel_id))
    with raises(ErrorCode.BAD_SIGNATURE, server):
        check(resume_msg(cid), nonce=bytes(32))  # proof over another session's nonce
    with raises(ErrorCode.BAD_SIGNATURE, server):
        check(resume_msg(cid, privkey=key("mallory")))
    good = resume_msg(cid)
    with raises(ErrorCode.BAD_SIGNATURE, server):
        check(dataclasses.replace(good, proof=good.proof + b"\x01"))  # a sighash byte
    with raises(ErrorCode.BAD_SIGNATURE, server):
        check(dataclasses.replace(good, proof=high_s(good.proof + b"\x01")[:-1]))
    with raises(ErrorCode.CHANNEL_EXPIRING, server) as info:
        check(good, now=pair.expiry)
    assert info.value.fatal
    assert check(good).balance == 100_000
    pair.pay(1_000)
    settle(server)
    with raises(ErrorCode.BAD_SIGNATURE, server):  # proof is checked before closed
        check(resume_msg(cid, privkey=key("mallory")))
    with raises(ErrorCode.CHANNEL_CLOSED, server):
        check(good, now=pair.expiry)  # closed is checked before expiring


def test_resume_unfunded_channel_is_unknown():
    channel = server_open(open_msg())
    with raises(ErrorCode.CHANNEL_UNKNOWN, channel):
        channel.check_resume(
            resume_msg(funding_outpoint().channel_id), nonce=NONCE, now=NOW, tip_height=TIP
        )


# -- settlement, restore ---------------------------------------------------------------------


def test_settle_with_nothing_paid_broadcasts_nothing():
    pair = ChannelPair()
    assert settle(pair.server) is None
    assert pair.server.state is ServerState.CLOSED
    exit_fee = pair.server.exit_fee
    assert pair.server.closed_message() == Closed(
        txid=None, paid=0, balance=100_000, exit_fee=exit_fee
    )
    pair.server.mark_refunded()  # the client's refund at expiry
    assert pair.server.state is ServerState.REFUNDED
    with raises(ErrorCode.BAD_STATE, pair.server):
        pair.server.claim()
    with raises(ErrorCode.BAD_STATE, pair.server):
        pair.server.mark_closed()


def test_settle_unfunded_and_refund_while_ready():
    channel = server_open(open_msg())
    channel.abandon()  # nothing funded: closed, nothing to broadcast
    assert channel.state is ServerState.CLOSED
    assert channel.closed_message() == Closed(
        txid=None, paid=0, balance=0, exit_fee=channel.exit_fee
    )
    pair = ChannelPair()
    pair.pay(1_000)
    pair.server.mark_refunded()
    assert pair.server.state is ServerState.REFUNDED


@pytest.mark.parametrize("kind", KINDS)
def test_restore_from_snapshot(kind):
    pair = ChannelPair(kind=kind)
    pair.pay(2_000)
    record = pair.server.snapshot()
    restored = ServerChannel.restore(record, server_privkey=SERVER_KEY, limits=LIMITS)
    assert restored.snapshot() == record
    assert restored.terms() == pair.server.terms()
    pair.server = restored
    pair.pay(3_000)
    with raises(ErrorCode.SEQ_NOT_INCREASING, restored):
        receive(pair, pay_for(pair, 90_000, seq=1))
    settlement = settle(restored)
    assert settlement is not None and restored.snapshot().settlement_txid == settlement.txid
    again = ServerChannel.restore(restored.snapshot(), server_privkey=SERVER_KEY, limits=LIMITS)
    assert again.state is ServerState.CLOSING
    again.mark_closed()
    opened = ServerChannel.restore(
        server_open(open_msg()).snapshot(), server_privkey=SERVER_KEY, limits=LIMITS
    )
    assert opened.state is ServerState.OPEN and opened.channel_id is None


# -- client side ------------------------------------------------------------------------


def proposed_client(kind="cltv") -> tuple[ClientChannel, Terms]:
    client = ClientChannel(CLIENT_KEY, hello(), budget=10**6)
    server = server_open(
        to_server(client.open(expiry=NOW + 7 * DAY, change_script=CHANGE_SCRIPT, kind=kind))
    )
    return client, server.terms()


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"kind": "multisig"}, ErrorCode.BAD_STATE),
        ({"expiry": NOW + 8 * DAY}, ErrorCode.BAD_EXPIRY),
        ({"server_pubkey": b"\x02" + b"\xff" * 32}, ErrorCode.BAD_KEY),
        ({"witness_script": b"\x51"}, ErrorCode.BAD_SCRIPT),
        ({"funding_script": b"\x00\x20" + b"\x00" * 32}, ErrorCode.BAD_SCRIPT),
        ({"funding_address": "bcrt1qattacker"}, ErrorCode.BAD_SCRIPT),
    ],
)
def test_client_never_trusts_terms(change, code):
    client, terms = proposed_client()
    with raises(code) as info:
        client.accept_terms(dataclasses.replace(terms, **change))
    assert info.value.fatal and client.state is ClientState.PROPOSED and client.script is None


def test_client_rejects_another_server_key_consistently_built():
    """Terms for a different K2 are fine only if the scripts match that K2."""
    client, terms = proposed_client()
    other = server_open(open_msg())
    assert other.terms().server_pubkey == terms.server_pubkey
    client.accept_terms(terms)
    assert client.state is ClientState.OPEN
    with raises(ErrorCode.BAD_STATE):
        client.accept_terms(terms)  # twice


def test_client_budget_and_monotonic_balance():
    pair = ChannelPair(budget=5_000)
    before = (pair.client.seq, pair.client.balance)
    with pytest.raises(LocalProtocolError, match="budget"):
        pair.client.pay(5_001)
    with pytest.raises(LocalProtocolError, match="nothing to sign"):
        pair.client.pay(0)
    assert (pair.client.seq, pair.client.balance) == before
    pair.pay(5_000)
    with pytest.raises(LocalProtocolError):
        pair.client.pay(4_000)  # would raise the balance
    big = ChannelPair(value=20_000)
    with pytest.raises(LocalProtocolError, match="channel value"):
        big.client.pay(20_001)
    with pytest.raises(LocalProtocolError, match="dust"):
        big.client.pay(19_500)
    assert big.client.seq == 0


def test_client_pay_due_checks_its_own_bill():
    pair = ChannelPair()
    pair.stream("m", rate_msat=1_000, free_ms=0)
    greedy = Due(total=3, media="m", index=0, duration_ms=2_000)
    with pytest.raises(OverchargeError):
        pair.client.pay_due(greedy)
    assert pair.client.seq == 0 and pair.client.meter.bill == 0
    pay = pair.client.pay_due(dataclasses.replace(greedy, total=2))
    assert pay.balance == 99_998 and pay.seq == 1
    # the pay was lost with the connection: after a resume the gateway asks
    # for the same chunk again; the same increment goes again, nothing new
    pair.client.resume(hello())
    pair.client.on_ready(pair.server.ready())
    pair.stream("m", rate_msat=1_000, free_ms=0)
    assert pair.client.pay_due(dataclasses.replace(greedy, total=2)) == pay
    assert (pair.client.seq, pair.client.balance) == (1, 99_998)
    # billed once: the gateway showed (ready.balance) it never got the increment
    assert pair.client.meter.bill == 2_000_000
    record = receive(pair, to_server(pay))
    assert record.seq == 1 and pair.server.paid == 2
    fresh = ChannelPair()  # a due of 0 on a channel that never paid: refused
    fresh.stream("m", rate_msat=0, free_ms=0)
    with pytest.raises(LocalProtocolError, match="nothing to pay"):
        fresh.client.pay_due(Due(total=0, media="m", index=0, duration_ms=1))


def test_client_out_of_order_and_server_lies():
    client = ClientChannel(CLIENT_KEY, hello(), budget=10**6)
    with pytest.raises(LocalProtocolError):
        client.pay(1)
    with pytest.raises(LocalProtocolError, match="no terms"):
        client.fund(funding_outpoint(), 10_000)
    client.open(expiry=NOW + DAY, change_script=CHANGE_SCRIPT)
    with pytest.raises(LocalProtocolError):
        client.open(expiry=NOW + DAY, change_script=CHANGE_SCRIPT)
    with pytest.raises(LocalProtocolError):
        ClientChannel(CLIENT_KEY, hello(), budget=1).open(
            expiry=NOW, change_script=b"", kind="lightning"
        )
    pair = ChannelPair()
    with pytest.raises(ProtocolError):
        pair.client.on_ready(pair.server.ready())  # ready twice
    with pytest.raises(ProtocolError):
        pair.client.on_paid(Paid(seq=5, balance=100_000, paid=0))  # never signed
    pair.pay(1_000)
    with pytest.raises(ProtocolError):
        pair.client.on_paid(Paid(seq=1, balance=98_000, paid=2_000))
    with pytest.raises(
        LocalProtocolError, match="cltv channel in state 'ready' cannot handle 'refund'"
    ):
        pair.client.refund_request(funding_outpoint(), 1, dest_script=REFUND_SCRIPT, fee=1)


def test_client_on_ready_checks_gateway_view():
    pair = ChannelPair()
    pair.pay(1_000)
    pair.client.resume(hello())
    ready = pair.server.ready()
    for bad in (
        dataclasses.replace(ready, channel_id=funding_outpoint("x").channel_id),
        dataclasses.replace(ready, value=ready.value + 1),
        dataclasses.replace(ready, balance=ready.balance - 1),  # claims more paid
    ):
        with pytest.raises(ProtocolError):
            pair.client.on_ready(bad)
        assert pair.client.state is ClientState.FUNDING
    # the gateway lost our last increment: its balance is higher; we keep ours
    pair.client.on_ready(dataclasses.replace(ready, balance=100_000, paid=0))
    assert pair.client.balance == 99_000


def test_client_refund_signed_bad_signature():
    server, client = multisig_channel()
    assert client.paid == 0
    with pytest.raises(ProtocolError) as info:  # refund_signed before any refund
        client.accept_refund_signed(RefundSigned(sig=b"\x30\x01"))
    assert info.value.code is ErrorCode.BAD_STATE and client.state is ClientState.OPEN
    refund = client.refund_request(funding_outpoint(), 50_000, dest_script=REFUND_SCRIPT, fee=300)
    good = server.sign_refund(to_server(refund))
    forged = RefundSigned(sig=sign_digest(key("mallory"), bytes(32)) + b"\x01")
    with pytest.raises(ProtocolError) as info:
        client.accept_refund_signed(forged)
    assert info.value.code is ErrorCode.BAD_SIGNATURE and info.value.fatal
    assert client.state is ClientState.OPEN and client.signed_refund is None
    with pytest.raises(LocalProtocolError, match="cannot handle 'fund'"):
        client.fund(funding_outpoint(), 50_000)
    client.accept_refund_signed(good)
    with pytest.raises(LocalProtocolError, match="T2"):
        client.fund(funding_outpoint("other"), 50_000)
    client.fund(funding_outpoint(), 50_000)
    assert client.state is ClientState.FUNDING


def test_client_cltv_refund_and_close_paths():
    pair = ChannelPair()
    refund = pair.client.cltv_refund(dest_script=REFUND_SCRIPT, fee=300)
    assert refund and pair.client.signed_refund == refund
    multi = ChannelPair(kind="multisig")
    with pytest.raises(LocalProtocolError):
        multi.client.cltv_refund(dest_script=REFUND_SCRIPT, fee=300)
    pair.client.close()
    with pytest.raises(LocalProtocolError):
        pair.client.close()
    pair.client.on_closed(pair.server.closed_message())
    pair.client.mark_refunded()
    assert pair.client.state is ClientState.REFUNDED


def test_transition_error_names_role_state_event():
    channel = server_open(open_msg())
    with raises(ErrorCode.BAD_STATE) as info:
        channel.confirm()
    assert info.value.message == "server cltv channel in state 'open' cannot handle 'confirm'"
    assert Event.PAY.value == "pay"
    assert Outpoint.parse(f"{'0' * 64}:0").vout == 0


# -- fund message, settlement after restart ------------------------------------------------


def t1_paying(spk: bytes, value: int) -> bytes:
    """A T1 with a change output first and the funding output second."""
    from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxOut, lx
    from bitcoin.core.script import CScript

    tx = CTransaction(
        [CTxIn(COutPoint(lx("11" * 32), 0))],
        [CTxOut(5_000, CScript(REFUND_SCRIPT)), CTxOut(value, CScript(spk))],
        nVersion=2,
    )
    return bytes(tx.serialize())


def test_resolve_fund_claims():
    channel = server_open(open_msg())
    spk = channel.script.script_pubkey
    tx = t1_paying(spk, 70_000)
    txid = txid_of(tx)
    before = channel.snapshot()
    claim = channel.resolve_fund(Fund(tx=tx))
    assert claim == FundingClaim(Outpoint(txid, 1), 70_000, tx)
    assert channel.resolve_fund(Fund(txid=txid, vout=1, tx=tx)) == claim
    assert channel.resolve_fund(Fund(txid=txid, vout=3)) == FundingClaim(
        Outpoint(txid, 3), None, None
    )
    assert channel.resolve_fund(Fund()) == FundingClaim(None, None, None)
    with raises(ErrorCode.FUNDING_MISMATCH, channel):
        channel.resolve_fund(Fund(txid="00" * 32, vout=1, tx=tx))
    with raises(ErrorCode.FUNDING_MISMATCH, channel):
        channel.resolve_fund(Fund(txid=txid, vout=0, tx=tx))
    with raises(ErrorCode.FUNDING_MISMATCH, channel):
        channel.resolve_fund(Fund(tx=t1_paying(CHANGE_SCRIPT, 70_000)))
    with raises(ErrorCode.BAD_MESSAGE, channel):
        channel.resolve_fund(Fund(tx=b"\x00\x01"))
    assert channel.snapshot() == before
    channel.accept_funding(claim.outpoint, claim.value, spk)  # type: ignore[arg-type]
    with raises(ErrorCode.BAD_STATE, channel):
        channel.resolve_fund(Fund(tx=tx))


def test_resolve_fund_multisig():
    server, client = multisig_channel()
    with raises(ErrorCode.BAD_STATE, server):
        server.resolve_fund(Fund())  # fund before any refund
    refund = client.refund_request(funding_outpoint(), 50_000, dest_script=REFUND_SCRIPT, fee=300)
    server.sign_refund(to_server(refund))
    # without txid or tx the only possible output is the one T2 spends
    assert server.resolve_fund(Fund()) == FundingClaim(funding_outpoint(), None, None)


def test_closing_channel_restored_rebuilds_the_same_settlement():
    pair = ChannelPair()
    pair.pay(20_000)
    settlement = settle(pair.server)
    assert settlement is not None
    restored = ServerChannel.restore(
        pair.server.snapshot(), server_privkey=SERVER_KEY, limits=LIMITS
    )
    assert restored.state is ServerState.CLOSING
    assert restored.settlement_txid == settlement.txid
    restored.unsettle()  # its batch was refused: settle it again, the same way
    again = settle(restored)
    assert again == settlement and restored.state is ServerState.CLOSING
    restored.mark_closed("ff" * 32)  # a fee-bumped replacement confirmed
    assert restored.closed_message().txid == "ff" * 32


def kernel_verify(tx: bytes, spk: bytes, amount: int) -> bool:
    """libbitcoinkernel's verdict on input 0 spending (spk, amount), all flags."""
    import pbk
    from pbk.script import PrecomputedTransactionData

    ktx = pbk.Transaction(tx)
    txdata = PrecomputedTransactionData(ktx, [pbk.TransactionOutput(pbk.ScriptPubkey(spk), amount)])
    return (
        pbk.ScriptPubkey(spk).verify(amount, ktx, txdata, 0, pbk.ScriptVerificationFlags.ALL) == 1
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("total", [20_000, 100_000])
def test_paired_settlement_is_consensus_valid(kind, total):
    """The client's last increment + the server's settlement spend the funding output."""
    pair = ChannelPair(kind=kind)
    pair.pay(total // 2)
    pair.pay(total)
    settlement = settle(pair.server)
    assert settlement is not None
    assert kernel_verify(settlement.tx, pair.server.script.script_pubkey, pair.value)
    client_out = [amt for spk, amt in settlement.outputs if spk == CHANGE_SCRIPT]
    assert client_out == ([pair.value - total] if total < pair.value else [])


# -- the reserve (section 3): the client's own exit fee, paid first ----------------------


def test_the_reserve_is_quoted_in_terms_and_due_before_any_media():
    pair = ChannelPair(feerate=Fraction(2))
    server, client = pair.server, pair.client
    vbytes = server.exit_vbytes
    assert server.exit_fee == 2 * vbytes and client.exit_fee == server.exit_fee
    assert client.quoted == Fraction(2) and server.quoted == Fraction(2)
    assert server.ready().exit_fee == server.exit_fee
    # The first chunk of a stream, its initialization segment, is due for the
    # reserve alone; the free minute then costs nothing more.
    pair.stream("m", rate_msat=1_000, free_ms=60_000)
    pair.deliver("m", -1, 0, 1_000, 60_000)
    assert server.paid == server.exit_fee == pair.released[-1][2]
    for index in range(30):
        pair.deliver("m", index, 2_000, 1_000, 60_000)
    assert server.paid == server.exit_fee  # the free minute was free
    pair.deliver("m", 30, 2_000, 1_000, 60_000)
    assert server.paid == server.exit_fee + 2
    # A gateway asking the reserve twice is overcharging.
    with pytest.raises(OverchargeError):
        client.pay_due(Due(total=2 * server.exit_fee + 3, media="m", index=31, duration_ms=2_000))
    # Settled alone, the reserve pays at least the quoted feerate.
    batch = settle(server)
    assert batch is not None and batch.feerate >= 2
    client.close()
    client.check_settlement(batch.tx, [pair.value])


def test_a_client_refuses_terms_quoting_an_exit_above_its_feerate():
    client = ClientChannel(CLIENT_KEY, hello(), budget=10**6, max_feerate=Fraction(5))
    msg = to_server(client.open(expiry=NOW + 7 * DAY, change_script=CHANGE_SCRIPT))
    expensive = ServerChannel.open(msg, server_privkey=SERVER_KEY, limits=LIMITS,
                                   network=NETWORK, now=NOW, tip_height=TIP, feerate=Fraction(6))
    with pytest.raises(ProtocolError, match="exit_fee"):
        client.accept_terms(to_client(expensive.terms()))
    assert client.state is ClientState.PROPOSED
    # exit_vbytes must be the client's own count for its script and change.
    fair = ServerChannel.open(msg, server_privkey=SERVER_KEY, limits=LIMITS,
                              network=NETWORK, now=NOW, tip_height=TIP, feerate=Fraction(5))
    lying = dataclasses.replace(fair.terms(), exit_vbytes=fair.exit_vbytes - 10)
    with pytest.raises(ProtocolError, match="exit_vbytes"):
        client.accept_terms(lying)
    client.accept_terms(to_client(fair.terms()))
    assert client.exit_fee == fair.exit_fee and client.meter.reserve == fair.exit_fee
    assert client.reserve_fits(10_000) and not client.reserve_fits(fair.exit_fee + 545)


def test_a_reserve_not_paid_whole_is_not_claimed():
    pair = ChannelPair(feerate=Fraction(3))
    pair.pay(pair.server.exit_fee - 1)  # short of the reserve
    pair.server.close()
    claim = pair.server.claim()
    assert claim is not None and claim.reserve == 0 and claim.quoted == 0
    with raises(ErrorCode.BAD_STATE, ServerChannel.restore(
        ChannelPair().server.snapshot(), server_privkey=SERVER_KEY, limits=LIMITS
    )):
        ChannelPair().server.claim()



def test_a_payment_is_the_channels_only_once_committed():
    """receive_payment decides; commit_payment takes only the next durable increment."""
    pair = ChannelPair()
    before = pair.server.snapshot()
    record = pair.server.receive_payment(pay_for(pair, 90_000), now=NOW, tip_height=TIP)
    assert pair.server.snapshot() == before
    pair.server.commit_payment(record)
    assert (pair.server.seq, pair.server.balance) == (record.seq, record.balance)
    after = pair.server.snapshot()
    stale = dataclasses.replace(record, seq=record.seq)  # the same increment twice
    lower = dataclasses.replace(record, seq=record.seq + 1, balance=record.balance + 1)
    for wrong in (stale, lower):
        with pytest.raises(LocalProtocolError):
            pair.server.commit_payment(wrong)
        assert pair.server.snapshot() == after
    pair.server.close()
    with pytest.raises(LocalProtocolError):
        pair.server.commit_payment(dataclasses.replace(record, seq=record.seq + 1))


def test_reorg_transitions_and_settlement_bookkeeping_in_state():
    """unconfirm/void/settled_in/unsettle only from their states (section 8)."""
    pair = ChannelPair()
    with raises(ErrorCode.BAD_STATE, pair.server):
        pair.server.settled_in("00" * 32)
    with raises(ErrorCode.BAD_STATE, pair.server):
        pair.server.unsettle()
    pair.server.unconfirm()
    assert pair.server.state is ServerState.FUNDING
    pair.client.on_funding_lost()
    assert pair.client.state is ClientState.FUNDING
    pair.server.void()
    assert pair.server.state is ServerState.VOID
    with raises(ErrorCode.BAD_STATE, pair.server):
        pair.server.confirm()


def test_a_client_checks_no_settlement_before_funding():
    client, _terms = proposed_client()
    with pytest.raises(LocalProtocolError):
        client.check_settlement(b"")
