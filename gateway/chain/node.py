"""Embedded regtest node: Bitcoin Core's consensus, a Bitcoin Core-compatible JSON-RPC.

Theory of operation
-------------------
Consensus is libbitcoinkernel's (``kernel.py``): every block, whether mined
here or handed in through ``generateblock``, goes through
``ChainstateManager.process_block`` and becomes the tip only if the kernel
connects it. The node keeps beside the kernel what the kernel's C API does not
expose: a UTXO index (for mempool checks, ``gettxout`` and the wallet), a txid
index, the mempool and the wallet keys, in ``DIR/regtest/node.sqlite``
(stdlib sqlite3, WAL). The index is rebuilt from the kernel's blocks whenever
it disagrees with the kernel's tip, so a crash between the two never leaves
them inconsistent. The mempool is written at shutdown, as bitcoind's
``mempool.dat`` is, and re-validated on load.

Mempool acceptance checks, in Bitcoin Core's order and with its reject reasons
(validation.cpp ``PreChecks``/``PolicyScriptChecks``, policy.cpp):
decode (-22), context-free checks, standardness (version, size, output types,
dust, one OP_RETURN), finality for the next block (BIP113 median-time-past),
BIP68 sequence locks, inputs present and unspent in chain or mempool (-25;
-26 ``txn-mempool-conflict`` for a mempool double spend, no replacement),
coinbase maturity, value balance, min relay fee 1 sat/vB, relay policy on
signatures (strict DER, low S, compressed segwit keys, MINIMALIF) and finally
every input through ``pbk.ScriptPubkey.verify`` with all consensus flags.

Block times are ``max(MTP + 1, now)`` where ``now`` follows ``setmocktime``.
The kernel itself refuses headers more than 2 h ahead of the real clock, so
``setmocktime`` can move block times forward by at most that much.

Reorgs are not handled: the node only mines on its own tip.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hmac
import inspect
import json
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from gateway.chain.blocks import (
    COIN,
    Block,
    DecodeError,
    Tx,
    TxIn,
    TxOut,
    assemble_block,
    bits_to_target,
    block_subsidy,
)
from gateway.chain.kernel import Kernel, KernelError, ScriptVerifyError, prepare_transaction
from gateway.chain.kernel import verify_input as kernel_verify_input
from gateway.chain.wallet import (
    AddressError,
    Wallet,
    address_to_script,
    script_to_address,
    script_type,
)
from gateway.protocol.signatures import der_s_value, is_low_s_der

log = logging.getLogger(__name__)

COINBASE_MATURITY = 100
MAX_STANDARD_TX_WEIGHT = 400_000
#: BIP141 block weight limit, and what the header and coinbase need of it
#: (Bitcoin Core's block assembler reserves 4,000 WU the same way).
MAX_BLOCK_WEIGHT = 4_000_000
BLOCK_RESERVED_WEIGHT = 4_000
MIN_STANDARD_TX_NONWITNESS_SIZE = 65
MIN_RELAY_FEE_PER_KVB = 1000  # sat per 1000 vB (1 sat/vB), Bitcoin Core's default
DUST_RELAY_FEE_PER_KVB = 3000
DEFAULT_MAX_FEE_RATE = Decimal("0.10")  # BTC/kvB, sendrawtransaction's maxfeerate
MAX_OP_RETURN_RELAY = 83
MAX_SCRIPT_SIG_SIZE = 1650
MAX_MONEY = 21_000_000 * COIN
LOCKTIME_THRESHOLD = 500_000_000
SEQUENCE_FINAL = 0xFFFFFFFF
SEQUENCE_DISABLE_FLAG = 1 << 31
SEQUENCE_TYPE_FLAG = 1 << 22
SEQUENCE_MASK = 0xFFFF
DEFAULT_PREMINE = 120  # 20 mature coinbases (1,000 BTC) at first start
WALLET_FEE_RATE = 2  # sat/vB for the faucet wallet's own transactions
MAX_REQUEST_BYTES = 32 * 1024 * 1024


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


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


RPC_MISC_ERROR = -1
RPC_TYPE_ERROR = -3
RPC_INVALID_ADDRESS_OR_KEY = -5
RPC_WALLET_INSUFFICIENT_FUNDS = -6
RPC_INVALID_PARAMETER = -8
RPC_DESERIALIZATION_ERROR = -22
RPC_VERIFY_ERROR = -25
RPC_VERIFY_REJECTED = -26
RPC_VERIFY_ALREADY_IN_CHAIN = -27
RPC_METHOD_NOT_FOUND = -32601
RPC_INVALID_REQUEST = -32600
RPC_PARSE_ERROR = -32700


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def btc(sats: int) -> float:
    """Satoshis as a BTC JSON number (repr round-trips to the exact 8-decimal value)."""
    return sats / COIN


def parse_amount(value: Any) -> int:
    """BTC amount (number or string) to satoshis, as Bitcoin Core's ``AmountFromValue``."""
    try:
        amount = Decimal(str(value))
    except InvalidOperation as exc:
        raise NodeRpcError(RPC_TYPE_ERROR, "Amount is not a number or string") from exc
    sats = amount * COIN
    if sats != sats.to_integral_value():
        raise NodeRpcError(RPC_TYPE_ERROR, "Invalid amount")
    if sats < 0 or sats > MAX_MONEY:
        raise NodeRpcError(RPC_TYPE_ERROR, "Amount out of range")
    return int(sats)


def hex_to_hash(value: Any, name: str = "hash") -> bytes:
    """Display-order 64-hex hash to internal byte order (-8 like Core's ParseHashV)."""
    if not isinstance(value, str):
        raise NodeRpcError(RPC_TYPE_ERROR, f"{name} must be a string")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    if len(raw) != 32 or len(value) != 64:
        raise NodeRpcError(
            RPC_INVALID_PARAMETER, f"{name} must be of length 64 (not {len(value)}, for '{value}')"
        )
    return raw[::-1]


def decode_tx_hex(value: Any) -> Tx:
    """Hex to ``Tx`` or RPC -22 ``TX decode failed`` (Core's DecodeHexTx)."""
    if not isinstance(value, str):
        raise NodeRpcError(RPC_TYPE_ERROR, "Expected type string")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raw = b""
    # Like Core's DecodeHexTx: extended (BIP144) format first, then legacy, so
    # that a zero-input template for fundrawtransaction decodes too.
    try:
        return Tx.parse(raw)
    except DecodeError:
        pass
    try:
        return Tx.parse(raw, allow_witness=False)
    except DecodeError as exc:
        raise NodeRpcError(
            RPC_DESERIALIZATION_ERROR,
            "TX decode failed. Make sure the tx has at least one input.",
        ) from exc


def script_json(script: bytes) -> dict[str, Any]:
    """``scriptPubKey`` object as Bitcoin Core prints it (without ``asm``)."""
    out: dict[str, Any] = {"hex": script.hex(), "type": script_type(script)}
    address = script_to_address(script)
    if address is not None:
        out["address"] = address
    return out


def tx_json(tx: Tx) -> dict[str, Any]:
    """Bitcoin Core's decoded transaction object."""
    vin: list[dict[str, Any]] = []
    for index, txin in enumerate(tx.inputs):
        item: dict[str, Any]
        if tx.is_coinbase:
            item = {"coinbase": txin.script_sig.hex()}
        else:
            item = {
                "txid": txin.prev_txid[::-1].hex(),
                "vout": txin.prev_index,
                "scriptSig": {"asm": "", "hex": txin.script_sig.hex()},
            }
        if tx.witnesses and tx.witnesses[index]:
            item["txinwitness"] = [w.hex() for w in tx.witnesses[index]]
        item["sequence"] = txin.sequence
        vin.append(item)
    return {
        "txid": tx.txid[::-1].hex(),
        "hash": tx.wtxid[::-1].hex(),
        "version": tx.version,
        "size": len(tx.serialize()),
        "vsize": tx.vsize,
        "weight": tx.weight,
        "locktime": tx.locktime,
        "vin": vin,
        "vout": [
            {"value": btc(out.value), "n": n, "scriptPubKey": script_json(out.script_pubkey)}
            for n, out in enumerate(tx.outputs)
        ],
    }


