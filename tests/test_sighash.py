"""The project's one BIP143 (gateway.protocol.sighash) against BIP143's own examples.

The vectors are the "Example" section of BIP143
(https://github.com/bitcoin/bips/blob/master/bip-0143.mediawiki): native
P2WPKH, native P2WSH with an out-of-range SIGHASH_SINGLE, SINGLE|ANYONECANPAY,
and the six sighash types of the P2SH-P2WSH 6-of-6 example.
"""

from __future__ import annotations

import hashlib

import pytest
from bitcoin.core import CTransaction
from bitcoin.core.script import SIGVERSION_WITNESS_V0, CScript, SignatureHash
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.scripts import ChannelScript
from gateway.protocol.sighash import (
    SIGHASH_ALL,
    bip143_digest,
    hash_outputs,
    hash_prevouts,
    hash_sequence,
    output_bytes,
    p2wpkh_script_code,
)
from gateway.protocol.transactions import (
    PAYMENT_SIGHASH,
    PAYMENT_SIGHASH_ZERO,
    Outpoint,
    PaymentTemplate,
    parse_tx,
)

P2WPKH_TX = (
    "0100000002fff7f7881a8099afa6940d42d1e7f6362bec38171ea3edf433541db4e4ad969f0000000000eef"
    "fffffef51e1b804cc89d182d279655c3aa89e815b1b309fe287d9b2b55d57b90ec68a0100000000ffffffff"
    "02202cb206000000001976a9148280b37df378db99f66f85c95a783a76ac7a6d5988ac9093510d00000000"
    "1976a9143bde42dbee7e4dbe6a21b2d50ce2f0167faa815988ac11000000"
)
P2WSH_SINGLE_TX = (
    "0100000002fe3dc9208094f3ffd12645477b3dc56f60ec4fa8e6f5d67c565d1c6b9216b36e0000000000ff"
    "ffffff0815cf020f013ed6cf91d29f4202e8a58726b1ac6c79da47c23d1bee0a6925f80000000000ffffff"
    "ff0100f2052a010000001976a914a30741f8145e5acadf23f751864167f32e0963f788ac00000000"
)
P2WSH_SINGLE_SCRIPT = (
    "21026dccc749adc2a9d0d89497ac511f760f45c47dc5ed9cf352a58ac706453880aeadab210255a9626aeb"
    "f5e29c0e6538428ba0d1dcf6ca98ffdf086aa8ced5e0d0215ea465ac"
)
ANYONECANPAY_TX = (
    "0100000002e9b542c5176808107ff1df906f46bb1f2583b16112b95ee5380665ba7fcfc001000000000"
    "0ffffffff80e68831516392fcd100d186b3c2c7b95c80b53c77e77c35ba03a66b429a2a1b0000000000ff"
    "ffffff0280969800000000001976a914de4b231626ef508c9a74a8517e6783c0546d6b2888ac809698000"
    "00000001976a9146648a8cd4531e1ec47f35916de8e259237294d1e88ac00000000"
)
SIX_OF_SIX_TX = (
    "010000000136641869ca081e70f394c6948e8af409e18b619df2ed74aa106c1ca29787b96e0100000000ff"
    "ffffff0200e9a435000000001976a914389ffce9cd9ae88dcc0631e88a821ffdbe9bfe2688acc0832f0500"
    "0000001976a9147480a33f950689af511e6e84c138dbbd3c3ee41588ac00000000"
)
SIX_OF_SIX_SCRIPT = (
    "56210307b8ae49ac90a048e9b53357a2354b3334e9c8bee813ecb98e99a7e07e8c3ba32103b28f0c28bfab"
    "54554ae8c658ac5c3e0ce6e79ad336331f78c428dd43eea8449b21034b8113d703413d57761b8b9781957b"
    "8c0ac1dfe69f492580ca4195f50376ba4a21033400f6afecb833092a9a21cfdf1ed1376e58c5d1f47de746"
    "83123987e967a8f42103a6d48b1131e94ba04d9737d61acdaa1322008af9602b3b14862c07a1789aac1621"
    "02d8b661b0b3302ee2f162b09e07a55ad5dfbe673a9f01d9f0c19617681024306b56ae"
)

