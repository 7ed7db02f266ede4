"""T2 refunds and the T3 template (protocol.md sections 2 and 3; settlements:
test_settlement.py).

Every transaction built here is checked by libbitcoinkernel
(``ScriptPubkey.verify`` with all flags and the spent outputs), never by
python-bitcoinlib's ``VerifyScript``. python-bitcoinlib's ``SignatureHash``
serves only as the reference for the T3 digest.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

import coincurve
import pbk
import pytest
from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxInWitness, CTxOut, CTxWitness
from bitcoin.core.script import SIGVERSION_WITNESS_V0, CScript, CScriptWitness, SignatureHash
from hypothesis import given, settings
from hypothesis import strategies as st
from pbk.script import PrecomputedTransactionData

from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.protocol.scripts import ChannelScript
from gateway.protocol.signatures import SECP256K1_ORDER, sign_digest, verifier_for
from gateway.protocol.transactions import (
    DUST_LIMIT,
    MAX_MONEY,
    Outpoint,
    PaymentTemplate,
    build_refund,
    check_payment_signature,
    check_refund_t2,
    check_refund_t2_signature,
    finalize_cltv_refund,
    finalize_multisig_refund,
    find_funding_output,
    parse_tx,
    sign_payment,
    sign_refund_t2,
    txid_of,
)

CLIENT = coincurve.PrivateKey(hashlib.sha256(b"client").digest())
SERVER = coincurve.PrivateKey(hashlib.sha256(b"server").digest())
WALLET = coincurve.PrivateKey(hashlib.sha256(b"wallet").digest())
K1 = CLIENT.public_key.format()
K2 = SERVER.public_key.format()
CHANGE = b"\x00\x14" + b"\x33" * 20  # the client's P2WPKH change script
OPERATOR = b"\x00\x14" + b"\x66" * 20
PUBLISHER_A = b"\x00\x20" + b"\x44" * 32
PUBLISHER_B = b"\x51\x20" + b"\x55" * 32
VALUE = 1_000_000


def kernel_verify(tx: bytes, spent: list[tuple[bytes, int]], index: int = 0) -> bool:
    """libbitcoinkernel's verdict on input ``index`` with all consensus flags."""
    ktx = pbk.Transaction(tx)
    outputs = [pbk.TransactionOutput(pbk.ScriptPubkey(spk), amount) for spk, amount in spent]
    txdata = PrecomputedTransactionData(ktx, outputs)
    spk, amount = spent[index]
    result = pbk.ScriptPubkey(spk).verify(
        amount, ktx, txdata, index, pbk.ScriptVerificationFlags.ALL
    )
    assert result in (0, 1, True, False)  # the kernel answers 1/0, not a bool
    return result == 1


def p2wpkh(pubkey: bytes) -> bytes:
    return b"\x00\x14" + hashlib.new("ripemd160", hashlib.sha256(pubkey).digest()).digest()


def make_funding(script_pubkey: bytes, value: int) -> tuple[bytes, list[tuple[bytes, int]]]:
    """T1: spends a wallet P2WPKH coin into the channel output (vout 1) and change."""
    coin_spk = p2wpkh(WALLET.public_key.format())
    coin_value = value + 100_000
    unsigned = CTransaction(
        [CTxIn(COutPoint(b"\x42" * 32, 3), nSequence=0xFFFFFFFD)],
        [CTxOut(50_000, CScript(coin_spk)), CTxOut(value, CScript(script_pubkey))],
        nVersion=2,
    )
    script_code = CScript(b"\x76\xa9\x14" + coin_spk[2:] + b"\x88\xac")
    digest = SignatureHash(script_code, unsigned, 0, 1, coin_value, SIGVERSION_WITNESS_V0)
    sig = sign_digest(WALLET.secret, digest) + b"\x01"
    witness = CTxWitness([CTxInWitness(CScriptWitness([sig, WALLET.public_key.format()]))])
    signed = CTransaction(unsigned.vin, unsigned.vout, 0, 2, witness)
    return bytes(signed.serialize()), [(coin_spk, coin_value)]


