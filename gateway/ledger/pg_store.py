"""The channel store on PostgreSQL: asyncpg, one writer connection, group commit.

The same interface as the SQLite store (:mod:`gateway.ledger.store`):
``await write(ops)`` returns once the ops are committed, ``read(sql,
params)`` answers rows, with the same ``?`` SQL (translated to ``$n`` here,
in one place). What differs, and why:

* **Durability.** Every connection runs with ``synchronous_commit = on``:
  ``COMMIT`` returns once the WAL is flushed on the server, so "durable
  before ``paid``" (protocol.md section 7) holds as with SQLite's fsync.
* **Group commit.** Writes queue; one writer task takes every queued
  request, runs them in ONE transaction and commits; the next batch gathers
  meanwhile, and its statements run on a second connection while the first
  batch's ``COMMIT`` waits for the WAL flush (as SQLite's fsync runs beside
  the next batch's statements). Requests of the same shape (the same statements, the hot path's
  ``paid``) run position by position through ``executemany``, which asyncpg
  pipelines: a batch of a hundred increments costs a few round trips, not
  two hundred (docs/performance.md, "Choosing the driver"). The ledger's
  statements only assign parameters, so position-major order leaves every
  row as request order would. If anything fails, the batch is rolled back
  to a savepoint and run again with a savepoint per request: a failing
  request (a fenced write, say) fails alone.
* **Reads.** :meth:`fetch` is async (a small pool). :meth:`read` stays
  synchronous for the ledger's rare reads, the web pages and the tools: it
  runs on a private thread with its own connection and event loop, so it
  blocks its caller for one local round trip, as an SQLite read blocks for
  its page reads.
* **Schema.** Versioned SQL files in ``gateway/ledger/migrations``, applied
  in order by ``gateway db upgrade`` (:func:`upgrade`) and recorded in
  ``schema_migrations``; a store whose schema is behind refuses to open.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg

from gateway.ledger.live import ChannelReleased
from gateway.ledger.store import Op, StoreClosed, resolve

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).with_name("migrations")
#: Every migration runs under this advisory lock: two hosts upgrading at once take turns.
_UPGRADE_LOCK = 0x5061_7973_7472_6D31  # "Paystrm1"
#: The SQLSTATE ``paystream_fence`` raises (migrations/0001_schema.sql).
FENCE_SQLSTATE = "PSF01"
#: Writer connections: while one batch commits (the WAL flush) the next
#: one's statements run on the other. A write that touches a row of the
#: batch committing waits for that commit (the row's lock), so the batches'
#: order holds wherever it matters.
WRITERS = 2
#: Seconds any one statement may take before the store gives up on it.
COMMAND_TIMEOUT_S = 30.0
#: A host stopped (SIGSTOP) inside a transaction would keep its row locks, and
#: a take-over would wait for them: the server ends such a transaction first.
IDLE_IN_TRANSACTION_S = 5

Row = dict[str, Any]


class SchemaError(RuntimeError):
    """The database's schema is not the one this gateway needs (run ``gateway db upgrade``)."""


class Fenced(ChannelReleased):
    """A write of a channel refused by the fence: another host holds it now."""


def is_postgres(url: str | None) -> bool:
    """True if ``url`` names a PostgreSQL store (``postgresql://`` or ``postgres://``)."""
    return bool(url) and str(url).startswith(("postgresql://", "postgres://"))


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """``?`` placeholders to PostgreSQL's ``$1, $2, …`` (never inside a quoted literal)."""
    out: list[str] = []
    n = 0
    quoted = False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
        if ch == "?" and not quoted:
            n += 1
            out.append(f"${n}")
        else:
            out.append(ch)
    return "".join(out)


def _row(record: asyncpg.Record) -> Row:
    # SUM() of BIGINT is NUMERIC in PostgreSQL; the ledger's figures are whole sats.
    return {
        k: int(v) if isinstance(v, Decimal) and v == v.to_integral_value() else v
        for k, v in record.items()
    }


