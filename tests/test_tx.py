"""The one transaction model (gateway.protocol.tx): ids, sizes, strict decoding (BIP141/BIP144)."""

from __future__ import annotations

import pytest
from bitcoin.core import CTransaction, CTxOut
from bitcoin.core.script import CScript

from gateway.protocol.tx import (
    decode_canonical,
    deserialize,
    measure,
    stripped,
    txid,
    vsize,
    weight,
    with_witness,
    witness_stack,
    wtxid,
)

# BIP143's native P2WPKH example, unsigned (legacy format) and signed (BIP144).
UNSIGNED = bytes.fromhex(
    "0100000002fff7f7881a8099afa6940d42d1e7f6362bec38171ea3edf433541db4e4ad969f0000000000eef"
    "fffffef51e1b804cc89d182d279655c3aa89e815b1b309fe287d9b2b55d57b90ec68a0100000000ffffffff"
    "02202cb206000000001976a9148280b37df378db99f66f85c95a783a76ac7a6d5988ac9093510d00000000"
    "1976a9143bde42dbee7e4dbe6a21b2d50ce2f0167faa815988ac11000000"
)
SIGNED = bytes.fromhex(
    "01000000000102fff7f7881a8099afa6940d42d1e7f6362bec38171ea3edf433541db4e4ad969f0000000049"
    "4830450221008b9d1dc26ba6a9cb62127b02742fa9d754cd3bebf337f7a55d114c8e5cdd30be022040529b19"
    "4ba3f9281a99f2b1c0a19c0489bc22ede944ccf4ecbab4cc618ef3ed01eeffffffef51e1b804cc89d182d279"
    "655c3aa89e815b1b309fe287d9b2b55d57b90ec68a0100000000ffffffff02202cb206000000001976a91482"
    "80b37df378db99f66f85c95a783a76ac7a6d5988ac9093510d000000001976a9143bde42dbee7e4dbe6a21b2"
    "d50ce2f0167faa815988ac000247304402203609e17b84f6a7d30c80bfa610b5b4542f32a8a0d5447a12fb13"
    "66d7f01cc44a0220573a954c4518331561406f90300e8f3358f51928d43c212a8caed02de67eebee0121025476"
    "c2e83188368da1ff3e292e7acafcdb3566bb0ad253f62fc70f07aeee635711000000"
)
P2WPKH = CScript(b"\x00\x14" + b"\x11" * 20)


def test_ids_and_sizes_of_a_witness_transaction() -> None:
    tx = decode_canonical(SIGNED)
    unsigned = decode_canonical(UNSIGNED)
    # Without marker, flag and witness record (an empty stack, then two items:
    # 1 + 1 + 72 + 34 bytes); input 0's scriptSig signature stays.
    assert stripped(tx) != UNSIGNED and len(stripped(tx)) == len(SIGNED) - 2 - 108
    assert txid(tx) != wtxid(tx)
    assert txid(unsigned) == wtxid(unsigned)
    sizes = measure(tx)
    assert sizes.serialized == SIGNED and sizes.size == len(SIGNED)
    assert sizes.txid == txid(tx) and sizes.wtxid == wtxid(tx)
    assert sizes.base_size == len(stripped(tx))
    assert sizes.weight == weight(tx) == 3 * sizes.base_size + sizes.size
    assert sizes.vsize == vsize(tx) == (sizes.weight + 3) // 4
    assert witness_stack(tx, 0) == ()
    assert len(witness_stack(tx, 1)) == 2 and witness_stack(tx, 1)[1][0] == 0x02


def test_with_witness_round_trip() -> None:
    tx = decode_canonical(SIGNED)
    stacks = [witness_stack(tx, i) for i in range(len(tx.vin))]
    assert with_witness(tx, stacks).serialize() == SIGNED
    # All stacks empty: the legacy serialisation (BIP144 forbids an empty record).
    assert with_witness(tx, [(), ()]).serialize() == stripped(tx)


def test_sizes_of_an_input_less_template() -> None:
    # decoderawtransaction describes what fundrawtransaction is given.
    template = CTransaction([], [CTxOut(1000, P2WPKH)], 0, 2)
    sizes = measure(template)
    assert sizes.size == sizes.base_size == len(template.serialize())
    assert sizes.weight == 4 * sizes.size


def test_non_canonical_compact_size_is_refused() -> None:
    # Input count 2 as 0xfd 0x0200: the library reads it, Core does not.
    raw = UNSIGNED[:4] + b"\xfd\x02\x00" + UNSIGNED[5:]
    assert len(deserialize(raw).vin) == 2
    with pytest.raises(ValueError):
        decode_canonical(raw)
    with pytest.raises(ValueError):
        decode_canonical(raw, legacy_fallback=True)


def test_superfluous_witness_record_is_refused() -> None:
    # BIP144 marker and flag, but every witness stack empty.
    body = UNSIGNED[4:-4]
    raw = UNSIGNED[:4] + b"\x00\x01" + body + b"\x00\x00" + UNSIGNED[-4:]
    deserialize(raw)  # the library accepts it
    with pytest.raises(ValueError):
        decode_canonical(raw)
    with pytest.raises(ValueError):
        decode_canonical(raw, legacy_fallback=True)


def test_trailing_bytes_are_refused() -> None:
    with pytest.raises(ValueError):
        decode_canonical(SIGNED + b"\x00")
    with pytest.raises(ValueError):
        deserialize(SIGNED + b"\x00")
    with pytest.raises(ValueError):
        decode_canonical(b"", legacy_fallback=True)


def test_input_less_templates_need_the_legacy_fallback() -> None:
    one = CTransaction([], [CTxOut(1000, P2WPKH)], 0, 2).serialize()
    assert one[4:6] == b"\x00\x01"  # reads as the BIP144 marker and flag
    with pytest.raises(ValueError):
        decode_canonical(one)
    tx = decode_canonical(one, legacy_fallback=True)
    assert not tx.vin and tx.vout[0].nValue == 1000 and tx.serialize() == one
    # Two outputs: a flag byte of 2, "unknown optional data" to Core unless read as legacy.
    two = CTransaction([], [CTxOut(1000, P2WPKH), CTxOut(2000, P2WPKH)], 0, 2).serialize()
    with pytest.raises(ValueError):
        decode_canonical(two)
    assert len(decode_canonical(two, legacy_fallback=True).vout) == 2
    # No output either: the flag byte is 0, which Core reads as an empty transaction.
    empty = CTransaction([], [], 0, 2).serialize()
    assert decode_canonical(empty).serialize() == empty
