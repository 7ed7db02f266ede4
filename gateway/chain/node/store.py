"""node.sqlite: the node's durable record (blocks, UTXO index, mempool, wallet keys).

Every block the node ever accepted is a row of ``blocks`` (raw bytes, height,
parent, status, and once connected its undo record), written and committed
*before* the kernel sees it. The kernel's own files (``blocks/``,
``chainstate/``) are derived from these rows and may be wiped and replayed at
any time, as Bitcoin Core replays blocks after an unclean shutdown
(``Chainstate::ReplayBlocks``); the rows never are.

The file holds the faucet wallet's private keys (among them the operator's
payout key when the gateway asked this node for its address), so it is
created 0600 in a 0700 directory, and existing ones are tightened on start.
WAL mode with ``synchronous=FULL``: each commit is on disk when it returns.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.protocol.tx import decode_canonical, txid

log = logging.getLogger(__name__)

#: ``blocks.status``: written ahead, not yet judged by the kernel (deleted on start).
PENDING = 0
#: Accepted by the kernel: connected at some time, or stored on a side branch.
VALID = 1
#: Marked by ``invalidateblock`` (its descendants are invalid through it).
INVALID = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
CREATE TABLE IF NOT EXISTS blocks (
    hash BLOB PRIMARY KEY, height INTEGER NOT NULL, prev BLOB NOT NULL,
    status INTEGER NOT NULL, ntx INTEGER NOT NULL, raw BLOB NOT NULL, undo BLOB);
CREATE TABLE IF NOT EXISTS utxos (
    txid BLOB, vout INTEGER, value INTEGER, script BLOB, height INTEGER,
    coinbase INTEGER, PRIMARY KEY (txid, vout)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS mempool (
    txid BLOB PRIMARY KEY, seq INTEGER NOT NULL, raw BLOB NOT NULL, time INTEGER NOT NULL);
"""


@dataclass(slots=True)
class BlockInfo:
    """What the node keeps in memory of a stored block (its raw bytes stay on disk)."""

    hash: bytes
    height: int
    prev: bytes
    header: bytes
    ntx: int
    chainwork: int
    status: int

    @property
    def time(self) -> int:
        """Header timestamp."""
        return int.from_bytes(self.header[68:72], "little")

    @property
    def bits(self) -> int:
        """Compact target (``nBits``)."""
        return int.from_bytes(self.header[72:76], "little")


def _tighten(path: Path, wanted: int) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & ~wanted & 0o777:
        os.chmod(path, wanted)
        log.warning("tightened permissions of %s from %04o to %04o", path, mode, wanted)


def secure_paths(netdir: Path, db_path: Path) -> None:
    """Create ``netdir`` 0700 and ``db_path`` 0600, or tighten them if they exist."""
    netdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    _tighten(netdir, 0o700)
    try:
        fd = os.open(db_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        os.close(fd)
    # SQLite gives its -wal and -shm files the database file's mode.
    for path in (db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")):
        if path.exists():
            _tighten(path, 0o600)


def open_db(netdir: Path) -> sqlite3.Connection:
    """Open (creating or upgrading) ``netdir/node.sqlite``."""
    path = netdir / "node.sqlite"
    secure_paths(netdir, path)
    # Default (deferred) isolation: each `with db:` is one transaction, one fsync.
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    _upgrade_tables(db)
    db.executescript(SCHEMA)
    return db


def _columns(db: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]


def _upgrade_tables(db: sqlite3.Connection) -> None:
    """Bring a node.sqlite written before the blocks table to the current tables."""
    mempool = _columns(db, "mempool")
    if mempool and "txid" not in mempool:
        # Was (seq, raw, time), written only at shutdown: key it by txid.
        rows = db.execute("SELECT seq, raw, time FROM mempool ORDER BY seq").fetchall()
        with db:
            db.execute("DROP TABLE mempool")
            db.executescript(SCHEMA)
            for seq, raw, when in rows:
                try:
                    key = txid(decode_canonical(bytes(raw)))
                except ValueError:
                    continue
                db.execute(
                    "INSERT OR IGNORE INTO mempool VALUES (?, ?, ?, ?)", (key, seq, raw, when)
                )
    if "height" in _columns(db, "txindex"):
        # Was txid -> height on the only chain there was; now txid -> block hash.
        with db:
            db.execute("DROP TABLE txindex")


def meta(db: sqlite3.Connection, key: str) -> Any:
    """A value of the ``meta`` table, or None."""
    row = db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
    return row[0] if row else None


def set_meta(db: sqlite3.Connection, key: str, value: object) -> None:
    """Set a ``meta`` value (inside the caller's transaction)."""
    db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


def load_headers(db: sqlite3.Connection) -> list[tuple[bytes, int, bytes, bytes, int, int]]:
    """(hash, height, prev, header, ntx, status) of every judged block, parents first."""
    return [
        (bytes(h), height, bytes(prev), bytes(header), ntx, status)
        for h, height, prev, header, ntx, status in db.execute(
            "SELECT hash, height, prev, substr(raw, 1, 80), ntx, status FROM blocks"
            " WHERE status != ? ORDER BY height",
            (PENDING,),
        )
    ]


def raw_block(db: sqlite3.Connection, block_hash: bytes) -> bytes:
    """The stored bytes of a block (``KeyError`` if the node does not have it)."""
    row = db.execute("SELECT raw FROM blocks WHERE hash=?", (block_hash,)).fetchone()
    if row is None:
        raise KeyError(block_hash.hex())
    return bytes(row[0])


def undo_record(db: sqlite3.Connection, block_hash: bytes) -> bytes | None:
    """The undo record written when the block was last connected."""
    row = db.execute("SELECT undo FROM blocks WHERE hash=?", (block_hash,)).fetchone()
    return None if row is None or row[0] is None else bytes(row[0])
