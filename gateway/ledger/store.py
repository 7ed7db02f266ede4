"""The channel store: one SQLite file, one write connection, group commit.

Theory of operation (the datasette ``database.py`` pattern, design.md):

* One write connection (WAL, ``synchronous=FULL``). Callers
  ``await store.write(ops)``; every request queued while the previous commit
  was in flight runs in ONE transaction — a failing request fails alone — on
  the event loop's thread, then one thread does the ``COMMIT`` (one fsync)
  and every waiting future is resolved. A session therefore learns that its
  increment is durable only after the fsync, and sends ``paid`` and the chunk
  it pays for only then (protocol.md section 7); many sessions share one fsync.
  The running gateway's workers are the file's only writers (``gateway
  settle`` asks them over HTTP); a batch that finds another worker's write
  lock waits for it on the writer thread, never on the event loop.
* Reads use a separate connection on the caller's thread; WAL lets them run
  beside the writer. The hot path never reads before it writes: the sessions
  hold channel state in memory and only write.
* Schema creation uses sqlite-utils; the hot path uses plain SQL because
  ``table.update()`` costs an extra SELECT per call (design.md, "Traps").
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from gateway.datadir import create_private

log = logging.getLogger(__name__)

#: One statement with its parameters.
Op = tuple[str, Sequence[Any] | dict[str, Any]]

#: 2: settlements in batches (``settlements``, ``earnings``, per-batch
#: ``payouts``) and the reserve (``channels.exit_fee``), protocol version 2.
#: 3: ``channels.funding_script``, indexed: an unfunded channel is found by
#: its address without rebuilding every script.
SCHEMA_VERSION = 3

_CHANNELS = {
    "id": int,  # also the BIP32 child index of the channel's K2 (gateway/keys.py)
    "channel_id": str,  # "txid:vout" once funded (protocol.md section 6, ready)
    "kind": str,
    "client_pubkey": str,
    "server_pubkey": str,
    "expiry": int,
    "change_script": str,
    "funding_script": str,  # the P2WSH script_pubkey of terms.funding_address
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
    "exit_fee": int,  # the reserve quoted in terms (protocol.md section 3)
    "closing_at": float,  # when it stopped taking payments
    "settle_txid": str,  # its batch (settlements.txid)
    "settle_tx": str,  # schema 1 only: the single-channel settlement
    "settle_fee": int,  # the reserve it paid towards its batch's fee
    "settled_at": float,
    "confirmed_height": int,
    "closed_at": float,
}


#: One row per settlement batch (protocol.md section 8).
_SETTLEMENTS = {
    "txid": str,
    "tx": str,  # the whole signed transaction, broadcast again as stored
    "fee": int,
    "vsize": int,
    "reserves": int,  # the part of the fee the clients' reserves paid
    "channels": int,
    "state": str,  # broadcast, confirmed, abandoned (refused: its channels moved on)
    "created_at": float,
    "confirmed_height": int,
}
#: What each batch paid each publisher (and the operator) on chain.
_PAYOUTS = {"txid": str, "publisher": str, "script": str, "amount": int}


@dataclass
class _Request:
    ops: list[Op]
    future: asyncio.Future[list[int]]


#: Each request with its statements' rowids, or the error that undid it.
_Results = list[tuple[_Request, list[int] | BaseException]]
#: How often the WAL is copied into the database file (see Store._checkpoint_loop).
CHECKPOINT_INTERVAL_S = 1.0
#: How long the writer thread waits for SQLite's lock held by a writer that
#: does not take the lock file (a tool with its own connection).
LOCK_WAIT_MS = 5000
#: Bytes per database page. The WAL gets every page a commit touched, whole:
#: a paid increment touches two (its channel row and its delivery row), so
#: smaller pages write less per commit, as long as a channel's row (a settled
#: multisig one is the largest) still fits one page; 1 KiB pages would
#: overflow it. Measured in docs/performance.md ("Measurements behind the code").
PAGE_SIZE = 2048
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)


def connect(path: Path | str) -> sqlite3.Connection:
    """Open ``path`` with the settings every connection here needs."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    # Only a new file takes it (a WAL database keeps the size it was made with).
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    conn.execute("PRAGMA journal_mode=WAL")
    # synchronous is per connection (design.md): FULL fsyncs the WAL on every
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
    _migrate(conn, db)
    db.table("channels").create_index(["funding_script"], if_not_exists=True)
    db.table("payouts").create(_PAYOUTS, pk=("txid", "script"), if_not_exists=True)
    # One row per batch: the transaction is kept whole, so a restart
    # broadcasts exactly what was stored (protocol.md section 8).
    db.table("settlements").create(_SETTLEMENTS, pk="txid", if_not_exists=True)
    db.table("settlements").create_index(["state"], if_not_exists=True)
    # What each item earned in each batch, and its part of the fee (dashboard).
    db.table("earnings").create(
        {"txid": str, "channel": int, "media": str, "gross": int, "fee": int},
        pk=("txid", "channel", "media"),
        if_not_exists=True,
    )
    db.table("meta").create({"key": str, "value": str}, pk="key", if_not_exists=True)
    conn.execute(
        "INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)",
        (str(SCHEMA_VERSION),),
    )


