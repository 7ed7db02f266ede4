"""The player's side of the reserve and batched settlement (protocol.md sections 3 and 8),
against the real gateway: ``gateway serve`` with its embedded regtest node and ``player``
as processes (:mod:`helpers_stack`), or the in-process gateway where a test reads the
player's progress as it happens.

What is checked is what a viewer can see: the cost lines printed before funding and what
the channel then paid; the exit feerate refused before any money moves; the progress
line's free time following playback; what ``closed`` means for the change; and
``player status`` checking the settlement against the gateway's channel API and the
viewer's own node, refusing a settlement that does not do what section 3 promises.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import sqlite3
import subprocess
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import coincurve
import pytest
from aiohttp import web
from bitcoin.core import (
    CMutableTransaction,
    COutPoint,
    CTransaction,
    CTxIn,
    CTxInWitness,
    CTxOut,
    CTxWitness,
    lx,
)
from bitcoin.core.script import CScript, CScriptWitness
from conftest_gateway import PUBLISHERS, ws_url
from helpers_chain import get_transaction
from helpers_stack import Stack, bin_path

from gateway.chain.rpc import RpcClient
from gateway.chain.watch import btc_to_sat
from gateway.media.catalog import set_price
from gateway.protocol.scripts import ChannelScript, address_to_script_pubkey
from gateway.protocol.settlement import exit_vbytes
from gateway.protocol.transactions import parse_tx, txid_of
from player.cli import _fmt_ms, cost_lines, media_cost
from player.client import Player, Progress, format_feerate
from player.keystore import ChannelState, Keystore, StoredChannel
from player.settlement import (
    SettlementCheckFailed,
    check_served_settlement,
    fetch_channel,
    format_time,
)
from player.wallet import Wallet

#: The demo's sample video costs 2 sat/s (gateway/media/sample.py).
DEMO_RATE_MSAT = 2_000


def _chunks(stack: Stack, media: str = "clip") -> list[int]:
    manifest = json.loads((stack.media / media / "manifest.json").read_text())
    return [c["duration_ms"] for c in manifest["chunks"]]


def _billed(rate_msat: int, free_ms: int, watched_ms: int) -> int:
    """Section 7: a new channel's media bill for its first ``watched_ms``, rounded up once."""
    return -(-rate_msat * max(0, watched_ms - free_ms) // 1_000_000)


def _channel(stack: Stack, channel_id: int = 1) -> StoredChannel:
    with Keystore(stack.player_dir) as keys:
        return keys.get(channel_id)


def _quoted(ch: StoredChannel, pubkey: bytes) -> Fraction:
    script = ChannelScript.make(ch.kind, pubkey, ch.server_pubkey, ch.expiry)
    return Fraction(ch.exit_fee, exit_vbytes(script, ch.change_script))


def _pubkey(stack: Stack) -> bytes:
    with Keystore(stack.player_dir) as keys:
        return keys.pubkey


async def _settlement_on_chain(rpc: RpcClient, ch: StoredChannel) -> tuple[dict[str, Any], int]:
    """The confirmed settlement of ``ch`` (from the keystore's txid) and its block height."""
    assert ch.closing_txid is not None
    tx = await get_transaction(rpc, ch.closing_txid)
    assert tx["confirmations"] >= 1
    height = int(await rpc.call("getblockcount")) - tx["confirmations"] + 1
    return tx, height


def _our_index(tx: dict[str, Any], ch: StoredChannel) -> int:
    return next(
        i for i, txin in enumerate(tx["vin"]) if f"{txin['txid']}:{txin['vout']}" == ch.channel_id
    )


async def _fee(rpc: RpcClient, tx: dict[str, Any], ch: StoredChannel) -> int:
    """Fee of a settlement of ``ch`` alone: its funding value less its outputs."""
    assert len(tx["vin"]) == 1 and ch.value is not None
    return ch.value - sum(btc_to_sat(o["value"]) for o in tx["vout"])


# -- (a) a cheap session gets its change back ----------------------------------------


@pytest.mark.parametrize(
    ("kind", "chunks"),
    [("cltv", 2), ("multisig", 5)],
    ids=["cltv-free-part-only", "multisig-a-few-paid-seconds"],
)
async def test_a_cheap_session_gets_its_change_back_within_two_blocks(
    stack_factory: Any, media_copy: Path, kind: str, chunks: int
) -> None:
    """At the demo's prices (2 sat/s after the free seconds) a short session pays for
    media far less than a settlement costs; its reserve pays its exit, so the gateway
    settles it in its next batch: the change is on chain within two blocks of leaving
    (blocks every 2 s, the gateway's default settle window of one block), exactly
    ``value - paid``, where ``paid`` is the exit fee agreed in ``terms`` plus the
    media billed and not a satoshi more. ``player status`` follows it from
    ``pending`` to ``settled``."""
    set_price(media_copy, "clip", rate_msat=DEMO_RATE_MSAT, free_ms=3_000)
    stack = await stack_factory("--block-interval", "2")
    rpc = stack.rpc()
    done = await stack.player(
        "play", stack.info["ws"], "clip", "--kind", kind, "--max-chunks", str(chunks),
        "--budget", "20000", "--out", "clip.mp4", "--no-pace",
    )
    left_at = int(await rpc.call("getblockcount"))
    ch = _channel(stack)
    assert ch.kind == kind and ch.value == 20_000 and ch.exit_fee > 0
    watched = sum(_chunks(stack)[:chunks])
    media = _billed(DEMO_RATE_MSAT, 3_000, watched)
    assert (media == 0) == (chunks == 2)  # the free part only, or a few paid seconds
    assert media < ch.exit_fee  # pays for media less than a settlement costs
    assert ch.paid == ch.exit_fee + media
    quoted = format_feerate(_quoted(ch, _pubkey(stack)))
    lines = done.stderr.splitlines()
    # The reserve agreed to is the exit fee said before funding.
    assert lines[1] == (
        f"leaving costs {ch.exit_fee} sat: the network fee to return your change, at "
        f"{quoted} sat/vB (paid first, before any media)"
    )
    assert ch.state == ChannelState.PENDING and ch.settle_by is not None
    assert lines[-1] == (
        f"settlement pending: your change of {20_000 - ch.paid} sat goes out by "
        f"{format_time(ch.settle_by)} (exit fee {ch.exit_fee} sat); "
        "`player status 1` checks it then"
    )

    deadline = time.monotonic() + 60
    while True:
        status = await stack.player("status")
        ch = _channel(stack)
        if ch.state == ChannelState.SETTLED:
            break
        assert ch.state in (ChannelState.PENDING, ChannelState.SETTLING), status.stdout
        assert time.monotonic() < deadline, status.stdout
        await asyncio.sleep(0.5)
    tx, height = await _settlement_on_chain(rpc, ch)
    assert height <= left_at + 2  # within two blocks of leaving
    assert status.stdout.startswith(f"channel 1: settled by {ch.closing_txid}, checked and ")
    index = _our_index(tx, ch)
    change = tx["vout"][index]
    assert change["scriptPubKey"]["hex"] == ch.change_script.hex()
    assert btc_to_sat(change["value"]) == 20_000 - ch.paid
    # Only the change: everything the channel paid (its reserve and media below
    # dust) went to the fee, to no one's output.
    assert len(tx["vout"]) == 1
    assert await _fee(rpc, tx, ch) == ch.paid
    assert stack.channel_row()["exit_fee"] == ch.exit_fee
    await rpc.close()


# -- (b) and (f): a paid session, and the cost lines ------------------------------------


async def test_a_paid_session_settles_with_a_publisher_output_and_its_cost_lines_were_true(
    stack_factory: Any,
) -> None:
    """A session that paid for most of the clip (300 sat/s after 3 s) settles with the
    publisher's output; the cost lines printed before funding are what the channel then
    paid (the whole item, and ``--duration-ms`` of it); ``closed`` names the settlement,
    which the player checks at once (window 0) and ``player status`` marks settled once
    the viewer's node shows it confirmed (the gateway's word alone is not enough);
    ``player channels`` shows the amounts."""
    stack = await stack_factory()
    rpc = stack.rpc()
    done = await stack.player(
        "play", stack.info["ws"], "clip", "--budget", "30000", "--out", "clip.mp4", "--no-pace"
    )
    ch = _channel(stack)
    length = sum(_chunks(stack))
    whole = _billed(300_000, 3_000, length)
    assert ch.paid == ch.exit_fee + whole  # what the third line said, plus the exit fee
    quoted = format_feerate(_quoted(ch, _pubkey(stack)))
    lines = done.stderr.splitlines()
    assert lines[:3] == [
        f"clip costs 300 sat/s after its first 0:03 free ({_fmt_ms(length)} long)",
        f"leaving costs {ch.exit_fee} sat: the network fee to return your change, at "
        f"{quoted} sat/vB (paid first, before any media)",
        f"the whole item costs {whole} sat, plus the exit fee; this channel holds 30000 sat",
    ]
    txid = stack.channel_row()["settle_txid"]
    assert txid and ch.closing_txid == txid and ch.state == ChannelState.SETTLING
    assert lines[-1].startswith(
        f"settled by {txid}, checked: your change of {ch.balance} sat, paid {ch.paid} sat "
        f"(exit fee {ch.exit_fee} sat); it pays "
    )
    assert lines[-1].endswith("; in your node's mempool, not confirmed yet")

    await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
    # Without a node of its own the player has only the gateway's word: not final.
    await _gateway_saw_a_block(stack, ch)
    status = await stack.player("status", wallet=False)
    assert status.stdout.startswith(f"channel 1: settled by {txid}, checked: ")
    assert status.stdout.endswith(
        "; 1 confirmation by the gateway's word; --wallet-rpc confirms it on your node\n"
    )
    assert _channel(stack).state == ChannelState.SETTLING
    status = await stack.player("status")
    assert status.stdout.startswith(
        f"channel 1: settled by {txid}, checked and confirmed on your node (1 confirmation): "
    )
    ch = _channel(stack)
    assert ch.state == ChannelState.SETTLED
    tx, _ = await _settlement_on_chain(rpc, ch)
    outputs = {o["scriptPubKey"]["hex"]: btc_to_sat(o["value"]) for o in tx["vout"]}
    assert outputs[ch.change_script.hex()] == ch.balance
    studio = address_to_script_pubkey(PUBLISHERS["studio"], "regtest").hex()
    fee = await _fee(rpc, tx, ch)
    assert fee >= ch.exit_fee and outputs[studio] == ch.paid - fee
    assert set(outputs) == {ch.change_script.hex(), studio}
    # Nothing left to follow; the table shows the amounts and the settlement.
    assert (await stack.player("status")).stdout == "no channel to follow\n"
    table = (await stack.player("channels")).stdout.splitlines()
    assert table[1].split()[4:] == [
        "30000", str(ch.paid), str(ch.exit_fee), str(ch.balance), *table[1].split()[8:10],
        "settled", txid,
    ]

    # A second channel for part of the clip: the line for --duration-ms was true too.
    part = sum(_chunks(stack)[:6])
    done = await stack.player(
        "play", stack.info["ws"], "clip", "--new-channel", "--budget", "30000",
        "--duration-ms", str(part), "--out", "part.mp4", "--no-pace",
    )
    second = _channel(stack, 2)
    billed = _billed(300_000, 3_000, part)
    assert done.stderr.splitlines()[2] == (
        f"this run's {_fmt_ms(part)} costs {billed} sat, the whole item {whole} sat, plus "
        "the exit fee; this channel holds 30000 sat"
    )
    assert second.paid == second.exit_fee + billed
    await rpc.close()


async def _gateway_saw_a_block(stack: Stack, ch: StoredChannel) -> None:
    """Wait until the gateway's channel API reports ``ch``'s settlement confirmed."""
    deadline = time.monotonic() + 20
    while True:
        answer = await asyncio.to_thread(fetch_channel, stack.info["ws"], ch.channel_id or "")
        if (answer["settlement"] or {}).get("confirmations"):
            return
        assert time.monotonic() < deadline, answer
        await asyncio.sleep(0.1)


# -- (c) player status refuses a settlement that breaks section 3 -------------------------


class _TamperedApi:
    """A FAKE gateway channel API on 127.0.0.1:0 (aiohttp) serving a settlement answer the
    test rewrote; the player is pointed at it with ``player status --gateway``."""

    def __init__(self) -> None:
        self.answer: dict[str, Any] = {}
        self.requests = 0
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/channel/{channel_id}", self._channel)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"ws://127.0.0.1:{port}/paystream/2"

    async def _channel(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.json_response(self.answer)

    async def stop(self) -> None:
        await self._runner.cleanup()


def _rewritten(answer: dict[str, Any], edit: Any) -> dict[str, Any]:
    """``answer`` with its settlement transaction edited and its txid recomputed
    (the witnesses are kept: the signatures no longer match, as a forger's would not)."""
    settlement = dict(answer["settlement"])
    tx = CMutableTransaction.from_tx(parse_tx(bytes.fromhex(settlement["tx"])))
    edit(tx)
    raw = bytes(tx.serialize())
    settlement.update(tx=raw.hex(), txid=txid_of(raw))
    return {**answer, "settlement": settlement}


async def test_status_refuses_a_settlement_below_the_quote_or_paying_the_wrong_balance(
    stack_factory: Any,
) -> None:
    """``player status`` checks what the gateway's channel API serves: a settlement whose
    feerate is below our quoted one (our reserve went to someone's output) or that pays
    us another balance fails loudly (exit 4, one line) and the channel is not marked
    settled, though the real settlement is confirmed on the real chain. A forged
    settlement that passes the transaction check but is not on chain is not marked
    settled either: only the viewer's own node makes it final. The tampered answers come
    from a FAKE HTTP server (:class:`_TamperedApi`); the chain and the real settlement
    are real."""
    stack = await stack_factory()
    rpc = stack.rpc()
    await stack.player(
        "play", stack.info["ws"], "clip", "--budget", "30000", "--out", "clip.mp4", "--no-pace"
    )
    await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))  # it is confirmed
    ch = _channel(stack)
    assert ch.state == ChannelState.SETTLING and ch.balance is not None
    real = await asyncio.to_thread(fetch_channel, stack.info["ws"], ch.channel_id or "")
    assert real["settlement"]["txid"] == ch.closing_txid
    index = _our_index(await get_transaction(rpc, real["settlement"]["txid"]), ch)
    other = 1 - index  # the publisher's output (our change and one publisher output)

    def fee_to_publisher(tx: CMutableTransaction) -> None:
        fee = sum(real["settlement"]["input_values"]) - sum(o.nValue for o in tx.vout)
        tx.vout[other].nValue += fee - 1  # a 1-sat fee: far below our quote

    def sat_from_our_change(tx: CMutableTransaction) -> None:
        tx.vout[index].nValue -= 1
        tx.vout[other].nValue += 1  # same fee, one satoshi of ours to the publisher

    def another_locktime(tx: CMutableTransaction) -> None:
        tx.nLockTime = 1  # passes the transaction check; not what is on chain

    api = _TamperedApi()
    await api.start()
    try:
        cases = [
            (fee_to_publisher, "below the quoted"),
            (sat_from_our_change, "our change output is not our last signed balance"),
        ]
        for edit, why in cases:
            api.answer = _rewritten(real, edit)
            done = await stack.player("status", "1", "--gateway", api.url, check=False)
            forged = api.answer["settlement"]["txid"]
            assert done.returncode == 4, done
            assert done.stdout == ""
            assert done.stderr.count("\n") == 1
            assert done.stderr.startswith(
                f"player: channel 1: settlement {forged} FAILS the check: "
            )
            assert why in done.stderr and done.stderr.endswith("; not marked settled\n")
            assert _channel(stack).state == ChannelState.SETTLING
            assert _channel(stack).closing_txid == ch.closing_txid
        api.answer = _rewritten(real, another_locktime)
        done = await stack.player("status", "1", "--gateway", api.url, check=False)
        forged = api.answer["settlement"]["txid"]
        assert done.returncode == 0, done
        assert done.stdout.startswith(f"channel 1: settled by {forged}, checked: ")
        assert done.stdout.endswith("; not on your node yet (or our change is already spent)\n")
        assert _channel(stack).state == ChannelState.SETTLING
        assert api.requests == 3
    finally:
        await api.stop()
    # The real answer passes, and the viewer's node confirms it.
    done = await stack.player("status", "1")
    assert done.stdout.startswith(f"channel 1: settled by {ch.closing_txid}, checked and ")
    assert _channel(stack).state == ChannelState.SETTLED
    await rpc.close()


