"""Pure block assembly for regtest: transactions, coinbase, merkle root, header, PoW.

Nothing here touches the chain, the clock or a socket: callers pass heights,
times and transactions, and get bytes back. The kernel (``kernel.py``) is what
decides whether the result is a valid block; this module only builds one the
way Bitcoin Core's ``BlockAssembler`` does:

- the coinbase's scriptSig starts with the height as ``CScript() << nHeight``
  (BIP34: minimal push, so heights 1-16 are ``OP_1``..``OP_16``), followed by
  ``OP_0`` so that it is at least 2 bytes (``bad-cb-length``);
- when any transaction carries a witness, the coinbase gets the BIP141 witness
  commitment output (``OP_RETURN 0xaa21a9ed <sha256d(root || reserved)>``) and
  a 32-byte zero witness reserved value;
- regtest's proof-of-work limit (``nBits`` 0x207fffff) makes the grind trivial:
  on average two nonces.

``Tx`` is a small parser/serializer for the consensus transaction format
(BIP144 for witnesses) used by the node for txids, weights and outpoints.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

#: Regtest ``powLimit`` in compact form (chainparams.cpp, CRegTestParams).
REGTEST_BITS = 0x207FFFFF
#: BIP9 version bits top mask, as Bitcoin Core's miner sets it.
BLOCK_VERSION = 0x20000000
#: Regtest halves the subsidy every 150 blocks (``nSubsidyHalvingInterval``).
REGTEST_HALVING_INTERVAL = 150
#: BIP141: the witness commitment header bytes inside the OP_RETURN output.
WITNESS_COMMITMENT_HEADER = bytes.fromhex("aa21a9ed")
COIN = 100_000_000
#: The coinbase input's null outpoint.
NULL_TXID = bytes(32)
NULL_INDEX = 0xFFFFFFFF


class DecodeError(ValueError):
    """Raised when bytes are not a valid serialized transaction or block."""


def sha256d(data: bytes) -> bytes:
    """Bitcoin's double SHA-256."""
    return hashlib.sha256(hashlib.sha256(data).digest()).digest()


def hash160(data: bytes) -> bytes:
    """RIPEMD160(SHA256(data)), via hashlib (OpenSSL), not python-bitcoinlib's pure Python."""
    return hashlib.new("ripemd160", hashlib.sha256(data).digest()).digest()


def ser_compact_size(n: int) -> bytes:
    """Serialize ``n`` as a Bitcoin CompactSize (varint)."""
    if n < 0xFD:
        return bytes((n,))
    if n <= 0xFFFF:
        return b"\xfd" + struct.pack("<H", n)
    if n <= 0xFFFFFFFF:
        return b"\xfe" + struct.pack("<I", n)
    return b"\xff" + struct.pack("<Q", n)


def ser_bytes(data: bytes) -> bytes:
    """Serialize a length-prefixed byte string."""
    return ser_compact_size(len(data)) + data