@dataclass(frozen=True)
class Channel:
    script: ChannelScript
    funding: bytes
    outpoint: Outpoint
    template: PaymentTemplate

    @property
    def spent(self) -> list[tuple[bytes, int]]:
        return [(self.script.script_pubkey, self.template.value)]


def make_channel(kind: str, value: int = VALUE, expiry: int = 1_000) -> Channel:
    script = ChannelScript.make(kind, K1, K2, expiry)
    funding, coin = make_funding(script.script_pubkey, value)
    assert kernel_verify(funding, coin)
    vout, found = find_funding_output(funding, script.script_pubkey)
    assert (vout, found) == (1, value)
    outpoint = Outpoint(txid_of(funding), vout)
    return Channel(script, funding, outpoint, PaymentTemplate(script, outpoint, value, CHANGE))


CHANNELS = {kind: make_channel(kind) for kind in ("cltv", "multisig")}
KINDS = pytest.mark.parametrize("kind", ["cltv", "multisig"])


# -- outpoints and parsing -------------------------------------------------------


def test_txid_of_matches_the_kernel() -> None:
    funding = CHANNELS["cltv"].funding
    assert txid_of(funding) == str(pbk.Transaction(funding).txid)
    with pytest.raises(ProtocolError) as exc:
        txid_of(b"\x02\x00")
    assert exc.value.code is ErrorCode.BAD_MESSAGE


def test_outpoint() -> None:
    txid = "ab" * 32
    outpoint = Outpoint.parse(f"{txid}:7")
    assert outpoint == Outpoint(txid, 7)
    assert outpoint.channel_id == f"{txid}:7"
    assert outpoint.serialize() == bytes.fromhex(txid)[::-1] + struct.pack("<I", 7)
    assert Outpoint.parse(f"{txid}:4294967295").vout == 0xFFFFFFFF


@pytest.mark.parametrize(
    "channel_id",
    [
        "ab" * 32,
        "ab" * 32 + ":",
        "ab" * 32 + ":01",
        "ab" * 32 + ":+1",
        "ab" * 32 + ": 1",
        "ab" * 32 + ":1 ",
        "ab" * 32 + ":\u0661",  # ARABIC-INDIC DIGIT ONE
        "ab" * 32 + ":4294967296",
        "AB" * 32 + ":1",
        "ab" * 31 + ":1",
        "xy" * 32 + ":1",
    ],
)
def test_outpoint_parse_rejects(channel_id: str) -> None:
    with pytest.raises(ValueError):
        Outpoint.parse(channel_id)


def test_outpoint_rejects_non_int_vout() -> None:
    with pytest.raises(ValueError):
        Outpoint.parse(b"ab" * 32 + b":1")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Outpoint("ab" * 32, True)
    with pytest.raises(ValueError):
        Outpoint("ab" * 32, -1)


def test_find_funding_output_errors() -> None:
    funding = CHANNELS["cltv"].funding
    with pytest.raises(ProtocolError) as exc:
        find_funding_output(funding, OPERATOR)
    assert exc.value.code is ErrorCode.FUNDING_MISMATCH
    with pytest.raises(ProtocolError) as exc:
        find_funding_output(funding + b"\x00", CHANNELS["cltv"].script.script_pubkey)
    assert exc.value.code is ErrorCode.BAD_MESSAGE


# -- T3 template: digest -----------------------------------------------------------


def reference_digest(template: PaymentTemplate, balance: int) -> bytes:
    tx = CTransaction.deserialize(template.unsigned_tx(balance))
    return bytes(
        SignatureHash(
            CScript(template.script.witness_script),
            tx,
            0,
            template.sighash_type(balance),
            amount=template.value,
            sigversion=SIGVERSION_WITNESS_V0,
        )
    )


balances = st.one_of(st.just(0), st.integers(DUST_LIMIT, VALUE))


@KINDS
@settings(max_examples=150)
@given(balance=balances)
def test_digest_equals_reference(kind: str, balance: int) -> None:
    template = CHANNELS[kind].template
    assert template.digest(balance) == reference_digest(template, balance)


