"""ECDSA signatures over secp256k1, through coincurve (libsecp256k1).

Every transaction signature on the wire is strict DER (BIP66), low S
(BIP62/BIP146 ``LOW_S``), followed by one sighash-type byte; signers sign the
32-byte digest as is, with no further hashing (protocol.md section 1).

Signing is RFC 6979 deterministic (libsecp256k1's default nonce), so the
same key, digest and balance always give the same bytes. Verification parses
each public key once and keeps the parsed key (:class:`Verifier`), because
parsing is a sizeable share of a verify (docs/performance.md, "Figures
behind code comments").
"""

from __future__ import annotations

import functools

import coincurve

from gateway.protocol.errors import ErrorCode, ProtocolError

__all__ = [
    "SECP256K1_ORDER",
    "Verifier",
    "check_der_low_s",
    "is_low_s_der",
    "is_valid_pubkey",
    "sign_digest",
    "split_sighash",
    "verifier_for",
    "verify_digest",
]

#: The order ``n`` of the secp256k1 group.
SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_HALF_ORDER = SECP256K1_ORDER // 2


def _der_s(der: bytes) -> int | None:
    """The S value of a strict-DER signature, or ``None`` if not strict DER.

    This is Bitcoin Core's ``IsValidSignatureEncoding`` (BIP66) applied to
    the DER part alone, i.e. without the trailing sighash byte::

        0x30 [total-length] 0x02 [R-length] [R] 0x02 [S-length] [S]
    """
    size = len(der)
    # Minimum: 1-byte R and S (8 bytes); maximum: 33-byte R and S (72 bytes).
    if size < 8 or size > 72:
        return None
    if der[0] != 0x30 or der[1] != size - 2:
        return None
    len_r = der[3]
    # The S length byte must lie inside the signature.
    if 5 + len_r >= size:
        return None
    len_s = der[5 + len_r]
    if len_r + len_s + 6 != size:
        return None
    # R: an integer, not empty, not negative, no unnecessary leading zero.
    if der[2] != 0x02 or len_r == 0 or der[4] & 0x80:
        return None
    if len_r > 1 and der[4] == 0x00 and not der[5] & 0x80:
        return None
    # S: the same rules.
    if der[4 + len_r] != 0x02 or len_s == 0 or der[6 + len_r] & 0x80:
        return None
    if len_s > 1 and der[6 + len_r] == 0x00 and not der[7 + len_r] & 0x80:
        return None
    return int.from_bytes(der[6 + len_r :], "big")


def der_s_value(der: bytes) -> int | None:
    """S of a strict-DER (BIP66) signature without sighash byte; None if not strict DER."""
    return _der_s(der)


def is_low_s_der(der: bytes) -> bool:
    """True if ``der`` is strict DER (BIP66) with S <= n/2 (BIP146 LOW_S)."""
    s = _der_s(der)
    return s is not None and s <= _HALF_ORDER


def check_der_low_s(der: bytes) -> None:
    """Raise ``non_canonical_signature`` unless ``der`` is strict DER, low S.

    protocol.md section 1 and section 9: a signature that is not strict DER
    (BIP66) or has a high S (BIP62/BIP146) is ``non_canonical_signature``.
    """
    s = _der_s(der)
    if s is None:
        raise ProtocolError(ErrorCode.NON_CANONICAL_SIGNATURE, "signature is not strict DER")
    if s > _HALF_ORDER:
        raise ProtocolError(
            ErrorCode.NON_CANONICAL_SIGNATURE, "signature has a high S value (must be low S)"
        )


def split_sighash(sig: bytes) -> tuple[bytes, int]:
    """Split a wire transaction signature into its DER part and sighash type.

    Raises ``non_canonical_signature`` for an empty signature.
    """
    if not sig:
        raise ProtocolError(ErrorCode.NON_CANONICAL_SIGNATURE, "signature is empty")
    return sig[:-1], sig[-1]


def is_valid_pubkey(pubkey: bytes) -> bool:
    """True if ``pubkey`` is a 33-byte compressed SEC point on secp256k1."""
    if len(pubkey) != 33 or pubkey[0] not in (2, 3):
        return False
    try:
        coincurve.PublicKey(pubkey)
    except Exception:  # coincurve raises ValueError for points not on the curve
        return False
    return True


@functools.lru_cache(maxsize=64)
def _private_key(privkey: bytes) -> coincurve.PrivateKey:
    # coincurve derives the public key when it builds a PrivateKey, which
    # costs more than the signature itself (docs/performance.md, "Figures
    # behind code comments"). A player signs every increment with the same key.
    return coincurve.PrivateKey(privkey)


def sign_digest(privkey: bytes, digest: bytes) -> bytes:
    """Sign the 32-byte ``digest`` as is; return strict DER, low S.

    RFC 6979 deterministic nonces (libsecp256k1's default); libsecp256k1
    always produces low S, which is checked rather than assumed.
    """
    if len(digest) != 32:
        raise ValueError("digest must be 32 bytes")
    der: bytes = _private_key(bytes(privkey)).sign(digest, hasher=None)
    if not is_low_s_der(der):  # pragma: no cover - libsecp256k1 guarantees it
        raise RuntimeError("libsecp256k1 returned a non-canonical signature")
    return der


class Verifier:
    """Verifies signatures by one public key, parsed once.

    Raises ``ValueError`` if ``pubkey`` is not a valid compressed SEC point
    (callers check peer keys with :func:`is_valid_pubkey` first).
    """

    __slots__ = ("_key", "pubkey")

    def __init__(self, pubkey: bytes) -> None:
        if not is_valid_pubkey(pubkey):
            raise ValueError("not a compressed secp256k1 public key")
        self.pubkey = bytes(pubkey)
        self._key = coincurve.PublicKey(self.pubkey)

    def verify(self, digest: bytes, der: bytes) -> bool:
        """True if ``der`` is a valid signature of the 32-byte ``digest``.

        No hashing is applied to ``digest``. Any failure (unparseable DER, a
        wrong-length digest, high S — libsecp256k1 rejects it) is ``False``.
        """
        try:
            return bool(self._key.verify(der, digest, hasher=None))
        except Exception:  # coincurve raises for unparseable DER or a bad digest
            return False


@functools.lru_cache(maxsize=4096)
def verifier_for(pubkey: bytes) -> Verifier:
    """The cached :class:`Verifier` for ``pubkey`` (``ValueError`` if invalid)."""
    return Verifier(pubkey)


def verify_digest(pubkey: bytes, digest: bytes, der: bytes) -> bool:
    """True if ``der`` by ``pubkey`` signs the 32-byte ``digest``; never raises."""
    try:
        verifier = verifier_for(bytes(pubkey))
    except ValueError:
        return False
    return verifier.verify(digest, der)
