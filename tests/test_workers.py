"""``gateway serve --workers N``: worker processes on one port and one store.

Real parts throughout: the supervisor runs in the test's loop with its
embedded node; the workers are real processes accepting on the shared
socket; viewers are real WebSocket clients paying real increments.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import coincurve
import pytest
from conftest_gateway import Viewer, gateway_config, resume

from gateway.chain.rpc import RpcClient
from gateway.handover import WorkerRole
from gateway.protocol.channel import resume_digest
from gateway.protocol.errors import ErrorCode
from gateway.protocol.messages import Closed, Error, Resume
from gateway.protocol.signatures import sign_digest
from gateway.workers import Supervisor


def test_each_worker_allocates_its_own_residue_of_channel_ids():
    roles = [WorkerRole(index=i, count=3, link=None) for i in range(3)]  # type: ignore[arg-type]
    firsts = [role.first_id_above(10) for role in roles]
    assert firsts == [12, 13, 11]
    assert all(f % 3 == i and f > 10 for i, f in enumerate(firsts))
    moved = WorkerRole(index=1, count=3, link=None, extra={6}, away={4})  # type: ignore[arg-type]
    assert [i for i in range(1, 11) if moved.holds_at_start(i)] == [1, 6, 7, 10]


@pytest.fixture
async def supervisor(tmp_path: Path, media_copy: Path) -> AsyncIterator[Supervisor]:
    """Two workers and the supervisor's embedded node; a long resume grace."""
    config = gateway_config(tmp_path, media_copy, resume_grace_s=60)
    config.workers = 2
    sup = Supervisor(config)
    await sup.start()
    try:
        yield sup
    finally:
        await sup.stop()


def _rpc(sup: Supervisor) -> RpcClient:
    return RpcClient(sup.node.rpc_url, cookie_path=sup.node.cookie_path)


def worker_of(viewer: Viewer) -> int:
    """Which worker accepted the viewer's connection (``X-Paystream-Worker``)."""
    return int(viewer.ws.response.headers["X-Paystream-Worker"])


async def connect_on(url: str, rpc: RpcClient, worker: int) -> Viewer:
    """A viewer whose connection the kernel gave to ``worker`` (reconnect until so)."""
    for _ in range(200):
        viewer = Viewer(url, rpc)
        await viewer.connect()
        if worker_of(viewer) == worker:
            return viewer
        await viewer.disconnect()
    raise AssertionError(f"no connection landed on worker {worker}")


def _rows(sup: Supervisor) -> list[sqlite3.Row]:
    conn = sqlite3.connect(sup.datadir / "gateway.db")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM channels WHERE channel_id IS NOT NULL").fetchall()
    finally:
        conn.close()


async def paying_viewer(
    sup: Supervisor, worker: int, chunks: int
) -> tuple[str, RpcClient, Viewer]:
    """A viewer on ``worker`` with a funded channel and ``chunks`` chunks paid for."""
    url = f"ws://127.0.0.1:{sup.port}/paystream/2"
    rpc = _rpc(sup)
    viewer = await connect_on(url, rpc, worker)
    await viewer.open_and_fund()
    await viewer.play_and_pay("clip", chunks=chunks)
    return url, rpc, viewer


