"""The player's local data: K1 and every channel it opened, in one SQLite file.

Theory of operation
-------------------

A viewer must be able to resume a channel in a later run and to refund it
alone after expiry (protocol.md sections 2, 5 and 8), so everything that
defines a channel lives here: the keys and expiry (its script), the funding
outpoint and value, the signed refund (the cltv refund, or the multisig T2
signed by the gateway before T1 was broadcast), and the latest increment.

The money rule (design.md): the player persists an increment — ``seq``,
``balance``, signature and its section 7 bill — durably *before* sending the
``pay``, so a crash can never make it sign a lower ``seq`` or a higher
``balance`` again. :meth:`Keystore.record_payment` commits with
``synchronous=FULL`` (an fsync per commit) and refuses to go backwards.

The directory is created 0700 and the database 0600 (it holds K1's secret);
SQLite gives its ``-wal``/``-shm`` files the database file's permissions.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Final

import coincurve

from gateway.protocol.scripts import ChannelKind

__all__ = [
    "DB_NAME",
    "ENV_DATA_DIR",
    "ChannelState",
    "Keystore",
    "KeystoreError",
    "StoredChannel",
    "default_data_dir",
]

#: Environment variable overriding the default data dir.
ENV_DATA_DIR: Final = "PAYSTREAM_PLAYER_DIR"
#: The database file inside the data dir.
DB_NAME: Final = "player.sqlite3"


class KeystoreError(Exception):
    """The data dir is unusable, or a write would break a money rule."""


class ChannelState:
    """Values of :attr:`StoredChannel.state` (the player's view, protocol.md section 4)."""

    OPEN: Final = "open"  # terms accepted, not funded yet
    REFUND_SIGNED: Final = "refund_signed"  # our refund is signed and stored; T1 may be broadcast
    FUNDING: Final = "funding"  # funding output exists; waiting for `ready`
    READY: Final = "ready"  # takes payments; resumable
    CLOSING: Final = "closing"  # `close` sent, no `closed` seen
    #: The gateway takes nothing more; what it broadcasts is not known yet
    #: (a `resume` answered `channel_closed`): ``player status`` asks.
    CLOSED: Final = "closed"
    PENDING: Final = "pending"  # `closed`: the settlement waits for its batch (`settle_by`)
    SETTLING: Final = "settling"  # the settlement is broadcast (`closing_txid`), not yet final
    #: Final: the settlement passed our check (protocol.md section 8) and our
    #: own node shows it confirmed.
    SETTLED: Final = "settled"
    #: The gateway broadcasts nothing (section 8: nothing paid, or a share that
    #: cannot pay its own exit): only our refund after expiry brings the value back.
    UNSETTLED: Final = "unsettled"
    REFUNDED: Final = "refunded"  # our refund was broadcast
    #: States a later run may `resume` (the gateway resumes funding and ready channels).
    RESUMABLE: Final = frozenset({FUNDING, READY})
    #: Closed at the gateway, not final: ``player status`` follows their settlement.
    FOLLOWED: Final = frozenset({CLOSING, CLOSED, PENDING, SETTLING, UNSETTLED})
    #: Nothing more will happen to the channel's value.
    FINAL: Final = frozenset({SETTLED, REFUNDED})


@dataclass(frozen=True, slots=True)
class StoredChannel:
    """One row of the ``channels`` table. Byte fields are raw bytes."""

    id: int
    gateway_url: str
    network: str
    kind: ChannelKind
    server_pubkey: bytes
    expiry: int
    change_script: bytes
    refund_script: bytes
    state: str
    created_at: float
    txid: str | None = None
    vout: int | None = None
    value: int | None = None
    funding_tx: bytes | None = None
    refund_fee: int | None = None
    refund_server_sig: bytes | None = None
    signed_refund: bytes | None = None
    seq: int = 0
    balance: int | None = None
    sig: bytes | None = None
    bill: int = 0
    #: The settlement's txid, from ``closed`` or the gateway's channel API.
    closing_txid: str | None = None
    refund_txid: str | None = None
    #: The reserve accepted with ``terms``: our own exit fee (protocol.md section 3).
    exit_fee: int = 0
    #: Unix time by which the gateway said a pending settlement goes out (``closed.settle_by``).
    settle_by: int | None = None

    @property
    def channel_id(self) -> str | None:
        """``txid:vout`` once the funding output is known (protocol.md section 6)."""
        return None if self.txid is None else f"{self.txid}:{self.vout}"

    @property
    def paid(self) -> int:
        """Sat paid so far: value - balance (0 before the first increment)."""
        if self.value is None or self.balance is None:
            return 0
        return self.value - self.balance


_BYTES_FIELDS: Final = frozenset(f.name for f in fields(StoredChannel) if "bytes" in str(f.type))
_COLUMNS: Final = tuple(f.name for f in fields(StoredChannel))

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS channels (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    gateway_url TEXT NOT NULL,
    network TEXT NOT NULL,
    kind TEXT NOT NULL,
    server_pubkey BLOB NOT NULL,
    expiry INTEGER NOT NULL,
    change_script BLOB NOT NULL,
    refund_script BLOB NOT NULL,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    txid TEXT,
    vout INTEGER,
    value INTEGER,
    funding_tx BLOB,
    refund_fee INTEGER,
    refund_server_sig BLOB,
    signed_refund BLOB,
    seq INTEGER NOT NULL DEFAULT 0,
    balance INTEGER,
    sig BLOB,
    bill INTEGER NOT NULL DEFAULT 0,
    closing_txid TEXT,
    refund_txid TEXT,
    exit_fee INTEGER NOT NULL DEFAULT 0,
    settle_by INTEGER
);
-- Where the viewer left off, per channel and media: a later run resumes there.
CREATE TABLE IF NOT EXISTS positions (
    channel INTEGER NOT NULL REFERENCES channels(id),
    media TEXT NOT NULL,
    position_ms INTEGER NOT NULL,
    PRIMARY KEY (channel, media)
);
"""


#: (column, declaration) added to ``channels`` after its first version: an
#: older keystore gets them on open. ``exit_fee``: protocol version 2's
#: reserve; ``settle_by``: when a pending settlement goes out.
_ADDED_COLUMNS: Final = (
    ("exit_fee", "INTEGER NOT NULL DEFAULT 0"),
    ("settle_by", "INTEGER"),
)


def default_data_dir() -> Path:
    """``$PAYSTREAM_PLAYER_DIR``, else ``~/.paystream-player``."""
    env = os.environ.get(ENV_DATA_DIR)
    return Path(env).expanduser() if env else Path.home() / ".paystream-player"


class Keystore:
    """K1 and the channels of one data dir. Use as a context manager or call :meth:`close`."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / DB_NAME
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            # Create the file 0600 before SQLite opens it: it will hold K1's secret.
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            os.chmod(self.path, 0o600)
            self._db = sqlite3.connect(self.path, isolation_level=None)
            # WAL + synchronous=FULL: every commit is fsync'd (design.md, "Traps").
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            columns = {r[1] for r in self._db.execute("PRAGMA table_info(channels)")}
            # Columns added since a keystore was first written, in the order they came.
            for name, decl in _ADDED_COLUMNS:
                if name not in columns:
                    self._db.execute(f"ALTER TABLE channels ADD COLUMN {name} {decl}")
        except (OSError, sqlite3.Error) as exc:
            raise KeystoreError(f"cannot open player data in {self.data_dir}: {exc}") from None
        self._privkey = self._load_or_create_key()

    def __enter__(self) -> Keystore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- K1 ---------------------------------------------------------------------

    def _load_or_create_key(self) -> bytes:
        with self._tx() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'k1'").fetchone()
            if row is not None:
                return bytes.fromhex(row[0])
            # coincurve draws the secret from the OS CSPRNG and checks its range.
            secret = coincurve.PrivateKey().secret
            db.execute("INSERT INTO meta VALUES ('k1', ?)", (secret.hex(),))
            return bytes(secret)

    @property
    def privkey(self) -> bytes:
        """K1's 32-byte secret (created on first use)."""
        return self._privkey

    @property
    def pubkey(self) -> bytes:
        """K1's 33-byte compressed public key."""
        return bytes(coincurve.PrivateKey(self._privkey).public_key.format(compressed=True))

    # -- channels -----------------------------------------------------------------

    @staticmethod
    def _row(row: sqlite3.Row | tuple[Any, ...]) -> StoredChannel:
        values: dict[str, Any] = {
            name: (bytes(v) if name in _BYTES_FIELDS and v is not None else v)
            for name, v in zip(_COLUMNS, row, strict=True)
        }
        values["kind"] = ChannelKind(values["kind"])
        return StoredChannel(**values)

    def add_channel(
        self,
        *,
        gateway_url: str,
        network: str,
        kind: ChannelKind,
        server_pubkey: bytes,
        expiry: int,
        change_script: bytes,
        refund_script: bytes,
        exit_fee: int = 0,
    ) -> StoredChannel:
        """Record a channel whose terms were accepted, before any money moves."""
        with self._tx() as db:
            cur = db.execute(
                "INSERT INTO channels (gateway_url, network, kind, server_pubkey, expiry,"
                " change_script, refund_script, state, created_at, exit_fee)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    gateway_url,
                    network,
                    kind,
                    server_pubkey,
                    expiry,
                    change_script,
                    refund_script,
                    ChannelState.OPEN,
                    time.time(),
                    exit_fee,
                ),
            )
            row_id = cur.lastrowid
        assert row_id is not None
        return self.get(row_id)

    def update(self, channel_id: int, **values: Any) -> StoredChannel:
        """Set columns of a channel (``seq``, ``balance``, ``sig``: :meth:`record_payment`)."""
        unknown = set(values) - set(_COLUMNS)
        if unknown or {"id", "seq", "balance", "sig"} & set(values):
            raise KeystoreError(f"cannot update {sorted(values)}")
        if values:
            assignments = ", ".join(f"{name} = ?" for name in values)
            with self._tx() as db:
                db.execute(
                    f"UPDATE channels SET {assignments} WHERE id = ?",
                    (*values.values(), channel_id),
                )
        return self.get(channel_id)

    def record_payment(
        self, channel_id: int, *, seq: int, balance: int, sig: bytes, bill: int
    ) -> None:
        """Durably record an increment we are about to send (fsync'd commit).

        Refuses (``KeystoreError``) a ``seq`` not above the stored one or a
        balance above it: whatever happened before a crash, the player never
        signs the same seq twice nor gives money back to itself.
        """
        with self._tx() as db:
            row = db.execute(
                "SELECT seq, balance FROM channels WHERE id = ?", (channel_id,)
            ).fetchone()
            if row is None:
                raise KeystoreError(f"no channel {channel_id}")
            old_seq, old_balance = row
            if seq <= old_seq:
                raise KeystoreError(f"seq {seq} is not above the stored seq {old_seq}")
            if old_balance is not None and balance > old_balance:
                raise KeystoreError(f"balance {balance} is above the stored {old_balance}")
            db.execute(
                "UPDATE channels SET seq = ?, balance = ?, sig = ?, bill = ? WHERE id = ?",
                (seq, balance, sig, bill, channel_id),
            )

    def record_bill(self, channel_id: int, bill: int) -> None:
        """Store the section 7 bill after a chunk metered without a ``due``."""
        with self._tx() as db:
            db.execute("UPDATE channels SET bill = ? WHERE id = ?", (bill, channel_id))

    def record_position(self, channel_id: int, media: str, position_ms: int) -> None:
        """Note that ``media`` was received up to ``position_ms`` on this channel.

        0 forgets it (the next run starts at the beginning, as after the end).
        """
        with self._tx() as db:
            if position_ms <= 0:
                db.execute(
                    "DELETE FROM positions WHERE channel = ? AND media = ?", (channel_id, media)
                )
            else:
                db.execute(
                    "INSERT OR REPLACE INTO positions(channel, media, position_ms) "
                    "VALUES (?, ?, ?)",
                    (channel_id, media, position_ms),
                )

    def position(self, channel_id: int, media: str) -> int:
        """Where ``media`` was left off on this channel (ms; 0 if never, or finished)."""
        row = self._db.execute(
            "SELECT position_ms FROM positions WHERE channel = ? AND media = ?",
            (channel_id, media),
        ).fetchone()
        return 0 if row is None else int(row[0])

    def get(self, channel_id: int) -> StoredChannel:
        """The channel with local id ``channel_id`` (``KeystoreError`` if none)."""
        row = self._db.execute(
            f"SELECT {', '.join(_COLUMNS)} FROM channels WHERE id = ?", (channel_id,)
        ).fetchone()
        if row is None:
            raise KeystoreError(f"no channel {channel_id}")
        return self._row(row)

    def channels(self) -> list[StoredChannel]:
        """Every channel, oldest first."""
        rows = self._db.execute(f"SELECT {', '.join(_COLUMNS)} FROM channels ORDER BY id")
        return [self._row(row) for row in rows]

    def find(self, ref: str) -> StoredChannel:
        """A channel by local id, ``txid:vout``, or a unique txid prefix (>= 8 hex digits)."""
        ref = ref.strip().lower()
        if ref.isdigit():
            return self.get(int(ref))
        matches = [
            ch
            for ch in self.channels()
            if ch.txid is not None
            and (ch.channel_id == ref or (len(ref) >= 8 and ch.txid.startswith(ref)))
        ]
        if len(matches) != 1:
            what = "no channel" if not matches else "several channels"
            raise KeystoreError(f"{what} match {ref!r}")
        return matches[0]

    def resumable(self, gateway_url: str, network: str) -> list[StoredChannel]:
        """Funded channels with this gateway that a new session may ``resume``, newest first."""
        return [
            ch
            for ch in reversed(self.channels())
            if ch.gateway_url == gateway_url
            and ch.network == network
            and ch.state in ChannelState.RESUMABLE
            and ch.txid is not None
        ]