# -- (d) --max-feerate ---------------------------------------------------------------------


async def test_max_feerate_refuses_the_terms_before_any_money_moves(stack_factory: Any) -> None:
    """The gateway quotes the exit at its settlement feerate (the fee floor, 2 sat/vB, on
    an idle regtest node): ``--max-feerate 1.5`` refuses it in one line before funding,
    before the cost lines; nothing is stored, nothing broadcast. At 2 it funds."""
    stack = await stack_factory()
    rpc = stack.rpc()
    done = await stack.player(
        "play", stack.info["ws"], "clip", "--max-feerate", "1.5", "--budget", "30000",
        "--out", "clip.mp4", check=False,
    )
    assert done.returncode == 1
    last = done.stderr.splitlines()[-1]
    match = re.fullmatch(
        r"player: the gateway quotes leaving at 2 sat/vB \(exit fee (\d+) sat for (\d+) vB\), "
        r"above --max-feerate 1\.5: not funding",
        last,
    )
    assert match and int(match[1]) == 2 * int(match[2]), last
    assert "leaving costs" not in done.stderr
    with Keystore(stack.player_dir) as keys:
        assert keys.channels() == []
    assert await rpc.call("getrawmempool") == []
    with sqlite3.connect(stack.datadir / "gateway.db") as db:
        funded = db.execute("SELECT count(*) FROM channels WHERE channel_id IS NOT NULL")
        assert funded.fetchone() == (0,)

    done = await stack.player(
        "play", stack.info["ws"], "clip", "--max-feerate", "2", "--budget", "30000",
        "--max-chunks", "1", "--out", "clip.mp4", "--no-pace",
    )
    assert _channel(stack).exit_fee == int(match[1])
    await rpc.close()