def _script_opcodes(script: bytes) -> list[int] | None:
    """Opcodes of ``script`` (pushes reported as their push opcode), None if malformed."""
    ops: list[int] = []
    i = 0
    while i < len(script):
        op = script[i]
        i += 1
        if 0 < op < 0x4C:
            i += op
        elif op == 0x4C:
            if i + 1 > len(script):
                return None
            i += 1 + script[i]
        elif op == 0x4D:
            if i + 2 > len(script):
                return None
            i += 2 + int.from_bytes(script[i : i + 2], "little")
        elif op == 0x4E:
            if i + 4 > len(script):
                return None
            i += 4 + int.from_bytes(script[i : i + 4], "little")
        if i > len(script):
            return None
        ops.append(op)
    return ops


def _policy_flag_failure(detail: str) -> TxRejected:
    return TxRejected(RPC_VERIFY_REJECTED, f"non-mandatory-script-verify-flag ({detail})")


def _check_signature_policy(item: bytes) -> None:
    if not item:
        return  # an empty signature is a valid "no" for CHECKMULTISIG/IF branches
    # BIP66 strict DER and BIP146 LOW_S on the DER part (the last byte is the
    # sighash type): the same checks the channel core applies to increments.
    der = item[:-1]
    if der_s_value(der) is None:
        raise _policy_flag_failure("Non-canonical DER signature")
    if not is_low_s_der(der):
        raise _policy_flag_failure("Non-canonical signature: S value is unnecessarily high")
    if item[-1] not in (0x01, 0x02, 0x03, 0x81, 0x82, 0x83):
        raise _policy_flag_failure("Signature hash type missing or not understood")


def check_input_policy(script_pubkey: bytes, script_sig: bytes, witness: tuple[bytes, ...]) -> None:
    """Relay policy on one input (policy.cpp ``AreInputsStandard`` + STANDARD flags).

    Signatures must be strict DER with low S (BIP62/BIP66), segwit keys
    compressed, and an OP_IF argument in a P2WSH script minimal (MINIMALIF):
    that last one is a heuristic, since without an interpreter the node treats
    every 1-byte non-signature item of a script using OP_IF/OP_NOTIF as an
    OP_IF argument.
    """
    if len(script_sig) > MAX_SCRIPT_SIG_SIZE:
        raise TxRejected(RPC_VERIFY_REJECTED, "scriptsig-size")
    ops = _script_opcodes(script_sig)
    if ops is None or any(op > 0x60 for op in ops):
        raise TxRejected(RPC_VERIFY_REJECTED, "scriptsig-not-pushonly")
    kind = script_type(script_pubkey)
    if kind == "witness_v0_keyhash" and len(witness) == 2:
        _check_signature_policy(witness[0])
        if len(witness[1]) != 33 or witness[1][0] not in (2, 3):
            raise _policy_flag_failure("Using non-compressed keys in segwit")
    elif kind == "witness_v0_scripthash" and witness:
        wscript = witness[-1]
        wops = _script_opcodes(wscript) or []
        uses_if = 0x63 in wops or 0x64 in wops
        for item in witness[:-1]:
            if len(item) >= 9 and item[0] == 0x30:
                _check_signature_policy(item)
            elif uses_if and len(item) == 1 and item != b"\x01":
                raise _policy_flag_failure("OP_IF/NOTIF argument must be minimal")


