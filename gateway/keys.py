"""The gateway's master key and the per-channel server keys K2.

A 32-byte BIP32 seed lives in ``<datadir>/master.key`` (hex, file mode 0600,
created on first run). Channel ``n`` uses the hardened child ``m/n'``: a fresh
K2 per channel, re-derivable after a restart from the index the store keeps,
so no per-channel private key is ever written to disk or logged.

BIP32 hardened derivation is a dozen lines over HMAC-SHA512 and coincurve; the
``bip32`` package pins ``coincurve<21``, which conflicts with ours.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from pathlib import Path

import coincurve

_HARDENED = 0x8000_0000
_CURVE_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


class MasterKey:
    """A BIP32 master private key (from a seed) that derives hardened children."""

    def __init__(self, seed: bytes) -> None:
        if not 16 <= len(seed) <= 64:
            raise ValueError("a BIP32 seed is 16 to 64 bytes")
        digest = hmac.digest(b"Bitcoin seed", seed, "sha512")
        self._key, self._chain_code = digest[:32], digest[32:]
        if not 0 < int.from_bytes(self._key, "big") < _CURVE_ORDER:
            raise ValueError("seed gives an invalid master key (BIP32: use another seed)")

    def __repr__(self) -> str:  # never show key material
        return "MasterKey(<secret>)"

    def derive_hardened(self, index: int) -> bytes:
        """The 32-byte private key of ``m/index'`` (BIP32 CKDpriv, hardened)."""
        if not 0 <= index < _HARDENED:
            raise ValueError("child index out of range")
        data = b"\x00" + self._key + (index | _HARDENED).to_bytes(4, "big")
        digest = hmac.digest(self._chain_code, data, "sha512")
        tweak = int.from_bytes(digest[:32], "big")
        child = (tweak + int.from_bytes(self._key, "big")) % _CURVE_ORDER
        if tweak >= _CURVE_ORDER or child == 0:  # BIP32: probability < 2^-127
            raise ValueError(f"child {index}' is invalid; use the next index")
        return child.to_bytes(32, "big")

    def token(self, label: str) -> str:
        """A bearer token for ``label`` derived from the master key, never stored.

        HMAC-SHA256 keyed with the master private key over a tagged label
        (e.g. ``publisher/demo``): shown again whenever asked (``gateway
        publisher token``), checked by recomputing it (in constant time), and
        unrelated to any channel key (BIP32 children are HMAC-SHA512 over the
        chain code, a different key and message).
        """
        digest = hmac.digest(self._key, b"paystream token\0" + label.encode(), "sha256")
        return base64.urlsafe_b64encode(digest[:24]).decode()

    def fingerprint(self) -> str:
        """A public name of this key (hex): gateway hosts sharing a ledger compare it.

        A hash of the master public key, so it reveals nothing of the seed.
        """
        public = coincurve.PrivateKey(self._key).public_key.format(compressed=True)
        return hashlib.sha256(b"paystream master key\x00" + public).hexdigest()[:32]

    def channel_key(self, index: int) -> tuple[bytes, bytes]:
        """``(private key, compressed public key)`` of channel ``index``'s K2."""
        priv = self.derive_hardened(index)
        return priv, coincurve.PrivateKey(priv).public_key.format(compressed=True)

    def publisher_token(self, publisher_id: str) -> str:
        """The WHIP bearer token of publisher ``publisher_id`` (RFC 9725 section 4.1)."""
        return self.token(f"publisher/{publisher_id}")

    @classmethod
    def load_or_create(cls, path: Path) -> MasterKey:
        """Read the seed at ``path``, creating it (mode 0600) on first run."""
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            path.parent.mkdir(parents=True, exist_ok=True)
            seed = secrets.token_bytes(32)
            # Written whole to a private name, then linked into place: a
            # gateway starting at the same moment finds either no file or the
            # whole seed, never a half-written one, and never overwrites it.
            # Mode 0600 from the first byte, not chmod after.
            tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(seed.hex() + "\n")
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:  # the other one won: use its seed
                return cls.load_or_create(path)
            finally:
                tmp.unlink()
            return cls(seed)
        try:
            seed = bytes.fromhex(text)
        except ValueError:
            raise ValueError(f"{path} does not hold a hex BIP32 seed") from None
        return cls(seed)