# -- (e) free left follows playback ---------------------------------------------------------


async def test_free_left_follows_playback_not_the_chunks_received_ahead(
    gateway: Any, tmp_path: Path
) -> None:
    """The gateway sends the free seconds at once; the progress's free time left counts
    down with the playback clock (pacing), and its position never passes what was
    received. Without pacing, what was written counts as played."""
    free_ms = 3_000  # the clip's first two chunks are free, the third straddles the boundary
    wallet = Wallet.connect(gateway.node.rpc_url, cookie_path=gateway.node.cookie_path)
    try:
        seen: list[tuple[float, Progress]] = []
        with Keystore(tmp_path / "paced") as store:
            player = Player(
                ws_url(gateway), store, wallet=wallet, budget=30_000, buffer_s=1.0,
                on_progress=lambda p: seen.append((time.monotonic(), p)),
            )
            result = await player.play("clip", max_chunks=6)
        assert result.chunks == 6
        # The gateway offers the binary pay (protocol.md section 5a): the player used it.
        assert player.pay_binary and player.binary_pays >= 1 and result.paid > 0
        playing = [(t, p) for t, p in seen if p.status == "playing" and p.chunks >= 1]
        start = playing[0][0]  # the playback clock starts with the first chunk
        # The free chunks arrived at once, long before they were watched...
        t_free, at_free = next((t, p) for t, p in playing if p.chunks == 2)
        assert t_free - start < 0.5 and at_free.media_ms >= 2_000
        assert at_free.free_left_ms >= free_ms - 500
        _follows_the_clock(playing, start, free_ms)

        seen.clear()
        with Keystore(tmp_path / "unpaced") as store:
            unpaced = Player(
                ws_url(gateway), store, wallet=wallet, budget=30_000, buffer_s=None,
                on_progress=lambda p: seen.append((time.monotonic(), p)),
            )
            await unpaced.play("clip", max_chunks=6)
    finally:
        await wallet.close()
    written = [p for _, p in seen if p.status == "playing" and p.chunks >= 1]
    assert written and all(
        p.position_ms == p.media_ms and p.free_left_ms == max(0, free_ms - p.media_ms)
        for p in written
    )