async def test_a_resume_on_another_worker_takes_the_channel_over(supervisor):
    sup = supervisor
    url, rpc, first = await paying_viewer(sup, 0, chunks=6)
    channel = first.channel
    paid_before = channel.paid
    assert paid_before > 0
    (row,) = _rows(sup)
    assert row["id"] % 2 == 0  # worker 0 allocates even ids (K2's BIP32 index)

    # A bad proof on the other worker does not take the channel from its session.
    thief = await connect_on(url, rpc, 1)
    cid = channel.outpoint.channel_id
    wrong_key = coincurve.PrivateKey().secret
    await thief.send(
        Resume(channel_id=cid, proof=sign_digest(wrong_key, resume_digest(cid, thief.hello.nonce)))
    )
    assert (await thief.expect(Error)).code == ErrorCode.BAD_SIGNATURE.value

    second = await connect_on(url, rpc, 1)
    assert (await resume(second, first)).paid == paid_before
    replaced = await first.expect(Error)
    assert replaced.code == ErrorCode.SESSION_REPLACED.value

    # The new holder bills on from the stored meter: the free allowance is used up.
    stream = await second.play_and_pay("clip")
    assert stream.free_used_ms == stream.free_ms
    assert channel.paid > paid_before
    closed = await second.close_channel()
    assert closed.paid == channel.paid and closed.txid is not None
    (row,) = _rows(sup)
    assert row["settle_txid"] == closed.txid
    assert row["value"] - row["balance"] == channel.paid
    assert sup._turns == {}  # nothing kept per channel once its hand-over ended
    await rpc.close()


async def test_an_old_client_that_stopped_reading_does_not_hold_up_the_hand_over(supervisor):
    """The old session's goodbye (error, close handshake) is not awaited by the
    release: its close alone would wait out websockets' 10 s close timeout."""
    sup = supervisor
    url, rpc, first = await paying_viewer(sup, 0, chunks=4)
    first.ws.transport.pause_reading()  # gone quiet: never answers the close
    second = await connect_on(url, rpc, 1)
    assert (await resume(second, first, timeout=5)).paid == first.channel.paid
    closed = await second.close_channel()
    assert closed.paid == second.channel.paid and closed.txid is not None
    await rpc.close()


async def test_a_killed_worker_is_started_again_and_nothing_paid_is_lost(supervisor):
    sup = supervisor
    url, rpc, viewer = await paying_viewer(sup, 1, chunks=5)
    channel = viewer.channel
    paid = channel.paid
    old_pid = sup._procs[1].pid
    os.kill(old_pid, signal.SIGKILL)  # mid-session: no clean-up at all
    for _ in range(200):
        proc = sup._procs.get(1)
        if proc is not None and proc.pid != old_pid and sup._ready[1].done():
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("worker 1 was not started again")

    # Whichever worker the resume lands on, the channel continues where it was.
    again = Viewer(url, rpc)
    await again.connect()
    assert (await resume(again, viewer)).paid == paid
    await again.play_and_pay("clip", chunks=2)
    closed = await again.close_channel()
    assert closed.paid == channel.paid > paid and closed.txid is not None
    await rpc.close()


async def test_operator_settlement_waits_for_a_restarting_holder(supervisor):
    """Settling a channel whose holder was just killed waits for its restart
    instead of answering "no live channel" (404)."""
    sup = supervisor
    _, rpc, viewer = await paying_viewer(sup, 1, chunks=8)  # past the free minute
    cid = viewer.channel.outpoint.channel_id
    await viewer.disconnect()
    os.kill(sup._procs[1].pid, signal.SIGKILL)
    while 1 in sup._links:  # the supervisor has seen it die
        await asyncio.sleep(0.01)
    status, answer = await asyncio.to_thread(_admin_settle, sup, cid)
    assert status == 200
    (settled,) = answer["settled"]
    assert settled["channel_id"] == cid and settled["paid"] == viewer.channel.paid > 0
    assert settled["txid"] is not None
    await rpc.close()


async def test_operator_settlement_says_which_worker_is_down(supervisor, monkeypatch):
    """A holder that does not come back in time: 503 naming it, and nothing settled."""
    import gateway.workers

    sup = supervisor
    _, rpc, viewer = await paying_viewer(sup, 1, chunks=3)
    cid = viewer.channel.outpoint.channel_id
    monkeypatch.setattr(gateway.workers, "WHOLE_WAIT_S", 0.2)
    sup.stopping = True  # no restart: worker 1 stays down
    os.kill(sup._procs[1].pid, signal.SIGKILL)
    while 1 in sup._links:
        await asyncio.sleep(0.01)
    assert await asyncio.to_thread(_admin_settle, sup, cid) == (
        503, {"error": "gateway worker 1 is not serving (restarting); try again"}
    )
    (row,) = _rows(sup)
    assert row["channel_id"] == cid and row["settle_txid"] is None
    await rpc.close()


