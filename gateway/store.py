"""The channel store: one SQLite file, one writer task, group commit.

Theory of operation (the datasette ``database.py`` pattern, DESIGN.md):

* One thread owns the write connection (WAL, ``synchronous=FULL``). Callers
  ``await store.write(ops)``; the writer drains every request queued while the
  previous commit was in flight, runs them in ONE transaction — each inside
  its own SAVEPOINT so a failing request fails alone — commits (one fsync),
  then resolves every waiting future. A session therefore learns that its
  increment is durable only after the fsync, and sends ``paid`` and the chunk
  it pays for only then (PROTOCOL.md section 7); many sessions share one fsync.
* Reads use a separate connection on the caller's thread; WAL lets them run
  beside the writer. The hot path never reads before it writes: the sessions
  hold channel state in memory and only write.
* Schema creation uses sqlite-utils; the hot path uses plain SQL because
  ``table.update()`` costs an extra SELECT per call (DESIGN.md, "Traps").
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlite_utils

#: One statement with its parameters.
Op = tuple[str, Sequence[Any] | dict[str, Any]]

SCHEMA_VERSION = 1

_CHANNELS = {
    "id": int,  # also the BIP32 child index of the channel's K2 (gateway/keys.py)
    "channel_id": str,  # "txid:vout" once funded (PROTOCOL.md section 6, ready)
    "kind": str,
    "client_pubkey": str,
    "server_pubkey": str,
    "expiry": int,
    "change_script": str,
    "network": str,
    "state": str,
    "value": int,
    "refund_tx": str,  # multisig: the T2 the server signed
    "refund_value": int,
    "refund_outpoint": str,
    "seq": int,
    "balance": int,
    "sig": str,  # the client's latest T3 signature (DER + sighash byte)
    "bill": int,  # section 7 bill in msat*ms/s
    "created_at": float,
    "funded_at": float,
    "disconnected_at": float,  # last session end; the resume grace runs from here
    "client_addr": str,
    "settle_txid": str,
    "settle_tx": str,
    "settle_fee": int,
    "settled_at": float,
    "confirmed_height": int,
    "closed_at": float,
}


@dataclass
class _Request:
    ops: list[Op]
    future: asyncio.Future[list[int]]
    loop: asyncio.AbstractEventLoop = field(repr=False)


def connect(path: Path | str) -> sqlite3.Connection:
    """Open ``path`` with the settings every connection here needs."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # synchronous is per connection (DESIGN.md): FULL fsyncs the WAL on every
    # commit, which is what makes "durable before paid" true.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    conn.row_factory = sqlite3.Row
    return conn


def create_schema(conn: sqlite3.Connection) -> None:
    """Create the tables if they do not exist (idempotent)."""
    db = sqlite_utils.Database(conn)
    db.table("channels").create(_CHANNELS, pk="id", not_null={"kind", "state"}, if_not_exists=True)
    db.table("channels").create_index(["channel_id"], unique=True, if_not_exists=True)
    db.table("channels").create_index(["state"], if_not_exists=True)
    # Per (channel, media): media delivered (for the free allowance, section 7)
    # and the bill it earned, which splits the server's share among publishers.
    db.table("deliveries").create(
        {"channel": int, "media": str, "publisher": str, "delivered_ms": int, "bill": int},
        pk=("channel", "media"),
        if_not_exists=True,
    )
    db.table("payouts").create(
        {"channel": int, "publisher": str, "script": str, "amount": int, "txid": str},
        pk=("channel", "script"),
        if_not_exists=True,
    )
    db.table("meta").create({"key": str, "value": str}, pk="key", if_not_exists=True)
    conn.execute(
        "INSERT OR IGNORE INTO meta(key, value) VALUES ('schema_version', ?)",
        (str(SCHEMA_VERSION),),
    )


class StoreClosed(RuntimeError):
    """A write was requested after :meth:`Store.close`."""


