"""End to end with real processes: ``gateway serve`` (with its embedded node),
the ``player`` CLI and, where the gateway must be down, ``gateway node``
alone — all on 127.0.0.1 port 0 with temp dirs (issue 4, "Must hold" 1-2).

Each settlement is checked in a block mined by the node (whose blocks
libbitcoinkernel validates), and its input is verified once more with
``pbk.ScriptPubkey.verify`` against the funding output it spends.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from conftest_gateway import PUBLISHERS
from helpers_chain import get_transaction
from helpers_stack import Proc, Stack, bin_path

from gateway.chain.kernel import verify_input
from gateway.chain.rpc import RpcClient
from gateway.chain.watch import btc_to_sat
from gateway.protocol.scripts import ChannelScript, address_to_script_pubkey
from player.keystore import Keystore


async def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


async def _confirmed_settlement(stack: Stack, rpc: RpcClient, txid: str) -> dict:
    """Mine ``txid``; check it is in a block and every channel input verifies in the kernel."""
    await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
    tx = await get_transaction(rpc, txid)
    assert tx["confirmations"] == 1 and tx["blockhash"]
    with Keystore(stack.player_dir) as keys:
        by_outpoint = {c.channel_id: c for c in keys.channels()}
        pubkey = keys.pubkey
    spent = []
    for txin in tx["vin"]:
        ch = by_outpoint[f"{txin['txid']}:{txin['vout']}"]
        script = ChannelScript.make(ch.kind, pubkey, ch.server_pubkey, ch.expiry)
        assert ch.value is not None
        spent.append((script.script_pubkey, ch.value))
    for index in range(len(spent)):
        verify_input(bytes.fromhex(tx["hex"]), index, spent)
    return tx


@pytest.mark.parametrize("kind", ["cltv", "multisig"])
async def test_player_streams_free_then_paid_and_close_settles(stack_factory, kind):
    stack = await stack_factory("--resume-grace", "60")
    done = await stack.player("play", stack.info["ws"], "clip", "--kind", kind,
                              "--budget", "30000", "--out", "clip.mp4", "--no-pace")
    assert "finished" in done.stderr or "closed" in done.stderr
    manifest = json.loads((stack.media / "clip" / "manifest.json").read_text())
    expected = manifest["init"]["size"] + sum(c["size"] for c in manifest["chunks"])
    assert (stack.tmp / "clip.mp4").stat().st_size == expected
    with Keystore(stack.player_dir) as keys:
        (mine,) = keys.channels()
    assert mine.kind == kind and mine.paid > 0
    paid_ms = manifest["duration_ms"] - 3000  # the reserve, 3 s free, then 300 sat/s
    assert mine.exit_fee > 0
    assert mine.paid == mine.exit_fee + -(-paid_ms * 300_000 // 1_000_000)
    row = stack.channel_row()
    assert row["settle_txid"] and row["balance"] == mine.balance
    rpc = stack.rpc()
    tx = await _confirmed_settlement(stack, rpc, row["settle_txid"])
    outputs = {o["scriptPubKey"]["hex"]: btc_to_sat(o["value"]) for o in tx["vout"]}
    assert outputs[mine.change_script.hex()] == mine.balance  # exactly its last balance
    studio = address_to_script_pubkey(PUBLISHERS["studio"], "regtest").hex()
    fee = stack.settlement_row(row["settle_txid"])["fee"]
    assert fee >= mine.exit_fee  # the reserve went to the fee...
    assert outputs[studio] == mine.paid - fee  # ... the only publisher watched gets the rest
    await rpc.close()


async def test_disconnect_settles_and_resume_continues(stack_factory):
    stack = await stack_factory("--resume-grace", "2")
    first = await stack.player("play", stack.info["ws"], "clip", "--max-chunks", "6",
                               "--keep-open", "--out", "a.mp4", "--no-pace", "--budget", "30000")
    assert "6 chunks" in first.stderr and "still open" in first.stderr
    with Keystore(stack.player_dir) as keys:
        (ch,) = keys.channels()
    paid_first = ch.paid
    second = await stack.player("play", stack.info["ws"], "clip", "--keep-open",
                                "--start-ms", "6000", "--out", "b.mp4", "--no-pace")
    assert "(resumed, " in second.stderr
    with Keystore(stack.player_dir) as keys:
        (again,) = keys.channels()
    assert again.channel_id == ch.channel_id and again.paid > paid_first
    # Dropped without close: settled once the 2 s grace has passed.
    await _wait_for(lambda: stack.channel_row()["settle_txid"] is not None)
    row = stack.channel_row()
    assert row["channel_id"] == ch.channel_id and row["balance"] == again.balance
    rpc = stack.rpc()
    tx = await _confirmed_settlement(stack, rpc, row["settle_txid"])
    outputs = {o["scriptPubKey"]["hex"]: btc_to_sat(o["value"]) for o in tx["vout"]}
    assert outputs[again.change_script.hex()] == again.balance
    await rpc.close()


async def test_expiry_without_the_gateway_player_refunds(stack_factory):
    stack = await stack_factory("--resume-grace", "3600", "--settle-margin", "600")
    rpc = stack.rpc()
    tip = await rpc.call("getblockcount")
    # A height expiry: 30 blocks (5 h at 600 s) — within the advertised window.
    await stack.player("play", stack.info["ws"], "clip", "--max-chunks", "6", "--keep-open",
                       "--expiry", f"h:{tip + 30}", "--out", "a.mp4", "--no-pace",
                       "--budget", "30000")
    with Keystore(stack.player_dir) as keys:
        (ch,) = keys.channels()
    assert ch.paid > 0 and ch.expiry == tip + 30
    await rpc.close()
    stack.stop()  # the gateway (and its node) are gone before the expiry

    node = Proc([bin_path("gateway"), "node", "--datadir", str(stack.datadir / "node"),
                 "--rpc-port", "0"], stack.tmp / "node.log", stack.tmp)
    try:
        deadline = time.monotonic() + 30
        while "RPC URL: " not in (stack.tmp / "node.log").read_text():
            assert time.monotonic() < deadline and node.proc.poll() is None
            await asyncio.sleep(0.05)
        url = next(line.removeprefix("RPC URL: ").strip() for line in
                   (stack.tmp / "node.log").read_text().splitlines()
                   if line.startswith("RPC URL: "))
        stack.info["rpc"] = url
        rpc = stack.rpc()
        early = await stack.player("refund", check=False)
        assert early.returncode != 0  # not final before the expiry
        await rpc.call("generatetoaddress", 30, await rpc.call("getnewaddress"))
        await stack.player("refund")
        with Keystore(stack.player_dir) as keys:
            (ch,) = keys.channels()
        assert ch.refund_txid
        await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
        refund = await get_transaction(rpc, ch.refund_txid)
        assert refund["confirmations"] == 1
        back = sum(btc_to_sat(o["value"]) for o in refund["vout"])
        assert back == ch.value - ch.refund_fee  # the whole value, less the refund's fee
        await rpc.close()
    finally:
        node.stop()


async def test_everyday_mistakes_with_the_real_gateway(stack_factory):
    """Issue 14 items 9-11 against ``gateway serve``: an unknown id and a budget past
    the gateway's largest channel are refused before anything is opened; replaying
    goes on where the last run left off, so no second is billed twice."""
    stack = await stack_factory("--resume-grace", "600")
    unknown = await stack.player("play", stack.info["ws"], "no-such", "--budget", "20000",
                                 "--out", "x.mp4", check=False)
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("player: no media 'no-such' in the gateway's catalog "
                                     "(it has: clip, song); see http://127.0.0.1:")
    big = await stack.player("play", stack.info["ws"], "clip", "--budget", "20000000",
                             "--out", "x.mp4", check=False)
    assert big.returncode == 1
    assert big.stderr.splitlines()[-1] == (
        "player: budget 20000000 sat is above the gateway's largest channel, 10000000 sat: "
        "use --budget 10000000 or less")
    import sqlite3

    with sqlite3.connect(stack.datadir / "gateway.db") as db:
        assert db.execute("SELECT count(*) FROM channels").fetchone() == (0,)

    # Three runs of four chunks: the second and third go on where the one before stopped.
    runs = []
    for _ in range(3):
        runs.append(await stack.player("play", stack.info["ws"], "clip", "--max-chunks", "4",
                                       "--keep-open", "--budget", "30000", "--out", "a.mp4",
                                       "--no-pace"))
    with Keystore(stack.player_dir) as keys:
        (ch,) = keys.channels()
    assert "resuming" not in runs[0].stderr
    assert runs[1].stderr.startswith(
        f"resuming channel {ch.id} (value 30000, paid ")
    # A resumed channel says its exit fee, the reserve agreed when it was opened.
    assert f" sat, exit fee {ch.exit_fee} sat); " in runs[1].stderr.splitlines()[0]
    assert ch.exit_fee > 0
    manifest = json.loads((stack.media / "clip" / "manifest.json").read_text())
    chunks = manifest["chunks"]
    at = sum(c["duration_ms"] for c in chunks[:4])
    assert f"clip goes on at 0:{at // 1000:02d} (--from 0 starts it over)" in runs[1].stderr
    # Billed once for the first twelve chunks' media beyond the 3 free seconds.
    watched = sum(c["duration_ms"] for c in chunks[:12])
    assert ch.paid == ch.exit_fee + -(-(watched - 3000) * 300_000 // 1_000_000)
    assert stack.channel_row()["balance"] == ch.balance