def _follows_the_clock(playing: list[tuple[float, Progress]], start: float, free_ms: int) -> None:
    """Free time left is the allowance less the time played since ``start``, within jitter."""
    for t, p in playing:
        assert p.position_ms <= p.media_ms
        # ...and free time left follows the clock, not the chunks received.
        expected = max(0, free_ms - (t - start) * 1000)
        assert abs(p.free_left_ms - expected) <= 600, (t - start, p)
    counting = [p.free_left_ms for t, p in playing if 1.0 <= t - start <= 2.0]
    assert counting and all(0 < left < free_ms - 500 for left in counting)


# -- item 4: a channel the gateway settles nothing for -----------------------------------


async def test_a_channel_that_paid_nothing_stays_refundable_until_refunded(
    stack_factory: Any,
) -> None:
    """A channel stopped while its funding confirms pays nothing, not even its reserve;
    the gateway closes it after the resume grace and broadcasts nothing. ``player
    status`` says so (``unsettled``: refund after expiry with ``player refund``),
    ``player channels`` shows it, and ``player refund`` brings the value back after
    expiry."""
    stack = await stack_factory("--min-conf", "1", "--resume-grace", "1")
    rpc = stack.rpc()
    tip = int(await rpc.call("getblockcount"))
    expiry = tip + 15  # 2.5 h at 600 s a block: inside the gateway's window
    cmd = [
        bin_path("player"), "play", stack.info["ws"], "clip", "--budget", "20000",
        "--expiry", f"h:{expiry}", "--out", str(stack.tmp / "x.mp4"),
        "--data-dir", str(stack.player_dir), "--wallet-rpc", stack.info["rpc"],
        "--wallet-cookie", stack.info["cookie"],
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=stack.tmp)
    deadline = time.monotonic() + 30
    while _states(stack) != [ChannelState.FUNDING]:
        assert time.monotonic() < deadline and proc.poll() is None
        await asyncio.sleep(0.1)
    proc.terminate()  # SIGTERM while waiting for a confirmation: nothing was paid
    _, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 1 and "interrupted while channel 1 was funding" in err
    await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
    deadline = time.monotonic() + 30
    while stack.channel_row()["state"] != "closed":
        assert time.monotonic() < deadline, stack.channel_row()
        await asyncio.sleep(0.2)

    status = await stack.player("status")
    assert status.stdout == (
        "channel 1: nothing was paid: refund after expiry with `player refund 1`\n"
    )
    assert _channel(stack).state == ChannelState.UNSETTLED
    row = (await stack.player("channels")).stdout.splitlines()[1]
    assert row.endswith("unsettled  none: refund after expiry")
    early = await stack.player("refund", check=False)
    assert early.returncode == 1 and "not valid before its expiry" in early.stderr
    await rpc.call("generatetoaddress", expiry - tip, await rpc.call("getnewaddress"))
    await stack.player("refund")
    ch = _channel(stack)
    assert ch.state == ChannelState.REFUNDED and ch.refund_txid
    await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
    refund = await get_transaction(rpc, ch.refund_txid)
    assert sum(btc_to_sat(o["value"]) for o in refund["vout"]) == 20_000 - (ch.refund_fee or 0)
    assert (await stack.player("status")).stdout == "no channel to follow\n"
    await rpc.close()