def _migrate(conn: sqlite3.Connection, db: sqlite_utils.Database) -> None:
    """Bring a schema 1 file (one settlement per channel) to schema 2 (batches)."""
    channels = db.table("channels")
    for name, kind in _CHANNELS.items():
        if name not in channels.columns_dict:
            channels.add_column(name, kind)
    if "payouts" in db.table_names() and "channel" in db.table("payouts").columns_dict:
        conn.execute("ALTER TABLE payouts RENAME TO payouts_v1")
        db.table("payouts").create(_PAYOUTS, pk=("txid", "script"))
        conn.execute(
            "INSERT OR REPLACE INTO payouts(txid, publisher, script, amount) "
            "SELECT txid, publisher, script, SUM(amount) FROM payouts_v1 GROUP BY txid, script"
        )
        conn.execute("DROP TABLE payouts_v1")
    if "settlements" not in db.table_names():
        db.table("settlements").create(_SETTLEMENTS, pk="txid")
        conn.execute(
            "INSERT OR IGNORE INTO settlements(txid, tx, fee, channels, state, created_at, "
            "confirmed_height) SELECT settle_txid, settle_tx, settle_fee, 1, "
            "CASE state WHEN 'closing' THEN 'broadcast' ELSE 'confirmed' END, settled_at, "
            "confirmed_height FROM channels WHERE settle_txid IS NOT NULL AND settle_tx IS NOT NULL"
        )


class StoreClosed(RuntimeError):
    """A write was requested after :meth:`Store.close`."""


