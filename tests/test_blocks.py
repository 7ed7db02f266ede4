"""Regtest block assembly (gateway.chain.blocks) over python-bitcoinlib's CBlock."""

from __future__ import annotations

import pytest
from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxOut
from bitcoin.core.script import CScript

from gateway.chain.blocks import (
    WITNESS_COMMITMENT_HEADER,
    assemble_block,
    bits_to_target,
    block_hash_hex,
    block_subsidy,
    block_txids,
    header_bytes,
    make_coinbase,
    merkle_root,
    parse_block,
)
from gateway.protocol.sighash import sha256d
from gateway.protocol.tx import txid, with_witness

SCRIPT = CScript(b"\x00\x14" + b"\x22" * 20)


def spend(tag: int, witness: bool) -> CTransaction:
    tx = CTransaction(
        [CTxIn(COutPoint(bytes([tag]) * 32, 1), CScript(), 0xFFFFFFFD)],
        [CTxOut(1000, SCRIPT), CTxOut(2000, SCRIPT)], 0, 2,
    )
    return with_witness(tx, [(b"\x30" * 71, b"\x02" * 33)]) if witness else tx


@pytest.mark.parametrize(
    ("height", "push"),
    # BIP34: the height as a minimal CScriptNum push (OP_1..OP_16 below 17), then OP_0.
    [(1, "51"), (16, "60"), (17, "0111"), (128, "028000"), (32768, "03008000"),
     (8_388_608, "0400008000")],
)
def test_coinbase_starts_with_the_bip34_height(height: int, push: str) -> None:
    coinbase = make_coinbase(height, [CTxOut(block_subsidy(height), SCRIPT)])
    assert coinbase.vin[0].scriptSig.hex() == push + "00"
    assert coinbase.is_coinbase() and not coinbase.has_witness()


def test_a_block_with_a_witness_transaction() -> None:
    txs = [spend(1, witness=True), spend(2, witness=False)]
    block = assemble_block(b"\x11" * 32, 300, 1_700_000_000, txs, [CTxOut(5, SCRIPT)])
    ids = block_txids(block)
    assert ids == [txid(tx) for tx in block.vtx]
    assert block.hashMerkleRoot == merkle_root(ids)
    # BIP141: the commitment output, and the coinbase's 32-byte reserved value.
    commitment = bytes(block.vtx[0].vout[-1].scriptPubKey)
    assert commitment[:6] == b"\x6a\x24" + WITNESS_COMMITMENT_HEADER
    assert block.vtx[0].wit.vtxinwit[0].scriptWitness.stack == [bytes(32)]
    header = header_bytes(block)
    assert len(header) == 80 and sha256d(header) == block.GetHash()
    assert int.from_bytes(block.GetHash(), "little") <= bits_to_target(block.nBits)
    assert block_hash_hex(block) == block.GetHash()[::-1].hex()
    raw = block.serialize()
    assert parse_block(raw).serialize() == raw


def test_parse_block_refuses_what_core_cannot_read() -> None:
    block = assemble_block(b"\x11" * 32, 5, 1_700_000_000, [spend(3, True)], [CTxOut(5, SCRIPT)])
    raw = block.serialize()
    with pytest.raises(ValueError):
        parse_block(raw + b"\x00")
    with pytest.raises(ValueError):
        parse_block(raw[:80] + b"\xfd\x02\x00" + raw[81:])  # non-canonical tx count
    with pytest.raises(ValueError):
        parse_block(b"\x00")