# (transaction, input, scriptCode, amount, sighash type, expected digest)
VECTORS = [
    # Native P2WPKH, input 1 (6 BTC), SIGHASH_ALL.
    (
        P2WPKH_TX, 1, p2wpkh_script_code(bytes.fromhex("1d0f172a0ecb48aee1be1f2687d2963ae33f71a1")),
        600_000_000, 0x01,
        "c37af31116d1b27caf68aae9e3ac82f1477929014d5b917657d0eb49478cb670",
    ),
    # Native P2WSH, input 1 (49 BTC), SIGHASH_SINGLE with no output 1: zero hashOutputs.
    (
        P2WSH_SINGLE_TX, 1, bytes.fromhex(P2WSH_SINGLE_SCRIPT), 4_900_000_000, 0x03,
        "82dde6e4f1e94d02c2b7ad03d2115d691f48d064e9d52f58194a6637e4194391",
    ),
    # The same after the executed OP_CODESEPARATOR (scriptCode from there on).
    (
        P2WSH_SINGLE_TX, 1, bytes.fromhex(P2WSH_SINGLE_SCRIPT[72:]), 4_900_000_000, 0x03,
        "fef7bd749cce710c5c052bd796df1af0d935e59cea63736268bcbe2d2134fc47",
    ),
    # SINGLE|ANYONECANPAY (0x83, the T3 type), both inputs.
    (
        ANYONECANPAY_TX, 0,
        bytes.fromhex("0063ab68210392972e2eb617b2388771abe27235fd5ac44af8e61693261550447a4c3e39da98ac"),
        0xFFFFFF, 0x83, "e9071e75e25b8a1e298a72f0d2e9f4f95a0f5cdf86a533cda597eb402ed13b3a",
    ),
    (
        ANYONECANPAY_TX, 1,
        bytes.fromhex("68210392972e2eb617b2388771abe27235fd5ac44af8e61693261550447a4c3e39da98ac"),
        0xFFFFFF, 0x83, "cd72f1f1a433ee9df816857fad88d8ebd97e09a75cd481583eb841c330275e54",
    ),
    # P2SH-P2WSH 6-of-6: every sighash type.
    *[
        (SIX_OF_SIX_TX, 0, bytes.fromhex(SIX_OF_SIX_SCRIPT), 987_654_321, hashtype, digest)
        for hashtype, digest in [
            (0x01, "185c0be5263dce5b4bb50a047973c1b6272bfbd0103a89444597dc40b248ee7c"),
            (0x02, "e9733bc60ea13c95c6527066bb975a2ff29a925e80aa14c213f686cbae5d2f36"),
            (0x03, "1e1f1c303dc025bd664acb72e583e933fae4cff9148bf78c157d1e8f78530aea"),
            (0x81, "2a67f03e63a6a422125878b40b82da593be8d4efaafe88ee528af6e5a9955c6e"),
            (0x82, "781ba15f3779d5542ce8ecb5c18716733a5ee42a6f51488ec96154934e2c890a"),
            (0x83, "511e8e52ed574121fc1b654970395502128263f62662e076dc6baf05c2e6a99b"),
        ]
    ],
]


@pytest.mark.parametrize(("tx", "index", "script_code", "amount", "hashtype", "digest"), VECTORS)
def test_bip143_vectors(
    tx: str, index: int, script_code: bytes, amount: int, hashtype: int, digest: str
) -> None:
    parsed = parse_tx(bytes.fromhex(tx))
    assert bip143_digest(parsed, index, script_code, amount, hashtype).hex() == digest


def test_bip143_intermediate_hashes() -> None:
    # BIP143's native P2WPKH example lists hashPrevouts, hashSequence and hashOutputs.
    tx = parse_tx(bytes.fromhex(P2WPKH_TX))
    assert hash_prevouts(tx).hex() == (
        "96b827c8483d4e9b96712b6713a7b68d6e8003a781feba36c31143470b4efd37"
    )
    assert hash_sequence(tx).hex() == (
        "52b0a642eea2fb7ae638c36f6252b6750293dbe574a806984b8e4d8548339a3b"
    )
    assert hash_outputs(tx.vout).hex() == (
        "863ef3e1a92afbfdb97f31ad0fc7683ee943e9abcf2501590ff8f6551f47e5e5"
    )
    assert all(output_bytes(o.nValue, o.scriptPubKey) == o.serialize() for o in tx.vout)


@settings(max_examples=60, deadline=None)
@given(
    hashtype=st.sampled_from([0x01, 0x02, 0x03, 0x81, 0x82, 0x83]),
    index=st.integers(0, 1),
    locktime=st.integers(0, 2**31 - 1),
    amount=st.integers(0, 21_000_000 * 100_000_000),
)
def test_bip143_equals_python_bitcoinlib(
    hashtype: int, index: int, locktime: int, amount: int
) -> None:
    # python-bitcoinlib's SignatureHash agrees wherever it works (nLockTime < 2**31).
    base = parse_tx(bytes.fromhex(ANYONECANPAY_TX))
    tx = CTransaction(base.vin, base.vout, locktime, 2)
    code = bytes.fromhex(SIX_OF_SIX_SCRIPT)
    expected = SignatureHash(CScript(code), tx, index, hashtype, amount, SIGVERSION_WITNESS_V0)
    assert bip143_digest(tx, index, code, amount, hashtype) == expected


def test_bip143_takes_an_nlocktime_past_2_31() -> None:
    # The reason for writing BIP143 out: nLockTime is unsigned (BIP65 time expiries).
    base = parse_tx(bytes.fromhex(SIX_OF_SIX_TX))
    tx = CTransaction(base.vin, base.vout, 0xFFFFFFFE, 2)
    code = bytes.fromhex(SIX_OF_SIX_SCRIPT)
    with pytest.raises(Exception):  # noqa: B017 - struct.error inside python-bitcoinlib
        SignatureHash(CScript(code), tx, 0, SIGHASH_ALL, 1, SIGVERSION_WITNESS_V0)
    assert len(bip143_digest(tx, 0, code, 1, SIGHASH_ALL)) == 32


@pytest.mark.parametrize("balance", [0, 546, 700_000, 1_000_000])
def test_payment_template_is_bip143_of_its_t3(balance: int) -> None:
    # The per-payment fast path computes the same digest as the general BIP143.
    k1 = bytes.fromhex("0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798")
    k2 = bytes.fromhex("02c6047f9441ed7d6d3045406e95c07cd85c778e4b8cef3ca7abac09b95c709ee5")
    script = ChannelScript.make("cltv", k1, k2, 800_000)
    outpoint = Outpoint(hashlib.sha256(b"t1").hexdigest(), 3)
    template = PaymentTemplate(script, outpoint, 1_000_000, b"\x00\x14" + b"\x33" * 20)
    t3 = parse_tx(template.unsigned_tx(balance))
    hashtype = PAYMENT_SIGHASH if balance else PAYMENT_SIGHASH_ZERO
    assert template.digest(balance) == bip143_digest(
        t3, 0, script.witness_script, 1_000_000, hashtype
    )
