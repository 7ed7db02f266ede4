"""kill -9 of a ``gateway node`` at random moments loses nothing an RPC reported.

A client mines blocks and sends wallet transactions over RPC while the node
is killed with SIGKILL at a random moment (sometimes while it is still
starting: premining or replaying blocks into the kernel). After each restart:

- every block hash any RPC reported is still on the active chain at its
  height (blocks being mined at the kill may be there or not: never reported);
- the tip, the mempool and the wallet balance are those of the last completed
  step, or of that step plus the effect of the one in flight at the kill
  (a send adds its transaction and costs its fee; blocks mine the mempool and
  mature premined coinbases); a step whose answer arrived is never undone.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

from gateway.chain.rpc import RpcClient, RpcTransportError
from gateway.protocol.scripts import script_pubkey_to_address

GATEWAY = str(Path(sys.executable).with_name("gateway"))
PREMINE = 120
SUBSIDY = Decimal(50)
#: Coinbases go to an address outside the wallet: only premined coins mature into it.
EXTERNAL = script_pubkey_to_address(b"\x00\x14" + bytes(range(20)), "regtest")
KILLS = 24


@dataclass
class Snapshot:
    height: int
    tip: str
    mempool: frozenset[str]
    balance: Decimal


@dataclass
class Step:
    kind: str  # "send" or "mine"
    blocks: int = 0
    result: object = None  # the answer, if it arrived


@dataclass
class History:
    reported: dict[int, str] = field(default_factory=dict)
    snapshot: Snapshot | None = None
    step: Step | None = None  # started after the snapshot


def start_node(datadir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [GATEWAY, "node", "--datadir", str(datadir), "--rpc-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )


def read_url(proc: subprocess.Popen[str]) -> tuple[str, Path]:
    stdout = proc.stdout
    assert stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(stdout.readline() for _ in range(3)))
    reader.start()
    reader.join(timeout=60)
    assert len(lines) == 3 and lines[1].startswith("RPC URL: "), f"no start: {lines}"
    return lines[1].split("RPC URL: ")[1].strip(), Path(lines[2].split("cookie: ")[1].strip())


async def observe(rpc: RpcClient) -> Snapshot:
    height = await rpc.call("getblockcount")
    tip = await rpc.call("getblockhash", height)
    mempool = frozenset(await rpc.call("getrawmempool"))
    balance = await rpc.call("getbalance")
    assert await rpc.call("getbestblockhash") == tip
    return Snapshot(height, tip, mempool, balance)


def matured(low: int, high: int) -> int:
    """Premined coinbases that become spendable as the tip goes from ``low`` to ``high``."""
    # A coinbase at height c is spendable once the next block is 100 deeper (tip >= c + 99).
    return sum(1 for tip in range(low + 1, high + 1) if 1 <= tip - 99 <= PREMINE)


async def check_restart(rpc: RpcClient, history: History) -> None:
    for height, block_hash in history.reported.items():
        assert await rpc.call("getblockhash", height) == block_hash, f"lost block {height}"
    seen = await observe(rpc)
    before, step = history.snapshot, history.step
    if before is None:
        return  # first successful start (a premine may have been cut short before)
    if seen == before:
        assert step is None or step.result is None, f"answered {step} was undone"
        return
    assert step is not None, f"state moved without a step: {before} -> {seen}"
    if step.kind == "send":
        assert seen.height == before.height and seen.tip == before.tip
        added = seen.mempool - before.mempool
        assert before.mempool <= seen.mempool and len(added) == 1
        [txid] = added
        assert step.result in (None, txid)
        fee = (await rpc.call("getmempoolentry", txid))["fees"]["base"]
        assert seen.balance == before.balance - fee
    else:
        mined = seen.height - before.height
        assert 1 <= mined <= step.blocks
        assert await rpc.call("getblockhash", before.height) == before.tip
        if step.result is not None:
            assert mined == step.blocks
        assert seen.mempool == frozenset()
        assert seen.balance == before.balance + SUBSIDY * matured(before.height, seen.height)


async def work(rpc: RpcClient, history: History, rng: random.Random) -> None:
    """Steps until the node dies: one change, then a snapshot read back."""
    own = await rpc.call("getnewaddress")
    history.snapshot = await observe(rpc)
    history.reported[history.snapshot.height] = history.snapshot.tip
    while True:
        if rng.random() < 0.5:
            step = Step("send")
            history.step = step
            step.result = await rpc.call("sendtoaddress", own, Decimal("0.01"))
        else:
            step = Step("mine", rng.choice((1, 1, 2, 5, 30)))
            history.step = step
            hashes = await rpc.call("generatetoaddress", step.blocks, EXTERNAL)
            step.result = hashes
            base = history.snapshot.height
            for offset, block_hash in enumerate(hashes, start=1):
                history.reported[base + offset] = block_hash
        snapshot = await observe(rpc)
        history.reported[snapshot.height] = snapshot.tip
        history.snapshot, history.step = snapshot, None


async def round_trip(
    proc: subprocess.Popen[str], history: History, rng: random.Random
) -> None:
    url, cookie = read_url(proc)
    async with RpcClient(url, cookie_path=cookie, timeout=20) as rpc:
        await check_restart(rpc, history)
        asyncio.get_running_loop().call_later(rng.uniform(0.05, 0.8), proc.kill)
        with contextlib.suppress(RpcTransportError):  # killed
            await work(rpc, history, rng)


def test_kill_9_at_random_moments_loses_nothing_reported(tmp_path: Path) -> None:
    seed = int(os.environ.get("NODE_CRASH_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    history = History()
    kills = 0
    while kills < KILLS:
        proc = start_node(tmp_path)
        try:
            if kills % 5 == 0:
                # While starting: premining (first start) or replaying into the kernel.
                try:
                    proc.wait(timeout=rng.uniform(0.3, 1.2))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGKILL)
            else:
                asyncio.run(round_trip(proc, history, rng))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"seed {seed}: exit {proc.returncode}"
        kills += 1
    proc = start_node(tmp_path)
    try:
        async def final() -> None:
            url, cookie = read_url(proc)
            async with RpcClient(url, cookie_path=cookie) as rpc:
                await check_restart(rpc, history)
                assert len(history.reported) > 20, "too few blocks reported to mean much"

        asyncio.run(final())
    finally:
        proc.kill()
        proc.wait()
