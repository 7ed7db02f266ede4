"""The store's single writer: group commit, isolation of failing requests,
durability across a reopen (a real SQLite file)."""

import asyncio
import sqlite3

import pytest

from gateway.store import Store, StoreClosed


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


async def test_settings_are_wal_and_full_sync(tmp_path):
    store = Store(tmp_path / "s.db")
    await store.start()
    assert store.read("PRAGMA journal_mode")[0][0] == "wal"
    assert store.read("PRAGMA synchronous")[0][0] == 2  # FULL
    await store.close()
