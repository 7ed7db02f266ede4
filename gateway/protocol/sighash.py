"""BIP143: the signature digest of witness v0 inputs, the project's one implementation.

Every witness v0 signature the project makes or checks is over a digest from
here: the channel core's refunds, settlements and T3 template
(:mod:`gateway.protocol.transactions`, :mod:`gateway.protocol.settlement`)
and the embedded node's faucet wallet (P2WPKH).

Written out rather than python-bitcoinlib's ``SignatureHash``, which packs
nLockTime and the sighash type as *signed* 32-bit integers and so fails for
an nLockTime of 2**31 or more (BIP65 time expiries after 2038, or any value
with the top bit set).

The preimage (BIP143, "Specification")::

    nVersion | hashPrevouts | hashSequence | outpoint | scriptCode | amount |
    nSequence | hashOutputs | nLockTime | sighash type

Its parts are public so that a signer of many digests over one transaction
shape hashes the fixed head once (``PaymentTemplate`` in
:mod:`gateway.protocol.transactions`: only hashOutputs changes per payment).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

from bitcoin.core import CTransaction, CTxOut
from bitcoin.core.script import SIGHASH_ALL, SIGHASH_ANYONECANPAY, SIGHASH_NONE, SIGHASH_SINGLE
from bitcoin.core.serialize import VarIntSerializer

__all__ = [
    "SIGHASH_ALL",
    "SIGHASH_ANYONECANPAY",
    "SIGHASH_NONE",
    "SIGHASH_SINGLE",
    "ZERO_HASH",
    "bip143_digest",
    "hash_outputs",
    "hash_prevouts",
    "hash_sequence",
    "output_bytes",
    "p2wpkh_script_code",
    "preimage_head",
    "preimage_tail",
    "sha256d",
    "var_bytes",
]

#: What ANYONECANPAY, NONE and SINGLE put in place of the hashes they drop (BIP143).
ZERO_HASH = bytes(32)


def sha256d(data: bytes) -> bytes:
    """Bitcoin's double SHA-256."""
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def var_bytes(data: bytes) -> bytes:
    """``data`` with its CompactSize length in front (how scripts are serialised)."""
    return bytes(VarIntSerializer.serialize(len(data))) + data


def output_bytes(value: int, script_pubkey: bytes) -> bytes:
    """One output as serialised in a transaction: 8-byte amount, then the script."""
    return struct.pack("<q", value) + var_bytes(script_pubkey)


def hash_prevouts(tx: CTransaction) -> bytes:
    """hashPrevouts: SHA256d of every input's outpoint (zero under ANYONECANPAY)."""
    pack = struct.Struct("<I").pack
    return sha256d(b"".join(i.prevout.hash + pack(i.prevout.n) for i in tx.vin))


def hash_sequence(tx: CTransaction) -> bytes:
    """hashSequence: SHA256d of every input's nSequence (ALL without ANYONECANPAY only)."""
    pack = struct.Struct("<I").pack
    return sha256d(b"".join(pack(i.nSequence) for i in tx.vin))


def hash_outputs(outputs: Iterable[CTxOut]) -> bytes:
    """hashOutputs over ``outputs``: all of them for ALL, the one facing the input for SINGLE."""
    return sha256d(b"".join(output_bytes(o.nValue, o.scriptPubKey) for o in outputs))


def preimage_head(
    version: int,
    prevouts_hash: bytes,
    sequence_hash: bytes,
    outpoint: bytes,
    script_code: bytes,
    amount: int,
    sequence: int,
) -> bytes:
    """The preimage up to hashOutputs: items 1 to 7 of BIP143.

    ``outpoint`` is the 36-byte serialisation (txid in internal order, then
    the 4-byte index); ``script_code`` is the witness script for P2WSH, or
    :func:`p2wpkh_script_code` for P2WPKH.
    """
    return b"".join(
        [
            struct.pack("<i", version),
            prevouts_hash,
            sequence_hash,
            outpoint,
            var_bytes(script_code),
            struct.pack("<q", amount),
            struct.pack("<I", sequence),
        ]
    )


def preimage_tail(locktime: int, hashtype: int) -> bytes:
    """Items 9 and 10 of BIP143: nLockTime and the sighash type, both unsigned."""
    return struct.pack("<II", locktime, hashtype)


def bip143_digest(
    tx: CTransaction, index: int, script_code: bytes, amount: int, hashtype: int = SIGHASH_ALL
) -> bytes:
    """The BIP143 digest that signs input ``index`` of ``tx``, spending ``amount``.

    Every sighash type: ALL, NONE and SINGLE, each with or without
    ANYONECANPAY. SINGLE with no output at ``index`` commits to a zero
    hashOutputs (BIP143 drops the legacy "1" digest).
    """
    txin = tx.vin[index]
    anyone_can_pay = bool(hashtype & SIGHASH_ANYONECANPAY)
    base = hashtype & 0x1F
    prevouts = ZERO_HASH if anyone_can_pay else hash_prevouts(tx)
    if anyone_can_pay or base in (SIGHASH_SINGLE, SIGHASH_NONE):
        sequences = ZERO_HASH
    else:
        sequences = hash_sequence(tx)
    if base not in (SIGHASH_SINGLE, SIGHASH_NONE):
        outputs = hash_outputs(tx.vout)
    elif base == SIGHASH_SINGLE and index < len(tx.vout):
        outputs = hash_outputs([tx.vout[index]])
    else:
        outputs = ZERO_HASH
    outpoint = txin.prevout.hash + struct.pack("<I", txin.prevout.n)
    head = preimage_head(
        tx.nVersion, prevouts, sequences, outpoint, script_code, amount, txin.nSequence
    )
    return sha256d(head + outputs + preimage_tail(tx.nLockTime, hashtype))


def p2wpkh_script_code(pubkey_hash: bytes) -> bytes:
    """BIP143's scriptCode of a P2WPKH input.

    ``OP_DUP OP_HASH160 <pubkey_hash> OP_EQUALVERIFY OP_CHECKSIG``: the
    P2PKH script of the key the witness program commits to.
    """
    return b"\x76\xa9\x14" + pubkey_hash + b"\x88\xac"
