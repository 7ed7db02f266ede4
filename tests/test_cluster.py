"""Two gateway hosts on one PostgreSQL ledger, in this process (must-hold 1 and the fence).

Real parts: a real PostgreSQL (conftest_pg), one embedded regtest node both
hosts reach over JSON-RPC (``rpc_url``), real sockets on 127.0.0.1, real
viewers paying real increments. The process-level tests (SIGKILL, SIGSTOP)
are in test_cluster_hosts.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest_gateway import Viewer, gateway_config, resume, ws_url
from helpers_cluster import check_settled_once, ledger_rows

from gateway.keys import MasterKey
from gateway.ledger import upgrade
from gateway.protocol.errors import ErrorCode
from gateway.protocol.messages import Closed, Error
from gateway.server import Gateway, GatewayStartError


@pytest.fixture
async def hosts(tmp_path: Path, media_copy: Path, node: Any, pg_dsn: str) -> AsyncIterator[Any]:
    """Start gateway hosts named as asked, sharing ``pg_dsn``, the node and one master key."""
    await upgrade(pg_dsn)
    key = tmp_path / "master.key"
    MasterKey.load_or_create(key)
    started: list[Gateway] = []

    async def start(name: str, **overrides: Any) -> Gateway:
        config = gateway_config(tmp_path / name, media_copy, resume_grace_s=60)
        config.rpc_url, config.rpc_cookie = node.rpc_url, node.cookie_path
        config.store, config.master_key, config.host_id, config.lease_s = pg_dsn, key, name, 2
        for field, value in overrides.items():
            setattr(config, field, value)
        gw = Gateway(config)
        await gw.start()
        started.append(gw)
        return gw

    try:
        yield start
    finally:
        for gw in reversed(started):
            await gw.stop()


async def mine(rpc: Any, n: int = 1) -> None:
    await rpc.call("generatetoaddress", n, await rpc.call("getnewaddress"))


async def test_a_viewer_resumes_on_another_host_and_the_channel_settles_once(
    hosts, node, rpc, pg_dsn
):
    a = await hosts("host-a")
    b = await hosts("host-b")
    first = Viewer(ws_url(a), rpc)
    await first.connect()
    await first.open_and_fund()
    await first.play_and_pay("clip", chunks=6)
    paid_before = first.channel.paid
    assert paid_before > 0

    second = Viewer(ws_url(b), rpc)
    await second.connect()
    assert (await resume(second, first)).paid == paid_before
    replaced = await first.expect(Error)
    assert replaced.code == ErrorCode.SESSION_REPLACED.value
    (row,) = ledger_rows(pg_dsn)
    assert row["holder"] == "host-b" and row["epoch"] == 2

    # Host B bills on from the stored meter: the free allowance is used up.
    stream = await second.play_and_pay("clip")
    assert stream.free_used_ms == stream.free_ms
    assert second.channel.paid > paid_before
    closed = await second.close_channel()
    assert closed.paid == second.channel.paid and closed.txid is not None
    await mine(rpc)
    for _ in range(100):
        (row,) = ledger_rows(pg_dsn)
        if row["state"] == "closed":
            break
        await asyncio.sleep(0.1)
    assert row["value"] - row["balance"] == second.channel.paid
    await check_settled_once(rpc, [row])
    # Host A never settled it: one batch in the ledger, stored by host B.
    assert len(ledger_rows(pg_dsn, "SELECT * FROM settlements")) == 1
    health = await b.health()
    assert health["host"] == "host-b"


async def test_a_host_with_another_master_key_is_refused(hosts, tmp_path):
    await hosts("host-a")
    other = tmp_path / "other.key"
    MasterKey.load_or_create(other)
    with pytest.raises(GatewayStartError, match="master key"):
        await hosts("host-b", master_key=other)


async def test_a_paused_holders_write_is_refused_by_the_fence_and_the_meter_stays(
    hosts, node, rpc, pg_dsn
):
    """Host A's lease runs out (its renewals stopped, as when SIGSTOPped); host B
    takes the channel on resume; A's next write (a pay its viewer sent it) is
    refused by the fence, changes nothing, and A's viewer hears session_replaced."""
    a = await hosts("host-a")
    b = await hosts("host-b")
    first = Viewer(ws_url(a), rpc)
    await first.connect()
    await first.open_and_fund()
    await first.play_and_pay("clip", chunks=5)
    a.cluster._loop_task.cancel()  # A goes quiet: its lease is not renewed
    live_a = next(iter(a.channels.values()))
    await asyncio.sleep(2.5)  # past the 2 s lease

    second = Viewer(ws_url(b), rpc)
    await second.connect()
    paid = first.channel.paid
    assert (await resume(second, first)).paid == paid  # taken without asking A
    await second.play_and_pay("clip", chunks=2)
    (before,) = ledger_rows(pg_dsn)
    assert before["holder"] == "host-b" and before["epoch"] == 2

    # A still has the channel in memory at epoch 1: its write is refused whole.
    from gateway.ledger import Fenced

    live_a.meter.bill += 10**9  # what A would write if it could
    with pytest.raises(Fenced, match="taken over"):
        await a.ledger.meter_flushed(live_a, 0.0)
    (after,) = ledger_rows(pg_dsn)
    assert after == before  # not a column moved: seq, balance, bill, deliveries' owner
    assert live_a.channel_id not in a.channels
    closed = await second.close_channel()
    assert closed.paid == second.channel.paid