async def test_operator_settlement_that_fails_in_a_worker_is_not_a_partial_answer(supervisor):
    """With the node gone the holder cannot broadcast: 503 naming it, not a list
    without its channel (or a 404) that reads as "nothing to settle"."""
    sup = supervisor
    _, rpc, viewer = await paying_viewer(sup, 0, chunks=8)
    cid = viewer.channel.outpoint.channel_id
    await rpc.close()
    await sup.node.stop()
    status, answer = await asyncio.to_thread(_admin_settle, sup, cid)
    assert status == 503 and answer["error"].startswith("gateway worker 0 failed: ")


def _admin_settle(sup: Supervisor, channel_id: str) -> tuple[int, Any]:
    """The operator's ``/api/admin/settle?channel=`` (blocking): status and JSON body."""
    token = (sup.datadir / "operator-token").read_text().strip()
    url = f"{sup.urls['web']}api/admin/settle?channel={channel_id}"
    request = urllib.request.Request(
        url, data=b"", method="POST", headers={"Authorization": f"Bearer {token}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return 200, json.load(answer)
    except urllib.error.HTTPError as failed:
        return failed.code, json.load(failed)


def _get(url: str, token: str | None = None, timeout: float = 30) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
        return json.load(r)


async def test_serve_with_workers_from_the_cli(tmp_path: Path, media_copy: Path):
    """`gateway serve --workers 2`: health and operator settlement cover every worker."""
    datadir = tmp_path / "gw"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--workers", "2", "--datadir",
         str(datadir), "--media", str(media_copy), "--port", "0", "--rpc-port", "0",
         "--block-interval", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    try:
        info_path = datadir / "gateway.json"
        for _ in range(600):
            if info_path.exists() or proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        assert info_path.exists(), proc.stdout.read().decode() if proc.poll() is not None else ""
        info = json.loads(info_path.read_text())
        rpc = RpcClient(info["rpc"], cookie_path=Path(info["cookie"]))
        viewers = [await connect_on(info["ws"], rpc, w) for w in (0, 1)]
        for viewer in viewers:
            await viewer.open_and_fund()
            await viewer.play_and_pay("clip", chunks=5)
        health = await asyncio.to_thread(_get, info["web"] + "api/health")
        assert (health["channels"], health["sessions"]) == (2, 2)
        assert health["workers"] == [
            {"worker": 0, "channels": 1, "sessions": 1},
            {"worker": 1, "channels": 1, "sessions": 1},
        ]
        token = (datadir / "operator-token").read_text().strip()
        listed = await asyncio.to_thread(_get, info["web"] + "api/dashboard/channels", token)
        ids = {v.channel.outpoint.channel_id for v in viewers}
        assert {c["channel_id"] for c in listed["channels"]} == ids

        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway.cli", "settle", "--datadir", str(datadir)],
            capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert all(cid in out.stdout for cid in ids)
        for viewer in viewers:  # each holder told its own session
            closed = await viewer.expect(Closed)
            assert closed.txid is not None
        await rpc.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0


async def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path, media_copy: Path):
    """No orphans: a worker whose supervisor is gone cannot be restarted or hand a
    channel over, so it finishes its sessions' writes and exits."""
    from gateway.bench import process_tree

    datadir = tmp_path / "gw"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "--workers", "2", "--datadir",
         str(datadir), "--media", str(media_copy), "--port", "0", "--rpc-port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            if (datadir / "gateway.json").exists():
                break
            await asyncio.sleep(0.05)
        workers = process_tree(proc.pid)[1:]
        assert len(workers) == 2
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        for _ in range(300):
            if not any(_running(pid) for pid in workers):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("workers outlived their supervisor")
    finally:
        if proc.poll() is None:
            proc.kill()


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's exit is reaped by init, in its own time)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"
