"""Settlements in batches (protocol.md sections 3 and 8), judged by libbitcoinkernel.

Every input of every batch built here is verified by the kernel
(``ScriptPubkey.verify``, all flags, the spent outputs), never by
python-bitcoinlib's ``VerifyScript``.
"""

from __future__ import annotations

import hashlib
import math
from fractions import Fraction

import coincurve
import pytest
from bitcoin.core import CTransaction
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_transactions import kernel_verify, make_funding

from gateway.protocol.scripts import ChannelScript
from gateway.protocol.settlement import (
    NULL_OUTPUT_SCRIPT,
    Batch,
    ChannelClaim,
    build_batch,
    check_settlement,
    exit_fee,
    exit_vbytes,
    feerate,
    lone_payout_share,
    split_payout,
)
from gateway.protocol.transactions import (
    DUST_LIMIT,
    Outpoint,
    PaymentTemplate,
    find_funding_output,
    sign_payment,
    txid_of,
)

SERVER = coincurve.PrivateKey(hashlib.sha256(b"batch server").digest())
K2 = SERVER.public_key.format()
OPERATOR = b"\x00\x14" + b"\x66" * 20
PUB_A = b"\x00\x20" + b"\x44" * 32
PUB_B = b"\x51\x20" + b"\x55" * 32
VALUE = 100_000
RATE = Fraction(2)


class Chan:
    """One funded channel of its own client, with its funding checked by the kernel."""

    def __init__(self, n: int, kind: str = "cltv", value: int = VALUE, change: bytes = b"") -> None:
        self.client = coincurve.PrivateKey(hashlib.sha256(b"batch client %d" % n).digest())
        self.script = ChannelScript.make(kind, self.client.public_key.format(), K2, 1_000 + n)
        funding, coin = make_funding(self.script.script_pubkey, value)
        assert kernel_verify(funding, coin)
        vout, _ = find_funding_output(funding, self.script.script_pubkey)
        self.outpoint = Outpoint(txid_of(funding), vout)
        self.change = change or b"\x00\x14" + hashlib.sha256(b"change %d" % n).digest()[:20]
        self.template = PaymentTemplate(self.script, self.outpoint, value, self.change)
        self.vbytes = exit_vbytes(self.script, self.change)

    def claim(
        self,
        paid: int,
        *,
        rate: Fraction = RATE,
        reserve: bool = True,
        payouts: tuple[tuple[bytes, int], ...] = ((PUB_A, 1),),
    ) -> ChannelClaim:
        """The claim after paying ``paid`` sat, the reserve (quoted at ``rate``) included."""
        balance = self.template.value - paid
        sig = sign_payment(self.template, self.client.secret, balance)
        fee = exit_fee(self.vbytes, rate) if reserve else 0
        return ChannelClaim(
            template=self.template,
            balance=balance,
            client_sig=sig,
            server_privkey=SERVER.secret,
            reserve=fee,
            quoted=Fraction(fee, self.vbytes) if reserve else Fraction(0),
            payouts=payouts if paid > fee else (),
        )


CHANS = [Chan(n, "cltv" if n % 3 else "multisig") for n in range(12)]


def spent_of(batch: Batch, chans: list[Chan]) -> list[tuple[bytes, int]]:
    by_outpoint = {c.outpoint: c for c in chans}
    return [
        (by_outpoint[o].script.script_pubkey, by_outpoint[o].template.value)
        for o in batch.channels
    ]


def assert_valid(batch: Batch, chans: list[Chan], claims: list[ChannelClaim]) -> None:
    """Every input valid in the kernel; the amounts, order and outputs as section 3 says."""
    spent = spent_of(batch, chans)
    for index in range(len(spent)):
        assert kernel_verify(batch.tx, spent, index), index
    tx = CTransaction.deserialize(batch.tx)
    assert batch.txid == txid_of(batch.tx)
    assert batch.vsize == math.ceil(tx.calc_weight() / 4)
    assert sum(v for _, v in spent) == sum(a for _, a in batch.outputs) + batch.fee
    assert tx.nVersion == 2 and tx.nLockTime == 0
    by_outpoint = {c.outpoint: c for c in claims}
    ordered = [by_outpoint[o] for o in batch.channels]
    # Inputs with change first, each facing its change at the same index.
    with_change = [c for c in ordered if c.balance]
    assert ordered[: len(with_change)] == with_change
    for index, claim in enumerate(with_change):
        assert batch.outputs[index] == (claim.template.change_script, claim.balance)
    for spk, amount in batch.outputs:
        assert amount >= DUST_LIMIT or (spk == NULL_OUTPUT_SCRIPT and amount == 0)
    # The fee pays every reserve, and the feerate reaches every quote.
    assert batch.fee >= sum(c.reserve for c in claims)
    for claim in claims:
        if claim.reserve:
            assert batch.feerate >= claim.quoted