def _states(stack: Stack) -> list[str]:
    """The player's channel states, read without opening (or creating) its keystore."""
    path = stack.player_dir / "player.sqlite3"
    if not path.exists():
        return []
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as db:
        try:
            return [row[0] for row in db.execute("SELECT state FROM channels ORDER BY id")]
        except sqlite3.OperationalError:  # the schema is not written yet
            return []


# -- the check itself, case by case (no network) ----------------------------------------


def _stored(tmp_path: Path, *, balance: int) -> tuple[Keystore, StoredChannel]:
    """A keystore with one funded cltv channel (a made-up funding txid) and a payment."""
    store = Keystore(tmp_path)
    server = coincurve.PrivateKey().public_key.format(compressed=True)
    change = b"\x00\x14" + b"\x11" * 20
    rec = store.add_channel(
        gateway_url="ws://gw/paystream/2", network="regtest", kind="cltv",
        server_pubkey=server, expiry=int(time.time()) + 86_400, change_script=change,
        refund_script=change, exit_fee=282,
    )
    store.update(rec.id, txid="ab" * 32, vout=1, value=20_000, state=ChannelState.CLOSED)
    store.record_payment(rec.id, seq=1, balance=balance, sig=b"\x30sig", bill=0)
    return store, store.get(rec.id)


