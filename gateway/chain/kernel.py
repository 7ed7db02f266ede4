"""Thin wrapper over libbitcoinkernel (py-bitcoinkernel, ``import pbk``).

Two jobs, both delegated to Bitcoin Core's own consensus code:

- ``Kernel``: a regtest ``ChainstateManager`` in a data dir. ``process_block``
  returns ``(accepted, reason)``. The kernel raises for some failures (unknown
  parent, bad coinbase height, timestamp) and silently refuses others (a block
  that fails while connecting: bad script, failed CLTV, spent input), so
  acceptance is decided by comparing the tip before and after, and the reason
  is read from the kernel's log (design.md, "Traps already found here").
- ``verify_input``: one input through ``ScriptPubkey.verify`` with all
  consensus flags and the spent outputs (``PrecomputedTransactionData``),
  raising ``ScriptVerifyError`` with a Bitcoin Core-like reason.

The kernel checks consensus only, not relay policy; policy lives in the node
(``gateway.chain.node``). The kernel keeps its chainstate in memory and writes
it only when closed: ``close`` is the flush.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import pbk
from pbk.script import PrecomputedTransactionData

#: Number of blocks whose times make up median-time-past (BIP113).
MTP_WINDOW = 11

_ALL_FLAGS = pbk.ScriptVerificationFlags.ALL
_F = pbk.ScriptVerificationFlags

# The kernel's log is process-global; one connection feeds a per-thread buffer,
# so that two kernels used from two threads (two nodes in one test process) do
# not read each other's reasons. ``process_block`` logs on the calling thread.
_log_lock = threading.Lock()
_log_local = threading.local()
_log_connection: pbk.LoggingConnection | None = None


def _on_log(message: str) -> None:
    buffer = getattr(_log_local, "buffer", None)
    if buffer is not None:
        buffer.append(message.rstrip("\n"))


def _ensure_logging() -> None:
    global _log_connection
    with _log_lock:
        if _log_connection is not None:
            return
        pbk.logging_set_options(pbk.LoggingOptions(log_timestamps=False))
        # Header-time failures (time-too-old, time-too-new) are logged only in the
        # VALIDATION category at debug level; connect failures are [error] lines.
        pbk.set_log_level_category(pbk.LogCategory.VALIDATION, pbk.LogLevel.DEBUG)
        pbk.enable_log_category(pbk.LogCategory.VALIDATION)
        _log_connection = pbk.LoggingConnection(cb=_on_log)


# Reasons appear as "<code>, <debug message>" inside these kernel log lines.
_REASON_PATTERNS = (
    re.compile(r"ConnectBlock [0-9a-f]{64} failed, (.+)$"),
    re.compile(r"AcceptBlock FAILED \((.+)\)$"),
    re.compile(r"ContextualCheckBlockHeader: [0-9a-f]{64}, (.+)$"),
    re.compile(r"CheckBlockHeader: [0-9a-f]{64}, (.+)$"),
    re.compile(r"\[error\] \w+: (.+)$"),
)


def _reason_from_log(lines: list[str]) -> str | None:
    for pattern in _REASON_PATTERNS:
        for line in lines:
            match = pattern.search(line)
            if match:
                return match.group(1)
    return None


class KernelError(Exception):
    """The kernel could not be opened or failed internally."""


class ScriptVerifyError(Exception):
    """An input failed script verification; ``reason`` reads like Bitcoin Core's."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Kernel:
    """A regtest chainstate in ``datadir`` (``blocks/`` and ``chainstate/`` inside it).

    Not safe for concurrent ``process_block`` calls from several threads: the
    caller (the node) serializes them; reads are fine.
    """

    def __init__(self, datadir: Path | str) -> None:
        _ensure_logging()
        self.datadir = Path(datadir)
        self.datadir.mkdir(parents=True, exist_ok=True)
        context = pbk.make_context(pbk.ChainType.REGTEST)
        opts = pbk.ChainstateManagerOptions(
            context, str(self.datadir.absolute()), str((self.datadir / "blocks").absolute())
        )
        # Parallel script checks would log on worker threads; blocks here are small.
        opts.set_worker_threads_num(0)
        try:
            self._chainman: pbk.ChainstateManager | None = pbk.ChainstateManager(opts)
        except RuntimeError as exc:
            raise KernelError(f"cannot open chainstate in {self.datadir}: {exc}") from exc
        self._lock = threading.Lock()
        self._mtp_cache: dict[int, int] = {}

    @property
    def chainman(self) -> pbk.ChainstateManager:
        """The underlying ``ChainstateManager`` (raises once closed)."""
        if self._chainman is None:
            raise KernelError("kernel is closed")
        return self._chainman

    def close(self) -> None:
        """Flush and release the chainstate (the kernel needs exclusive access)."""
        with self._lock:
            if self._chainman is not None:
                self._chainman.__exit__(None, None, None)
                self._chainman = None

    # -- chain queries -------------------------------------------------------

    @property
    def tip_height(self) -> int:
        """Height of the active chain's tip."""
        return int(self.chainman.get_active_chain().height)

    @property
    def tip_hash(self) -> bytes:
        """Tip block hash, internal byte order."""
        return bytes(self._entry_at(self.tip_height).block_hash)

    def _entry_at(self, height: int) -> pbk.BlockTreeEntry:
        chain = self.chainman.get_active_chain()
        if height < 0 or height > chain.height:
            raise IndexError(f"height {height} out of range")
        return chain.block_tree_entries[height]

    def hash_at(self, height: int) -> bytes:
        """Active-chain block hash at ``height`` (internal byte order)."""
        return bytes(self._entry_at(height).block_hash)

    def header_at(self, height: int) -> bytes:
        """The 80-byte header of the active-chain block at ``height``."""
        return bytes(self._entry_at(height).block_header)

    def block_at(self, height: int) -> bytes:
        """The serialized active-chain block at ``height``, read from disk."""
        entry = self._entry_at(height)
        return bytes(self.chainman.blocks[entry])

    def height_of(self, block_hash: bytes) -> int | None:
        """Active-chain height of ``block_hash``, or None if not on the active chain."""
        entries = self.chainman.block_tree_entries
        key = pbk.BlockHash(block_hash)
        if key not in entries:
            return None
        entry = entries[key]
        chain = self.chainman.get_active_chain()
        if entry.height > chain.height or entry not in chain.block_tree_entries:
            return None
        return int(entry.height)

    def knows(self, block_hash: bytes) -> bool:
        """True when the kernel's block index has ``block_hash`` (on any branch)."""
        return pbk.BlockHash(block_hash) in self.chainman.block_tree_entries

    def block_time_at(self, height: int) -> int:
        """Header timestamp of the active-chain block at ``height``."""
        return int(self._entry_at(height).block_header.timestamp.timestamp())

    def median_time_past(self, height: int | None = None) -> int:
        """BIP113 median of the last 11 block times ending at ``height`` (default: tip).

        Cached per height until the next block is processed: mempool checks ask
        for it on every transaction, and reading 11 headers through the kernel
        is not free (docs/performance.md, "Figures behind code comments").
        """
        top = self.tip_height if height is None else height
        cached = self._mtp_cache.get(top)
        if cached is not None:
            return cached
        times = sorted(self.block_time_at(h) for h in range(max(0, top - MTP_WINDOW + 1), top + 1))
        self._mtp_cache[top] = times[len(times) // 2]
        return self._mtp_cache[top]

    # -- blocks --------------------------------------------------------------

    def process_block(self, raw: bytes) -> tuple[bool, str | None]:
        """Give a serialized block to the kernel.

        Returns ``(True, None)`` when the block became the new tip (or already
        was on the active chain: ``duplicate``), else ``(False, reason)`` with
        the kernel's reject reason, e.g. ``"bad-cb-amount, coinbase pays too
        much (...)"``. Never raises for an invalid block.
        """
        with self._lock:
            chainman = self.chainman
            try:
                block = pbk.Block(raw)
            except RuntimeError:
                return False, "block decode failed"
            before = self.tip_hash
            self._mtp_cache.clear()  # a reorg could change any height's ancestors
            _log_local.buffer = []
            try:
                try:
                    is_new = chainman.process_block(block)
                except pbk.ProcessBlockException as exc:
                    reason = _reason_from_log(_log_local.buffer)
                    return False, reason or str(exc)
                lines = _log_local.buffer
            finally:
                _log_local.buffer = None
            after = self.tip_hash
            if after == bytes(block.block_hash) and after != before:
                return True, None
            if not is_new:
                on_chain = self.height_of(bytes(block.block_hash)) is not None
                return (True, None) if on_chain else (False, "duplicate-invalid")
            reason = _reason_from_log(lines)
            if reason is None:
                # Valid but not the best chain (e.g. a side branch): not connected.
                reason = "inconclusive: not connected to the active chain"
            return False, reason


def _script_error_detail(
    script: pbk.ScriptPubkey,
    amount: int,
    tx: pbk.Transaction,
    txdata: PrecomputedTransactionData,
    index: int,
) -> str:
    """Best-effort Bitcoin Core script error text.

    The kernel's C API reports pass/fail, not the ScriptError, so the failing
    rule is found by retrying without one flag at a time.
    """
    probes = (
        (_F.CHECKLOCKTIMEVERIFY, "Locktime requirement not satisfied"),
        (_F.CHECKSEQUENCEVERIFY, "Locktime requirement not satisfied"),
        (_F.DERSIG, "Non-canonical DER signature"),
        (_F.NULLDUMMY, "Dummy CHECKMULTISIG argument must be zero"),
    )
    for flag, text in probes:
        try:
            if script.verify(amount, tx, txdata, index, _ALL_FLAGS & ~flag):
                return text
        except pbk.ScriptVerifyException:
            continue
    return "Script evaluated without error but finished with a false/empty top stack element"


def verify_input(
    tx: bytes | pbk.Transaction,
    index: int,
    spent_outputs: list[tuple[bytes, int]],
    *,
    txdata: PrecomputedTransactionData | None = None,
) -> None:
    """Verify input ``index`` of ``tx`` with all consensus flags.

    ``spent_outputs`` lists ``(script_pubkey, value)`` for every input of
    ``tx``, in order (BIP341 needs all of them). Raises ``ScriptVerifyError``
    with ``mandatory-script-verify-flag-failed (<detail>)`` on failure, and
    ``ValueError`` for malformed arguments.
    """
    ktx, data, spent = prepare_transaction(tx, spent_outputs) if txdata is None else (
        tx if isinstance(tx, pbk.Transaction) else pbk.Transaction(tx), txdata, spent_outputs
    )
    if not 0 <= index < len(spent):
        raise ValueError(f"input index {index} out of range")
    script = pbk.ScriptPubkey(spent[index][0])
    amount = spent[index][1]
    try:
        ok = script.verify(amount, ktx, data, index, _ALL_FLAGS)
    except pbk.ScriptVerifyException as exc:
        raise ScriptVerifyError(f"mandatory-script-verify-flag-failed ({exc})") from exc
    if not ok:
        detail = _script_error_detail(script, amount, ktx, data, index)
        raise ScriptVerifyError(f"mandatory-script-verify-flag-failed ({detail})")


def prepare_transaction(
    tx: bytes | pbk.Transaction, spent_outputs: list[tuple[bytes, int]]
) -> tuple[pbk.Transaction, PrecomputedTransactionData, list[tuple[bytes, int]]]:
    """Parse ``tx`` and precompute its signature hashes once for all its inputs."""
    try:
        ktx = tx if isinstance(tx, pbk.Transaction) else pbk.Transaction(tx)
    except RuntimeError as exc:
        raise ValueError("transaction decode failed") from exc
    if len(spent_outputs) != len(ktx.inputs):
        raise ValueError(
            f"{len(spent_outputs)} spent outputs for {len(ktx.inputs)} inputs"
        )
    outputs = [pbk.TransactionOutput(pbk.ScriptPubkey(spk), value) for spk, value in spent_outputs]
    return ktx, PrecomputedTransactionData(ktx, outputs), spent_outputs


def verify_transaction(tx: bytes, spent_outputs: list[tuple[bytes, int]]) -> None:
    """Verify every input of ``tx``; raises ``ScriptVerifyError`` on the first failure."""
    ktx, data, spent = prepare_transaction(tx, spent_outputs)
    for index in range(len(spent)):
        verify_input(ktx, index, spent, txdata=data)