@given(
    value=st.integers(1, MAX_MONEY),
    data=st.data(),
    change=st.binary(min_size=0, max_size=300),
    txid=st.binary(min_size=32, max_size=32),
    vout=st.integers(0, 0xFFFFFFFF),
)
def test_digest_equals_reference_any_channel(
    value: int, data: st.DataObject, change: bytes, txid: bytes, vout: int
) -> None:
    balance = data.draw(st.one_of(st.just(0), st.integers(min(DUST_LIMIT, value), value)))
    if 0 < balance < DUST_LIMIT:
        return
    script = CHANNELS["cltv"].script
    template = PaymentTemplate(script, Outpoint(txid.hex(), vout), value, change)
    assert template.digest(balance) == reference_digest(template, balance)


def test_digest_commits_to_balance_and_type() -> None:
    template = CHANNELS["cltv"].template
    assert template.sighash_type(0) == 0x82
    assert template.sighash_type(546) == 0x83
    assert len({template.digest(b) for b in (0, 546, 547, VALUE)}) == 4


@pytest.mark.parametrize("balance", [-1, 1, 545, VALUE + 1])
def test_digest_rejects_impossible_balance(balance: int) -> None:
    with pytest.raises(ValueError):
        CHANNELS["cltv"].template.digest(balance)


@pytest.mark.parametrize("value", [0, -5, MAX_MONEY + 1, True])
def test_template_rejects_bad_value(value: int) -> None:
    channel = CHANNELS["cltv"]
    with pytest.raises(ValueError):
        PaymentTemplate(channel.script, channel.outpoint, value, CHANGE)


# -- T3 signatures -----------------------------------------------------------------


