"""The store's single writer: group commit, isolation of failing requests,
durability across a reopen (a real SQLite file)."""

import asyncio
import sqlite3

import pytest

from gateway.ledger.store import PAGE_SIZE, Store, StoreClosed


def _insert(kind="cltv", state="open"):
    return ("INSERT INTO channels(kind, state) VALUES (?, ?)", (kind, state))


async def test_many_writers_share_commits_and_all_land(tmp_path):
    store = Store(tmp_path / "s.db")
    await store.start()
    results = await asyncio.gather(*(store.write([_insert()]) for _ in range(200)))
    assert sorted(r[0] for r in results) == list(range(1, 201))
    assert store.requests == 200
    assert store.commits < 200  # group commit: concurrent writers shared fsyncs
    await store.close()
    reopened = Store(tmp_path / "s.db")
    assert reopened.read("SELECT count(*) FROM channels")[0][0] == 200
    await reopened.start()
    await reopened.close()


async def test_a_failing_request_fails_alone_and_changes_nothing(tmp_path):
    store = Store(tmp_path / "s.db")
    await store.start()
    bad = [_insert(), ("INSERT INTO channels(kind) VALUES (NULL)", ())]  # NOT NULL
    good = store.write([_insert()])
    failing = store.write(bad)
    (rowid,), outcome = await asyncio.gather(good, failing, return_exceptions=True)
    assert isinstance(outcome, sqlite3.IntegrityError)
    rows = store.read("SELECT id FROM channels")
    assert [r["id"] for r in rows] == [rowid]  # the first op of the bad request rolled back
    # Alone in its batch, the same request fails the same way, and the store goes on.
    with pytest.raises(sqlite3.IntegrityError):
        await store.write(bad)
    assert [r["id"] for r in store.read("SELECT id FROM channels")] == [rowid]
    (after,) = await store.write([_insert()])
    assert after > rowid
    await store.close()
    with pytest.raises(StoreClosed):
        await store.write([_insert()])


async def test_a_request_failing_outside_sqlite_fails_alone_and_frees_the_lock(tmp_path):
    """Not only sqlite3 errors: an int beyond 64 bits raises OverflowError while
    binding. It once escaped the batch and left the write lock held for good."""
    store, other = Store(tmp_path / "s.db"), Store(tmp_path / "s.db")
    await store.start()
    await other.start()
    huge = [("INSERT INTO channels(kind, state, value) VALUES ('cltv', 'open', ?)", (2**70,))]
    for requests in ([huge], [huge, [_insert()]]):  # alone, and beside a good request
        outcomes = await asyncio.wait_for(
            asyncio.gather(*(store.write(r) for r in requests), return_exceptions=True), 5
        )
        assert isinstance(outcomes[0], OverflowError)
        assert all(isinstance(o, list) for o in outcomes[1:])
    # The lock file is free: another worker's store writes, and so does this one.
    await asyncio.wait_for(other.write([_insert()]), 5)
    await asyncio.wait_for(store.write([_insert()]), 5)
    assert store.read("SELECT count(*) FROM channels WHERE value IS NOT NULL")[0][0] == 0
    assert store.read("SELECT count(*) FROM channels")[0][0] == 3
    await store.close()
    await other.close()


async def test_settings_are_wal_and_full_sync(tmp_path):
    store = Store(tmp_path / "s.db")
    await store.start()
    assert store.read("PRAGMA journal_mode")[0][0] == "wal"
    assert store.read("PRAGMA synchronous")[0][0] == 2  # FULL
    assert store.read("PRAGMA page_size")[0][0] == PAGE_SIZE == 2048
    await store.close()