def _server_settings(name: str) -> dict[str, str]:
    return {
        "synchronous_commit": "on",
        "idle_in_transaction_session_timeout": f"{IDLE_IN_TRANSACTION_S}s",
        "application_name": name[:63],
    }


async def connect(dsn: str, name: str = "paystream") -> asyncpg.Connection:
    """A connection with the settings every connection of the store needs."""
    return await asyncpg.connect(
        dsn, command_timeout=COMMAND_TIMEOUT_S, server_settings=_server_settings(name)
    )


# -- migrations ---------------------------------------------------------------------


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, SQL) of every migration shipped, in order."""
    found = []
    for path in sorted(MIGRATIONS.glob("*.sql")):
        version = int(path.name.split("_", 1)[0])
        found.append((version, path.stem, path.read_text()))
    return found


async def schema_version(conn: asyncpg.Connection) -> int:
    """The last migration applied to the database (0: none)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations"))


async def upgrade(dsn: str) -> list[str]:
    """Apply the migrations the database lacks, each in its own transaction; their names."""
    conn = await connect(dsn, "paystream-upgrade")
    applied: list[str] = []
    try:
        for version, name, sql in migrations():
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock($1)", _UPGRADE_LOCK)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, "
                    "name TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
                )
                if await schema_version(conn) >= version:
                    continue
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations(version, name) VALUES ($1, $2)", version, name
                )
                applied.append(name)
    finally:
        await conn.close()
    return applied


async def check_schema(conn: asyncpg.Connection) -> None:
    """Raise :class:`SchemaError` unless every shipped migration is applied."""
    have, want = await schema_version(conn), migrations()[-1][0]
    if have < want:
        raise SchemaError(
            f"the database's schema is version {have}, this gateway needs {want}: "
            "run `gateway db upgrade --store URL` first"
        )
    if have > want:
        raise SchemaError(
            f"the database's schema is version {have}, newer than this gateway's {want}"
        )


# -- the store -------------------------------------------------------------------------


@dataclass
class _Request:
    ops: list[Op]
    future: asyncio.Future[list[int]]


_Results = list[tuple[_Request, list[int] | BaseException]]


class _Reader:
    """Synchronous reads: a private thread, event loop and connection (see the module doc)."""

    def __init__(self, dsn: str, name: str) -> None:
        self._dsn, self._name = dsn, name
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="pg-reader",
                                        daemon=True)
        self._thread.start()
        self._lock = threading.Lock()
        self._conn: asyncpg.Connection | None = None

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(COMMAND_TIMEOUT_S + 5)

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[Row]:
        if self._conn is None or self._conn.is_closed():
            self._conn = await connect(self._dsn, self._name)
        return [_row(r) for r in await self._conn.fetch(sql, *params)]

    def read(self, sql: str, params: Sequence[Any]) -> list[Row]:
        with self._lock:
            return list(self._call(self._fetch(sql, params)))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                with contextlib.suppress(Exception):
                    self._call(self._conn.close(timeout=5))
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()