async def test_the_leader_adopts_and_settles_the_channels_of_a_dead_host(
    hosts, node, rpc, pg_dsn
):
    """Host A dies with a channel whose viewer left (no resume comes); once A's
    lease ran out the leader, B, adopts it and settles it after the resume grace."""
    a = await hosts("host-a")
    b = await hosts("host-b")
    viewer = Viewer(ws_url(a), rpc)
    await viewer.connect()
    await viewer.open_and_fund()
    await viewer.play_and_pay("clip", chunks=6)
    await viewer.disconnect()
    # A dies: its duties stop, its lease is no longer renewed, and its
    # connections drop (the leader's lock, if A had it, goes with its own).
    a.cluster._loop_task.cancel()
    await a.settler.stop()
    for conn in (a.cluster._leader_conn, a.cluster._listener):
        if conn is not None:
            await conn.close()
    b.settler.settings = dataclasses.replace(b.settler.settings, resume_grace_s=1)
    for _ in range(200):
        rows = ledger_rows(pg_dsn)
        if rows[0]["holder"] == "host-b" and rows[0]["state"] == "closing":
            break
        await asyncio.sleep(0.1)
    assert rows[0]["holder"] == "host-b", rows[0]
    await mine(rpc)
    for _ in range(100):
        (row,) = ledger_rows(pg_dsn)
        if row["state"] == "closed":
            break
        await mine(rpc)
        await asyncio.sleep(0.2)
    assert row["value"] - row["balance"] == viewer.channel.paid
    await check_settled_once(rpc, [row])


async def test_settle_and_health_on_one_host_cover_the_cluster(hosts, node, rpc, pg_dsn):
    """The operator's settle asked of host A settles a channel host B holds;
    A's health counts B's sessions and names both hosts."""
    a = await hosts("host-a")
    b = await hosts("host-b")
    viewer = Viewer(ws_url(b), rpc)
    await viewer.connect()
    await viewer.open_and_fund()
    await viewer.play_and_pay("clip", chunks=6)
    health = await a.health()
    assert [h["host"] for h in health["hosts"]] == ["host-a", "host-b"]
    assert health["channels"] == 1 and health["sessions"] == 1
    answers = await a.everywhere("settle", whole=True, channel=None)
    settled = [item for answer in answers if answer for item in answer]
    assert [s["channel_id"] for s in settled] == [viewer.channel.outpoint.channel_id]
    assert settled[0]["paid"] == viewer.channel.paid and settled[0]["txid"]
    closed = await viewer.expect(Closed)
    assert closed.txid == settled[0]["txid"]
