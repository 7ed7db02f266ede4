"""The PostgreSQL store (gateway/ledger/pg_store.py) against a real PostgreSQL.

Group commit, a failing request failing alone, the fence refusing a write
of a channel another host took over, schema versions, ids from a sequence.
"""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from gateway.ledger import Cluster, Fenced, PgStore, SchemaError, upgrade
from gateway.ledger.pg_store import migrations, translate


def test_placeholders_are_translated_outside_literals():
    assert translate("SELECT ? WHERE a = '?' AND b = ?") == "SELECT $1 WHERE a = '?' AND b = $2"


async def test_a_database_not_upgraded_is_refused_then_upgrade_is_idempotent(pg_dsn):
    with pytest.raises(SchemaError, match="gateway db upgrade"):
        PgStore(pg_dsn)
    assert await upgrade(pg_dsn) == [name for _, name, _ in migrations()]
    assert await upgrade(pg_dsn) == []
    store = PgStore(pg_dsn)
    await store.start()
    await store.close()


def _insert(row_id: int, state: str = "ready") -> tuple[str, tuple]:
    return (
        "INSERT INTO channels(id, kind, state, seq, balance) VALUES (?, 'cltv', ?, 0, 1000)",
        (row_id, state),
    )


async def test_group_commit_shares_commits_and_a_bad_request_fails_alone(pg_dsn):
    await upgrade(pg_dsn)
    store = PgStore(pg_dsn)
    await store.start()
    try:
        await store.write([_insert(i) for i in range(1, 201)])
        pays = [
            [("UPDATE channels SET seq = ?, balance = ? WHERE id = ?", (1, 900, i)),
             ("INSERT INTO deliveries(channel, media, publisher, delivered_ms, bill) "
              "VALUES (?, 'clip', 'studio', ?, ?) ON CONFLICT(channel, media) DO UPDATE SET "
              "delivered_ms = excluded.delivered_ms, bill = excluded.bill", (i, 1000, 5))]
            for i in range(1, 201)
        ]
        bad = [_insert(1)]  # a duplicate id
        commits = store.commits
        results = await asyncio.gather(
            *(store.write(p) for p in pays[:100]), store.write(bad),
            *(store.write(p) for p in pays[100:]), return_exceptions=True,
        )
        assert isinstance(results[100], asyncpg.UniqueViolationError)
        assert all(r == [0, 0] for i, r in enumerate(results) if i != 100)
        assert store.commits - commits < 20  # shared, not one commit per write
        rows = store.read("SELECT COUNT(*) AS n, SUM(balance) AS b FROM channels WHERE seq = ?",
                          (1,))
        assert rows == [{"n": 200, "b": 200 * 900}]
        assert (await store.fetch("SELECT COUNT(*) AS n FROM deliveries"))[0]["n"] == 200
    finally:
        await store.close()


async def test_the_fence_refuses_a_write_after_a_take_over(pg_dsn):
    """Host A holds channel 7 at epoch 1; host B takes it (A's lease ran out): A's
    next write is refused whole, B's goes through, and ids never repeat."""
    await upgrade(pg_dsn)
    stores = [PgStore(pg_dsn), PgStore(pg_dsn)]
    for store in stores:
        await store.start()
    a, b = (Cluster(s, h, lease_s=1) for s, h in zip(stores, ("host-a", "host-b"), strict=True))
    try:
        await a.register()
        await b.register()
        await stores[0].write([_insert(7), a.claim_op(7)])
        pay = ("UPDATE channels SET seq = ?, balance = ? WHERE id = ?", (1, 900, 7))
        await stores[0].write([a.fence_op(7, 1), pay])
        assert await b.take(7, 1) is None  # A's lease runs: no taking without asking
        await stores[0].execute("UPDATE hosts SET alive_until = 0 WHERE host = 'host-a'")
        assert await b.take(7, 1) == 2
        stale = ("UPDATE channels SET seq = ?, balance = ? WHERE id = ?", (2, 100, 7))
        with pytest.raises(Fenced, match="taken over"):
            await stores[0].write([a.fence_op(7, 1), stale])
        await stores[1].write([b.fence_op(7, 2),
                               ("UPDATE channels SET seq = ?, balance = ? WHERE id = ?",
                                (2, 800, 7))])
        (row,) = stores[1].read("SELECT seq, balance, holder, epoch FROM channels WHERE id = 7")
        assert row == {"seq": 2, "balance": 800, "holder": "host-b", "epoch": 2}
        ids = await asyncio.gather(*(c.next_index() for c in (a, b) for _ in range(40)))
        assert len(set(ids)) == 80
    finally:
        for store in stores:
            await store.close()


def test_gateway_db_upgrade_and_channels_on_a_postgresql_store(pg_dsn, capsys, tmp_path):
    from gateway.cli import main

    assert main(["channels", "--store", pg_dsn, "--datadir", str(tmp_path)]) == 1
    assert "gateway db upgrade" in capsys.readouterr().err
    assert main(["db", "upgrade", "--store", pg_dsn, "--datadir", str(tmp_path)]) == 0
    assert "0001_schema" in capsys.readouterr().out
    assert main(["db", "upgrade", "--store", pg_dsn, "--datadir", str(tmp_path)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["channels", "--json", "--store", pg_dsn, "--datadir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == "[]"
    assert main(["db", "upgrade", "--datadir", str(tmp_path)]) == 1
    assert "needs --store" in capsys.readouterr().err


async def test_unfunded_channels_are_found_by_their_script_and_expire(pg_dsn, tmp_path):
    """Migration 0002: the lookup and the expiry of unfunded channels (issue 14,
    item 2) work on the shared ledger as on SQLite."""
    import time

    from gateway.keys import MasterKey
    from gateway.ledger import Ledger, Reports

    await upgrade(pg_dsn)
    store = PgStore(pg_dsn)
    await store.start()
    try:
        now = time.time()
        insert = (
            "INSERT INTO channels(id, kind, state, created_at, funding_script) "
            "VALUES (?, 'cltv', 'open', ?, ?)"
        )
        await store.write([(insert, (1, now - 3600, "aa")), (insert, (2, now, "bb"))])
        reports = Reports(store)
        assert reports.unfunded_channel(bytes.fromhex("aa"))["id"] == 1  # type: ignore[index]
        ledger = Ledger(store, MasterKey.load_or_create(tmp_path / "m.key"), publisher_of=dict)
        await ledger.expire_unfunded(now - 60)
        assert reports.unfunded_channel(bytes.fromhex("aa")) is None  # abandoned
        assert reports.unfunded_channel(bytes.fromhex("bb"))["id"] == 2  # type: ignore[index]
    finally:
        await store.close()
