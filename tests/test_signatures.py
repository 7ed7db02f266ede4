"""Signatures: RFC 6979 signing, strict DER + low S (BIP66/BIP146), verify."""

from __future__ import annotations

import hashlib

import coincurve
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.protocol.signatures import (
    SECP256K1_ORDER,
    Verifier,
    check_der_low_s,
    is_low_s_der,
    is_valid_pubkey,
    sign_digest,
    split_sighash,
    verifier_for,
    verify_digest,
)

PRIV = (1).to_bytes(32, "big")
PUB = coincurve.PrivateKey(PRIV).public_key.format()
DIGEST = hashlib.sha256(b"Satoshi Nakamoto").digest()

privkeys = st.integers(min_value=1, max_value=SECP256K1_ORDER - 1).map(
    lambda n: n.to_bytes(32, "big")
)
digests = st.binary(min_size=32, max_size=32)


def _der_int(n: int) -> bytes:
    body = n.to_bytes((n.bit_length() + 8) // 8, "big")  # room for a sign bit
    return b"\x02" + bytes([len(body)]) + body


def _der(r: int, s: int) -> bytes:
    body = _der_int(r) + _der_int(s)
    return b"\x30" + bytes([len(body)]) + body


def _r_s(der: bytes) -> tuple[int, int]:
    len_r = der[3]
    return int.from_bytes(der[4 : 4 + len_r], "big"), int.from_bytes(der[6 + len_r :], "big")


def _high_s(der: bytes) -> bytes:
    r, s = _r_s(der)
    return _der(r, SECP256K1_ORDER - s)


def test_rfc6979_known_vector() -> None:
    # The widely published RFC 6979 secp256k1 vector: key 1, sha256("Satoshi Nakamoto").
    assert sign_digest(PRIV, DIGEST).hex() == (
        "3045022100934b1ea10a4b3c1757e2b0c017d0b6143ce3c9a7e6a4a49860d7a6ab210ee3d8"
        "02202442ce9d2b916064108014783e923ec36b49743e2ffa1c4496f01a512aafd9e5"
    )


def test_sign_rejects_wrong_digest_length() -> None:
    with pytest.raises(ValueError):
        sign_digest(PRIV, b"\x00" * 31)


@settings(max_examples=50)
@given(privkeys, digests)
def test_sign_verify_roundtrip_low_s(priv: bytes, digest: bytes) -> None:
    der = sign_digest(priv, digest)
    pub = coincurve.PrivateKey(priv).public_key.format()
    check_der_low_s(der)
    assert verify_digest(pub, digest, der)
    assert sign_digest(priv, digest) == der  # deterministic
    # The same signature with S replaced by n - S is the high-S twin: it is
    # mathematically valid but refused by the encoding check and by libsecp256k1.
    twin = _high_s(der)
    assert not is_low_s_der(twin)
    with pytest.raises(ProtocolError) as exc:
        check_der_low_s(twin)
    assert exc.value.code is ErrorCode.NON_CANONICAL_SIGNATURE
    assert not verify_digest(pub, digest, twin)
    # A different digest does not verify.
    assert not verify_digest(pub, hashlib.sha256(digest).digest(), der)


def test_verify_failures_are_false() -> None:
    der = sign_digest(PRIV, DIGEST)
    other = coincurve.PrivateKey((2).to_bytes(32, "big")).public_key.format()
    assert verify_digest(PUB, DIGEST, der)
    assert not verify_digest(other, DIGEST, der)  # wrong key
    assert not verify_digest(PUB, DIGEST, b"\x30\x00")  # unparseable DER
    assert not verify_digest(PUB, DIGEST[:31], der)  # wrong digest length
    assert not verify_digest(b"\x02" + b"\x00" * 31 + b"\x05", DIGEST, der)  # bad key
    assert not verify_digest(b"", DIGEST, der)


def test_verifier_cache_and_errors() -> None:
    assert verifier_for(PUB) is verifier_for(bytes(PUB))
    assert verifier_for(PUB).pubkey == PUB
    with pytest.raises(ValueError):
        Verifier(b"\x04" + b"\x00" * 64)
    with pytest.raises(ValueError):
        verifier_for(b"\x02" + (5).to_bytes(32, "big"))


@pytest.mark.parametrize(
    ("pubkey", "valid"),
    [
        (PUB, True),
        (coincurve.PrivateKey(PRIV).public_key.format(compressed=False), False),
        (b"\x04" + PUB[1:], False),  # uncompressed prefix on 33 bytes
        (b"\x02" + (5).to_bytes(32, "big"), False),  # x = 5 is not on the curve
        (PUB[:-1], False),
        (b"", False),
    ],
)
def test_is_valid_pubkey(pubkey: bytes, valid: bool) -> None:
    assert is_valid_pubkey(pubkey) is valid


def test_split_sighash() -> None:
    assert split_sighash(b"\x30\x06abcd\x83") == (b"\x30\x06abcd", 0x83)
    with pytest.raises(ProtocolError) as exc:
        split_sighash(b"")
    assert exc.value.code is ErrorCode.NON_CANONICAL_SIGNATURE


GOOD = sign_digest(PRIV, DIGEST)
LEN_R = GOOD[3]


def _mutate(index: int, value: int) -> bytes:
    out = bytearray(GOOD)
    out[index] = value
    return bytes(out)


# BIP66's rejection cases, each applied to a real signature.
@pytest.mark.parametrize(
    "der",
    [
        pytest.param(GOOD[:7], id="too-short"),
        pytest.param(GOOD + b"\x00" * 40, id="too-long"),
        pytest.param(_mutate(0, 0x31), id="not-compound"),
        pytest.param(_mutate(1, GOOD[1] + 1), id="wrong-total-length"),
        pytest.param(_mutate(2, 0x03), id="r-not-integer"),
        pytest.param(_mutate(3, 0), id="r-zero-length"),
        pytest.param(_mutate(3, 0x40), id="r-length-mismatch"),
        pytest.param(_mutate(3, len(GOOD) - 5), id="r-length-overruns"),
        pytest.param(_mutate(4 + LEN_R, 0x03), id="s-not-integer"),
        pytest.param(_mutate(5 + LEN_R, GOOD[5 + LEN_R] + 1), id="s-length-mismatch"),
        pytest.param(_der(0x7F, 0x81)[:4] + b"\x81" + _der(0x7F, 0x81)[5:], id="r-negative"),
        pytest.param(b"\x30\x07\x02\x02\x00\x01\x02\x01\x01", id="r-padded"),
        pytest.param(b"\x30\x06\x02\x01\x01\x02\x01\x81", id="s-negative"),
        pytest.param(b"\x30\x07\x02\x01\x01\x02\x02\x00\x01", id="s-padded"),
        pytest.param(b"\x30\x06\x02\x01\x01\x02\x00\x00", id="s-zero-length"),
    ],
)
def test_check_der_rejects_non_strict(der: bytes) -> None:
    assert not is_low_s_der(der)
    with pytest.raises(ProtocolError) as exc:
        check_der_low_s(der)
    assert exc.value.code is ErrorCode.NON_CANONICAL_SIGNATURE
    assert "DER" in exc.value.message


@pytest.mark.parametrize(
    "der",
    [
        b"\x30\x06\x02\x01\x01\x02\x01\x01",  # minimal: 1-byte R and S
        b"\x30\x07\x02\x02\x00\x80\x02\x01\x01",  # a needed zero pad on R
        _der(1, SECP256K1_ORDER // 2),  # the largest low S
    ],
)
def test_check_der_accepts_strict_low_s(der: bytes) -> None:
    check_der_low_s(der)
    assert is_low_s_der(der)


def test_half_order_boundary() -> None:
    with pytest.raises(ProtocolError, match="high S"):
        check_der_low_s(_der(1, SECP256K1_ORDER // 2 + 1))


def test_der_s_value_reads_s_or_refuses_non_strict_der() -> None:
    from gateway.protocol.signatures import der_s_value

    # Minimal strict DER: R = 1, S = 2.
    assert der_s_value(bytes.fromhex("3006020101020102")) == 2
    # A negative S (high bit set without a 0x00 pad) is not strict DER (BIP66).
    assert der_s_value(bytes.fromhex("3006020101020181")) is None