def dust_threshold(script: bytes) -> int:
    """Bitcoin Core's ``GetDustThreshold`` at the default 3 sat/vB dust relay fee."""
    if script and script[0] == 0x6A:
        return 0
    size = 8 + len(script) + (1 if len(script) < 0xFD else 3)
    kind = script_type(script)
    if kind.startswith("witness") or kind == "anchor":
        size += 32 + 4 + 1 + (107 // 4) + 4
    else:
        size += 32 + 4 + 1 + 107 + 4
    return size * DUST_RELAY_FEE_PER_KVB // 1000


# --------------------------------------------------------------------------
# Chain state beside the kernel
# --------------------------------------------------------------------------


@dataclass(slots=True)
class Coin:
    """An unspent output."""

    value: int
    script: bytes
    height: int  # confirmation height; for mempool outputs the next block's height
    coinbase: bool


@dataclass(slots=True)
class MempoolEntry:
    """An accepted unconfirmed transaction."""

    tx: Tx
    fee: int
    time: int
    height: int
    parents: set[bytes] = field(default_factory=set)


Outpoint = tuple[bytes, int]


class EmbeddedNode:
    """A regtest node: kernel-validated chain, mempool, faucet wallet, JSON-RPC server.

    ``datadir`` gets a ``regtest/`` directory like bitcoind's. Use as::

        async with EmbeddedNode(tmp_path, rpc_port=0) as node:
            client = RpcClient(node.rpc_url, cookie_path=node.cookie_path)
    """

    def __init__(
        self,
        datadir: str | Path,
        *,
        rpc_bind: str = "127.0.0.1",
        rpc_port: int = 18443,
        block_interval: float = 0,
        premine: int = DEFAULT_PREMINE,
    ) -> None:
        self.datadir = Path(datadir)
        self.netdir = self.datadir / "regtest"
        self.cookie_path = self.netdir / ".cookie"
        self.rpc_bind = rpc_bind
        self.rpc_port = rpc_port
        self.block_interval = block_interval
        self.premine = premine
        #: Weight limit of the blocks this node assembles (BIP141; tests lower it).
        self.max_block_weight = MAX_BLOCK_WEIGHT
        self.kernel: Kernel | None = None
        self._db: sqlite3.Connection | None = None
        self.wallet: Wallet | None = None
        self.utxos: dict[Outpoint, Coin] = {}
        self.wallet_utxos: set[Outpoint] = set()
        self.txindex: dict[bytes, int] = {}
        self.mempool: dict[bytes, MempoolEntry] = {}
        self.mempool_spent: dict[Outpoint, bytes] = {}
        self.mocktime = 0
        self._lock = asyncio.Lock()
        self._server: asyncio.Server | None = None
        self._cookie = ""
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Future[None] | None = None
        self._miner: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._methods: dict[str, Callable[..., Awaitable[Any]]] = {
            name[4:]: getattr(self, name) for name in dir(self) if name.startswith("rpc_")
        }

    # -- lifecycle -----------------------------------------------------------

    @property
    def rpc_url(self) -> str:
        """``http://host:port`` of the RPC server (valid after ``start``)."""
        return f"http://{self.rpc_bind}:{self.rpc_port}"

    async def __aenter__(self) -> EmbeddedNode:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open the chain, catch the index up, premine at first start, serve RPC."""
        self.netdir.mkdir(parents=True, exist_ok=True)
        self.kernel = await asyncio.to_thread(Kernel, self.netdir)
        try:
            self._open_db()
            await self._sync_index()
            if self.kernel.tip_height == 0 and self.premine:
                await self._premine(self.premine)
            self._load_mempool()
            self._server = await asyncio.start_server(
                self._serve_connection, self.rpc_bind, self.rpc_port
            )
        except BaseException:
            self._close_storage()
            raise
        self.rpc_port = self._server.sockets[0].getsockname()[1]
        self._write_cookie()
        if self.block_interval > 0:
            self._miner = asyncio.create_task(self._mine_periodically())

    async def stop(self) -> None:
        """Stop serving, persist the mempool, flush and release the chainstate.

        Idempotent and safe to call from a signal handler, the ``stop`` RPC and
        the owner at the same time: all of them await the same shutdown.
        """
        self._stopped.set()
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._stopping)

    async def _shutdown(self) -> None:
        if self._miner is not None:
            self._miner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._miner
        if self._server is not None:
            self._server.close()
            current = asyncio.current_task()
            tasks = [t for t in self._connections if t is not current]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._server.wait_closed()
        async with self._lock:
            self._save_mempool()
            self._close_storage()
        with contextlib.suppress(FileNotFoundError):
            self.cookie_path.unlink()

    async def wait_stopped(self) -> None:
        """Wait until ``stop`` (the RPC or a signal) has been requested."""
        await self._stopped.wait()

    def _close_storage(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        if self.kernel is not None:
            self.kernel.close()

    def _write_cookie(self) -> None:
        # bitcoind: "__cookie__:<64 hex>", readable by the owner only.
        self._cookie = "__cookie__:" + os.urandom(32).hex()
        fd = os.open(self.cookie_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self._cookie)

    @property
    def db(self) -> sqlite3.Connection:
        """The node's SQLite connection."""
        if self._db is None:
            raise NodeRpcError(RPC_MISC_ERROR, "node is not running")
        return self._db

    @property
    def chain(self) -> Kernel:
        """The kernel (raises once stopped)."""
        if self.kernel is None:
            raise NodeRpcError(RPC_MISC_ERROR, "node is not running")
        return self.kernel

    def _open_db(self) -> None:
        # Default (deferred) isolation: `with db:` wraps each block or key in one
        # transaction, one fsync (autocommit would fsync every row).
        db = sqlite3.connect(self.netdir / "node.sqlite")
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(
            """
            CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
            CREATE TABLE IF NOT EXISTS utxos (
                txid BLOB, vout INTEGER, value INTEGER, script BLOB, height INTEGER,
                coinbase INTEGER, PRIMARY KEY (txid, vout)) WITHOUT ROWID;
            CREATE TABLE IF NOT EXISTS txindex (txid BLOB PRIMARY KEY, height INTEGER);
            CREATE TABLE IF NOT EXISTS mempool (seq INTEGER PRIMARY KEY, raw BLOB, time INTEGER);
            """
        )
        self._db = db
        self.wallet = Wallet(db)
        row = db.execute("SELECT value FROM meta WHERE key='mocktime'").fetchone()
        self.mocktime = int(row[0]) if row else 0

    def _meta(self, key: str) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    async def _sync_index(self) -> None:
        """Make the UTXO/tx index match the kernel's tip, replaying blocks if needed."""
        kernel = self.chain
        height = self._meta("height")
        tip_hash = self._meta("tip")
        consistent = (
            height is not None
            and height <= kernel.tip_height
            and kernel.hash_at(height) == tip_hash
        )
        if consistent:
            for txid, vout, value, script, h, cb in self.db.execute("SELECT * FROM utxos"):
                self._add_coin((bytes(txid), vout), Coin(value, bytes(script), h, bool(cb)))
            self.txindex = {bytes(t): h for t, h in self.db.execute("SELECT * FROM txindex")}
            start = height + 1
        else:
            with self.db:
                self.db.execute("DELETE FROM utxos")
                self.db.execute("DELETE FROM txindex")
            self.utxos.clear()
            self.wallet_utxos.clear()
            self.txindex.clear()
            start = 1
        for h in range(start, kernel.tip_height + 1):
            raw = await asyncio.to_thread(kernel.block_at, h)
            self._connect(Block.parse(raw), h)
        if start > kernel.tip_height and height is None:
            with self.db:
                self._set_tip_meta(kernel.tip_height)

    def _set_tip_meta(self, height: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO meta VALUES ('height', ?), ('tip', ?)",
            (height, self.chain.hash_at(height)),
        )

    def _add_coin(self, outpoint: Outpoint, coin: Coin) -> None:
        self.utxos[outpoint] = coin
        if self.wallet is not None and self.wallet.owns(coin.script):
            self.wallet_utxos.add(outpoint)

    def _connect(self, block: Block, height: int) -> None:
        """Apply a block the kernel connected at ``height`` to the index and mempool."""
        spent: list[Outpoint] = []
        created: list[tuple[bytes, int, int, bytes, int, int]] = []
        for tx in block.txs:
            txid = tx.txid
            if not tx.is_coinbase:
                for txin in tx.inputs:
                    outpoint = (txin.prev_txid, txin.prev_index)
                    self.utxos.pop(outpoint, None)
                    self.wallet_utxos.discard(outpoint)
                    spent.append(outpoint)
            for n, out in enumerate(tx.outputs):
                if out.script_pubkey[:1] == b"\x6a":
                    continue  # provably unspendable: never enters the UTXO set
                coin = Coin(out.value, out.script_pubkey, height, tx.is_coinbase)
                self._add_coin((txid, n), coin)
                created.append((txid, n, out.value, out.script_pubkey, height, int(tx.is_coinbase)))
            self.txindex[txid] = height
        with self.db:
            self.db.executemany("DELETE FROM utxos WHERE txid=? AND vout=?", spent)
            self.db.executemany("INSERT OR REPLACE INTO utxos VALUES (?,?,?,?,?,?)", created)
            self.db.executemany(
                "INSERT OR REPLACE INTO txindex VALUES (?, ?)",
                [(tx.txid, height) for tx in block.txs],
            )
            self._set_tip_meta(height)
        self._remove_for_block(block, spent)

    def _remove_for_block(self, block: Block, spent: list[Outpoint]) -> None:
        """Drop mined transactions and anything now conflicting with the chain."""
        for tx in block.txs:
            self.mempool.pop(tx.txid, None)
        conflicts = {
            self.mempool_spent[o] for o in spent if o in self.mempool_spent
        } - {tx.txid for tx in block.txs}
        for txid in conflicts:
            self._evict(txid)
        self.mempool_spent = {
            (txin.prev_txid, txin.prev_index): txid
            for txid, entry in self.mempool.items()
            for txin in entry.tx.inputs
        }
        for entry in self.mempool.values():
            entry.parents &= self.mempool.keys()

    def _evict(self, txid: bytes) -> None:
        entry = self.mempool.pop(txid, None)
        if entry is None:
            return
        for child, other in list(self.mempool.items()):
            if txid in other.parents:
                self._evict(child)

    # -- time ----------------------------------------------------------------

    def now(self) -> int:
        """Node clock: the mock time if set (``setmocktime``), else the system clock."""
        return self.mocktime or int(time.time())

    def _next_block_time(self) -> int:
        return max(self.chain.median_time_past() + 1, self.now())

    # -- mining --------------------------------------------------------------

    async def _premine(self, count: int) -> None:
        assert self.wallet is not None
        script = self.wallet.default_script()
        # Start in the past so the premine does not push block times ahead of
        # the clock (each block must exceed the median of the previous 11).
        start = int(time.time()) - count
        for i in range(count):
            await self._mine(script, [], block_time=start + i)

    async def _mine(
        self, script: bytes, txs: list[Tx], *, block_time: int | None = None
    ) -> Block:
        """Assemble a block on the tip paying ``script``, process it, index it.

        Raises ``NodeRpcError`` with the kernel's reason if it is not connected.
        """
        kernel = self.chain
        height = kernel.tip_height + 1
        fees = 0
        for tx in txs:
            entry = self.mempool.get(tx.txid)
            if entry is not None:
                fees += entry.fee
            else:
                fees += self._fee_of_unchecked(tx)
        when = max(kernel.median_time_past() + 1, block_time or self.now())
        block = assemble_block(
            kernel.tip_hash,
            height,
            when,
            txs,
            [TxOut(block_subsidy(height) + max(fees, 0), script)],
        )
        raw = block.serialize()
        if len(txs) > 20:
            accepted, reason = await asyncio.to_thread(kernel.process_block, raw)
        else:
            accepted, reason = kernel.process_block(raw)
        if not accepted:
            raise NodeRpcError(RPC_VERIFY_ERROR, f"TestBlockValidity failed: {reason}")
        self._connect(block, height)
        return block

    def _fee_of_unchecked(self, tx: Tx) -> int:
        """Fee of a transaction not from the mempool (0 when inputs are unknown).

        The kernel rejects the block if the inputs are missing, so a wrong
        guess here only turns into ``bad-cb-amount`` for an already bad block.
        """
        total = 0
        for txin in tx.inputs:
            coin = self.utxos.get((txin.prev_txid, txin.prev_index))
            if coin is None:
                return 0
            total += coin.value
        return total - sum(o.value for o in tx.outputs)

    def _mempool_block_txs(self) -> list[Tx]:
        """Mempool transactions for the next block, within ``max_block_weight``.

        Insertion order is a valid topological order (parents are accepted
        first), so a transaction is left for a later block when it does not
        fit or when it spends one that was left: a block is never invalid
        (``bad-blk-weight``) and never misses a parent.
        """
        budget = self.max_block_weight - BLOCK_RESERVED_WEIGHT
        chosen: list[Tx] = []
        left: set[bytes] = set()
        for entry in self.mempool.values():
            tx = entry.tx
            weight = tx.weight
            if weight > budget or entry.parents & left:
                left.add(tx.txid)
                continue
            chosen.append(tx)
            budget -= weight
        return chosen

    async def _mine_periodically(self) -> None:
        assert self.wallet is not None
        while True:
            await asyncio.sleep(self.block_interval)
            if not self.mempool:
                continue
            async with self._lock:
                try:
                    await self._mine(self.wallet.default_script(), self._mempool_block_txs())
                except NodeRpcError as exc:
                    log.error("scheduled block rejected: %s", exc.message)

    # -- mempool acceptance --------------------------------------------------

    def _lookup_coin(self, outpoint: Outpoint) -> Coin | None:
        coin = self.utxos.get(outpoint)
        if coin is not None:
            return coin
        entry = self.mempool.get(outpoint[0])
        if entry is not None and outpoint[1] < len(entry.tx.outputs):
            out = entry.tx.outputs[outpoint[1]]
            return Coin(out.value, out.script_pubkey, self.chain.tip_height + 1, False)
        return None

    def check_transaction(self, tx: Tx, max_fee_rate: Decimal | None) -> MempoolEntry:
        """Run every mempool check on ``tx``; return the entry it would get.

        Raises ``TxRejected`` with Bitcoin Core's code and reason.
        """
        kernel = self.chain
        txid = tx.txid
        # CheckTransaction (consensus, context-free)
        if not tx.inputs:
            raise TxRejected(RPC_VERIFY_REJECTED, "bad-txns-vin-empty")
        if not tx.outputs:
            raise TxRejected(RPC_VERIFY_REJECTED, "bad-txns-vout-empty")
        if tx.is_coinbase:
            raise TxRejected(RPC_VERIFY_REJECTED, "coinbase")
        total_out = 0
        for out in tx.outputs:
            if out.value < 0:
                raise TxRejected(RPC_VERIFY_REJECTED, "bad-txns-vout-negative")
            if out.value > MAX_MONEY:
                raise TxRejected(RPC_VERIFY_REJECTED, "bad-txns-vout-toolarge")
            total_out += out.value
            if total_out > MAX_MONEY:
                raise TxRejected(RPC_VERIFY_REJECTED, "bad-txns-txouttotal-toolarge")
        outpoints = [(i.prev_txid, i.prev_index) for i in tx.inputs]
        if len(set(outpoints)) != len(outpoints):
            raise TxRejected(RPC_VERIFY_REJECTED, "bad-txns-inputs-duplicate")
        # IsStandardTx (policy)
        if not 1 <= tx.version <= 3:
            raise TxRejected(RPC_VERIFY_REJECTED, "version")
        if tx.weight > MAX_STANDARD_TX_WEIGHT:
            raise TxRejected(RPC_VERIFY_REJECTED, "tx-size")
        if len(tx.serialize(with_witness=False)) < MIN_STANDARD_TX_NONWITNESS_SIZE:
            raise TxRejected(RPC_VERIFY_REJECTED, "tx-size-small")
        data_outputs = 0
        for out in tx.outputs:
            kind = script_type(out.script_pubkey)
            if kind == "nulldata":
                data_outputs += 1
                if len(out.script_pubkey) > MAX_OP_RETURN_RELAY:
                    raise TxRejected(RPC_VERIFY_REJECTED, "scriptpubkey")
            elif kind in ("nonstandard", "witness_unknown", "multisig", "pubkey"):
                raise TxRejected(RPC_VERIFY_REJECTED, "scriptpubkey")
            elif out.value < dust_threshold(out.script_pubkey):
                raise TxRejected(RPC_VERIFY_REJECTED, "dust")
        if data_outputs > 1:
            raise TxRejected(RPC_VERIFY_REJECTED, "multi-op-return")
        # IsFinalTx for the next block, with BIP113 median-time-past.
        next_height = kernel.tip_height + 1
        mtp = kernel.median_time_past()
        if tx.locktime != 0:
            limit = next_height if tx.locktime < LOCKTIME_THRESHOLD else mtp
            if tx.locktime >= limit and any(i.sequence != SEQUENCE_FINAL for i in tx.inputs):
                raise TxRejected(RPC_VERIFY_REJECTED, "non-final")
        # Already known?
        if txid in self.mempool:
            raise TxRejected(RPC_VERIFY_ALREADY_IN_CHAIN, "txn-already-in-mempool")
        # Inputs: in the chain or in the mempool, and not spent by the mempool.
        spent: list[Coin] = []
        parents: set[bytes] = set()
        for outpoint in outpoints:
            conflict = self.mempool_spent.get(outpoint)
            if conflict is not None:
                raise TxRejected(RPC_VERIFY_REJECTED, "txn-mempool-conflict")
            coin = self._lookup_coin(outpoint)
            if coin is None:
                if any((txid, n) in self.utxos for n in range(len(tx.outputs))):
                    raise TxRejected(RPC_VERIFY_ALREADY_IN_CHAIN, "txn-already-known")
                raise TxRejected(RPC_VERIFY_ERROR, "bad-txns-inputs-missingorspent")
            if outpoint[0] in self.mempool:
                parents.add(outpoint[0])
            if coin.coinbase and next_height - coin.height < COINBASE_MATURITY:
                raise TxRejected(
                    RPC_VERIFY_REJECTED,
                    "bad-txns-premature-spend-of-coinbase",
                    f"tried to spend coinbase at depth {next_height - coin.height}",
                )
            spent.append(coin)
        # BIP68 relative lock-times (CheckSequenceLocksAtTip).
        if tx.version >= 2:
            self._check_sequence_locks(tx, spent, next_height, mtp)
        total_in = sum(c.value for c in spent)
        if total_in < total_out:
            raise TxRejected(
                RPC_VERIFY_REJECTED,
                "bad-txns-in-belowout",
                f"value in ({btc(total_in):.8f}) < value out ({btc(total_out):.8f})",
            )
        fee = total_in - total_out
        vsize = tx.vsize
        min_fee = vsize * MIN_RELAY_FEE_PER_KVB // 1000
        if fee < min_fee:
            raise TxRejected(RPC_VERIFY_REJECTED, "min relay fee not met", f"{fee} < {min_fee}")
        if max_fee_rate is not None and max_fee_rate > 0:
            max_fee = int(max_fee_rate * COIN) * vsize // 1000
            if fee > max_fee:
                raise TxRejected(RPC_VERIFY_ERROR, "max-fee-exceeded")
        # Relay policy on signatures, then consensus scripts through the kernel.
        witnesses = tx.witnesses or tuple(() for _ in tx.inputs)
        for txin, coin, witness in zip(tx.inputs, spent, witnesses, strict=True):
            check_input_policy(coin.script, txin.script_sig, witness)
        spent_outputs = [(c.script, c.value) for c in spent]
        try:
            ktx, txdata, _ = prepare_transaction(tx.serialize(), spent_outputs)
            for index in range(len(spent_outputs)):
                kernel_verify_input(ktx, index, spent_outputs, txdata=txdata)
        except ScriptVerifyError as exc:
            raise TxRejected(RPC_VERIFY_REJECTED, exc.reason) from exc
        except ValueError as exc:
            raise TxRejected(RPC_DESERIALIZATION_ERROR, "TX decode failed", str(exc)) from exc
        return MempoolEntry(tx, fee, self.now(), kernel.tip_height, parents)

    def _check_sequence_locks(
        self, tx: Tx, spent: list[Coin], next_height: int, mtp: int
    ) -> None:
        kernel = self.chain
        min_height = -1
        min_time = -1
        for txin, coin in zip(tx.inputs, spent, strict=True):
            if txin.sequence & SEQUENCE_DISABLE_FLAG:
                continue
            value = txin.sequence & SEQUENCE_MASK
            if txin.sequence & SEQUENCE_TYPE_FLAG:
                base = kernel.median_time_past(max(0, min(coin.height, next_height) - 1))
                min_time = max(min_time, base + (value << 9) - 1)
            else:
                min_height = max(min_height, coin.height + value - 1)
        if min_height >= next_height or min_time >= mtp:
            raise TxRejected(RPC_VERIFY_REJECTED, "non-BIP68-final")

    def _add_to_mempool(self, entry: MempoolEntry) -> None:
        txid = entry.tx.txid
        self.mempool[txid] = entry
        for txin in entry.tx.inputs:
            self.mempool_spent[(txin.prev_txid, txin.prev_index)] = txid

    async def accept(self, tx: Tx, max_fee_rate: Decimal | None = None) -> bytes:
        """Validate and add ``tx`` to the mempool; return its txid."""
        async with self._lock:
            entry = self.check_transaction(tx, max_fee_rate)
            self._add_to_mempool(entry)
            return tx.txid

    def _save_mempool(self) -> None:
        if self._db is None:
            return
        with self._db:
            self._db.execute("DELETE FROM mempool")
            self._db.executemany(
                "INSERT INTO mempool (raw, time) VALUES (?, ?)",
                [(e.tx.serialize(), e.time) for e in self.mempool.values()],
            )

    def _load_mempool(self) -> None:
        rows = self.db.execute("SELECT raw, time FROM mempool ORDER BY seq").fetchall()
        for raw, when in rows:
            try:
                entry = self.check_transaction(Tx.parse(bytes(raw)), None)
            except (NodeRpcError, DecodeError) as exc:
                log.info("dropping saved mempool transaction: %s", exc)
                continue
            entry.time = when
            self._add_to_mempool(entry)

    # -- wallet helpers --------------------------------------------------------

    def _wallet(self) -> Wallet:
        if self.wallet is None:
            raise NodeRpcError(RPC_MISC_ERROR, "node is not running")
        return self.wallet

    def _spendable_wallet_coins(self) -> list[tuple[Outpoint, Coin]]:
        """Mature wallet coins not spent by the mempool, plus unconfirmed wallet change."""
        wallet = self._wallet()
        next_height = self.chain.tip_height + 1
        coins = [
            (o, self.utxos[o])
            for o in self.wallet_utxos
            if o not in self.mempool_spent
            and not (
                self.utxos[o].coinbase and next_height - self.utxos[o].height < COINBASE_MATURITY
            )
        ]
        for txid, entry in self.mempool.items():
            # Only outputs of transactions the wallet itself funded are trusted.
            if not all(
                (i.prev_txid, i.prev_index) in self.wallet_utxos or i.prev_txid in self.mempool
                for i in entry.tx.inputs
            ):
                continue
            for n, out in enumerate(entry.tx.outputs):
                if wallet.owns(out.script_pubkey) and (txid, n) not in self.mempool_spent:
                    coin = Coin(out.value, out.script_pubkey, next_height, False)
                    coins.append(((txid, n), coin))
        return coins

    def _fund(
        self, tx: Tx, fee_rate: int, change_position: int | None = None
    ) -> tuple[Tx, int, int]:
        """Add wallet inputs and a change output to cover outputs + fee at ``fee_rate`` sat/vB."""
        wallet = self._wallet()
        preset: list[Coin] = []
        for txin in tx.inputs:
            coin = self._lookup_coin((txin.prev_txid, txin.prev_index))
            if coin is None:
                raise NodeRpcError(RPC_INVALID_ADDRESS_OR_KEY, "Unable to find UTXO for input")
            preset.append(coin)
        target = sum(o.value for o in tx.outputs)
        have = sum(c.value for c in preset)
        used = {(i.prev_txid, i.prev_index) for i in tx.inputs}
        candidates = sorted(
            (c for c in self._spendable_wallet_coins() if c[0] not in used),
            key=lambda item: -item[1].value,
        )
        inputs = list(tx.inputs)
        change_script = wallet.default_script()
        out_vbytes = sum(9 + len(o.script_pubkey) for o in tx.outputs)
        while True:
            # P2WPKH input <= 68 vB with a 72-byte signature; change output 31 vB.
            vsize = 11 + 68 * len(inputs) + out_vbytes + 31
            fee = vsize * fee_rate
            if have >= target + fee:
                break
            if not candidates:
                raise NodeRpcError(RPC_WALLET_INSUFFICIENT_FUNDS, "Insufficient funds")
            outpoint, coin = candidates.pop(0)
            inputs.append(TxIn(outpoint[0], outpoint[1], b"", 0xFFFFFFFD))
            have += coin.value
        outputs = list(tx.outputs)
        change = have - target - fee
        position = -1
        if change >= dust_threshold(change_script):
            position = len(outputs) if change_position is None else change_position
            if not 0 <= position <= len(outputs):
                raise NodeRpcError(RPC_INVALID_PARAMETER, "changePosition out of bounds")
            outputs.insert(position, TxOut(change, change_script))
        else:
            fee += change
        funded = Tx(tx.version, tuple(inputs), tuple(outputs), tx.locktime, ())
        return funded, fee, position

    def _sign(self, tx: Tx) -> tuple[Tx, list[int]]:
        spent: list[tuple[bytes, int] | None] = []
        for txin in tx.inputs:
            coin = self._lookup_coin((txin.prev_txid, txin.prev_index))
            spent.append(None if coin is None else (coin.script, coin.value))
        return self._wallet().sign(tx, spent)

    # -- RPC: blockchain -------------------------------------------------------

    def _block_by_hash(self, value: Any) -> tuple[int, bytes]:
        block_hash = hex_to_hash(value, "blockhash")
        height = self.chain.height_of(block_hash)
        if height is None:
            raise NodeRpcError(RPC_INVALID_ADDRESS_OR_KEY, "Block not found")
        return height, block_hash

    def _header_json(self, height: int) -> dict[str, Any]:
        kernel = self.chain
        header = kernel.header_at(height)
        version = int.from_bytes(header[:4], "little", signed=True)
        bits = int.from_bytes(header[72:76], "little")
        out: dict[str, Any] = {
            "hash": kernel.hash_at(height)[::-1].hex(),
            "confirmations": kernel.tip_height - height + 1,
            "height": height,
            "version": version,
            "versionHex": f"{version & 0xFFFFFFFF:08x}",
            "merkleroot": header[36:68][::-1].hex(),
            "time": int.from_bytes(header[68:72], "little"),
            "mediantime": kernel.median_time_past(height),
            "nonce": int.from_bytes(header[76:80], "little"),
            "bits": f"{bits:08x}",
            "difficulty": _difficulty(bits),
            "nTx": None,
        }
        if height > 0:
            out["previousblockhash"] = header[4:36][::-1].hex()
        if height < kernel.tip_height:
            out["nextblockhash"] = kernel.hash_at(height + 1)[::-1].hex()
        return out

    async def rpc_getblockchaininfo(self) -> dict[str, Any]:
        """Bitcoin Core ``getblockchaininfo`` (regtest subset)."""
        kernel = self.chain
        tip = kernel.tip_height
        return {
            "chain": "regtest",
            "blocks": tip,
            "headers": tip,
            "bestblockhash": kernel.tip_hash[::-1].hex(),
            "difficulty": _difficulty(0x207FFFFF),
            "time": kernel.block_time_at(tip),
            "mediantime": kernel.median_time_past(),
            "verificationprogress": 1,
            "initialblockdownload": False,
            "pruned": False,
            "warnings": [],
        }

    async def rpc_getblockcount(self) -> int:
        """Height of the tip."""
        return self.chain.tip_height

    async def rpc_getbestblockhash(self) -> str:
        """Tip hash (display order)."""
        return self.chain.tip_hash[::-1].hex()

    async def rpc_getblockhash(self, height: int) -> str:
        """Active-chain block hash at ``height``."""
        _expect_int(height, "height")
        if not 0 <= height <= self.chain.tip_height:
            raise NodeRpcError(RPC_INVALID_PARAMETER, "Block height out of range")
        return self.chain.hash_at(height)[::-1].hex()

    async def rpc_getblockheader(self, blockhash: str, verbose: bool = True) -> Any:
        """Header as hex (verbose=false) or object."""
        height, _ = self._block_by_hash(blockhash)
        if not verbose:
            return self.chain.header_at(height).hex()
        out = self._header_json(height)
        out["nTx"] = len(Block.parse(self.chain.block_at(height)).txs)
        return out

    async def rpc_getblock(self, blockhash: str, verbosity: Any = 1) -> Any:
        """Block as hex (0), with txids (1) or with decoded transactions (2)."""
        if isinstance(verbosity, bool):
            verbosity = int(verbosity)
        _expect_int(verbosity, "verbosity")
        height, _ = self._block_by_hash(blockhash)
        raw = await asyncio.to_thread(self.chain.block_at, height)
        if verbosity <= 0:
            return raw.hex()
        block = Block.parse(raw)
        out = self._header_json(height)
        out["nTx"] = len(block.txs)
        out["strippedsize"] = 80 + sum(len(t.serialize(with_witness=False)) for t in block.txs)
        out["size"] = len(raw)
        out["weight"] = sum(t.weight for t in block.txs) + 80 * 4
        if verbosity == 1:
            out["tx"] = [t.txid[::-1].hex() for t in block.txs]
        else:
            txs = []
            for t in block.txs:
                item = tx_json(t)
                item["hex"] = t.serialize().hex()
                txs.append(item)
            out["tx"] = txs
        return out

    async def rpc_getrawtransaction(
        self, txid: str, verbose: Any = False, blockhash: str | None = None
    ) -> Any:
        """A mempool or chain transaction, as hex or decoded (with block fields)."""
        key = hex_to_hash(txid, "txid")
        verbosity = int(verbose) if isinstance(verbose, bool | int) else 0
        tx: Tx | None = None
        height: int | None = None
        entry = self.mempool.get(key)
        if blockhash is not None:
            height, _ = self._block_by_hash(blockhash)
            if self.txindex.get(key) != height:
                raise NodeRpcError(
                    RPC_INVALID_ADDRESS_OR_KEY, "No such transaction found in the provided block."
                )
        elif entry is not None:
            tx = entry.tx
        else:
            height = self.txindex.get(key)
        if tx is None and height is not None:
            block = Block.parse(await asyncio.to_thread(self.chain.block_at, height))
            tx = next((t for t in block.txs if t.txid == key), None)
        if tx is None:
            raise NodeRpcError(
                RPC_INVALID_ADDRESS_OR_KEY,
                "No such mempool or blockchain transaction. Use gettransaction for wallet "
                "transactions.",
            )
        if not verbosity:
            return tx.serialize().hex()
        out = tx_json(tx)
        out["hex"] = tx.serialize().hex()
        if height is not None:
            out["blockhash"] = self.chain.hash_at(height)[::-1].hex()
            out["confirmations"] = self.chain.tip_height - height + 1
            out["time"] = out["blocktime"] = self.chain.block_time_at(height)
        return out

    async def rpc_decoderawtransaction(self, hexstring: str) -> dict[str, Any]:
        """Decode a raw transaction."""
        return tx_json(decode_tx_hex(hexstring))

    async def rpc_gettxout(self, txid: str, n: int, include_mempool: bool = True) -> Any:
        """An unspent output, or null when spent or unknown."""
        key = hex_to_hash(txid, "txid")
        _expect_int(n, "n")
        outpoint = (key, n)
        tip = self.chain.tip_height
        if include_mempool and outpoint in self.mempool_spent:
            return None
        coin = self.utxos.get(outpoint)
        confirmations = 0
        if coin is not None:
            confirmations = tip - coin.height + 1
        elif include_mempool:
            coin = self._lookup_coin(outpoint)
        if coin is None:
            return None
        return {
            "bestblock": self.chain.tip_hash[::-1].hex(),
            "confirmations": confirmations,
            "value": btc(coin.value),
            "scriptPubKey": script_json(coin.script),
            "coinbase": coin.coinbase,
        }

    # -- RPC: mempool ----------------------------------------------------------

    async def rpc_sendrawtransaction(self, hexstring: str, maxfeerate: Any = None) -> str:
        """Validate and relay (here: add to the mempool); return the txid."""
        tx = decode_tx_hex(hexstring)
        rate = DEFAULT_MAX_FEE_RATE if maxfeerate is None else _fee_rate_param(maxfeerate)
        if tx.txid in self.mempool:
            return tx.txid[::-1].hex()  # Core: already in mempool is success
        try:
            await self.accept(tx, rate)
        except TxRejected as exc:
            if exc.reason == "max-fee-exceeded":
                raise NodeRpcError(
                    RPC_VERIFY_ERROR,
                    "Fee exceeds maximum configured by user (e.g. -maxtxfee, maxfeerate)",
                ) from exc
            if exc.reason == "txn-already-known":
                raise NodeRpcError(
                    RPC_VERIFY_ALREADY_IN_CHAIN, "Transaction outputs already in utxo set"
                ) from exc
            raise
        return tx.txid[::-1].hex()

    async def rpc_testmempoolaccept(
        self, rawtxs: list[str], maxfeerate: Any = None
    ) -> list[dict[str, Any]]:
        """Would each transaction be accepted? Nothing is added to the mempool."""
        if not isinstance(rawtxs, list) or not rawtxs:
            raise NodeRpcError(
                RPC_INVALID_PARAMETER, "Array must contain at least one transaction."
            )
        rate = DEFAULT_MAX_FEE_RATE if maxfeerate is None else _fee_rate_param(maxfeerate)
        txs = [decode_tx_hex(raw) for raw in rawtxs]
        results = []
        async with self._lock:
            for tx in txs:
                item: dict[str, Any] = {"txid": tx.txid[::-1].hex(), "wtxid": tx.wtxid[::-1].hex()}
                try:
                    entry = self.check_transaction(tx, rate)
                except TxRejected as exc:
                    item["allowed"] = False
                    item["reject-reason"] = exc.reason
                else:
                    item["allowed"] = True
                    item["vsize"] = tx.vsize
                    item["fees"] = {"base": btc(entry.fee)}
                results.append(item)
        return results

    def _entry_json(self, txid: bytes, entry: MempoolEntry) -> dict[str, Any]:
        children = sorted(
            {c for o, c in self.mempool_spent.items() if o[0] == txid}
        )
        return {
            "vsize": entry.tx.vsize,
            "weight": entry.tx.weight,
            "time": entry.time,
            "height": entry.height,
            "descendantcount": 1 + len(children),
            "ancestorcount": 1 + len(entry.parents),
            "wtxid": entry.tx.wtxid[::-1].hex(),
            "fees": {
                "base": btc(entry.fee),
                "modified": btc(entry.fee),
                "ancestor": btc(entry.fee),
                "descendant": btc(entry.fee),
            },
            "depends": [p[::-1].hex() for p in sorted(entry.parents)],
            "spentby": [c[::-1].hex() for c in children],
            "bip125-replaceable": False,
            "unbroadcast": False,
        }

    async def rpc_getrawmempool(self, verbose: bool = False) -> Any:
        """Mempool txids, or txid -> entry objects when verbose."""
        if verbose:
            return {t[::-1].hex(): self._entry_json(t, e) for t, e in self.mempool.items()}
        return [t[::-1].hex() for t in self.mempool]

    async def rpc_getmempoolentry(self, txid: str) -> dict[str, Any]:
        """One mempool entry."""
        key = hex_to_hash(txid, "txid")
        entry = self.mempool.get(key)
        if entry is None:
            raise NodeRpcError(RPC_INVALID_ADDRESS_OR_KEY, "Transaction not in mempool")
        return self._entry_json(key, entry)

    async def rpc_estimatesmartfee(
        self, conf_target: int, estimate_mode: str = "economical"
    ) -> Any:
        """Fee rate in BTC/kvB: the mempool's median rate, at least the min relay fee."""
        _expect_int(conf_target, "conf_target")
        if not 1 <= conf_target <= 1008:
            raise NodeRpcError(
                RPC_INVALID_PARAMETER, "Invalid conf_target, must be between 1 and 1008"
            )
        rates = sorted(e.fee * 1000 // e.tx.vsize for e in self.mempool.values())
        rate = max(MIN_RELAY_FEE_PER_KVB, rates[len(rates) // 2] if rates else 0)
        return {"feerate": btc(rate), "blocks": max(conf_target, 2)}

    # -- RPC: mining and control -----------------------------------------------

    def _output_script(self, address: Any) -> bytes:
        if not isinstance(address, str):
            raise NodeRpcError(RPC_TYPE_ERROR, "address must be a string")
        try:
            return address_to_script(address)
        except AddressError as exc:
            raise NodeRpcError(RPC_INVALID_ADDRESS_OR_KEY, "Error: Invalid address") from exc

    async def rpc_generatetoaddress(
        self, nblocks: int, address: str, maxtries: int = 1_000_000
    ) -> list[str]:
        """Mine ``nblocks`` blocks (with the mempool) paying ``address``."""
        _expect_int(nblocks, "nblocks")
        script = self._output_script(address)
        hashes = []
        async with self._lock:
            for _ in range(nblocks):
                block = await self._mine(script, self._mempool_block_txs())
                hashes.append(block.hash_hex)
        return hashes

    async def rpc_generateblock(
        self, output: str, transactions: list[str], submit: bool = True
    ) -> dict[str, str]:
        """Mine a block with exactly ``transactions`` (mempool txids or raw hex).

        The block goes through the kernel like any other: if it is invalid the
        tip does not move and the error carries the kernel's reason.
        """
        script = self._output_script(output)
        if not isinstance(transactions, list):
            raise NodeRpcError(RPC_TYPE_ERROR, "transactions must be an array")
        txs: list[Tx] = []
        for item in transactions:
            if isinstance(item, str) and len(item) == 64:
                key = hex_to_hash(item, "txid")
                entry = self.mempool.get(key)
                if entry is None:
                    raise NodeRpcError(
                        RPC_INVALID_ADDRESS_OR_KEY, f"Transaction {item} not in mempool."
                    )
                txs.append(entry.tx)
            else:
                try:
                    txs.append(decode_tx_hex(item))
                except NodeRpcError as exc:
                    raise NodeRpcError(
                        RPC_DESERIALIZATION_ERROR, f"Transaction decode failed for {item}. "
                        "Make sure the tx has at least one input."
                    ) from exc
        async with self._lock:
            if not submit:
                kernel = self.chain
                height = kernel.tip_height + 1
                fees = sum(self._fee_of_unchecked(t) for t in txs)
                block = assemble_block(
                    kernel.tip_hash, height, self._next_block_time(), txs,
                    [TxOut(block_subsidy(height) + fees, script)],
                )
                return {"hash": block.hash_hex, "hex": block.serialize().hex()}
            block = await self._mine(script, txs)
        return {"hash": block.hash_hex}

    async def rpc_submitblock(self, hexdata: str, dummy: Any = None) -> str | None:
        """Process a serialized block; null when it became the tip, else the reason."""
        try:
            raw = bytes.fromhex(hexdata)
            block = Block.parse(raw)
        except (ValueError, DecodeError) as exc:
            raise NodeRpcError(RPC_DESERIALIZATION_ERROR, "Block decode failed") from exc
        async with self._lock:
            kernel = self.chain
            if kernel.height_of(block.hash) is not None:
                return "duplicate"
            if block.prev_hash != kernel.tip_hash:
                return "inconclusive"
            accepted, reason = await asyncio.to_thread(kernel.process_block, raw)
            if not accepted:
                return (reason or "rejected").split(",")[0]
            self._connect(block, kernel.tip_height)
        return None

    async def rpc_setmocktime(self, timestamp: int) -> None:
        """Set the node clock (0 = system clock); block times follow it."""
        _expect_int(timestamp, "timestamp")
        if timestamp < 0:
            raise NodeRpcError(RPC_INVALID_PARAMETER, f"Mocktime cannot be negative: {timestamp}.")
        self.mocktime = timestamp
        with self.db:
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('mocktime', ?)", (timestamp,))

    async def rpc_stop(self) -> str:
        """Shut the node down after answering."""
        # Answer first: the shutdown task starts on a later loop iteration.
        asyncio.get_running_loop().call_later(0.01, lambda: asyncio.ensure_future(self.stop()))
        return "Bitcoin Core stopping"

    # -- RPC: wallet -----------------------------------------------------------

    async def rpc_getnewaddress(self, label: str = "", address_type: str = "bech32") -> str:
        """A new P2WPKH address of the faucet wallet."""
        if address_type != "bech32":
            raise NodeRpcError(RPC_INVALID_ADDRESS_OR_KEY, f"Unknown address type '{address_type}'")
        script = self._wallet().new_script()
        address = script_to_address(script)
        assert address is not None
        return address

    async def rpc_getrawchangeaddress(self, address_type: str = "bech32") -> str:
        """A new address for change."""
        return await self.rpc_getnewaddress("", address_type)

    async def rpc_getbalance(
        self, dummy: str = "*", minconf: int = 0, include_watchonly: bool = False,
        avoid_reuse: bool = True,
    ) -> float:
        """Spendable balance: mature confirmed coins plus the wallet's own unconfirmed change."""
        coins = self._spendable_wallet_coins()
        if minconf > 0:
            tip = self.chain.tip_height
            coins = [c for c in coins if c[0] in self.utxos and tip - c[1].height + 1 >= minconf]
        return btc(sum(c.value for _, c in coins))

    async def rpc_listunspent(
        self, minconf: int = 1, maxconf: int = 9_999_999, addresses: list[str] | None = None,
        include_unsafe: bool = True, query_options: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Wallet coins (mature coinbases only), like Bitcoin Core's."""
        wanted = {self._output_script(a) for a in addresses} if addresses else None
        tip = self.chain.tip_height
        out = []
        for (txid, n), coin in self._spendable_wallet_coins():
            confirmations = tip - coin.height + 1 if (txid, n) in self.utxos else 0
            if not minconf <= confirmations <= maxconf:
                continue
            if wanted is not None and coin.script not in wanted:
                continue
            out.append({
                "txid": txid[::-1].hex(),
                "vout": n,
                "address": script_to_address(coin.script),
                "label": "",
                "scriptPubKey": coin.script.hex(),
                "amount": btc(coin.value),
                "confirmations": confirmations,
                "spendable": True,
                "solvable": True,
                "safe": True,
            })
        return out

    async def rpc_sendtoaddress(
        self, address: str, amount: Any, comment: str = "", comment_to: str = "",
        subtractfeefromamount: bool = False, replaceable: bool = True,
        conf_target: int | None = None, estimate_mode: str = "unset", avoid_reuse: bool = True,
        fee_rate: Any = None,
    ) -> str:
        """Pay ``amount`` BTC to ``address`` from the faucet wallet; return the txid."""
        script = self._output_script(address)
        value = parse_amount(amount)
        if value <= 0:
            raise NodeRpcError(RPC_TYPE_ERROR, "Invalid amount for send")
        rate = WALLET_FEE_RATE if fee_rate is None else int(Decimal(str(fee_rate)))
        async with self._lock:
            template = Tx(2, (), (TxOut(value, script),), 0)
            funded, fee, _ = self._fund(template, rate)
            if subtractfeefromamount:
                outs = list(funded.outputs)
                outs[0] = TxOut(value - fee, script)
                funded = Tx(funded.version, funded.inputs, tuple(outs), funded.locktime)
            signed, unsigned = self._sign(funded)
            if unsigned:
                raise NodeRpcError(RPC_MISC_ERROR, "Signing transaction failed")
            entry = self.check_transaction(signed, None)
            self._add_to_mempool(entry)
        return signed.txid[::-1].hex()

    async def rpc_fundrawtransaction(
        self, hexstring: str, options: dict[str, Any] | None = None, iswitness: bool | None = None
    ) -> dict[str, Any]:
        """Add wallet inputs and change; fee rate from ``fee_rate`` (sat/vB) or ``feeRate``."""
        tx = decode_tx_hex(hexstring) if hexstring else None
        if tx is None:
            raise NodeRpcError(RPC_DESERIALIZATION_ERROR, "TX decode failed")
        options = options or {}
        if not isinstance(options, dict):
            raise NodeRpcError(RPC_TYPE_ERROR, "options must be an object")
        rate = WALLET_FEE_RATE
        if "fee_rate" in options:
            rate = int(
                Decimal(str(options["fee_rate"])).to_integral_value(rounding="ROUND_CEILING")
            )
        elif "feeRate" in options:
            per_kvb = parse_amount(options["feeRate"])
            rate = -(-per_kvb // 1000)
        change_position = options.get("changePosition")
        async with self._lock:
            funded, fee, position = self._fund(tx, rate, change_position)
        return {"hex": funded.serialize().hex(), "fee": btc(fee), "changepos": position}

    async def rpc_signrawtransactionwithwallet(
        self, hexstring: str, prevtxs: list[dict[str, Any]] | None = None,
        sighashtype: str = "ALL",
    ) -> dict[str, Any]:
        """Sign the inputs that spend wallet coins (P2WPKH, SIGHASH_ALL)."""
        if sighashtype != "ALL":
            raise NodeRpcError(
                RPC_INVALID_PARAMETER, f"{sighashtype} is not a valid sighash parameter."
            )
        tx = decode_tx_hex(hexstring)
        signed, unsigned = self._sign(tx)
        out: dict[str, Any] = {"hex": signed.serialize().hex(), "complete": not unsigned}
        if unsigned:
            out["errors"] = [
                {
                    "txid": tx.inputs[i].prev_txid[::-1].hex(),
                    "vout": tx.inputs[i].prev_index,
                    "witness": [],
                    "scriptSig": tx.inputs[i].script_sig.hex(),
                    "sequence": tx.inputs[i].sequence,
                    "error": "Input not found or already spent",
                }
                for i in unsigned
            ]
        return out

    # -- JSON-RPC over HTTP ------------------------------------------------------

    async def dispatch(self, request: Any) -> dict[str, Any]:
        """Run one JSON-RPC request object; return the response object."""
        request_id = request.get("id") if isinstance(request, dict) else None
        try:
            if not isinstance(request, dict) or not isinstance(request.get("method"), str):
                raise NodeRpcError(RPC_INVALID_REQUEST, "Method must be a string")
            method = self._methods.get(request["method"])
            if method is None:
                raise NodeRpcError(RPC_METHOD_NOT_FOUND, "Method not found")
            params = request.get("params")
            if params is None:
                params = []
            try:
                bound = (
                    inspect.signature(method).bind(**params)
                    if isinstance(params, dict)
                    else inspect.signature(method).bind(*params)
                )
            except TypeError as exc:
                raise NodeRpcError(RPC_MISC_ERROR, f"{request['method']}: {exc}") from exc
            result = await method(*bound.args, **bound.kwargs)
        except NodeRpcError as exc:
            return {"result": None, "error": {"code": exc.code, "message": exc.message},
                    "id": request_id}
        except (TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
            # A parameter of the wrong JSON type surfaces here: never a crash.
            return {"result": None, "error": {"code": RPC_TYPE_ERROR, "message": str(exc)},
                    "id": request_id}
        return {"result": result, "error": None, "id": request_id}

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            while not self._stopped.is_set():
                if not await self._serve_request(reader, writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        request_line = await reader.readline()
        if not request_line:
            return False
        headers: dict[str, str] = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        parts = request_line.decode("latin-1").split()
        keep_alive = headers.get("connection", "").lower() != "close"
        if len(parts) != 3 or parts[0] != "POST":
            await _respond(writer, 405, b"JSONRPC server handles only POST requests", False)
            return False
        try:
            length = int(headers.get("content-length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_REQUEST_BYTES:
            await _respond(writer, 400, b"bad Content-Length", False)
            return False
        body = await reader.readexactly(length)
        if not self._authorized(headers.get("authorization", "")):
            await asyncio.sleep(0.05)  # bitcoind delays failed logins too
            await _respond(writer, 401, b"", keep_alive, extra=(
                'WWW-Authenticate: Basic realm="jsonrpc"',))
            return keep_alive
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            reply = {"result": None, "id": None,
                     "error": {"code": RPC_PARSE_ERROR, "message": "Parse error"}}
            await _respond(writer, 500, _dumps(reply), keep_alive)
            return keep_alive
        if isinstance(request, list):
            replies = [await self.dispatch(item) for item in request]
            await _respond(writer, 200, _dumps(replies), keep_alive)
        else:
            reply = await self.dispatch(request)
            status = 200
            error = reply["error"]
            if error is not None:
                # JSON-RPC 1.0 over bitcoind's HTTP server: errors come with 404/500.
                status = 404 if error["code"] == RPC_METHOD_NOT_FOUND else 500
            await _respond(writer, status, _dumps(reply), keep_alive)
        return keep_alive

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            supplied = base64.b64decode(token.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(supplied.encode(), self._cookie.encode())


def _fee_rate_param(value: Any) -> Decimal:
    """A BTC/kvB fee rate parameter (``maxfeerate``)."""
    return Decimal(parse_amount(value)) / COIN


def _difficulty(bits: int) -> float:
    return bits_to_target(0x1D00FFFF) / bits_to_target(bits)


def _expect_int(value: Any, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise NodeRpcError(RPC_TYPE_ERROR, f"{name} must be an integer")


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


async def _respond(
    writer: asyncio.StreamWriter, status: int, body: bytes, keep_alive: bool,
    extra: tuple[str, ...] = (),
) -> None:
    reasons = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
               405: "Method Not Allowed", 500: "Internal Server Error"}
    head = [
        f"HTTP/1.1 {status} {reasons.get(status, 'Error')}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        f"Connection: {'keep-alive' if keep_alive else 'close'}",
        *extra,
    ]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
    await writer.drain()


# --------------------------------------------------------------------------
# CLI: gateway node
# --------------------------------------------------------------------------


def register_cli(subparsers: Any) -> None:
    """Add ``gateway node`` to the ``gateway`` command."""
    parser = subparsers.add_parser(
        "node",
        help="run the embedded regtest node (Bitcoin Core consensus via libbitcoinkernel)",
        description="Run a regtest node with a Bitcoin Core-compatible JSON-RPC and a "
        "faucet wallet. Writes DIR/regtest/.cookie like bitcoind.",
    )
    parser.add_argument("--datadir", required=True, type=Path, help="data directory")
    parser.add_argument("--rpc-bind", default="127.0.0.1", help="RPC listen address")
    parser.add_argument("--rpc-port", default=18443, type=int, help="RPC port (0 = any)")
    parser.add_argument(
        "--block-interval", default=0.0, type=float, metavar="SECONDS",
        help="mine a block this often when the mempool is not empty (0 = only on request)",
    )
    parser.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    from gateway.cli import CliError

    if args.block_interval < 0:
        raise CliError("--block-interval must be >= 0")
    if not 0 <= args.rpc_port <= 65535:
        raise CliError("--rpc-port must be between 0 and 65535")

    async def run() -> None:
        node = EmbeddedNode(
            args.datadir, rpc_bind=args.rpc_bind, rpc_port=args.rpc_port,
            block_interval=args.block_interval,
        )
        try:
            await node.start()
        except KernelError as exc:
            raise CliError(str(exc)) from exc
        except OSError as exc:
            raise CliError(f"cannot listen on {args.rpc_bind}:{args.rpc_port}: {exc}") from exc
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(node.stop()))
        print(f"regtest node at height {node.chain.tip_height}", flush=True)
        print(f"RPC URL: {node.rpc_url}", flush=True)
        print(f"cookie: {node.cookie_path}", flush=True)
        await node.wait_stopped()
        await node.stop()
        print("node stopped", flush=True)

    from gateway.lockfile import NODE_LOCK, DataDirInUse, lock_datadir

    try:
        lock = lock_datadir(args.datadir, NODE_LOCK, "node")  # a second node: one line
    except DataDirInUse as exc:
        raise CliError(str(exc)) from None
    with lock:
        asyncio.run(run())
    return 0
