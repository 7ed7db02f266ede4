"""Pure block assembly for regtest: coinbase, witness commitment, merkle root, PoW.

Nothing here touches the chain, the clock or a socket: callers pass heights,
times and transactions, and get a block back. The kernel (``kernel.py``) is
what decides whether the result is a valid block; this module only builds one
the way Bitcoin Core's ``BlockAssembler`` does:

- the coinbase's scriptSig starts with the height as ``CScript() << nHeight``
  (BIP34: minimal push, so heights 1-16 are ``OP_1``..``OP_16``), followed by
  ``OP_0`` so that it is at least 2 bytes (``bad-cb-length``);
- when any transaction carries a witness, the coinbase gets the BIP141 witness
  commitment output (``OP_RETURN 0xaa21a9ed <sha256d(root || reserved)>``) and
  a 32-byte zero witness reserved value;
- regtest's proof-of-work limit (``nBits`` 0x207fffff) makes the grind trivial:
  on average two nonces.

Transactions and blocks are python-bitcoinlib's ``CTransaction`` and
``CBlock``, the project's one model (``gateway.protocol.tx``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from bitcoin.core import CBlock, COutPoint, CTransaction, CTxIn, CTxOut
from bitcoin.core.script import OP_0, CScript

from gateway.protocol.sighash import sha256d
from gateway.protocol.tx import txid, unknown_flag, with_witness, wtxid

#: Regtest ``powLimit`` in compact form (chainparams.cpp, CRegTestParams).
REGTEST_BITS = 0x207FFFFF
#: BIP9 version bits top mask, as Bitcoin Core's miner sets it.
BLOCK_VERSION = 0x20000000
#: Regtest halves the subsidy every 150 blocks (``nSubsidyHalvingInterval``).
REGTEST_HALVING_INTERVAL = 150
#: BIP141: the witness commitment header bytes inside the OP_RETURN output.
WITNESS_COMMITMENT_HEADER = bytes.fromhex("aa21a9ed")
COIN = 100_000_000


def block_subsidy(height: int) -> int:
    """Regtest block subsidy in satoshis at ``height``."""
    halvings = height // REGTEST_HALVING_INTERVAL
    return 0 if halvings >= 64 else (50 * COIN) >> halvings


def merkle_root(hashes: Sequence[bytes]) -> bytes:
    """Bitcoin merkle root of internal-order hashes (last one duplicated on odd levels)."""
    if not hashes:
        return bytes(32)
    return bytes(CBlock.build_merkle_tree_from_txids(list(hashes))[-1])


def witness_commitment_script(txs: Sequence[CTransaction], reserved: bytes = bytes(32)) -> bytes:
    """BIP141 commitment output script for ``txs`` (non-coinbase ones; coinbase wtxid is 0)."""
    root = merkle_root([bytes(32)] + [wtxid(tx) for tx in txs])
    return b"\x6a\x24" + WITNESS_COMMITMENT_HEADER + sha256d(root + reserved)


def make_coinbase(
    height: int,
    outputs: Sequence[CTxOut],
    txs: Sequence[CTransaction] = (),
    *,
    extra_nonce: bytes = b"",
    force_witness_commitment: bool = False,
) -> CTransaction:
    """Build the coinbase for a block at ``height`` containing ``txs`` after it.

    ``outputs`` must already hold subsidy plus fees; the BIP141 commitment is
    appended when a transaction has a witness (or when forced).
    """
    # CScript pushes an integer as a minimal CScriptNum: BIP34's encoding.
    script_sig = CScript([height, OP_0, extra_nonce] if extra_nonce else [height, OP_0])
    outs = list(outputs)
    witness = False
    if force_witness_commitment or any(tx.has_witness() for tx in txs):
        outs.append(CTxOut(0, CScript(witness_commitment_script(txs))))
        witness = True
    coinbase = CTransaction([CTxIn(COutPoint(), script_sig, 0xFFFFFFFF)], outs, 0, 2)
    return with_witness(coinbase, [[bytes(32)]]) if witness else coinbase


def bits_to_target(bits: int) -> int:
    """Expand compact ``nBits`` to the 256-bit target."""
    exponent = bits >> 24
    mantissa = bits & 0x007FFFFF
    if exponent <= 3:
        return mantissa >> (8 * (3 - exponent))
    return mantissa << (8 * (exponent - 3))


def grind_nonce(
    prev_hash: bytes, merkle: bytes, time: int, *, bits: int = REGTEST_BITS,
    version: int = BLOCK_VERSION,
) -> int:
    """The first nonce whose header meets ``bits`` (trivial on regtest)."""
    target = bits_to_target(bits)
    prefix = struct.pack("<i", version) + prev_hash + merkle + struct.pack("<II", time, bits)
    for nonce in range(1 << 32):
        if int.from_bytes(sha256d(prefix + struct.pack("<I", nonce)), "little") <= target:
            return nonce
    raise RuntimeError("nonce space exhausted")  # pragma: no cover - impossible on regtest


def assemble_block(
    prev_hash: bytes,
    height: int,
    time: int,
    txs: Sequence[CTransaction],
    coinbase_outputs: Sequence[CTxOut],
    *,
    bits: int = REGTEST_BITS,
    extra_nonce: bytes = b"",
) -> CBlock:
    """Assemble and grind a block on ``prev_hash`` at ``height``.

    ``coinbase_outputs`` must pay at most subsidy + fees (the kernel rejects
    ``bad-cb-amount`` otherwise). ``txs`` must be in a valid order (parents
    before children). ``extra_nonce`` distinguishes otherwise identical
    coinbases (e.g. two empty blocks at the same height on different forks).
    """
    coinbase = make_coinbase(height, coinbase_outputs, txs, extra_nonce=extra_nonce)
    all_txs = [coinbase, *txs]
    merkle = merkle_root([txid(tx) for tx in all_txs])
    nonce = grind_nonce(prev_hash, merkle, time, bits=bits)
    return CBlock(BLOCK_VERSION, prev_hash, merkle, time, bits, nonce, all_txs)


def parse_block(raw: bytes) -> CBlock:
    """A serialised block, decoded as Bitcoin Core does (``ValueError`` otherwise).

    Only the canonical encoding is accepted: the block must serialise back
    to the same bytes, and no transaction may have been read from an
    unknown BIP144 flag (see ``gateway.protocol.tx.decode_canonical``).
    The merkle root is not checked here: that is the kernel's verdict.
    """
    raw = bytes(raw)
    try:
        block = CBlock.deserialize(raw)
    except Exception as exc:  # python-bitcoinlib raises several unrelated types
        raise ValueError("not a serialised block") from exc
    if block.serialize() != raw or any(unknown_flag(tx) for tx in block.vtx):
        raise ValueError("non-canonical block encoding")
    return block


def block_txids(block: CBlock) -> list[bytes]:
    """The txids of ``block``'s transactions, in order (internal byte order).

    ``CBlock`` computes them when it is built or read: they are the first
    level of its merkle tree, which lists the leaves first.
    """
    return [bytes(h) for h in block.vMerkleTree[: len(block.vtx)]]


def block_hash_hex(block: CBlock) -> str:
    """Block hash as displayed by Bitcoin Core (big-endian hex)."""
    return bytes(block.GetHash())[::-1].hex()


def header_bytes(block: CBlock) -> bytes:
    """The 80-byte header."""
    return bytes(block.get_header().serialize())
