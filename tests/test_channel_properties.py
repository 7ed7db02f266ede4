"""Hypothesis drives random sequences of valid and invalid messages at the pair.

Invariants (design.md "Money rules", protocol.md sections 7 and 9), checked
after every step:

- the recorded balance never rises and ``seq`` strictly rises;
- ``paid`` never exceeds the channel value;
- no chunk is released before a stored increment covers it (asserted in
  ``ChannelPair.deliver``);
- the client never pays a total above its own section 7 figure;
- an invalid message changes nothing and the channel then goes on.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

from helpers_channel import (
    CLIENT_KEY,
    NOW,
    OPERATOR_SCRIPT,
    TIP,
    ChannelPair,
    hello,
    to_server,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.protocol.channel import LocalProtocolError, ServerState
from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.protocol.messages import Due, Pay, parse_client_message
from gateway.protocol.metering import OverchargeError
from gateway.protocol.settlement import build_batch
from gateway.protocol.transactions import sign_payment

MEDIA = ("a", "b")

chunk_action = st.tuples(st.just("chunk"), st.sampled_from(MEDIA), st.integers(1, 2_500))
bad_pay_action = st.tuples(
    st.just("bad_pay"),
    st.sampled_from(["replay", "same_seq", "raise", "dust", "flip", "sighash", "other_balance"]),
    st.integers(1, 10_000),
)
overcharge_action = st.tuples(st.just("overcharge"), st.sampled_from(MEDIA), st.integers(1, 50))
lost_action = st.tuples(st.just("lost"), st.sampled_from(MEDIA), st.integers(1, 2_500))
resume_action = st.tuples(st.just("resume"), st.binary(min_size=32, max_size=32), st.none())
raw_action = st.tuples(
    st.just("raw"),
    st.sampled_from(
        [
            '{"type":"pay","seq":%d,"balance":%d,"sig":"30"}',
            '{"type":"pay","seq":%d,"balance":%d.0,"sig":""}',
            '{"type":"pay","seq":%d,"balance":%d,"sig":"ZZ"}',
            '{"type":"pay","seq":%d,"balance":%d}',
            '{"type":"pay","seq":"%d","balance":%d,"sig":""}',
        ]
    ),
    st.integers(0, 2**60),
)
actions = st.lists(
    st.one_of(
        chunk_action,
        chunk_action,
        chunk_action,
        bad_pay_action,
        bad_pay_action,
        overcharge_action,
        resume_action,
        raw_action,
        lost_action,
    ),
    min_size=10,
    max_size=40,
)


def bad_pay(pair: ChannelPair, variant: str, n: int) -> Pay:
    """An invalid ``pay`` of the given kind, against the channel as it is."""
    server, client = pair.server, pair.client
    assert client._template is not None and server.balance is not None
    seq = client.seq + 1
    if variant == "replay" and pair.records:
        last = pair.records[-1]
        return Pay(seq=last.seq, balance=last.balance, sig=last.sig)
    if variant == "same_seq" and server.seq is not None:
        return Pay(seq=server.seq, balance=0, sig=b"")
    if variant == "raise":
        # validly signed by K1 whenever the raised balance is still <= value
        balance = min(pair.value, server.balance + n)
        if balance == server.balance:
            balance += n
        return Pay(seq=seq, balance=balance, sig=sign_payment_any(pair, balance))
    if variant == "dust":
        return Pay(seq=seq, balance=1 + n % 545, sig=b"\x30\x06\x02\x01\x01\x02\x01\x01\x83")
    target = max(0, server.balance - n)
    if 0 < target < 546:
        target = 0
    sig = sign_payment(client._template, CLIENT_KEY, target)
    if variant == "flip":
        sig = sig[:10] + bytes([sig[10] ^ 1]) + sig[11:]
    elif variant == "sighash":
        sig = sig[:-1] + (b"\x01" if target else b"\x83")
    else:  # "other_balance" (and the fallbacks of replay/same_seq): signs another amount
        return Pay(seq=seq, balance=target, sig=sign_payment_any(pair, server.balance))
    return Pay(seq=seq, balance=target, sig=sig)


def sign_payment_any(pair: ChannelPair, balance: int) -> bytes:
    """A real client signature, for ``balance`` clamped into the valid range."""
    assert pair.client._template is not None
    valid = min(pair.value, balance)
    if 0 < valid < 546:
        valid = 0
    return sign_payment(pair.client._template, CLIENT_KEY, valid)


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    kind=st.sampled_from(["cltv", "multisig"]),
    rate=st.integers(0, 20_000),
    free_ms=st.integers(0, 8_000),
    budget=st.one_of(st.just(10**6), st.integers(0, 3_000)),
    steps=actions,
)
def test_random_sessions_keep_the_money_rules(kind, rate, free_ms, budget, steps):
    pair = ChannelPair(kind=kind, budget=budget)
    for media in MEDIA:
        pair.stream(media, rate, free_ms)
    index = dict.fromkeys(MEDIA, 0)
    exhausted = False
    prev_balance, prev_seq = pair.server.balance, pair.server.seq

    for action, arg, n in steps:
        server, client = pair.server, pair.client
        before = server.snapshot()
        if action == "chunk" and not exhausted:
            released = len(pair.released)
            try:
                pair.deliver(arg, index[arg], n, rate, free_ms)
            except LocalProtocolError:
                # the client refuses (budget, value or dust): nothing released,
                # nothing recorded, the gateway keeps waiting for its `pay`
                assert len(pair.released) == released
                assert server.snapshot() == before
                exhausted = True
            else:
                index[arg] += 1
        elif action == "bad_pay":
            pay = bad_pay(pair, arg, n)
            try:
                server.receive_payment(to_server(pay), now=NOW, tip_height=TIP)
            except ProtocolError as exc:
                assert not exc.fatal
                assert server.snapshot() == before
            else:  # pragma: no cover - every variant is invalid
                raise AssertionError(f"accepted an invalid pay: {arg}")
        elif action == "overcharge" and not exhausted:
            quote = pair.meter.quote(arg, index[arg], 2_000, rate_msat=rate, free_ms=free_ms)
            state = (client.seq, client.balance, client.meter.bill)
            greedy = Due(total=quote.total + n, media=arg, index=index[arg], duration_ms=2_000)
            try:
                client.pay_due(greedy)
            except (OverchargeError, LocalProtocolError):
                pass
            else:  # pragma: no cover
                raise AssertionError("client paid above its own figure")
            assert (client.seq, client.balance, client.meter.bill) == state
        elif action == "lost" and not exhausted:
            # the client pays a due, the connection drops before the gateway
            # reads it; after a resume the gateway asks for the chunk again
            quote = pair.meter.quote(arg, index[arg], n, rate_msat=rate, free_ms=free_ms)
            if server.paid < quote.total:
                due = Due(total=quote.total, media=arg, index=index[arg], duration_ms=n)
                try:
                    client.pay_due(due)  # lost in flight
                except LocalProtocolError:
                    exhausted = True
                    continue
                nonce = bytes(32)
                resume = to_server(client.resume(hello(nonce)))
                client.on_ready(server.check_resume(resume, nonce=nonce, now=NOW, tip_height=TIP))
                for media in MEDIA:
                    pair.stream(media, rate, free_ms)
                seq_before = client.seq
                pair.deliver(arg, index[arg], n, rate, free_ms)
                assert client.seq == seq_before  # the same increment, sent again
                index[arg] += 1
        elif action == "resume":
            resume = to_server(client.resume(hello(arg)))
            client.on_ready(server.check_resume(resume, nonce=arg, now=NOW, tip_height=TIP))
            for media in MEDIA:
                pair.stream(media, rate, free_ms)
            assert server.snapshot() == before
        elif action == "raw":
            try:
                msg = parse_client_message(arg % (n, n))
                assert isinstance(msg, Pay)
                server.receive_payment(msg, now=NOW, tip_height=TIP)
            except ProtocolError as exc:
                assert exc.code is not ErrorCode.INTERNAL
                assert server.snapshot() == before
            else:  # pragma: no cover - only garbage signatures are generated
                raise AssertionError("accepted a raw pay")

        # -- invariants ------------------------------------------------------------
        assert server.state is ServerState.READY
        assert server.balance is not None and prev_balance is not None
        assert server.balance <= prev_balance
        if server.seq != prev_seq:
            assert server.seq is not None and (prev_seq is None or server.seq > prev_seq)
        prev_balance, prev_seq = server.balance, server.seq
        assert 0 <= server.paid <= pair.value
        assert server.paid <= budget
        # the client's own figure covers everything it paid
        assert client.paid <= math.ceil(client.meter.bill / 1_000_000)
        assert client.meter.bill == pair.meter.bill
        assert client.paid == server.paid

    # whatever happened, the channel still settles and pays the client its balance
    pair.server.close()
    claim = pair.server.claim([(b"\x00\x14" + b"\x44" * 20, 1)])
    settlement = None
    if claim is not None:
        settlement = build_batch([claim], OPERATOR_SCRIPT, Fraction(1)).batch
    if pair.server.paid == 0:
        assert claim is None
    elif settlement is not None:
        assert pair.server.balance is not None
        client_out = [amt for spk, amt in settlement.outputs if spk == pair.server.change_script]
        assert client_out == ([pair.server.balance] if pair.server.balance else [])


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["cltv", "multisig"]), totals=st.lists(st.integers(0, 100_000)))
def test_any_payment_sequence_accepts_exactly_the_valid_ones(kind, totals):
    """Direct ``pay`` of arbitrary totals: accepted iff it raises the total paid."""
    pair = ChannelPair(kind=kind)
    for total in totals:
        before = pair.server.snapshot()
        try:
            pay = pair.client.pay(total)
        except LocalProtocolError:
            assert total <= pair.client.paid or 0 < pair.value - total < 546
            continue
        record = pair.server.receive_payment(to_server(pay), now=NOW, tip_height=TIP)
        assert pair.server.snapshot() == before  # decided, not yet durable
        pair.server.commit_payment(record)
        assert record.paid == total and record.balance == pair.value - total
        assert before.balance is not None and record.balance <= before.balance
        # replaying the same increment is refused and changes nothing
        after = pair.server.snapshot()
        try:
            pair.server.receive_payment(pay, now=NOW, tip_height=TIP)
        except ProtocolError as exc:
            assert exc.code is ErrorCode.SEQ_NOT_INCREASING
        assert pair.server.snapshot() == after
        assert dataclasses.replace(after, seq=None) != dataclasses.replace(before, seq=None)
