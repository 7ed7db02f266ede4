"""The embedded node's faucet wallet keys (P2WPKH, coincurve signing) and script types.

Keys are random 32-byte secrets kept in the node's SQLite file; signatures
are RFC 6979 ECDSA from libsecp256k1 (always low-S, strict DER, BIP62/BIP66)
over the BIP143 digest of ``gateway.protocol.sighash``, the one the channel
core signs with. Addresses are not made here: the project has one codec,
``gateway.protocol.scripts`` (BIP173/BIP350, Base58Check).
"""

from __future__ import annotations

import os
import sqlite3

import coincurve
from bitcoin.core import CTransaction

from gateway.protocol.scripts import hash160, p2wpkh_script_pubkey
from gateway.protocol.sighash import SIGHASH_ALL, bip143_digest, p2wpkh_script_code
from gateway.protocol.tx import with_witness, witness_stack


def script_type(script: bytes) -> str:
    """Bitcoin Core's ``scriptPubKey.type`` name for ``script``."""
    n = len(script)
    if n == 22 and script[:2] == b"\x00\x14":
        return "witness_v0_keyhash"
    if n == 34 and script[:2] == b"\x00\x20":
        return "witness_v0_scripthash"
    if n == 34 and script[:2] == b"\x51\x20":
        return "witness_v1_taproot"
    if n == 4 and script == b"\x51\x02\x4e\x73":
        return "anchor"
    if (
        4 <= n <= 42
        and (script[0] == 0 or 0x51 <= script[0] <= 0x60)
        and script[1] + 2 == n
        and 2 <= script[1] <= 40
    ):
        return "witness_unknown"
    if n == 25 and script[:3] == b"\x76\xa9\x14" and script[23:] == b"\x88\xac":
        return "pubkeyhash"
    if n == 23 and script[:2] == b"\xa9\x14" and script[22] == 0x87:
        return "scripthash"
    if n >= 1 and script[0] == 0x6A:
        return "nulldata"
    if n in (35, 67) and script[0] == n - 2 and script[-1] == 0xAC:
        return "pubkey"
    if n >= 37 and script[-1] == 0xAE and 0x51 <= script[0] <= 0x60:
        return "multisig"
    return "nonstandard"


class Wallet:
    """P2WPKH keys persisted in the ``wallet_keys`` table of ``db``."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        db.execute(
            "CREATE TABLE IF NOT EXISTS wallet_keys ("
            " id INTEGER PRIMARY KEY, secret BLOB NOT NULL, script BLOB NOT NULL UNIQUE)"
        )
        self._keys: dict[bytes, coincurve.PrivateKey] = {}
        for secret, script in db.execute("SELECT secret, script FROM wallet_keys ORDER BY id"):
            self._keys[bytes(script)] = coincurve.PrivateKey(bytes(secret))

    def owns(self, script: bytes) -> bool:
        """True when ``script`` pays one of the wallet's keys."""
        return script in self._keys

    @property
    def scripts(self) -> list[bytes]:
        """All wallet scriptPubKeys, oldest first."""
        return list(self._keys)

    def new_script(self) -> bytes:
        """Create, persist (committed at once) and return a new P2WPKH scriptPubKey."""
        key = coincurve.PrivateKey(os.urandom(32))
        script = p2wpkh_script_pubkey(hash160(key.public_key.format(compressed=True)))
        with self._db:
            self._db.execute(
                "INSERT INTO wallet_keys (secret, script) VALUES (?, ?)", (key.secret, script)
            )
        self._keys[script] = key
        return script

    def default_script(self) -> bytes:
        """The first key's script (created on demand): premine and mining rewards go here."""
        return self.scripts[0] if self._keys else self.new_script()

    def sign(
        self, tx: CTransaction, spent: list[tuple[bytes, int] | None]
    ) -> tuple[CTransaction, list[int]]:
        """Sign every input whose spent output (``(script, value)``) pays this wallet.

        Returns the new transaction and the indexes of inputs left unsigned.
        Existing witnesses of other inputs are kept.
        """
        witnesses = [witness_stack(tx, index) for index in range(len(tx.vin))]
        unsigned: list[int] = []
        for index, prevout in enumerate(spent):
            if prevout is None or prevout[0] not in self._keys:
                if not witnesses[index] and not tx.vin[index].scriptSig:
                    unsigned.append(index)
                continue
            script, value = prevout
            key = self._keys[script]
            digest = bip143_digest(tx, index, p2wpkh_script_code(script[2:]), value, SIGHASH_ALL)
            signature = key.sign(digest, hasher=None) + bytes((SIGHASH_ALL,))
            witnesses[index] = (signature, key.public_key.format(compressed=True))
        return with_witness(tx, witnesses), unsigned
