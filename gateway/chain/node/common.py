"""What every part of the embedded node shares: RPC errors, constants, JSON shapes.

Error codes and messages are Bitcoin Core's (``rpc/protocol.h``); amounts are
converted the way ``AmountFromValue``/``ValueFromAmount`` do; transactions and
scripts are printed as ``TxToUniv``/``ScriptToUniv`` print them (without
``asm``). Addresses go through the project's one codec,
``gateway.protocol.scripts`` (BIP173/BIP350, Base58Check), on regtest.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

from bitcoin.core import CTransaction
from bitcoin.core.serialize import VarIntSerializer

from gateway.chain.blocks import COIN, bits_to_target
from gateway.chain.node.wallet import script_type
from gateway.protocol.scripts import address_to_script_pubkey, script_pubkey_to_address
from gateway.protocol.tx import TxSizes, decode_canonical, measure, witness_stack

NETWORK = "regtest"
COINBASE_MATURITY = 100
MAX_MONEY = 21_000_000 * COIN
MIN_RELAY_FEE_PER_KVB = 1000  # sat per 1000 vB (1 sat/vB), Bitcoin Core's -minrelaytxfee
#: ``sendrawtransaction``/``testmempoolaccept``'s default ``maxfeerate`` (BTC/kvB).
DEFAULT_MAX_FEE_RATE = Decimal("0.10")
#: Bitcoin Core's ``MAX_SIZE`` (serialize.h): libevent's cap on an RPC request body.
MAX_REQUEST_BYTES = 32 * 1024 * 1024

RPC_MISC_ERROR = -1
RPC_TYPE_ERROR = -3
RPC_INVALID_ADDRESS_OR_KEY = -5
RPC_WALLET_INSUFFICIENT_FUNDS = -6
RPC_INVALID_PARAMETER = -8
RPC_DATABASE_ERROR = -20
RPC_DESERIALIZATION_ERROR = -22
RPC_VERIFY_ERROR = -25
RPC_VERIFY_REJECTED = -26
RPC_VERIFY_ALREADY_IN_CHAIN = -27
RPC_METHOD_NOT_FOUND = -32601
RPC_INVALID_REQUEST = -32600
RPC_PARSE_ERROR = -32700


class NodeRpcError(Exception):
    """A JSON-RPC error answered to the caller: Bitcoin Core's code and message."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TxRejected(NodeRpcError):
    """Mempool rejection; ``reason`` is the bare reject reason (testmempoolaccept)."""

    def __init__(self, code: int, reason: str, detail: str = "") -> None:
        super().__init__(code, f"{reason}, {detail}" if detail else reason)
        self.reason = reason


Outpoint = tuple[bytes, int]

_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")


@dataclass(slots=True)
class Coin:
    """An unspent output."""

    value: int
    script: bytes
    height: int  # confirmation height; for mempool outputs the next block's height
    coinbase: bool

    def serialize(self) -> bytes:
        """Undo-record form: value, height, coinbase flag, script (like Core's ``TxInUndo``)."""
        return (
            struct.pack("<QIB", self.value, self.height, self.coinbase)
            + bytes(VarIntSerializer.serialize(len(self.script)))
            + self.script
        )


def btc(sats: int) -> float:
    """Satoshis as a BTC JSON number (repr round-trips to the exact 8-decimal value)."""
    return sats / COIN


def parse_amount(value: Any) -> int:
    """BTC amount (number or string) to satoshis, as Bitcoin Core's ``AmountFromValue``."""
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise NodeRpcError(RPC_TYPE_ERROR, "Amount is not a number or string")
    try:
        amount = Decimal(str(value))
    except InvalidOperation as exc:
        raise NodeRpcError(RPC_TYPE_ERROR, "Invalid amount") from exc
    if not amount.is_finite():
        raise NodeRpcError(RPC_TYPE_ERROR, "Invalid amount")
    sats = amount * COIN
    if sats != sats.to_integral_value():
        raise NodeRpcError(RPC_TYPE_ERROR, "Invalid amount")
    if sats < 0 or sats > MAX_MONEY:
        raise NodeRpcError(RPC_TYPE_ERROR, "Amount out of range")
    return int(sats)


def fee_rate_param(value: Any) -> Decimal:
    """A BTC/kvB fee rate parameter (``maxfeerate``)."""
    return Decimal(parse_amount(value)) / COIN