class PgStore:
    """The ledger's PostgreSQL store: group-committing writer, async and sync reads."""

    def __init__(self, dsn: str, *, name: str = "paystream") -> None:
        self.dsn = dsn
        self.name = name
        self._queue: list[_Request] = []
        self._writer_task: asyncio.Task[None] | None = None
        #: Writer connections not in a transaction (None: to be made anew).
        self._free: asyncio.Queue[asyncpg.Connection | None] = asyncio.Queue()
        self._writers: list[asyncpg.Connection] = []
        #: Batches being committed.
        self._ending: set[asyncio.Future[None]] = set()
        self._pool: asyncpg.Pool | None = None
        self._closed = False
        self.commits = 0
        self.requests = 0
        self._reader = _Reader(dsn, name)
        # Refuse at once, before anything starts, a database not upgraded.
        try:
            self._reader._call(self._check())
        except BaseException:
            self._reader.close()
            raise

    async def _check(self) -> None:
        conn = await connect(self.dsn, self.name)
        try:
            await check_schema(conn)
        finally:
            await conn.close()

    async def start(self) -> None:
        """Open the writer connection and the read pool (call once, from the event loop)."""
        self._writers = [await connect(self.dsn, self.name) for _ in range(WRITERS)]
        for conn in self._writers:
            self._free.put_nowait(conn)
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=1, max_size=4, command_timeout=COMMAND_TIMEOUT_S,
            server_settings=_server_settings(self.name),
        )

    async def close(self) -> None:
        """Finish pending writes, then close every connection."""
        if self._closed:
            return
        self._closed = True
        if self._writer_task is not None:
            with contextlib.suppress(Exception):
                await self._writer_task
        if self._ending:
            await asyncio.gather(*self._ending, return_exceptions=True)
        while not self._free.empty():
            conn = self._free.get_nowait()
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=5)
        if self._pool is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._pool.close(), 10)
        await asyncio.to_thread(self._reader.close)

    # -- reads ------------------------------------------------------------------------

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Rows of ``sql`` (``?`` placeholders), synchronously (see the module docstring)."""
        return self._reader.read(translate(sql), tuple(params))

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Rows of ``sql`` (``?`` placeholders), from the pool."""
        if self._pool is None:
            return await asyncio.to_thread(self.read, sql, params)
        async with self._pool.acquire() as conn:
            return [_row(r) for r in await conn.fetch(translate(sql), *params)]

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run one statement in its own transaction (autocommit) outside the group commit.

        For what must not wait behind the payments' batch nor join it: the
        cluster's leases and take-overs (gateway/ledger/cluster.py).
        """
        assert self._pool is not None, "the store is not started"
        async with self._pool.acquire() as conn:
            return [_row(r) for r in await conn.fetch(translate(sql), *params)]

    # -- writes ----------------------------------------------------------------------

    async def write(self, ops: Iterable[Op]) -> list[int]:
        """Run ``ops`` atomically; return once committed (``synchronous_commit = on``).

        Raises the statement's error if it failed (then none of ``ops`` took
        effect); :class:`Fenced` if the fence refused it.
        """
        if self._closed or not self._writers:
            raise StoreClosed("the store is closed")
        request = _Request(list(ops), asyncio.get_running_loop().create_future())
        self._queue.append(request)
        if self._writer_task is None or self._writer_task.done():
            self._writer_task = asyncio.create_task(self._write_loop(), name="pg-writer")
        return await request.future

    async def _write_loop(self) -> None:
        """Batch after batch: the statements of one run while the last one commits."""
        # One yield first: writers woken in this loop iteration join the batch.
        await asyncio.sleep(0)
        while self._queue:
            conn = await self._free.get()  # a connection whose last commit ended
            if not self._queue:
                self._free.put_nowait(conn)
                break
            batch, self._queue = self._queue, []
            try:
                if conn is None or conn.is_closed():
                    conn = await connect(self.dsn, self.name)
                transaction = conn.transaction()
                await transaction.start()
            except Exception as exc:  # no connection: nothing is written, say so
                self._free.put_nowait(None)
                self._done(batch, [(request, exc) for request in batch])
                continue
            try:
                results = await self._execute(conn, batch)
            except BaseException as exc:
                task = asyncio.ensure_future(self._end(conn, transaction, batch, exc))
            else:
                task = asyncio.ensure_future(self._end(conn, transaction, batch, results))
            self._ending.add(task)
            task.add_done_callback(self._ending.discard)

    async def _end(
        self,
        conn: asyncpg.Connection,
        transaction: Any,
        batch: list[_Request],
        outcome: _Results | BaseException,
    ) -> None:
        """Commit (or roll back) one batch, resolve its waiters, free its connection.

        A batch whose every request failed is rolled back. If the connection
        or the commit fails, nothing of the batch is known durable: every
        waiter learns it, nothing paid is released, and the connection is
        made anew for a later batch.
        """
        results: _Results
        try:
            if isinstance(outcome, BaseException):
                raise outcome
            if all(isinstance(o, BaseException) for _, o in outcome):
                await transaction.rollback()
            else:
                await transaction.commit()
            results = outcome
        except BaseException as exc:  # the task's end: every waiter must hear of it
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)
            conn = None
            results = [(request, exc) for request in batch]
        self._free.put_nowait(conn)
        self._done(batch, results)

    def _done(self, batch: list[_Request], results: _Results) -> None:
        self.commits += 1
        self.requests += len(batch)
        for request, outcome in results:
            resolve(request.future, outcome)

    async def _execute(self, conn: asyncpg.Connection, batch: list[_Request]) -> _Results:
        """Every request in the open transaction: grouped at once, else one by one."""
        if len(batch) == 1:
            # Alone, it needs no savepoint: if it fails the transaction is
            # rolled back whole. Two round trips fewer per commit at low load.
            try:
                await _run_grouped(conn, batch)
            except (asyncpg.PostgresError, OverflowError, TypeError, ValueError) as exc:
                return [(batch[0], _error(exc))]
            return [(batch[0], [0] * len(batch[0].ops))]
        try:
            async with conn.transaction():  # a savepoint
                for run in _runs(batch):
                    await _run_grouped(conn, run)
            return [(request, [0] * len(request.ops)) for request in batch]
        except (asyncpg.PostgresError, OverflowError, TypeError, ValueError):
            pass  # rolled back to the savepoint: now one by one
        results: _Results = []
        for request in batch:
            try:
                async with conn.transaction():
                    for sql, params in request.ops:
                        await conn.execute(translate(sql), *_params(params))
                results.append((request, [0] * len(request.ops)))
            except (asyncpg.PostgresError, OverflowError, TypeError, ValueError) as exc:
                results.append((request, _error(exc)))
        return results


def _params(params: Sequence[Any] | dict[str, Any]) -> Sequence[Any]:
    if isinstance(params, dict):
        raise TypeError("the PostgreSQL store takes positional (?) parameters only")
    return params


def _runs(batch: list[_Request]) -> list[list[_Request]]:
    """Consecutive requests with the same statements (the same "shape")."""
    runs: list[list[_Request]] = []
    shape: tuple[str, ...] | None = None
    for request in batch:
        this = tuple(sql for sql, _ in request.ops)
        if runs and this == shape:
            runs[-1].append(request)
        else:
            runs.append([request])
            shape = this
    return runs


async def _run_grouped(conn: asyncpg.Connection, run: list[_Request]) -> None:
    if len(run) == 1:
        for sql, params in run[0].ops:
            await conn.execute(translate(sql), *_params(params))
        return
    for position, (sql, _) in enumerate(run[0].ops):
        await conn.executemany(translate(sql), [_params(r.ops[position][1]) for r in run])


def _error(exc: BaseException) -> BaseException:
    if getattr(exc, "sqlstate", None) == FENCE_SQLSTATE:
        return Fenced(str(getattr(exc, "message", exc)))
    return exc


# -- for `gateway bench --store` -------------------------------------------------------


async def scratch_database(dsn: str, name: str) -> str:
    """Create database ``name`` on ``dsn``'s server (a bench run's own); its URL."""
    from urllib.parse import urlsplit, urlunsplit

    conn = await connect(dsn, "paystream-bench")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{name}"))


async def drop_database(dsn: str, name: str) -> None:
    """Drop a bench run's database (``WITH (FORCE)``: its hosts are gone)."""
    conn = await connect(dsn, "paystream-bench")
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def backend_pids(dsn: str, prefix: str) -> list[int]:
    """PIDs of the server processes serving connections named ``prefix…`` (bench CPU)."""
    conn = await connect(dsn, "paystream-bench")
    try:
        rows = await conn.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name LIKE $1", prefix + "%"
        )
    finally:
        await conn.close()
    return [int(r["pid"]) for r in rows]