@pytest.mark.parametrize("size", [1, 2, 10])
def test_a_batch_settles_every_channel_valid_in_the_kernel(size: int) -> None:
    chans = CHANS[:size]
    claims = [c.claim(2_000 + 300 * n) for n, c in enumerate(chans)]
    result = build_batch(claims, OPERATOR, RATE)
    assert result.left_out == () and result.batch is not None
    batch = result.batch
    assert_valid(batch, chans, claims)
    # One output per publisher over the whole batch; the operator gets the rounding.
    server = dict(batch.server_outputs)
    assert list(server)[:1] == [PUB_A]
    assert sum(server.values()) == sum(c.share for c in claims) - batch.fee
    assert len(batch.outputs) == size + len(server)


def test_channels_paid_down_to_zero_come_last_and_have_no_output() -> None:
    chans = CHANS[:4]
    claims = [chans[0].claim(VALUE), chans[1].claim(5_000), chans[2].claim(VALUE),
              chans[3].claim(7_000)]
    batch = build_batch(claims, OPERATOR, RATE).batch
    assert batch is not None
    assert_valid(batch, chans, claims)
    assert [c.balance for c in claims if c.outpoint in batch.channels[2:]] == [0, 0]
    # 0x82 signatures (NONE|ANYONECANPAY) at indexes without an output of their own.
    assert len([o for o in batch.outputs if o[0] in (c.change for c in chans)]) == 2


def test_a_lone_reserve_pays_its_own_settlement() -> None:
    # A viewer who watched only the free minute paid just its reserve: alone,
    # with no server output, that pays its whole transaction at the quoted rate.
    for chan in CHANS[:3]:
        for rate in (Fraction(1), Fraction(2), Fraction(37, 10), Fraction(20)):
            claim = chan.claim(exit_fee(chan.vbytes, rate), rate=rate)
            batch = build_batch([claim], OPERATOR, rate).batch
            assert batch is not None and batch.server_outputs == ()
            assert batch.fee == claim.share == claim.reserve
            assert batch.vsize <= chan.vbytes
            assert batch.feerate >= rate
            assert_valid(batch, [chan], [claim])


def test_a_batch_shares_the_overhead_so_publishers_earn_from_short_sessions() -> None:
    # 100 sat of media each: alone, 100 sat cannot make a publisher output;
    # ten together make one of nearly 1,000 sat.
    chans = CHANS[:10]
    claims = [c.claim(exit_fee(c.vbytes, RATE) + 100) for c in chans]
    batch = build_batch(claims, OPERATOR, RATE).batch
    assert batch is not None
    assert_valid(batch, chans, claims)
    server = dict(batch.server_outputs)
    assert server.get(PUB_A, 0) >= 900
    alone = build_batch(claims[:1], OPERATOR, RATE).batch
    assert alone is not None and alone.server_outputs == ()


def test_the_feerate_reaches_every_quote_or_the_highest_is_left_out() -> None:
    # Two channels quoted 1 and 30 sat/vB, paying only their reserves: the
    # batch cannot reach 30 sat/vB for both, so the 30 sat/vB one settles alone.
    low, high = CHANS[1], CHANS[2]
    claims = [low.claim(exit_fee(low.vbytes, Fraction(1)), rate=Fraction(1)),
              high.claim(exit_fee(high.vbytes, Fraction(30)), rate=Fraction(30))]
    result = build_batch(claims, OPERATOR, Fraction(1))
    assert result.batch is not None
    assert [c.outpoint for c in result.left_out] == [high.outpoint]
    assert_valid(result.batch, [low], [claims[0]])
    again = build_batch(result.left_out, OPERATOR, Fraction(1)).batch
    assert again is not None and again.feerate >= 30
    # With enough media paid, the server side pays the difference: one batch.
    rich = [low.claim(20_000, rate=Fraction(1)), claims[1]]
    result = build_batch(rich, OPERATOR, Fraction(1))
    assert result.left_out == () and result.batch is not None
    assert result.batch.feerate >= 30
    assert_valid(result.batch, [low, high], rich)


def test_a_channel_without_reserve_settles_only_if_its_share_pays_its_bytes() -> None:
    # A channel of protocol version 1 (no reserve): settled from its share if
    # that covers its bytes at the feerate, else left to the client's refund.
    chan = CHANS[4]
    poor = chan.claim(150, reserve=False)
    result = build_batch([poor], OPERATOR, Fraction(5))
    assert result.batch is None and result.left_out == (poor,)
    rich = chan.claim(5_000, reserve=False)
    batch = build_batch([rich], OPERATOR, Fraction(5)).batch
    assert batch is not None and batch.feerate >= 5
    assert_valid(batch, [chan], [rich])


def test_split_payout_folding() -> None:
    # No payouts: all to the operator.
    assert split_payout(10_000, [], OPERATOR) == [(OPERATOR, 10_000)]
    # A weight too small for 546 sat is folded into the operator's output...
    out = dict(split_payout(10_000, [(PUB_A, 100), (OPERATOR, 30), (PUB_B, 1)], OPERATOR))
    assert list(out) == [PUB_A, OPERATOR] and out[PUB_A] == 10_000 * 100 // 131
    # ... and a dust operator share into the largest payout.
    assert list(dict(split_payout(10_000, [(PUB_A, 1000), (PUB_B, 1)], OPERATOR))) == [PUB_A]
    # Duplicates merge; the operator's output comes last; the sum holds.
    out = dict(split_payout(9_001, [(OPERATOR, 1), (PUB_A, 1), (PUB_A, 2)], OPERATOR))
    assert list(out) == [PUB_A, OPERATOR] and sum(out.values()) == 9_001