def expect_int(value: Any, name: str) -> int:
    """``value`` if it is a JSON integer, else RPC -3 like UniValue's ``getInt``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise NodeRpcError(RPC_TYPE_ERROR, f"{name} must be an integer")
    return value


def hex_to_hash(value: Any, name: str = "hash") -> bytes:
    """Display-order 64-hex hash to internal byte order (-8 like Core's ParseHashV)."""
    if not isinstance(value, str):
        raise NodeRpcError(RPC_TYPE_ERROR, f"{name} must be a string")
    # ParseHashV checks IsHex (even length, hex digits only) before the length.
    if not _HEX.fullmatch(value):
        raise NodeRpcError(
            RPC_INVALID_PARAMETER, f"{name} must be hexadecimal string (not '{value}')"
        )
    if len(value) != 64:
        raise NodeRpcError(
            RPC_INVALID_PARAMETER, f"{name} must be of length 64 (not {len(value)}, for '{value}')"
        )
    return bytes.fromhex(value)[::-1]


def decode_tx_hex(value: Any) -> CTransaction:
    """Hex to a transaction or RPC -22 ``TX decode failed`` (Core's DecodeHexTx)."""
    if not isinstance(value, str):
        raise NodeRpcError(RPC_TYPE_ERROR, "Expected type string")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    # Like Core's DecodeHexTx: extended (BIP144) format first, then legacy, so
    # that a zero-input template for fundrawtransaction decodes too.
    try:
        return decode_canonical(raw, legacy_fallback=True)
    except ValueError as exc:
        raise NodeRpcError(
            RPC_DESERIALIZATION_ERROR,
            "TX decode failed. Make sure the tx has at least one input.",
        ) from exc


@lru_cache(maxsize=65536)
def address_of(script: bytes) -> str | None:
    """The regtest address of ``script`` (cached: every decoded output asks for one)."""
    return script_pubkey_to_address(script, NETWORK)


@lru_cache(maxsize=4096)
def script_of(address: str) -> bytes:
    """The scriptPubKey a regtest address pays to; ``ValueError`` if it is not one."""
    return address_to_script_pubkey(address, NETWORK)


def output_script(address: Any) -> bytes:
    """``script_of`` for an RPC parameter: -5 for anything but a valid regtest address."""
    if not isinstance(address, str):
        raise NodeRpcError(RPC_TYPE_ERROR, "address must be a string")
    try:
        return script_of(address)
    except ValueError as exc:
        raise NodeRpcError(RPC_INVALID_ADDRESS_OR_KEY, "Error: Invalid address") from exc


def script_json(script: bytes) -> dict[str, Any]:
    """``scriptPubKey`` object as Bitcoin Core prints it (without ``asm``)."""
    out: dict[str, Any] = {"hex": script.hex(), "type": script_type(script)}
    address = address_of(script)
    if address is not None:
        out["address"] = address
    return out


def tx_json(tx: CTransaction, sizes: TxSizes | None = None) -> dict[str, Any]:
    """Bitcoin Core's decoded transaction object (``sizes``: ``measure(tx)`` if known)."""
    coinbase = tx.is_coinbase()
    vin: list[dict[str, Any]] = []
    for index, txin in enumerate(tx.vin):
        item: dict[str, Any]
        if coinbase:
            item = {"coinbase": txin.scriptSig.hex()}
        else:
            item = {
                "txid": txin.prevout.hash[::-1].hex(),
                "vout": txin.prevout.n,
                "scriptSig": {"asm": "", "hex": txin.scriptSig.hex()},
            }
        witness = witness_stack(tx, index)
        if witness:
            item["txinwitness"] = [w.hex() for w in witness]
        item["sequence"] = txin.nSequence
        vin.append(item)
    if sizes is None:
        sizes = measure(tx)
    return {
        "txid": sizes.txid[::-1].hex(),
        "hash": sizes.wtxid[::-1].hex(),
        "version": tx.nVersion,
        "size": sizes.size,
        "vsize": sizes.vsize,
        "weight": sizes.weight,
        "locktime": tx.nLockTime,
        "vin": vin,
        "vout": [
            {"value": btc(out.nValue), "n": n, "scriptPubKey": script_json(bytes(out.scriptPubKey))}
            for n, out in enumerate(tx.vout)
        ],
    }


def block_work(bits: int) -> int:
    """Work of one block, as Core's ``GetBlockProof``: 2**256 / (target + 1)."""
    target = bits_to_target(bits)
    return (1 << 256) // (target + 1) if target > 0 else 0


def difficulty(bits: int) -> float:
    """Core's ``GetDifficulty``: the target of difficulty 1 over this one."""
    return bits_to_target(0x1D00FFFF) / bits_to_target(bits)


def dumps(value: Any) -> bytes:
    """Compact JSON bytes (as bitcoind writes its replies)."""
    return json.dumps(value, separators=(",", ":")).encode()