def _answer(rec: StoredChannel, k1: bytes, outputs: list[tuple[bytes, int]]) -> Any:
    """The channel API's ``settlement`` object for a one-input settlement of ``rec``.

    Its witness has the size of a real cooperative spend (two 72-byte signatures), so
    its vsize, and the feerate the check computes, are a real settlement's.
    """
    script = ChannelScript.make("cltv", k1, rec.server_pubkey, rec.expiry)
    tx = CTransaction(
        [CTxIn(COutPoint(lx(rec.txid or ""), rec.vout or 0), nSequence=0xFFFFFFFF)],
        [CTxOut(amount, CScript(spk)) for spk, amount in outputs],
        nLockTime=0,
        nVersion=2,
        witness=CTxWitness([CTxInWitness(CScriptWitness(
            [b"\x30" * 72, b"\x30" * 72, b"\x01", script.witness_script]
        ))]),
    )
    raw = bytes(tx.serialize())
    return {"txid": txid_of(raw), "tx": raw.hex(), "input_values": [rec.value]}


def test_the_settlement_check_case_by_case(tmp_path: Path) -> None:
    """``check_served_settlement``: our exact balance at our index and a feerate at least
    the quote pass; one sat less of ours, a fee below the quote, another txid, a missing
    input value or a transaction not spending our funding fail; more than our last
    balance (the gateway settled an earlier increment of ours) passes and is said."""
    store, rec = _stored(tmp_path, balance=19_000)
    k1 = store.pubkey
    publisher = b"\x00\x14" + b"\x22" * 20
    change = rec.change_script
    ok = _answer(rec, k1, [(change, 19_000), (publisher, 1_000 - 400)])  # fee 400 sat
    checked = check_served_settlement(rec, store.privkey, ok)
    assert (checked.index, checked.balance, checked.note) == (0, 19_000, "")
    assert checked.feerate >= checked.quoted == _quoted(rec, store.pubkey)

    more = _answer(rec, k1, [(change, 19_100), (publisher, 500)])
    assert check_served_settlement(rec, store.privkey, more).note == (
        "; it settles an earlier increment: 100 sat more back"
    )
    failing = [
        (_answer(rec, k1, [(change, 18_999), (publisher, 601)]), "not our last signed balance"),
        (_answer(rec, k1, [(change, 19_000), (publisher, 990)]), "below the quoted"),
        (ok | {"txid": "cd" * 32}, "the transaction served is "),
        (ok | {"input_values": [None]}, "does not list the value of every input"),
        (ok | {"input_values": [20_001]}, "the input values do not match"),
        (_answer(dataclasses.replace(rec, txid="ef" * 32), k1, [(change, 19_000)]),
         "does not spend our funding output"),
    ]
    for answer, why in failing:
        with pytest.raises(SettlementCheckFailed, match=why) as info:
            check_served_settlement(rec, store.privkey, answer)
        assert str(info.value).startswith(f"channel {rec.id}: settlement ")
    store.close()