class Store:
    """The gateway's SQLite store with a single group-committing writer."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._queue: list[_Request] = []
        self._lock = threading.Lock()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._writer: sqlite3.Connection | None = None
        self._closed = False
        #: Commits and requests so far (group commit: requests / commits > 1 under load).
        self.commits = 0
        self.requests = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._reader = connect(self.path)
        create_schema(self._reader)

    async def start(self) -> None:
        """Start the writer task (call once, from the event loop)."""
        loop = asyncio.get_running_loop()
        self._writer = await loop.run_in_executor(self._executor, connect, self.path)
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run(), name="store-writer")

    async def close(self) -> None:
        """Finish pending writes, then stop the writer and close connections."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None and self._wake is not None:
            self._wake.set()
            await self._task
        if self._writer is not None:
            writer = self._writer
            await asyncio.get_running_loop().run_in_executor(self._executor, writer.close)
        self._executor.shutdown(wait=True)
        self._reader.close()

    async def write(self, ops: Iterable[Op]) -> list[int]:
        """Run ``ops`` atomically and return after the commit is fsync'd.

        Returns each statement's ``lastrowid``. Raises the statement's error if
        it failed; then none of ``ops`` took effect.
        """
        if self._closed or self._wake is None:
            raise StoreClosed("the store is closed")
        loop = asyncio.get_running_loop()
        request = _Request(list(ops), loop.create_future(), loop)
        with self._lock:
            self._queue.append(request)
        self._wake.set()
        return await request.future

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            with self._lock:
                batch, self._queue = self._queue, []
            if batch:
                await loop.run_in_executor(self._executor, self._commit, batch)
                self.commits += 1
                self.requests += len(batch)
            if self._closed and not self._queue:
                return

    def _commit(self, batch: list[_Request]) -> None:
        """Writer thread: one transaction, a savepoint per request, one fsync."""
        conn = self._writer
        assert conn is not None
        results: list[tuple[_Request, list[int] | BaseException]] = []
        if len(batch) > 1 and self._commit_fast(conn, batch):
            return
        try:
            conn.execute("BEGIN IMMEDIATE")
            for request in batch:
                conn.execute("SAVEPOINT req")
                try:
                    rowids = [
                        conn.execute(sql, params).lastrowid or 0 for sql, params in request.ops
                    ]
                except sqlite3.Error as exc:
                    conn.execute("ROLLBACK TO req")
                    conn.execute("RELEASE req")
                    results.append((request, exc))
                else:
                    conn.execute("RELEASE req")
                    results.append((request, rowids))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # The commit itself failed (disk full, I/O error): nothing is
            # durable, so every waiter learns it and nothing paid is released.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            results = [(request, exc) for request in batch]
        _resolve_all(results)

    def _commit_fast(self, conn: sqlite3.Connection, batch: list[_Request]) -> bool:
        """The batch in one transaction without savepoints; False if any statement failed.

        Each statement is a GIL round trip for this thread while the event
        loop holds the GIL, so halving the statements (no SAVEPOINT/RELEASE
        per request) halves the commit time under load (``gateway bench``).
        On any failure everything is rolled back and :meth:`_commit` runs the
        batch again with a savepoint per request, so a failing request still
        fails alone and nothing of it is committed.
        """
        results: list[tuple[_Request, list[int]]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for request in batch:
                rowids = [conn.execute(sql, params).lastrowid or 0 for sql, params in request.ops]
                results.append((request, rowids))
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return False
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # As in _commit: nothing is durable, every waiter learns it.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            _resolve_all([(request, exc) for request in batch])
            return True
        _resolve_all(results)
        return True

    def read(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """Run a read-only query on the reader connection."""
        return self._reader.execute(sql, params).fetchall()


def _resolve_all(results: Sequence[tuple[_Request, list[int] | BaseException]]) -> None:
    """Writer thread: hand every outcome to its loop, one wake-up per loop.

    ``call_soon_threadsafe`` writes to the loop's self-pipe each time; once per
    request cost a syscall per increment (``gateway bench``, py-spy).
    """
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[list[int]], Any]]] = {}
    for request, outcome in results:
        by_loop.setdefault(request.loop, []).append((request.future, outcome))
    for loop, outcomes in by_loop.items():
        loop.call_soon_threadsafe(_resolve_many, outcomes)


def _resolve_many(outcomes: list[tuple[asyncio.Future[list[int]], Any]]) -> None:
    for future, outcome in outcomes:
        _resolve(future, outcome)


def _resolve(future: asyncio.Future[list[int]], outcome: list[int] | BaseException) -> None:
    if future.done():  # the waiter was cancelled; the write still happened
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