def _high_s(der: bytes) -> bytes:
    len_r = der[3]
    r = der[4 : 4 + len_r]
    s = SECP256K1_ORDER - int.from_bytes(der[6 + len_r :], "big")
    s_bytes = s.to_bytes((s.bit_length() + 8) // 8, "big")
    body = b"\x02" + bytes([len(r)]) + r + b"\x02" + bytes([len(s_bytes)]) + s_bytes
    return b"\x30" + bytes([len(body)]) + body


def test_payment_signature_checks_in_order() -> None:
    template = CHANNELS["cltv"].template
    verifier = verifier_for(K1)
    sig = sign_payment(template, CLIENT.secret, 600_000)
    assert sig[-1] == 0x83
    check_payment_signature(template, 600_000, sig, verifier)

    def code(balance: int, candidate: bytes) -> ErrorCode:
        with pytest.raises(ProtocolError) as exc:
            check_payment_signature(template, balance, candidate, verifier)
        return exc.value.code

    non_canonical = ErrorCode.NON_CANONICAL_SIGNATURE
    assert code(600_000, b"") is non_canonical
    assert code(600_000, sig[:-1] + b"\x01") is non_canonical  # SIGHASH_ALL
    assert code(600_000, sig[:-1] + b"\x82") is non_canonical  # NONE while balance > 0
    assert code(600_000, _high_s(sig[:-1]) + b"\x83") is non_canonical
    assert code(600_000, b"\x30\x00" + sig[2:]) is non_canonical  # wrong DER length
    assert code(600_000, sig[:-1] + b"\x00\x83") is non_canonical  # trailing byte
    # Strict DER, low S, right type, one bit of R changed: does not verify.
    flipped = sig[:-3] + bytes([sig[-3] ^ 1]) + sig[-2:]
    assert code(600_000, flipped) is ErrorCode.BAD_SIGNATURE
    # Encoding before type: a high-S signature with the wrong type reports the encoding.
    with pytest.raises(ProtocolError, match="high S"):
        check_payment_signature(template, 600_000, _high_s(sig[:-1]) + b"\x01", verifier)
    # Well formed but not for this balance, or not by K1.
    assert code(599_999, sig) is ErrorCode.BAD_SIGNATURE
    other = sign_digest(SERVER.secret, template.digest(600_000)) + b"\x83"
    assert code(600_000, other) is ErrorCode.BAD_SIGNATURE
    # Balance 0: NONE|ANYONECANPAY, and 0x83 is the wrong type there.
    zero = sign_payment(template, CLIENT.secret, 0)
    assert zero[-1] == 0x82
    check_payment_signature(template, 0, zero, verifier)
    assert code(0, zero[:-1] + b"\x83") is non_canonical


# -- refunds -----------------------------------------------------------------------


def test_cltv_refund_valid_in_kernel_only_at_expiry() -> None:
    channel = CHANNELS["cltv"]
    unsigned = build_refund(channel.script, channel.outpoint, VALUE, CHANGE, 500)
    refund = finalize_cltv_refund(unsigned, channel.script, VALUE, CLIENT.secret)
    tx = parse_tx(refund)
    assert (tx.nVersion, tx.nLockTime, tx.vin[0].nSequence) == (2, 1_000, 0xFFFFFFFE)
    assert [(bytes(o.scriptPubKey), o.nValue) for o in tx.vout] == [(CHANGE, VALUE - 500)]
    assert kernel_verify(refund, channel.spent)

    def variant(locktime: int, sequence: int) -> bytes:
        raw = CTransaction(
            [CTxIn(channel.outpoint.to_coutpoint(), nSequence=sequence)],
            [CTxOut(VALUE - 500, CScript(CHANGE))],
            nLockTime=locktime,
            nVersion=2,
        )
        return finalize_cltv_refund(raw.serialize(), channel.script, VALUE, CLIENT.secret)

    # BIP65: nLockTime below the expiry, a final nSequence, or a time-based
    # nLockTime against a height expiry all fail CHECKLOCKTIMEVERIFY.
    assert not kernel_verify(variant(999, 0xFFFFFFFE), channel.spent)
    assert not kernel_verify(variant(1_000, 0xFFFFFFFF), channel.spent)
    assert not kernel_verify(variant(500_000_000, 0xFFFFFFFE), channel.spent)
    assert kernel_verify(variant(1_001, 0xFFFFFFFE), channel.spent)


def test_cltv_refund_with_largest_time_expiry() -> None:
    channel = make_channel("cltv", expiry=0xFFFFFFFF)
    unsigned = build_refund(channel.script, channel.outpoint, VALUE, CHANGE, 500)
    refund = finalize_cltv_refund(unsigned, channel.script, VALUE, CLIENT.secret)
    assert kernel_verify(refund, channel.spent)


def test_multisig_t2_round_trip_valid_in_kernel() -> None:
    channel = CHANNELS["multisig"]
    t2 = build_refund(channel.script, channel.outpoint, VALUE, CHANGE, 400)
    assert check_refund_t2(t2, channel.script, VALUE) == channel.outpoint
    server_sig = sign_refund_t2(t2, channel.script, VALUE, SERVER.secret)
    assert server_sig[-1] == 0x01
    check_refund_t2_signature(t2, channel.script, VALUE, server_sig)
    refund = finalize_multisig_refund(t2, channel.script, VALUE, CLIENT.secret, server_sig)
    assert kernel_verify(refund, channel.spent)
    assert txid_of(refund) == txid_of(t2)  # segwit: the witness does not change the txid


def test_multisig_t2_signed_for_a_false_value_is_useless() -> None:
    # BIP143 commits to the funding value: a client lying about it gets a
    # signature that does not spend the real output.
    channel = CHANNELS["multisig"]
    t2 = build_refund(channel.script, channel.outpoint, VALUE, CHANGE, 400)
    lie = VALUE + 1_000
    server_sig = sign_refund_t2(t2, channel.script, lie, SERVER.secret)
    refund = finalize_multisig_refund(t2, channel.script, lie, CLIENT.secret, server_sig)
    assert not kernel_verify(refund, channel.spent)


def test_refund_t2_signature_check() -> None:
    channel = CHANNELS["multisig"]
    t2 = build_refund(channel.script, channel.outpoint, VALUE, CHANGE, 400)
    server_sig = sign_refund_t2(t2, channel.script, VALUE, SERVER.secret)
    for bad, code in [
        (server_sig[:-1] + b"\x83", ErrorCode.NON_CANONICAL_SIGNATURE),
        (_high_s(server_sig[:-1]) + b"\x01", ErrorCode.NON_CANONICAL_SIGNATURE),
        (b"", ErrorCode.NON_CANONICAL_SIGNATURE),
        (sign_refund_t2(t2, channel.script, VALUE - 1, SERVER.secret), ErrorCode.BAD_SIGNATURE),
    ]:
        with pytest.raises(ProtocolError) as exc:
            check_refund_t2_signature(t2, channel.script, VALUE, bad)
        assert exc.value.code is code


def _t2(
    channel: Channel,
    *,
    version: int = 2,
    inputs: int = 1,
    sequence: int = 0xFFFFFFFE,
    script_sig: bytes = b"",
    locktime: int = 1_000,
    outputs: tuple[int, ...] = (VALUE - 400,),
) -> bytes:
    vin = [
        CTxIn(COutPoint(bytes.fromhex(channel.outpoint.txid)[::-1], channel.outpoint.vout + i),
              CScript(script_sig), sequence)
        for i in range(inputs)
    ]  # fmt: skip
    vout = [CTxOut(amount, CScript(CHANGE)) for amount in outputs]
    return bytes(CTransaction(vin, vout, locktime, version).serialize())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"version": 1}, "version 2"),
        ({"inputs": 2}, "exactly one input"),
        ({"sequence": 0xFFFFFFFF}, "nSequence"),
        ({"script_sig": b"\x51"}, "scriptSig"),
        ({"locktime": 999}, "nLockTime"),
        ({"outputs": ()}, "at least one output"),
        ({"outputs": (VALUE - 400, 401)}, "exceed"),
        ({"outputs": (-1,)}, "out of range"),
    ],
)
def test_check_refund_t2_rejects(overrides: dict[str, object], message: str) -> None:
    channel = CHANNELS["multisig"]
    assert check_refund_t2(_t2(channel), channel.script, VALUE) == channel.outpoint
    t2 = _t2(channel, **overrides)  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match=message) as exc:
        check_refund_t2(t2, channel.script, VALUE)
    assert exc.value.code is ErrorCode.BAD_REFUND
    with pytest.raises(ProtocolError, match=message):  # never signed
        sign_refund_t2(t2, channel.script, VALUE, SERVER.secret)


