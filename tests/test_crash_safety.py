"""Crash safety (design.md "Money rules", protocol.md section 7): the gateway
process is killed with SIGKILL mid-stream at random points, 20 times, and
restarted on the same data dir. After every restart:

* every increment the gateway acknowledged with ``paid`` is in the store;
* every paid chunk the viewer received was covered by a durable increment
  (the stored total is at least that chunk's ``due`` total);

and the final settlement, mined by the node, pays the client exactly the last
stored balance, which is at most every acknowledged balance.

The node runs as its own process (``gateway node``), as bitcoind would, so
only the gateway dies. With ``--workers 2`` the supervisor and both workers
die together (SIGKILL to the process group, as in a power cut); after each
restart the viewer's resume may land on the worker that does not hold the
channel, which then takes it over.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websockets
from conftest_gateway import Viewer
from helpers_chain import get_transaction

from gateway.chain.rpc import RpcClient
from gateway.protocol.messages import Chunk, Closed, Due, Paid, Play, Ready, Stream

TRIALS = 20
GATEWAY = [sys.executable, "-m", "gateway.cli"]


def _spawn(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    # Its own process group: a kill takes the supervisor and its workers at once.
    return subprocess.Popen(
        GATEWAY + args,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        cwd=log.parent,
        start_new_session=True,
    )


def _kill_all(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the gateway and every worker it started."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


async def _wait_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"process exited with {proc.returncode}")
        assert time.monotonic() < deadline, f"{path} never appeared"
        await asyncio.sleep(0.05)


def _row_id(db: Path, cid: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT id FROM channels WHERE channel_id = ?", (cid,)).fetchone()
        return int(row[0])
    finally:
        conn.close()


def _stored(db: Path, cid: str) -> tuple[int, int]:
    """(seq, paid) durably stored for ``cid`` (read-only, like a fresh process)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        seq, value, balance = conn.execute(
            "SELECT seq, value, balance FROM channels WHERE channel_id = ?", (cid,)
        ).fetchone()
    finally:
        conn.close()
    return seq or 0, value - balance


@pytest.fixture
async def node_process(tmp_path: Path):
    datadir = tmp_path / "node"
    proc = _spawn(["node", "--datadir", str(datadir), "--rpc-port", "0"], tmp_path / "node.log")
    cookie = datadir / "regtest" / ".cookie"
    await _wait_file(cookie, proc)
    url = None
    deadline = time.monotonic() + 20
    while url is None:
        for line in (tmp_path / "node.log").read_text().splitlines():
            if line.startswith("RPC URL: "):
                url = line.removeprefix("RPC URL: ").strip()
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    yield url, cookie
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=20)


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigkill_mid_stream_loses_no_paid_increment(
    tmp_path, media_copy, node_process, workers
):
    rpc_url, cookie = node_process
    rpc = RpcClient(rpc_url, cookie_path=cookie)
    datadir = tmp_path / "gw"
    args = ["serve", "--datadir", str(datadir), "--port", "0", "--media", str(media_copy),
            "--rpc-url", rpc_url, "--rpc-cookie", str(cookie), "--resume-grace", "3600",
            "--workers", str(workers)]
    rng = random.Random(20261122)
    viewer: Viewer | None = None
    acked_paid = 0  # highest `paid` the gateway acknowledged
    delivered_total = 0  # highest `due` total of a chunk the viewer received
    cid = ""
    mid_stream_kills = 0  # kills that hit a stream with chunks or payments under way
    handovers = 0  # resumes on a worker other than the channel's holder (``id % 2``)
    for trial in range(TRIALS):
        (datadir / "gateway.json").unlink(missing_ok=True)
        proc = _spawn(args, tmp_path / "gateway.log")
        try:
            await _wait_file(datadir / "gateway.json", proc)
            url = json.loads((datadir / "gateway.json").read_text())["ws"]
            if viewer is None:
                viewer = Viewer(url, rpc, budget=200_000)
                await viewer.connect()
                await viewer.open_and_fund(value=150_000)
                cid = viewer.channel.outpoint.channel_id
                # Confirm the funding so it survives anything.
                await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
            else:
                viewer.url = url
                hello = await viewer.connect()
                await viewer.send(viewer.channel.resume(hello))
                ready = await viewer.expect(Ready)
                viewer.channel.on_ready(ready)
                # The restarted gateway holds at least every acknowledged increment.
                assert ready.paid >= acked_paid, (trial, ready.paid, acked_paid)
                if workers > 1:
                    worker = int(viewer.ws.response.headers["X-Paystream-Worker"])
                    handovers += worker != _row_id(datadir / "gateway.db", cid) % workers
            _, stored = _stored(datadir / "gateway.db", cid)
            assert stored >= acked_paid and stored >= delivered_total, (trial, stored)

            await viewer.send(Play(media="clip" if trial % 2 else "song"))
            kill_at = time.monotonic() + rng.uniform(0.0, 0.4)
            pending_total = 0
            while True:
                timeout = kill_at - time.monotonic()
                if timeout <= 0:
                    break
                try:
                    msg = await viewer.recv(timeout=timeout)
                except (TimeoutError, websockets.ConnectionClosed):
                    break
                if isinstance(msg, Stream):
                    viewer.channel.on_stream(msg)
                elif isinstance(msg, Due):
                    pending_total = msg.total
                    await viewer.send(viewer.channel.pay_due(msg))
                elif isinstance(msg, Paid):
                    viewer.channel.on_paid(msg)
                    acked_paid = max(acked_paid, msg.paid)
                elif isinstance(msg, Chunk) and msg.index >= 0 and pending_total:
                    delivered_total = max(delivered_total, pending_total)
                    pending_total = 0
            streaming = any(isinstance(m, (Due, Paid)) for m in viewer.log[-3:])
            mid_stream_kills += streaming
            _kill_all(proc)
            await viewer.disconnect()
            _seq, stored = _stored(datadir / "gateway.db", cid)
            assert stored >= acked_paid, (trial, stored, acked_paid)
            assert stored >= delivered_total, (trial, stored, delivered_total)
        finally:
            if proc.poll() is None:
                _kill_all(proc)
    assert viewer is not None and acked_paid > 0
    print(f"{mid_stream_kills} of {TRIALS} kills hit a paying stream; paid {acked_paid}; "
          f"{handovers} resumes taken over from another worker")
    assert mid_stream_kills >= TRIALS // 2
    assert workers == 1 or handovers > 0

    # Settle for real after the last crash: the client gets exactly the stored balance.
    (datadir / "gateway.json").unlink(missing_ok=True)
    proc = _spawn(args, tmp_path / "gateway.log")
    try:
        await _wait_file(datadir / "gateway.json", proc)
        viewer.url = json.loads((datadir / "gateway.json").read_text())["ws"]
        hello = await viewer.connect()
        await viewer.send(viewer.channel.resume(hello))
        viewer.channel.on_ready(await viewer.expect(Ready))
        _, stored = _stored(datadir / "gateway.db", cid)
        await viewer.send(viewer.channel.close())
        closed = await viewer.expect(Closed)
        assert closed.paid == stored >= acked_paid
        await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
        tx = await get_transaction(rpc, closed.txid)
        assert tx["confirmations"] == 1
        change = viewer.channel.change_script.hex()
        client_out = [o for o in tx["vout"] if o["scriptPubKey"]["hex"] == change]
        from gateway.chain.watch import btc_to_sat

        assert btc_to_sat(client_out[0]["value"]) == viewer.channel.value - stored
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        await rpc.close()
    assert os.path.exists(datadir / "gateway.db")