def test_an_older_keystore_gains_the_new_columns(tmp_path: Path) -> None:
    """A keystore written before protocol version 2 (no ``exit_fee``, no ``settle_by``)
    opens with both columns added and its channels kept."""
    path = tmp_path / "player.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE channels (
                id INTEGER PRIMARY KEY AUTOINCREMENT, gateway_url TEXT NOT NULL,
                network TEXT NOT NULL, kind TEXT NOT NULL, server_pubkey BLOB NOT NULL,
                expiry INTEGER NOT NULL, change_script BLOB NOT NULL,
                refund_script BLOB NOT NULL, state TEXT NOT NULL, created_at REAL NOT NULL,
                txid TEXT, vout INTEGER, value INTEGER, funding_tx BLOB, refund_fee INTEGER,
                refund_server_sig BLOB, signed_refund BLOB,
                seq INTEGER NOT NULL DEFAULT 0, balance INTEGER, sig BLOB,
                bill INTEGER NOT NULL DEFAULT 0, closing_txid TEXT, refund_txid TEXT
            );
            INSERT INTO channels (gateway_url, network, kind, server_pubkey, expiry,
                change_script, refund_script, state, created_at, value, balance)
                VALUES ('ws://gw/paystream/1', 'regtest', 'cltv', x'02', 1, x'00', x'00',
                'closed', 0, 20000, 19000);
            """
        )
    with Keystore(tmp_path) as store:
        (old,) = store.channels()
        assert (old.exit_fee, old.settle_by, old.paid) == (0, None, 1_000)
        store.update(old.id, state=ChannelState.PENDING, settle_by=1_800_000_000)
    with Keystore(tmp_path) as store:
        assert store.get(1).settle_by == 1_800_000_000


def test_cost_lines_for_the_demo_video_and_a_long_film() -> None:
    """The cost lines' arithmetic (section 7: the free time, then the rate, rounded up
    once): the demo's 3-minute video at 2 sat/s after a free minute; a 2-hour film names
    five minutes too, and ``--from`` prices the rest of it."""
    demo = {"rate_msat": 2_000, "free_seconds": 60, "duration_ms": 180_000}
    assert cost_lines("sample-video", demo, exit_fee=282, quoted=Fraction(2), value=20_000) == [
        "sample-video costs 2 sat/s after its first 1:00 free (3:00 long)",
        "leaving costs 282 sat: the network fee to return your change, at 2 sat/vB "
        "(paid first, before any media)",
        "the whole item costs 240 sat, plus the exit fee; this channel holds 20000 sat",
    ]
    film = {"rate_msat": 1_500, "free_seconds": 60.5, "duration_ms": 7_200_000}
    lines = cost_lines(
        "film", film, exit_fee=300, quoted=Fraction(300, 141), value=50_000, start_ms=600_000
    )
    assert lines[0] == "film costs 1.5 sat/s after its first 1:00 free (2:00:00 long)"
    assert "at 2.13 sat/vB" in lines[1]
    # 5 min less the 60.5 free seconds; the rest from 10:00 less them too, rounded up.
    assert lines[2] == (
        "5:00 costs 360 sat, the rest from 10:00 9810 sat, plus the exit fee; "
        "this channel holds 50000 sat"
    )
    assert media_cost(1_500, 60_500, 6_600_000) == 9_810  # 6539.5 s at 1.5 sat/s, rounded up
