"""Kill -9 the gateway and its node at random moments while channels open, pay
and settle; then check every satoshi (protocol.md sections 7 and 8).

``gateway node`` runs as its own process, as bitcoind would, and ``gateway
serve`` talks to it over RPC. Viewers open channels, pay, close or just
disconnect, over and over; blocks are mined as they go. At random moments
the gateway, the node or both are killed with SIGKILL and started again on
the same data dirs and ports. At the end, with nothing killed any more,
every channel must settle, and:

* no settlement the store calls confirmed is missing from the best chain;
* every channel ends ``closed`` (or ``refunded``/``void``), none stuck
  ``closing``;
* a settled channel pays its client exactly the balance the store holds,
  which is one the client signed, and no higher than any balance the
  gateway acknowledged (``paid``): no acknowledged satoshi is lost.

Run by tests/test_chaos.py (20 kills); ``python tests/chaos.py --trials 100``
runs the longer version and prints its figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websockets

sys.path.insert(0, str(Path(__file__).parent))

from conftest_gateway import Viewer
from helpers_chain import get_transaction

from gateway.chain.rpc import RpcClient, RpcException
from gateway.chain.watch import btc_to_sat
from gateway.protocol.messages import Chunk, Closed, Due, Paid, Play, Stream

GATEWAY = [sys.executable, "-m", "gateway.cli"]
#: States a channel may end in once everything has settled.
FINAL = {"closed", "refunded", "void"}


@dataclass
class Report:
    """What a chaos run did and found."""

    trials: int = 0
    kills: dict[str, int] = field(default_factory=lambda: {"gateway": 0, "node": 0, "both": 0})
    channels: int = 0
    sessions: int = 0
    settlements: int = 0
    closed: int = 0
    paid: int = 0
    seconds: float = 0.0
    #: channel id -> (lowest balance the client signed, lowest the gateway acknowledged)
    signed: dict[str, tuple[int, int]] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stack:
    """``gateway node`` and ``gateway serve`` as subprocesses, each in its own group."""

    def __init__(self, work: Path, media: Path) -> None:
        self.work = work
        self.node_dir = work / "node"
        self.gw_dir = work / "gw"
        self.node_port, self.gw_port = _free_port(), _free_port()
        self.media = media
        self.node: subprocess.Popen[bytes] | None = None
        self.gateway: subprocess.Popen[bytes] | None = None

    @property
    def rpc_url(self) -> str:
        return f"http://127.0.0.1:{self.node_port}"

    @property
    def cookie(self) -> Path:
        return self.node_dir / "regtest" / ".cookie"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.gw_port}/paystream/2"

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            GATEWAY + args, stdout=(self.work / log).open("ab"), stderr=subprocess.STDOUT,
            cwd=self.work, start_new_session=True,
        )

    async def start_node(self) -> None:
        self.cookie.unlink(missing_ok=True)
        self.node = self._spawn(["node", "--datadir", str(self.node_dir), "--rpc-port",
                                 str(self.node_port)], "node.log")
        await self._wait(lambda: self.cookie.exists(), self.node, "node")

    async def start_gateway(self) -> None:
        info = self.gw_dir / "gateway.json"
        info.unlink(missing_ok=True)
        self.gateway = self._spawn(
            ["serve", "--datadir", str(self.gw_dir), "--media", str(self.media), "--port",
             str(self.gw_port), "--rpc-url", self.rpc_url, "--rpc-cookie", str(self.cookie),
             "--resume-grace", "1"],
            "gateway.log",
        )
        await self._wait(lambda: info.exists(), self.gateway, "gateway")

    async def _wait(self, ready: Any, proc: subprocess.Popen[bytes], what: str) -> None:
        deadline = time.monotonic() + 60
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"{what} exited with {proc.returncode}: see {self.work}")
            assert time.monotonic() < deadline, f"{what} did not start"
            await asyncio.sleep(0.05)

    @staticmethod
    def kill(proc: subprocess.Popen[bytes] | None) -> None:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def stop(self) -> None:
        for proc in (self.gateway, self.node):
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.kill(proc)


def _store_rows(db: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM channels WHERE channel_id IS NOT NULL").fetchall()
    finally:
        conn.close()


async def _viewer_loop(stack: Stack, rpc: RpcClient, report: Report, rng: random.Random,
                       stop: asyncio.Event) -> None:
    """Open, pay, then close or disconnect; again and again until ``stop``."""
    while not stop.is_set():
        viewer = Viewer(stack.ws_url, rpc, budget=60_000)
        cid = ""
        try:
            await viewer.connect()
            await viewer.open_and_fund(value=30_000)
            assert viewer.channel is not None and viewer.channel.outpoint is not None
            cid = viewer.channel.outpoint.channel_id
            report.channels += 1
            report.sessions += 1
            report.signed[cid] = (viewer.channel.value or 0, viewer.channel.value or 0)
            await viewer.send(Play(media=rng.choice(["clip", "song"])))
            end_at = time.monotonic() + rng.uniform(0.2, 2.0)
            while time.monotonic() < end_at and not stop.is_set():
                try:
                    msg = await viewer.recv(timeout=max(0.01, end_at - time.monotonic()))
                except TimeoutError:
                    break
                if isinstance(msg, Stream):
                    viewer.channel.on_stream(msg)
                elif isinstance(msg, Due):
                    pay = viewer.channel.pay_due(msg)
                    report.signed[cid] = (pay.balance, report.signed[cid][1])
                    await viewer.send(pay)
                elif isinstance(msg, Paid):
                    viewer.channel.on_paid(msg)
                    low = min(report.signed[cid][1], msg.balance)
                    report.signed[cid] = (report.signed[cid][0], low)
                elif isinstance(msg, Chunk):
                    pass
            if rng.random() < 0.6:
                await viewer.send(viewer.channel.close())
                with contextlib.suppress(TimeoutError):
                    await viewer.expect(Closed, timeout=5)
        except (OSError, TimeoutError, AssertionError, websockets.ConnectionClosed,
                RpcException, EOFError):
            await asyncio.sleep(0.2)  # killed under us: the gateway settles after grace
        finally:
            with contextlib.suppress(Exception):
                await viewer.disconnect()


async def _miner(rpc: RpcClient, stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(RpcException, OSError):
            await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
        await asyncio.sleep(0.7)


async def run(work: Path, media: Path, *, trials: int, seed: int = 2026_12_03,
              viewers: int = 3) -> Report:
    """Kill ``trials`` times, then check everything (the module docstring)."""
    rng = random.Random(seed)
    report = Report(trials=trials)
    started = time.monotonic()
    stack = Stack(work, media)
    await stack.start_node()
    await stack.start_gateway()
    rpc = RpcClient(stack.rpc_url, cookie_path=stack.cookie, timeout=10)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(_viewer_loop(stack, rpc, report, rng, stop))
             for _ in range(viewers)]
    tasks.append(asyncio.create_task(_miner(rpc, stop)))
    try:
        for _ in range(trials):
            await asyncio.sleep(rng.uniform(0.3, 2.0))
            target = rng.choices(["gateway", "node", "both"], weights=[2, 1, 1])[0]
            report.kills[target] += 1
            if target in ("gateway", "both"):
                stack.kill(stack.gateway)
            if target in ("node", "both"):
                stack.kill(stack.node)
                await asyncio.sleep(rng.uniform(0.0, 0.5))
                await stack.start_node()
            if target in ("gateway", "both"):
                await stack.start_gateway()
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _settle_everything(stack, rpc)
        await _check(stack, rpc, report)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await rpc.close()
        stack.stop()
    report.seconds = round(time.monotonic() - started, 1)
    return report


async def _settle_everything(stack: Stack, rpc: RpcClient) -> None:
    """Mine until no channel is left open, funding, ready or closing (at most ~3 min)."""
    db = stack.gw_dir / "gateway.db"
    deadline = time.monotonic() + 180
    while True:
        states = {r["state"] for r in _store_rows(db)}
        if states <= FINAL:
            return
        assert time.monotonic() < deadline, f"channels left in {states - FINAL}"
        with contextlib.suppress(RpcException):
            await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
        await asyncio.sleep(0.5)


async def _check(stack: Stack, rpc: RpcClient, report: Report) -> None:
    rows = _store_rows(stack.gw_dir / "gateway.db")
    txids: set[str] = set()
    for row in rows:
        cid, state = row["channel_id"], row["state"]
        assert state in FINAL, (cid, state)
        paid = row["value"] - (row["balance"] if row["balance"] is not None else row["value"])
        if cid in report.signed:
            lowest_signed, lowest_acked = report.signed[cid]
            # The store holds a balance the client signed, never above an acknowledged one.
            assert lowest_signed <= (row["balance"] or row["value"]) <= lowest_acked, (cid, row)
        if state != "closed" or row["settle_txid"] is None:
            continue
        report.closed += 1
        report.paid += paid
        tx = await get_transaction(rpc, row["settle_txid"])
        assert tx.get("confirmations", 0) >= 1, f"settlement of {cid} is not on the chain"
        txids.add(row["settle_txid"])
        spends = [(i["txid"], i["vout"]) for i in tx["vin"]]
        txid, vout = cid.split(":")
        index = spends.index((txid, int(vout)))
        if row["balance"]:
            out = tx["vout"][index]
            assert out["scriptPubKey"]["hex"] == row["change_script"], cid
            assert btc_to_sat(out["value"]) == row["balance"], (cid, out, row["balance"])
    report.settlements = len(txids)


def main() -> None:
    """``python tests/chaos.py --trials 100``: the longer run, with its figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--seed", type=int, default=2026_12_03)
    parser.add_argument("--viewers", type=int, default=3)
    args = parser.parse_args()
    from conftest_gateway import PUBLISHERS

    from gateway.media.catalog import add_publisher, publish
    from gateway.media.sample import synthesize_music, synthesize_video

    work = Path(tempfile.mkdtemp(prefix="paystream-chaos-"))
    media = work / "media"
    media.mkdir()
    for pid, address in PUBLISHERS.items():
        add_publisher(media, pid, pid.title(), address)
    synthesize_video(media / "clip.mp4", 12)
    synthesize_music(media / "song.m4a", 8)
    publish(media, media / "clip.mp4", item_id="clip", title="Clip", publisher="studio",
            rate_msat=300_000, free_ms=3000)
    publish(media, media / "song.m4a", item_id="song", title="Song", publisher="label",
            rate_msat=150_500, free_ms=2000)
    report = asyncio.run(run(work, media, trials=args.trials, seed=args.seed,
                             viewers=args.viewers))
    summary = {k: v for k, v in vars(report).items() if k != "signed"}
    print(json.dumps(summary, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