def test_claims_refuse_impossible_arguments() -> None:
    chan = CHANS[0]
    sig = sign_payment(chan.template, chan.client.secret, 60_000)
    with pytest.raises(ValueError):  # a 0x83 signature for balance 0
        ChannelClaim(chan.template, 0, sig, SERVER.secret)
    with pytest.raises(ValueError):
        ChannelClaim(chan.template, 60_000, b"", SERVER.secret)
    with pytest.raises(ValueError):  # a reserve larger than what was paid
        ChannelClaim(chan.template, 60_000, sig, SERVER.secret, reserve=40_001)
    with pytest.raises(ValueError):
        ChannelClaim(chan.template, 60_000, sig, SERVER.secret, payouts=((PUB_A, 0),))
    with pytest.raises(ValueError):
        ChannelClaim(chan.template, 100, sig, SERVER.secret)  # dust balance
    with pytest.raises(ValueError):
        feerate(-1)
    assert feerate(1.1) == Fraction(11, 10) and feerate("2.5") == Fraction(5, 2)


def test_the_client_checks_its_settlement() -> None:
    chans = CHANS[:3]
    claims = [c.claim(3_000 + n) for n, c in enumerate(chans)]
    batch = build_batch(claims, OPERATOR, RATE).batch
    assert batch is not None
    values = [VALUE] * len(batch.channels)
    for chan, claim in zip(chans, claims, strict=True):
        check_settlement(batch.tx, outpoint=chan.outpoint, value=VALUE,
                         change_script=chan.change, balance=claim.balance,
                         quoted=claim.quoted, spent_values=values)
    chan, claim = chans[0], claims[0]
    kwargs = {"outpoint": chan.outpoint, "value": VALUE, "change_script": chan.change}
    with pytest.raises(ValueError, match="last signed balance"):
        check_settlement(batch.tx, balance=claim.balance - 1, quoted=claim.quoted, **kwargs)
    with pytest.raises(ValueError, match="below the quoted"):
        check_settlement(batch.tx, balance=claim.balance, quoted=Fraction(50),
                         spent_values=values, **kwargs)
    with pytest.raises(ValueError, match="does not spend"):
        check_settlement(batch.tx, outpoint=CHANS[5].outpoint, value=VALUE,
                         change_script=chan.change, balance=claim.balance, quoted=RATE)
    with pytest.raises(ValueError, match="input values"):
        check_settlement(batch.tx, balance=claim.balance, quoted=claim.quoted,
                         spent_values=values[:1], **kwargs)


@settings(max_examples=25, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    paid=st.lists(st.integers(0, VALUE), min_size=1, max_size=6),
    rate=st.sampled_from([Fraction(1), Fraction(3, 2), Fraction(4), Fraction(25)]),
    weights=st.lists(st.sampled_from([PUB_A, PUB_B, OPERATOR]), min_size=1, max_size=3),
)
def test_batch_properties(paid: list[int], rate: Fraction, weights: list[bytes]) -> None:
    chans = CHANS[: len(paid)]
    claims = []
    for chan, extra in zip(chans, paid, strict=True):
        total = min(VALUE, exit_fee(chan.vbytes, rate) + extra)
        if 0 < VALUE - total < DUST_LIMIT:
            total = VALUE
        claims.append(chan.claim(total, rate=rate, payouts=tuple((w, 1) for w in weights)))
    result = build_batch(claims, OPERATOR, rate)
    # Every claim paid its reserve: all settle, in this batch or alone.
    pending = list(result.left_out)
    batches = [result.batch]
    while pending:
        more = build_batch(pending, OPERATOR, rate)
        batches.append(more.batch)
        pending = list(more.left_out)
    settled = [o for b in batches if b is not None for o in b.channels]
    assert sorted(settled, key=str) == sorted((c.outpoint for c in claims), key=str)
    for batch in batches:
        assert batch is not None
        members = [c for c in claims if c.outpoint in batch.channels]
        assert_valid(batch, chans, members)


@pytest.mark.parametrize("rate", [Fraction(1), Fraction(2), Fraction(5), Fraction(20)])
def test_lone_payout_share_is_where_a_lone_channel_starts_paying_its_publisher(rate):
    chan = CHANS[6]
    threshold = lone_payout_share(rate, PUB_A)
    reserve = exit_fee(chan.vbytes, rate)

    def publisher_gets(media: int) -> int:
        batch = build_batch([chan.claim(reserve + media, rate=rate)], OPERATOR, rate).batch
        assert batch is not None
        assert_valid(batch, [chan], [chan.claim(reserve + media, rate=rate)])
        return dict(batch.server_outputs).get(PUB_A, 0)

    assert publisher_gets(threshold) >= DUST_LIMIT
    assert publisher_gets(threshold - 3) == 0  # all of it to the fee