async def test_a_store_made_with_another_page_size_keeps_it_and_works(tmp_path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.execute("PRAGMA journal_mode=WAL")  # made before PAGE_SIZE: SQLite's 4 KiB
    old.close()
    store = Store(path)
    await store.start()
    await store.write([_insert()])
    assert store.read("PRAGMA page_size")[0][0] == 4096
    assert store.read("SELECT count(*) FROM channels")[0][0] == 1
    await store.close()


async def test_another_writer_s_lock_is_waited_for_beside_the_loop(tmp_path):
    """A gateway worker (``--workers``) finds another worker's write lock held."""
    path = tmp_path / "s.db"
    store = Store(path)
    await store.start()
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    other.execute("INSERT INTO channels(kind, state) VALUES ('cltv', 'other')")
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.01)

    ticker = asyncio.create_task(tick())
    writes = asyncio.gather(*(store.write([_insert()]) for _ in range(20)))
    await asyncio.sleep(0.3)
    assert not writes.done()
    assert ticks >= 15  # the loop ran on while the writes waited for the lock
    other.execute("COMMIT")
    results = await asyncio.wait_for(writes, 10)
    ticker.cancel()
    assert len({r[0] for r in results}) == 20
    states = [r["state"] for r in store.read("SELECT state FROM channels ORDER BY id")]
    assert states == ["other"] + ["open"] * 20
    # A failing request that waited for the lock still fails alone.
    other.execute("BEGIN IMMEDIATE")
    good = asyncio.ensure_future(store.write([_insert()]))
    bad = asyncio.ensure_future(store.write([("INSERT INTO channels(kind) VALUES (NULL)", ())]))
    await asyncio.sleep(0.05)
    assert not good.done()
    other.execute("COMMIT")
    (rowid,), outcome = await asyncio.gather(good, bad, return_exceptions=True)
    assert isinstance(outcome, sqlite3.IntegrityError) and rowid == 22
    other.close()
    await store.close()


async def test_two_stores_on_one_file_take_turns_on_the_lock_file(tmp_path):
    """Two gateway workers' stores (``--workers``): writers take turns on
    ``gateway.db.lock``, whose release wakes a waiter at once (SQLite's busy
    handler polls with sleeps of up to 100 ms instead)."""
    import fcntl
    import os

    first, second = Store(tmp_path / "s.db"), Store(tmp_path / "s.db")
    await first.start()
    await second.start()
    stores = (first, second)
    rowids = await asyncio.gather(*(s.write([_insert()]) for _ in range(100) for s in stores))
    assert sorted(r[0] for r in rowids) == list(range(1, 201))
    assert first.commits + second.commits < 200  # each still group-commits

    # A worker in the middle of its commit holds the lock file: the write waits
    # for it although SQLite's own lock is free, then goes through.
    fd = os.open(tmp_path / "s.db.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    pending = asyncio.ensure_future(first.write([_insert()]))
    await asyncio.sleep(0.2)
    assert not pending.done()
    fcntl.flock(fd, fcntl.LOCK_UN)
    assert await asyncio.wait_for(pending, 5) == [201]
    os.close(fd)
    await first.close()
    await second.close()


async def test_the_wal_is_checkpointed_beside_the_commits(tmp_path, monkeypatch):
    """No commit copies the WAL into the database (that stalled every writer);
    the store's own checkpointer does, within a few seconds."""
    import gateway.ledger.store

    monkeypatch.setattr(gateway.ledger.store, "CHECKPOINT_INTERVAL_S", 2.0)  # after the writes
    store = Store(tmp_path / "s.db")
    await store.start()
    db = tmp_path / "s.db"
    before = db.stat().st_size
    big = "x" * 2000
    for _ in range(20):  # well past SQLite's automatic 1,000-page checkpoint
        await store.write(
            [("INSERT INTO channels(kind, state, refund_tx) VALUES ('cltv', 'open', ?)", (big,))]
            * 200
        )
    assert db.stat().st_size == before  # every page is still in the WAL only
    for _ in range(200):
        if db.stat().st_size > before + 4_000_000:
            break
        await asyncio.sleep(0.05)
    assert db.stat().st_size > before + 4_000_000
    assert store.read("SELECT count(*) FROM channels")[0][0] == 4000
    await store.close()
