"""The project's one transaction model: python-bitcoinlib's ``CTransaction``.

The channel core, the player and the embedded node all hold transactions as
python-bitcoinlib objects (``CTransaction``, ``CTxIn``, ``CTxOut``; blocks
are ``CBlock``). This module adds what they need that the library lacks:

- ids and sizes from one serialisation each: ``CTransaction.GetTxid``
  serialises twice, and ``calc_weight`` refuses a transaction without
  inputs, which ``decoderawtransaction`` must still describe (BIP141);
- :func:`deserialize`, raising only ``ValueError``;
- :func:`decode_canonical`, Bitcoin Core's ``DecodeHexTx``: only the
  canonical encoding (no non-minimal CompactSize, no BIP144 witness record
  whose stacks are all empty), the extended format first and then, for an
  input-less template, the legacy one;
- witness stacks read and written as tuples of bytes.

The signature digest is :mod:`gateway.protocol.sighash` (BIP143).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from io import BytesIO
from typing import NamedTuple

from bitcoin.core import CTransaction, CTxIn, CTxInWitness, CTxOut, CTxWitness
from bitcoin.core.script import CScriptWitness
from bitcoin.core.serialize import VectorSerializer, ser_read

from gateway.protocol.sighash import sha256d

__all__ = [
    "TxSizes",
    "decode_canonical",
    "deserialize",
    "measure",
    "stripped",
    "txid",
    "unknown_flag",
    "vsize",
    "weight",
    "with_witness",
    "witness_stack",
    "wtxid",
]

_NO_WITNESS = {"include_witness": False}


class TxSizes(NamedTuple):
    """A transaction's serialisation, ids (internal byte order) and BIP141 sizes."""

    #: The serialisation with witness data (BIP144), as sent and stored.
    serialized: bytes
    txid: bytes
    wtxid: bytes
    #: Bytes with witness data (BIP144 serialisation).
    size: int
    #: Bytes without witness data (what the txid hashes).
    base_size: int
    weight: int
    vsize: int


def deserialize(raw: bytes) -> CTransaction:
    """A whole serialised transaction, as python-bitcoinlib reads it.

    ``ValueError`` if ``raw`` is not one (the library raises several
    unrelated types). Lenient, as python-bitcoinlib: the protocol core
    checks the fields it cares about; :func:`decode_canonical` is strict.
    """
    try:
        return CTransaction.deserialize(bytes(raw))
    except Exception as exc:
        raise ValueError("not a serialised transaction") from exc


def _deserialize_legacy(raw: bytes) -> CTransaction:
    # The non-witness branch of CTransaction.stream_deserialize, which the
    # library takes only when the two bytes after nVersion are not 00 01: a
    # template with no input and one output starts exactly so.
    f = BytesIO(raw)
    version = struct.unpack("<i", ser_read(f, 4))[0]
    vin = VectorSerializer.stream_deserialize(CTxIn, f)
    vout = VectorSerializer.stream_deserialize(CTxOut, f)
    locktime = struct.unpack("<I", ser_read(f, 4))[0]
    if f.read(1):
        raise ValueError("trailing data after transaction")
    return CTransaction(vin, vout, locktime, version)


def unknown_flag(tx: CTransaction) -> bool:
    """True for an input-less transaction that Bitcoin Core refuses to read (BIP144).

    With no input, the byte after the empty input vector is the BIP144 flag
    to Core: 1 is the extended format, 0 an empty transaction, anything else
    "Unknown transaction optional data". The library reads it as the output
    count instead, so an input-less transaction that has outputs and no
    witness was read from such a flag.
    """
    return not tx.vin and bool(tx.vout) and not tx.has_witness()


def _read(raw: bytes, *, legacy: bool) -> CTransaction:
    tx = _deserialize_legacy(raw) if legacy else CTransaction.deserialize(raw)
    if tx.serialize() != raw:
        raise ValueError("non-canonical transaction encoding")
    if not legacy and unknown_flag(tx):
        raise ValueError("unknown transaction optional data")
    return tx


def decode_canonical(raw: bytes, *, legacy_fallback: bool = False) -> CTransaction:
    """Decode ``raw`` as Bitcoin Core does; ``ValueError`` unless it is canonical.

    A transaction is accepted only if it serialises back to the same bytes:
    that rejects what Core's deserialiser rejects and the library lets
    through (a non-minimal CompactSize, a BIP144 marker with all-empty
    witnesses; see also :func:`unknown_flag`). With ``legacy_fallback``
    bytes that fail as the extended format are read as the legacy one
    (``DecodeHexTx``: an input-less template for ``fundrawtransaction``).
    """
    raw = bytes(raw)
    try:
        return _read(raw, legacy=False)
    except Exception as exc:
        if not legacy_fallback:
            raise ValueError(f"TX decode failed: {exc}") from exc
    try:
        return _read(raw, legacy=True)
    except Exception as exc:
        raise ValueError(f"TX decode failed: {exc}") from exc


def stripped(tx: CTransaction) -> bytes:
    """The serialisation without witness data: what the txid hashes (BIP141)."""
    return bytes(tx.serialize(_NO_WITNESS))


def txid(tx: CTransaction) -> bytes:
    """The txid in internal byte order (reverse it for display)."""
    return sha256d(stripped(tx))


def wtxid(tx: CTransaction) -> bytes:
    """The wtxid (BIP141) in internal byte order; the txid when there is no witness.

    That is python-bitcoinlib's ``GetHash`` (the hash of the full
    serialisation), which an immutable ``CTransaction`` computes once.
    """
    return bytes(tx.GetHash())


def weight(tx: CTransaction) -> int:
    """BIP141 weight: 3 x the size without witness + the total size."""
    return 3 * len(stripped(tx)) + len(tx.serialize())


def vsize(tx: CTransaction) -> int:
    """Virtual size in vbytes: weight / 4, rounded up (BIP141)."""
    return (weight(tx) + 3) // 4


def measure(tx: CTransaction) -> TxSizes:
    """Everything at once, from one serialisation with and one without witness."""
    base = stripped(tx)
    full = bytes(tx.serialize())
    tx_weight = 3 * len(base) + len(full)
    return TxSizes(
        full, sha256d(base), sha256d(full), len(full), len(base), tx_weight, (tx_weight + 3) // 4
    )


def witness_stack(tx: CTransaction, index: int) -> tuple[bytes, ...]:
    """The witness stack of input ``index`` (empty if it has none)."""
    witnesses = tx.wit.vtxinwit
    if index >= len(witnesses):
        return ()
    return tuple(bytes(item) for item in witnesses[index].scriptWitness.stack)


def with_witness(tx: CTransaction, stacks: Sequence[Sequence[bytes]]) -> CTransaction:
    """``tx`` with one witness stack per input (all empty: the legacy serialisation)."""
    witness = CTxWitness([CTxInWitness(CScriptWitness(list(stack))) for stack in stacks])
    return CTransaction(tx.vin, tx.vout, tx.nLockTime, tx.nVersion, witness)
