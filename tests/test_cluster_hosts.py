"""Gateway hosts as real processes on one PostgreSQL ledger and one chain.

Each host is ``gateway serve`` with its own data dir and port, the shared
``--store postgresql://…``, the same ``--master-key`` and ``--rpc-url`` of one
node (run by this test, in a thread). Viewers are real WebSocket clients;
hosts die by SIGKILL and pause by SIGSTOP. Must-holds 1 to 3 of issue 17.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from conftest_gateway import Viewer, resume
from helpers_cluster import Host, check_settled_once, ledger_rows

from gateway.keys import MasterKey
from gateway.ledger import upgrade
from gateway.protocol.errors import ErrorCode
from gateway.protocol.messages import Due, Error, Paid

pytestmark = pytest.mark.slow


@pytest.fixture
async def cluster(
    tmp_path: Path, media_copy: Path, node: Any, pg_dsn: str
) -> AsyncIterator[Any]:
    """Start hosts by name: ``await cluster("a")``; all are stopped at teardown."""
    await upgrade(pg_dsn)
    key = tmp_path / "master.key"
    MasterKey.load_or_create(key)
    hosts: list[Host] = []

    async def start(name: str, **options: Any) -> Host:
        host = Host(tmp_path, name, media_copy, dsn=pg_dsn, node=node, key=key, **options)
        await host.start()
        hosts.append(host)
        return host

    try:
        yield start
    finally:
        for host in hosts:
            host.stop()


async def mine(rpc: Any) -> None:
    await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))


async def settled(rpc: Any, dsn: str, count: int, timeout: float = 60) -> list[dict]:
    """Mine until every funded channel is closed; the rows."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await asyncio.to_thread(ledger_rows, dsn)
        if len(rows) == count and all(r["state"] == "closed" for r in rows):
            return rows
        assert time.monotonic() < deadline, [(r["id"], r["state"]) for r in rows]
        await mine(rpc)
        await asyncio.sleep(0.5)


async def test_two_hosts_a_viewer_moves_from_a_to_b_and_settles_once(cluster, rpc, pg_dsn):
    """Must-hold 1: open and pay on A, resume and pay on B; A says session_replaced."""
    a, b = await cluster("a"), await cluster("b")
    first = Viewer(a.ws, rpc)
    await first.connect()
    await first.open_and_fund()
    await first.play_and_pay("clip", chunks=5)
    paid = first.channel.paid
    second = Viewer(b.ws, rpc)
    await second.connect()
    assert (await resume(second, first)).paid == paid
    assert (await first.expect(Error)).code == ErrorCode.SESSION_REPLACED.value
    await second.play_and_pay("clip", chunks=4)
    assert second.channel.paid > paid
    closed = await second.close_channel()
    assert closed.paid == second.channel.paid and closed.txid is not None
    (row,) = await settled(rpc, pg_dsn, 1)
    assert row["value"] - row["balance"] == second.channel.paid
    assert row["holder"] == "b"
    await check_settled_once(rpc, [row])
    assert "handed to host b" in a.log


async def _paying(url: str, rpc: Any, chunks: int) -> Viewer:
    viewer = Viewer(url, rpc, budget=40_000)
    await viewer.connect()
    await viewer.open_and_fund(value=30_000)
    await viewer.play_and_pay("clip", chunks=chunks)
    return viewer


async def test_sigkill_of_the_holder_of_100_paying_channels_loses_nothing(cluster, rpc, pg_dsn):
    """Must-hold 2: host A holds 100 paying channels and dies by SIGKILL; every
    viewer resumes on B (once A's lease ran out), pays on and closes; each
    channel settles exactly once, paying its client exactly its last balance."""
    a, b = await cluster("a"), await cluster("b")
    viewers: list[Viewer] = []
    for _ in range(5):
        viewers += await asyncio.gather(*(_paying(a.ws, rpc, 4) for _ in range(20)))
        await mine(rpc)  # keep the faucet's unconfirmed chain short
    paid = [v.channel.paid for v in viewers]
    assert all(p > 0 for p in paid)
    a.signal(signal.SIGKILL)
    a.proc.wait()

    async def move(old: Viewer) -> Viewer:
        new = Viewer(b.ws, rpc)
        await new.connect()
        ready = await resume(new, old, timeout=30)
        assert ready.paid == old.channel.paid  # nothing paid on A is lost
        await new.play_and_pay("clip", chunks=2)
        await new.close_channel()
        return new

    moved = []
    for start in range(0, 100, 25):
        moved += await asyncio.gather(*(move(v) for v in viewers[start : start + 25]))
    rows = await settled(rpc, pg_dsn, 100, timeout=120)
    by_id = {r["channel_id"]: r for r in rows}
    for new in moved:
        row = by_id[new.channel.outpoint.channel_id]
        assert row["value"] - row["balance"] == new.channel.paid
    await check_settled_once(rpc, rows)


async def test_a_paused_holder_cannot_write_after_another_host_took_over(cluster, rpc, pg_dsn):
    """Must-hold 3: A is SIGSTOPped longer than its lease while its viewer's pay
    waits in its socket; B takes the channel on resume and is paid on; after
    SIGCONT, A's write of that pay is refused (the fence, or first the lease
    check drops the channel), A's viewer hears session_replaced, and the
    ledger keeps B's meter and balance; the settlement pays B's last balance."""
    a, b = await cluster("a", lease_s=2.0), await cluster("b", lease_s=2.0)
    first = Viewer(a.ws, rpc)
    await first.connect()
    await first.open_and_fund()
    await first.play_and_pay("clip", chunks=4)
    due = await first.expect(Due)  # the next chunk's due: paid while A is stopped
    a.signal(signal.SIGSTOP)
    await first.send(first.channel.pay_due(due))
    await asyncio.sleep(3.0)  # past A's lease
    second = Viewer(b.ws, rpc)
    await second.connect()
    await resume(second, first, timeout=30)
    await second.play_and_pay("clip", chunks=3)
    (held_by_b,) = await asyncio.to_thread(ledger_rows, pg_dsn)
    assert held_by_b["holder"] == "b" and held_by_b["epoch"] == 2

    a.signal(signal.SIGCONT)
    while True:  # A's viewer: whatever A still says, then session_replaced
        msg = await first.recv(timeout=20)
        if isinstance(msg, Error):
            assert msg.code == ErrorCode.SESSION_REPLACED.value, msg
            break
        assert not isinstance(msg, Paid), "A acknowledged a pay it could not record"
    await asyncio.sleep(1.0)
    (after,) = await asyncio.to_thread(ledger_rows, pg_dsn)
    assert after == held_by_b  # A wrote nothing: seq, balance, bill, holder, epoch
    assert "refused: another gateway holds the channel" in a.log or (
        "taken over by another host" in a.log
    )
    closed = await second.close_channel()
    (row,) = await settled(rpc, pg_dsn, 1)
    assert row["value"] - row["balance"] == closed.paid == second.channel.paid
    await check_settled_once(rpc, [row])