class Store:
    """The gateway's SQLite store with a single group-committing writer."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._queue: list[_Request] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        #: A batch is between BEGIN and the end of its COMMIT.
        self._busy = False
        self._idle: asyncio.Event | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-fsync")
        self._checkpointer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-ckpt")
        self._checkpoints: asyncio.Task[None] | None = None
        self._writer: sqlite3.Connection | None = None
        #: The writers' lock file (see :meth:`_begin`).
        self._lock_fd = -1
        self._closed = False
        #: Commits and requests so far (group commit: requests / commits > 1 under load).
        self.commits = 0
        self.requests = 0
        self.path.parent.mkdir(parents=True, exist_ok=True)
        create_private(self.path)  # 0600: it holds signatures and client addresses
        self._reader = connect(self.path)
        create_schema(self._reader)

    async def start(self) -> None:
        """Open the write connection (call once, from the event loop)."""
        self._loop = asyncio.get_running_loop()
        self._writer = connect(self.path)
        # Never sleep on the event loop for another writer's lock (see _begin).
        self._writer.execute("PRAGMA busy_timeout = 0")
        # Checkpoints run beside the commits, not inside one (see _checkpoint_loop).
        self._writer.execute("PRAGMA wal_autocheckpoint = 0")
        self._checkpoints = asyncio.create_task(self._checkpoint_loop(), name="store-checkpoints")
        self._lock_fd = os.open(self.path.with_name(self.path.name + ".lock"), _LOCK_FLAGS, 0o600)
        self._idle = asyncio.Event()
        self._idle.set()

    async def close(self) -> None:
        """Finish pending writes, then close the connections."""
        if self._closed:
            return
        self._closed = True
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpoints
        if self._idle is not None:
            await self._idle.wait()
        if self._writer is not None:
            self._writer.close()
            os.close(self._lock_fd)
        self._executor.shutdown(wait=True)
        self._checkpointer.shutdown(wait=True)
        self._reader.close()

    async def write(self, ops: Iterable[Op]) -> list[int]:
        """Run ``ops`` atomically and return after the commit is fsync'd.

        Returns each statement's ``lastrowid``. Raises the statement's error if
        it failed; then none of ``ops`` took effect.
        """
        if self._closed or self._loop is None or self._idle is None:
            raise StoreClosed("the store is closed")
        request = _Request(list(ops), self._loop.create_future())
        self._queue.append(request)
        if not self._busy:
            self._busy = True
            self._idle.clear()
            # call_soon, not now: writers woken in this loop iteration join the batch.
            self._loop.call_soon(self._begin)
        return await request.future

    def _begin(self) -> None:
        """Loop thread: run the queued requests in one transaction, then fsync off-loop.

        Statements run here, on the event loop's thread: they touch only
        SQLite's page cache (microseconds each), while doing them on the
        writer thread cost two GIL hand-offs per statement, most of a
        commit's time under load (``gateway bench``). Only ``COMMIT``, the
        fsync, goes to the writer thread, and the next batch gathers
        meanwhile.

        With several gateway workers on one file (``--workers``) the writers
        take turns on a lock file (``flock``) around each transaction. A
        batch that finds it held waits on the writer thread, never on the
        loop, and is woken the moment the other worker's commit ends: SQLite's
        own busy handler polls with sleeps of up to 100 ms, which stalled a
        two-worker ``gateway bench`` (docs/performance.md).
        """
        assert self._loop is not None
        batch, self._queue = self._queue, []
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another worker is writing: wait beside the loop
            locked = self._loop.run_in_executor(
                self._executor, fcntl.flock, self._lock_fd, fcntl.LOCK_EX
            )
            locked.add_done_callback(lambda f: self._locked(batch, f))
            return
        self._write_batch(batch)

    def _locked(self, batch: list[_Request], locked: asyncio.Future[None]) -> None:
        failure = locked.exception()
        if failure is not None:
            self._finish([(request, failure) for request in batch])
        else:
            self._write_batch(batch)

    def _write_batch(self, batch: list[_Request]) -> None:
        """Loop thread, holding the lock file: BEGIN, the statements, then COMMIT off-loop."""
        assert self._loop is not None and self._writer is not None
        try:
            self._writer.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:
            # A writer outside the lock file holds SQLite's lock (busy_timeout
            # is 0 here): wait for it, and run the batch, on the writer thread.
            done = self._loop.run_in_executor(self._executor, self._batch_when_free, batch)
            done.add_done_callback(lambda f: self._committed(batch, f))
            return
        results = self._run_batch(batch)
        if not self._writer.in_transaction:  # nothing left to commit (all failed)
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            self._finish(results)
            return
        done = self._loop.run_in_executor(self._executor, self._commit, results)
        done.add_done_callback(lambda f: self._committed(batch, f))

    def _run_batch(self, batch: list[_Request]) -> _Results:
        """The batch's statements; rolled back whole if no request succeeded."""
        assert self._writer is not None
        try:
            results = self._execute(self._writer, batch)
        except Exception as exc:  # even the retry could not run: nothing is written
            results = [(request, exc) for request in batch]
        failed = all(isinstance(outcome, BaseException) for _, outcome in results)
        if failed and self._writer.in_transaction:
            self._writer.execute("ROLLBACK")
        return results

    def _commit(self, results: _Results) -> _Results:
        """Writer thread: the fsync, then the lock file is free for the next writer."""
        assert self._writer is not None
        try:
            self._writer.execute("COMMIT")
        except BaseException:
            # Disk full, I/O error: nothing is durable; undo before unlocking.
            if self._writer.in_transaction:
                self._writer.execute("ROLLBACK")
            raise
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        return results

    def _batch_when_free(self, batch: list[_Request]) -> _Results:
        """Writer thread: wait for SQLite's lock, then the batch and its commit."""
        assert self._writer is not None
        self._writer.execute(f"PRAGMA busy_timeout = {LOCK_WAIT_MS}")
        try:
            self._writer.execute("BEGIN IMMEDIATE")
            results = self._run_batch(batch)
        except BaseException:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            raise
        finally:
            self._writer.execute("PRAGMA busy_timeout = 0")
        if not self._writer.in_transaction:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            return results
        return self._commit(results)

    def _committed(self, batch: list[_Request], done: asyncio.Future[_Results]) -> None:
        # On an error (no lock, or the commit failed) nothing is durable: the
        # writer thread rolled back, every waiter learns it, nothing paid is released.
        exc = done.exception()
        results: _Results = (
            done.result() if exc is None else [(request, exc) for request in batch]
        )
        self.commits += 1
        self._finish(results)

    def _finish(self, results: _Results) -> None:
        self.requests += len(results)
        for request, outcome in results:
            resolve(request.future, outcome)
        assert self._loop is not None and self._idle is not None
        if self._queue:
            self._loop.call_soon(self._begin)
        else:
            self._busy = False
            self._idle.set()

    @staticmethod
    def _execute(conn: sqlite3.Connection, batch: list[_Request]) -> _Results:
        """Every request's statements in the open transaction, leaving it open.

        First all at once (a savepoint around the batch, not one per request);
        if anything fails, the batch is rolled back to that savepoint and run
        again with a savepoint per request, so a failing request fails alone
        and nothing of it is committed. The transaction, and so the write
        lock, is kept throughout: no other worker can slip in between.
        """
        conn.execute("SAVEPOINT batch")
        try:
            results: _Results = [(request, _run_ops(conn, request.ops)) for request in batch]
        # Any error, not only sqlite3's (an int beyond 64 bits is OverflowError):
        # one that escaped here would leave the transaction, and the lock file
        # every worker waits on, held for good.
        except Exception as exc:
            conn.execute("ROLLBACK TO batch")
            conn.execute("RELEASE batch")
            if len(batch) == 1:  # the one request is the one that failed
                return [(batch[0], exc)]
        else:
            conn.execute("RELEASE batch")
            return results
        results = []
        for request in batch:
            conn.execute("SAVEPOINT req")
            try:
                results.append((request, _run_ops(conn, request.ops)))
            except Exception as exc:
                conn.execute("ROLLBACK TO req")
                results.append((request, exc))
            conn.execute("RELEASE req")
        return results

    async def _checkpoint_loop(self) -> None:
        """Copy the WAL into the database every second, beside the commits.

        SQLite's automatic checkpoint runs inside the ``COMMIT`` that fills
        1,000 WAL pages, while that writer holds the write lock, and every
        pay of every worker waits for it (docs/performance.md). A PASSIVE
        checkpoint on its own connection and thread takes no write lock, so
        commits go on while it copies.
        """
        assert self._loop is not None
        conn = connect(self.path)
        try:
            while True:
                await asyncio.sleep(CHECKPOINT_INTERVAL_S)
                try:
                    await self._loop.run_in_executor(
                        self._checkpointer, conn.execute, "PRAGMA wal_checkpoint(PASSIVE)"
                    )
                except sqlite3.Error as exc:  # the next round tries again
                    log.warning("WAL checkpoint failed: %s", exc)
        finally:
            self._checkpointer.submit(conn.close)

    def read(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """Run a read-only query on the reader connection."""
        return self._reader.execute(sql, params).fetchall()

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """:meth:`read`, for callers that await (the PostgreSQL store's reads are async)."""
        return self.read(sql, params)


def _run_ops(conn: sqlite3.Connection, ops: list[Op]) -> list[int]:
    return [conn.execute(sql, params).lastrowid or 0 for sql, params in ops]


def resolve(future: asyncio.Future[list[int]], outcome: list[int] | BaseException) -> None:
    """Answer a writer's ``future`` with its row ids or its error (both stores)."""
    if future.done():  # the waiter was cancelled; the write still happened
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)