class _Reader:
    """Cursor over bytes that raises ``DecodeError`` instead of IndexError."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def read(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise DecodeError("unexpected end of data")
        out = self.data[self.pos : end]
        self.pos = end
        return out

    def u32(self) -> int:
        return int(struct.unpack("<I", self.read(4))[0])

    def i32(self) -> int:
        return int(struct.unpack("<i", self.read(4))[0])

    def u64(self) -> int:
        return int(struct.unpack("<Q", self.read(8))[0])

    def compact_size(self) -> int:
        first = self.read(1)[0]
        if first < 0xFD:
            return first
        if first == 0xFD:
            n = int(struct.unpack("<H", self.read(2))[0])
            minimum = 0xFD
        elif first == 0xFE:
            n = int(struct.unpack("<I", self.read(4))[0])
            minimum = 0x10000
        else:
            n = int(struct.unpack("<Q", self.read(8))[0])
            minimum = 0x100000000
        if n < minimum:
            raise DecodeError("non-canonical CompactSize")
        if n > 0x02000000:  # MAX_SIZE in serialize.h
            raise DecodeError("CompactSize too large")
        return n

    def var_bytes(self) -> bytes:
        return self.read(self.compact_size())


@dataclass(frozen=True, slots=True)
class TxIn:
    """A transaction input: ``prev_txid`` in internal (little-endian) byte order."""

    prev_txid: bytes
    prev_index: int
    script_sig: bytes = b""
    sequence: int = 0xFFFFFFFF

    def serialize(self) -> bytes:
        """Consensus serialization (without witness)."""
        return (
            self.prev_txid
            + struct.pack("<I", self.prev_index)
            + ser_bytes(self.script_sig)
            + struct.pack("<I", self.sequence)
        )


@dataclass(frozen=True, slots=True)
class TxOut:
    """A transaction output: value in satoshis and its scriptPubKey."""

    value: int
    script_pubkey: bytes

    def serialize(self) -> bytes:
        """Consensus serialization."""
        return struct.pack("<q", self.value) + ser_bytes(self.script_pubkey)


@dataclass(frozen=True, slots=True)
class Tx:
    """A parsed transaction; ``witnesses`` has one stack per input or is empty."""

    version: int
    inputs: tuple[TxIn, ...]
    outputs: tuple[TxOut, ...]
    locktime: int = 0
    witnesses: tuple[tuple[bytes, ...], ...] = ()
    _cache: dict[str, bytes] = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_witness(self) -> bool:
        """True when any input carries a non-empty witness stack (BIP144)."""
        return any(self.witnesses)

    def serialize(self, *, with_witness: bool = True) -> bytes:
        """Consensus serialization; BIP144 extended format when a witness is present."""
        key = "w" if with_witness else "nw"
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        body_in = ser_compact_size(len(self.inputs)) + b"".join(i.serialize() for i in self.inputs)
        body_out = ser_compact_size(len(self.outputs)) + b"".join(
            o.serialize() for o in self.outputs
        )
        version = struct.pack("<i", self.version)
        locktime = struct.pack("<I", self.locktime)
        if with_witness and self.has_witness:
            wit = b"".join(
                ser_compact_size(len(stack)) + b"".join(ser_bytes(item) for item in stack)
                for stack in self.witnesses
            )
            out = version + b"\x00\x01" + body_in + body_out + wit + locktime
        else:
            out = version + body_in + body_out + locktime
        self._cache[key] = out
        return out

    @property
    def txid(self) -> bytes:
        """Transaction id, internal byte order (reverse it for display)."""
        return sha256d(self.serialize(with_witness=False))

    @property
    def wtxid(self) -> bytes:
        """Witness transaction id (BIP141), internal byte order."""
        return sha256d(self.serialize(with_witness=True))

    @property
    def weight(self) -> int:
        """BIP141 weight: base size * 3 + total size."""
        return len(self.serialize(with_witness=False)) * 3 + len(self.serialize())

    @property
    def vsize(self) -> int:
        """Virtual size in vbytes, rounded up (BIP141)."""
        return (self.weight + 3) // 4

    @property
    def is_coinbase(self) -> bool:
        """True for a coinbase: one input spending the null outpoint."""
        return (
            len(self.inputs) == 1
            and self.inputs[0].prev_txid == NULL_TXID
            and self.inputs[0].prev_index == NULL_INDEX
        )

    @classmethod
    def parse(cls, data: bytes, *, allow_witness: bool = True) -> Tx:
        """Parse one serialized transaction; the whole of ``data`` must be consumed.

        With ``allow_witness=False`` a zero-input transaction (as given to
        ``fundrawtransaction``) is read without the BIP144 marker ambiguity.
        """
        reader = _Reader(data)
        tx = cls._read(reader, allow_witness=allow_witness)
        if reader.pos != len(data):
            raise DecodeError("trailing data after transaction")
        return tx

    @classmethod
    def _read(cls, r: _Reader, *, allow_witness: bool = True) -> Tx:
        start = r.pos
        version = r.i32()
        n_in = r.compact_size()
        segwit = False
        if n_in == 0 and allow_witness:
            flag = r.read(1)[0]
            if flag != 1:
                raise DecodeError("unknown transaction flag")
            segwit = True
            n_in = r.compact_size()
        inputs = []
        for _ in range(n_in):
            prev = r.read(32)
            index = r.u32()
            script_sig = r.var_bytes()
            inputs.append(TxIn(prev, index, script_sig, r.u32()))
        outputs = []
        for _ in range(r.compact_size()):
            value = int(struct.unpack("<q", r.read(8))[0])
            outputs.append(TxOut(value, r.var_bytes()))
        witnesses: list[tuple[bytes, ...]] = []
        if segwit:
            for _ in range(n_in):
                witnesses.append(tuple(r.var_bytes() for _ in range(r.compact_size())))
            if not any(witnesses):
                # BIP144: the extended format with all-empty witnesses is invalid.
                raise DecodeError("superfluous witness record")
        locktime = r.u32()
        tx = cls(version, tuple(inputs), tuple(outputs), locktime, tuple(witnesses))
        raw = r.data[start : r.pos]
        tx._cache["w" if segwit else "nw"] = raw
        if not segwit:
            tx._cache["w"] = raw
        return tx


def script_num(n: int) -> bytes:
    """Minimal CScriptNum encoding (little-endian, sign bit in the top byte)."""
    if n == 0:
        return b""
    negative = n < 0
    absval = -n if negative else n
    out = bytearray()
    while absval:
        out.append(absval & 0xFF)
        absval >>= 8
    if out[-1] & 0x80:
        out.append(0x80 if negative else 0)
    elif negative:
        out[-1] |= 0x80
    return bytes(out)


def push_int(n: int) -> bytes:
    """``CScript() << n``: OP_0, OP_1NEGATE, OP_1..OP_16, or a minimal data push."""
    if n == 0:
        return b"\x00"
    if n == -1:
        return b"\x4f"
    if 1 <= n <= 16:
        return bytes((0x50 + n,))
    return push_data(script_num(n))


def push_data(data: bytes) -> bytes:
    """Minimal push of ``data`` (BIP62 rule 3 for sizes up to 520 bytes)."""
    n = len(data)
    if n < 0x4C:
        return bytes((n,)) + data
    if n <= 0xFF:
        return b"\x4c" + bytes((n,)) + data
    if n <= 0xFFFF:
        return b"\x4d" + struct.pack("<H", n) + data
    return b"\x4e" + struct.pack("<I", n) + data


def block_subsidy(height: int) -> int:
    """Regtest block subsidy in satoshis at ``height``."""
    halvings = height // REGTEST_HALVING_INTERVAL
    return 0 if halvings >= 64 else (50 * COIN) >> halvings


def merkle_root(hashes: Sequence[bytes]) -> bytes:
    """Bitcoin merkle root of internal-order hashes (last one duplicated on odd levels)."""
    if not hashes:
        return bytes(32)
    level = list(hashes)
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        level = [sha256d(level[i] + level[i + 1]) for i in range(0, len(level), 2)]
    return level[0]


def witness_commitment_script(txs: Sequence[Tx], reserved: bytes = bytes(32)) -> bytes:
    """BIP141 commitment output script for ``txs`` (non-coinbase ones; coinbase wtxid is 0)."""
    root = merkle_root([bytes(32)] + [tx.wtxid for tx in txs])
    return b"\x6a\x24" + WITNESS_COMMITMENT_HEADER + sha256d(root + reserved)


def make_coinbase(
    height: int,
    outputs: Sequence[TxOut],
    txs: Sequence[Tx] = (),
    *,
    extra_nonce: bytes = b"",
    force_witness_commitment: bool = False,
) -> Tx:
    """Build the coinbase for a block at ``height`` containing ``txs`` after it.

    ``outputs`` must already hold subsidy plus fees; the BIP141 commitment is
    appended when a transaction has a witness (or when forced).
    """
    script_sig = push_int(height) + b"\x00" + (push_data(extra_nonce) if extra_nonce else b"")
    outs = list(outputs)
    witnesses: tuple[tuple[bytes, ...], ...] = ()
    if force_witness_commitment or any(tx.has_witness for tx in txs):
        outs.append(TxOut(0, witness_commitment_script(txs)))
        witnesses = ((bytes(32),),)
    return Tx(
        version=2,
        inputs=(TxIn(NULL_TXID, NULL_INDEX, script_sig, 0xFFFFFFFF),),
        outputs=tuple(outs),
        locktime=0,
        witnesses=witnesses,
    )


def bits_to_target(bits: int) -> int:
    """Expand compact ``nBits`` to the 256-bit target."""
    exponent = bits >> 24
    mantissa = bits & 0x007FFFFF
    if exponent <= 3:
        return mantissa >> (8 * (3 - exponent))
    return mantissa << (8 * (exponent - 3))


def serialize_header(
    version: int, prev_hash: bytes, merkle: bytes, time: int, bits: int, nonce: int
) -> bytes:
    """The 80-byte block header."""
    return struct.pack("<i", version) + prev_hash + merkle + struct.pack("<III", time, bits, nonce)


def grind_header(
    prev_hash: bytes, merkle: bytes, time: int, *, bits: int = REGTEST_BITS,
    version: int = BLOCK_VERSION,
) -> bytes:
    """Find a nonce meeting ``bits`` (trivial on regtest) and return the header."""
    target = bits_to_target(bits)
    prefix = struct.pack("<i", version) + prev_hash + merkle + struct.pack("<II", time, bits)
    for nonce in range(1 << 32):
        header = prefix + struct.pack("<I", nonce)
        if int.from_bytes(sha256d(header), "little") <= target:
            return header
    raise RuntimeError("nonce space exhausted")  # pragma: no cover - impossible on regtest


@dataclass(frozen=True, slots=True)
class Block:
    """An assembled block: header bytes and transactions (coinbase first)."""

    header: bytes
    txs: tuple[Tx, ...]

    @property
    def hash(self) -> bytes:
        """Block hash, internal byte order."""
        return sha256d(self.header)

    @property
    def hash_hex(self) -> str:
        """Block hash as displayed by Bitcoin Core (big-endian hex)."""
        return self.hash[::-1].hex()

    @property
    def prev_hash(self) -> bytes:
        """Parent hash, internal byte order."""
        return self.header[4:36]

    @property
    def time(self) -> int:
        """Header timestamp."""
        return int(struct.unpack("<I", self.header[68:72])[0])

    def serialize(self) -> bytes:
        """Consensus serialization (witnesses included)."""
        return self.header + ser_compact_size(len(self.txs)) + b"".join(
            tx.serialize() for tx in self.txs
        )

    @classmethod
    def parse(cls, data: bytes) -> Block:
        """Parse a serialized block."""
        r = _Reader(data)
        header = r.read(80)
        txs = tuple(Tx._read(r) for _ in range(r.compact_size()))
        if r.pos != len(data):
            raise DecodeError("trailing data after block")
        return cls(header, txs)


def assemble_block(
    prev_hash: bytes,
    height: int,
    time: int,
    txs: Sequence[Tx],
    coinbase_outputs: Sequence[TxOut],
    *,
    bits: int = REGTEST_BITS,
    extra_nonce: bytes = b"",
) -> Block:
    """Assemble and grind a block on ``prev_hash`` at ``height``.

    ``coinbase_outputs`` must pay at most subsidy + fees (the kernel rejects
    ``bad-cb-amount`` otherwise). ``txs`` must be in a valid order (parents
    before children). ``extra_nonce`` distinguishes otherwise identical
    coinbases (e.g. two empty blocks at the same height on different forks).
    """
    coinbase = make_coinbase(height, coinbase_outputs, txs, extra_nonce=extra_nonce)
    all_txs = (coinbase, *txs)
    merkle = merkle_root([tx.txid for tx in all_txs])
    header = grind_header(prev_hash, merkle, time, bits=bits)
    return Block(header, all_txs)


def p2wpkh_script(pubkey_hash: bytes) -> bytes:
    """``OP_0 <20-byte key hash>`` (BIP141)."""
    return b"\x00\x14" + pubkey_hash


def p2wsh_script(witness_script: bytes) -> bytes:
    """``OP_0 <sha256(witness script)>`` (BIP141)."""
    return b"\x00\x20" + hashlib.sha256(witness_script).digest()


SIGHASH_ALL = 0x01


def bip143_sighash(
    tx: Tx, index: int, script_code: bytes, amount: int, hashtype: int = SIGHASH_ALL
) -> bytes:
    """BIP143 signature hash for witness v0 input ``index`` (SIGHASH_ALL, no ANYONECANPAY).

    ``script_code`` is the witness script for P2WSH, or
    ``OP_DUP OP_HASH160 <hash> OP_EQUALVERIFY OP_CHECKSIG`` for P2WPKH.
    """
    if hashtype != SIGHASH_ALL:
        raise ValueError("only SIGHASH_ALL is supported")
    txin = tx.inputs[index]
    hash_prevouts = sha256d(
        b"".join(i.prev_txid + struct.pack("<I", i.prev_index) for i in tx.inputs)
    )
    hash_sequence = sha256d(b"".join(struct.pack("<I", i.sequence) for i in tx.inputs))
    hash_outputs = sha256d(b"".join(o.serialize() for o in tx.outputs))
    preimage = (
        struct.pack("<i", tx.version)
        + hash_prevouts
        + hash_sequence
        + txin.prev_txid
        + struct.pack("<I", txin.prev_index)
        + ser_bytes(script_code)
        + struct.pack("<q", amount)
        + struct.pack("<I", txin.sequence)
        + hash_outputs
        + struct.pack("<I", tx.locktime)
        + struct.pack("<I", hashtype)
    )
    return sha256d(preimage)


def p2wpkh_script_code(pubkey_hash: bytes) -> bytes:
    """BIP143 scriptCode for a P2WPKH input."""
    return b"\x76\xa9\x14" + pubkey_hash + b"\x88\xac"
