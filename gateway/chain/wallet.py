"""Addresses and the embedded node's faucet wallet (P2WPKH keys, coincurve signing).

Regtest addresses only: bech32/bech32m with HRP ``bcrt`` (BIP173/BIP350) and
base58check with version bytes 0x6f (P2PKH) and 0xc4 (P2SH). Keys are random
32-byte secrets kept in the node's SQLite file; signatures are RFC 6979 ECDSA
from libsecp256k1 (always low-S, strict DER, BIP62/BIP66) over the BIP143
digest.
"""

from __future__ import annotations

import os
import sqlite3
from functools import lru_cache

import coincurve
from bitcoin import base58, segwit_addr

from gateway.chain.blocks import (
    SIGHASH_ALL,
    Tx,
    bip143_sighash,
    hash160,
    p2wpkh_script,
    p2wpkh_script_code,
)

HRP = "bcrt"
P2PKH_VERSION = 0x6F
P2SH_VERSION = 0xC4


class AddressError(ValueError):
    """Not a valid regtest address."""


@lru_cache(maxsize=4096)
def address_to_script(address: str) -> bytes:
    """scriptPubKey for a regtest address; raises ``AddressError``."""
    if address.lower().startswith(HRP + "1"):
        version, program = segwit_addr.decode(HRP, address)
        if version is None or program is None:
            raise AddressError(f"Invalid address: {address}")
        op = 0 if version == 0 else 0x50 + version
        return bytes((op, len(program))) + bytes(program)
    try:
        data = base58.CBase58Data(address)
    except (base58.Base58Error, ValueError) as exc:
        raise AddressError(f"Invalid address: {address}") from exc
    if data.nVersion == P2PKH_VERSION and len(data) == 20:
        return b"\x76\xa9\x14" + bytes(data) + b"\x88\xac"
    if data.nVersion == P2SH_VERSION and len(data) == 20:
        return b"\xa9\x14" + bytes(data) + b"\x87"
    raise AddressError(f"Invalid address: {address}")


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


@lru_cache(maxsize=65536)
def script_to_address(script: bytes) -> str | None:
    """The regtest address of ``script``, or None when it has none."""
    kind = script_type(script)
    if kind.startswith("witness") or kind == "anchor":
        version = 0 if script[0] == 0 else script[0] - 0x50
        return str(segwit_addr.encode(HRP, version, script[2:]))
    if kind == "pubkeyhash":
        return str(base58.CBase58Data.from_bytes(script[3:23], P2PKH_VERSION))
    if kind == "scripthash":
        return str(base58.CBase58Data.from_bytes(script[2:22], P2SH_VERSION))
    return None


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
        script = p2wpkh_script(hash160(key.public_key.format(compressed=True)))
        with self._db:
            self._db.execute(
                "INSERT INTO wallet_keys (secret, script) VALUES (?, ?)", (key.secret, script)
            )
        self._keys[script] = key
        return script

    def default_script(self) -> bytes:
        """The first key's script (created on demand): premine and mining rewards go here."""
        return self.scripts[0] if self._keys else self.new_script()

    def sign(self, tx: Tx, spent: list[tuple[bytes, int] | None]) -> tuple[Tx, list[int]]:
        """Sign every input whose spent output (``(script, value)``) pays this wallet.

        Returns the new transaction and the indexes of inputs left unsigned.
        Existing witnesses of other inputs are kept.
        """
        witnesses: list[tuple[bytes, ...]] = (
            list(tx.witnesses) if tx.witnesses else [() for _ in tx.inputs]
        )
        unsigned: list[int] = []
        for index, prevout in enumerate(spent):
            if prevout is None or prevout[0] not in self._keys:
                if not witnesses[index] and not tx.inputs[index].script_sig:
                    unsigned.append(index)
                continue
            script, value = prevout
            key = self._keys[script]
            digest = bip143_sighash(tx, index, p2wpkh_script_code(script[2:]), value)
            signature = key.sign(digest, hasher=None) + bytes((SIGHASH_ALL,))
            witnesses[index] = (signature, key.public_key.format(compressed=True))
        signed = Tx(tx.version, tx.inputs, tx.outputs, tx.locktime, tuple(witnesses))
        return signed, unsigned