def test_check_refund_t2_other_errors() -> None:
    channel = CHANNELS["multisig"]
    t2 = _t2(channel)
    for garbage in (b"", b"\x02\x00\x00\x00", t2 + b"\x00", b"\xff" * 80):
        with pytest.raises(ProtocolError) as exc:
            check_refund_t2(garbage, channel.script, VALUE)
        assert exc.value.code is ErrorCode.BAD_REFUND
    with pytest.raises(ProtocolError) as exc:
        check_refund_t2(t2, CHANNELS["cltv"].script, VALUE)
    assert exc.value.code is ErrorCode.BAD_STATE
    for value in (0, MAX_MONEY + 1):
        with pytest.raises(ProtocolError) as exc:
            check_refund_t2(t2, channel.script, value)
        assert exc.value.code is ErrorCode.VALUE_OUT_OF_RANGE
    # Outputs exactly equal to the value are allowed (section 2: "does not exceed").
    check_refund_t2(_t2(channel, outputs=(VALUE,)), channel.script, VALUE)


def test_build_refund_rejects_dust_and_negative_fee() -> None:
    channel = CHANNELS["cltv"]
    with pytest.raises(ValueError):
        build_refund(channel.script, channel.outpoint, VALUE, CHANGE, VALUE - 545)
    with pytest.raises(ValueError):
        build_refund(channel.script, channel.outpoint, VALUE, CHANGE, -1)
    with pytest.raises(ValueError):
        parse_tx(b"\x00")
