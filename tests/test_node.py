"""The embedded regtest node, driven only through RpcClient over HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from decimal import Decimal
from pathlib import Path
from typing import Any

import coincurve
import pytest
from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxOut
from bitcoin.core.script import CScript
from helpers_chain import get_transaction

from gateway.chain.rpc import (
    RpcAuthError,
    RpcClient,
    RpcError,
    RpcMethodNotFound,
    RpcTransportError,
)
from gateway.protocol.scripts import (
    address_to_script_pubkey,
    hash160,
    p2wpkh_script_pubkey,
    p2wsh_script_pubkey,
    script_pubkey_to_address,
)
from gateway.protocol.sighash import bip143_digest
from gateway.protocol.tx import decode_canonical, txid, with_witness, witness_stack

OP_IF, OP_ELSE, OP_ENDIF = b"\x63", b"\x67", b"\x68"
OP_CHECKSIG, OP_CHECKSIGVERIFY = b"\xac", b"\xad"
OP_CLTV, OP_DROP = b"\xb1", b"\x75"
SAT = Decimal("0.00000001")
#: The installed console script (``python -m gateway.cli`` would load a second
#: copy of gateway.cli, whose CliError main() would not catch).
GATEWAY = str(Path(sys.executable).with_name("gateway"))


def address_to_script(address: str) -> bytes:
    return address_to_script_pubkey(address, "regtest")


def script_to_address(script: bytes) -> str:
    address = script_pubkey_to_address(script, "regtest")
    assert address is not None
    return address


def sats(amount: Any) -> int:
    return int(Decimal(amount) / SAT)


def txout(value: int, script: bytes) -> CTxOut:
    return CTxOut(value, CScript(script))


def witnesses(tx: CTransaction) -> list[tuple[bytes, ...]]:
    return [witness_stack(tx, i) for i in range(len(tx.vin))]


async def fund_and_sign(
    rpc: RpcClient, outputs: list[CTxOut], locktime: int = 0
) -> CTransaction:
    """A signed wallet transaction paying ``outputs`` (not broadcast)."""
    template = CTransaction([], outputs, locktime, 2)
    funded = await rpc.call("fundrawtransaction", template.serialize().hex())
    signed = await rpc.call("signrawtransactionwithwallet", funded["hex"])
    assert signed["complete"]
    return decode_canonical(bytes.fromhex(signed["hex"]))


async def new_script(rpc: RpcClient) -> bytes:
    return address_to_script(await rpc.call("getnewaddress"))


async def test_premine_gives_spendable_balance(rpc: RpcClient) -> None:
    info = await rpc.call("getblockchaininfo")
    assert info["chain"] == "regtest" and info["blocks"] >= 120
    assert await rpc.call("getbalance") >= Decimal(1000)
    coins = await rpc.call("listunspent")
    assert coins and all(c["confirmations"] >= 100 for c in coins if c["amount"] == 50)
    tip = await rpc.call("getbestblockhash")
    assert await rpc.call("getblockhash", info["blocks"]) == tip
    header = await rpc.call("getblockheader", tip)
    block = await rpc.call("getblock", tip, 2)
    assert header["height"] == block["height"] == info["blocks"]
    assert block["tx"][0]["vin"][0]["coinbase"]
    raw = await rpc.call("getblock", tip, 0)
    assert len(bytes.fromhex(raw)) == block["size"]
    assert header["mediantime"] < header["time"] or header["mediantime"] == header["time"]


async def test_send_confirm_and_lookups(rpc: RpcClient) -> None:
    address = await rpc.call("getnewaddress")
    txid = await rpc.call("sendtoaddress", address, Decimal("1.25"))
    assert txid in await rpc.call("getrawmempool")
    entry = await rpc.call("getmempoolentry", txid)
    assert entry["vsize"] > 0 and entry["fees"]["base"] > 0
    mempool_tx = await rpc.call("getrawtransaction", txid, True)
    vout = next(o["n"] for o in mempool_tx["vout"] if o["scriptPubKey"].get("address") == address)
    assert (await rpc.call("gettxout", txid, vout))["confirmations"] == 0
    assert await rpc.call("gettxout", txid, vout, False) is None
    [block_hash] = await rpc.call("generatetoaddress", 1, address)
    assert txid in (await rpc.call("getblock", block_hash))["tx"]
    assert await rpc.call("getrawmempool") == []
    # A stock node (no -txindex) finds a confirmed transaction only with its block.
    with pytest.raises(RpcError) as info:
        await rpc.call("getrawtransaction", txid, True)
    assert info.value.code == -5 and info.value.message == (
        "No such mempool transaction. Use -txindex or provide a block hash to enable "
        "blockchain transaction queries. Use gettransaction for wallet transactions."
    )
    confirmed = await rpc.call("getrawtransaction", txid, True, block_hash)
    assert confirmed["in_active_chain"] is True
    assert confirmed["blockhash"] == block_hash and confirmed["confirmations"] == 1
    assert await rpc.call("getrawtransaction", txid, False, block_hash) == confirmed["hex"]
    assert (await get_transaction(rpc, txid))["blockhash"] == block_hash
    parent = (await rpc.call("getblockheader", block_hash))["previousblockhash"]
    with pytest.raises(RpcError) as info:
        await rpc.call("getrawtransaction", txid, True, parent)
    assert info.value.code == -5 and info.value.message == (
        "No such transaction found in the provided block. Use gettransaction for wallet "
        "transactions."
    )
    out = await rpc.call("gettxout", txid, vout)
    assert out["value"] == Decimal("1.25") and out["scriptPubKey"]["address"] == address
    listed = await rpc.call("listunspent", 1, 9999999, [address])
    assert [(c["txid"], c["amount"]) for c in listed] == [(txid, Decimal("1.25"))]


async def test_double_spend_rejected(rpc: RpcClient) -> None:
    script = await new_script(rpc)
    first = await fund_and_sign(rpc, [txout(100_000, script)])
    # Same inputs, different outputs: a conflicting spend.
    second_template = CTransaction(first.vin, [txout(90_000, script), first.vout[-1]], 0, 2)
    signed = await rpc.call("signrawtransactionwithwallet", second_template.serialize().hex())
    await rpc.call("sendrawtransaction", first.serialize().hex())
    with pytest.raises(RpcError) as info:
        await rpc.call("sendrawtransaction", signed["hex"])
    assert info.value.code == -26 and info.value.message == "txn-mempool-conflict"
    await rpc.call("generatetoaddress", 1, script_to_address(script))
    with pytest.raises(RpcError) as info:
        await rpc.call("sendrawtransaction", signed["hex"])
    assert info.value.code == -25 and "bad-txns-inputs-missingorspent" in info.value.message
    verdict = await rpc.call("testmempoolaccept", [signed["hex"]])
    assert verdict[0]["allowed"] is False
    assert verdict[0]["reject-reason"] == "bad-txns-inputs-missingorspent"


def corrupt_signature(tx: CTransaction) -> CTransaction:
    """Flip one bit inside r of input 0's signature (still strict DER, low S)."""
    stacks = witnesses(tx)
    sig = bytearray(stacks[0][0])
    sig[10] ^= 0x01
    return with_witness(tx, [(bytes(sig), *stacks[0][1:]), *stacks[1:]])


async def test_bad_signature_rejected_with_script_reason(rpc: RpcClient) -> None:
    tx = corrupt_signature(await fund_and_sign(rpc, [txout(50_000, await new_script(rpc))]))
    with pytest.raises(RpcError) as info:
        await rpc.call("sendrawtransaction", tx.serialize().hex())
    assert info.value.code == -26
    assert info.value.message.startswith("mandatory-script-verify-flag-failed (")


async def test_relay_policy(rpc: RpcClient) -> None:
    script = await new_script(rpc)
    dust = await fund_and_sign(rpc, [txout(293, script)])  # P2WPKH dust limit is 294
    nulldata = await fund_and_sign(rpc, [txout(1000, script), txout(0, b"\x6a\x01\x01")] * 1)
    results = await rpc.call(
        "testmempoolaccept", [dust.serialize().hex(), nulldata.serialize().hex()]
    )
    assert results[0]["reject-reason"] == "dust"
    assert results[1]["allowed"] is True
    assert txid(nulldata)[::-1].hex() not in await rpc.call("getrawmempool")
    # A fee below 1 sat/vB: give almost everything back as change.
    coin = (await rpc.call("listunspent"))[0]
    cheap = CTransaction([CTxIn(COutPoint(bytes.fromhex(coin["txid"])[::-1], coin["vout"]))],
                         [txout(sats(coin["amount"]) - 50, script)], 0, 2)
    signed = await rpc.call("signrawtransactionwithwallet", cheap.serialize().hex())
    with pytest.raises(RpcError, match="min relay fee not met"):
        await rpc.call("sendrawtransaction", signed["hex"])
    # High-S signature: valid for consensus, refused by relay policy (BIP62 rule 5).
    tx = await fund_and_sign(rpc, [txout(10_000, script)])
    stacks = witnesses(tx)
    sig = stacks[0][0]
    r_len = sig[3]
    s = int.from_bytes(sig[6 + r_len : -1], "big")
    n = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
    high = (n - s).to_bytes(33, "big")
    der = sig[2 : 4 + r_len] + b"\x02\x21" + high
    high_sig = b"\x30" + bytes((len(der),)) + der + sig[-1:]
    bad = with_witness(tx, [(high_sig, stacks[0][1]), *stacks[1:]])
    with pytest.raises(RpcError, match="S value is unnecessarily high"):
        await rpc.call("sendrawtransaction", bad.serialize().hex())


def push(item: bytes | int) -> bytes:
    """One minimal push (BIP62: integers as CScriptNum, small ones as OP_n)."""
    return bytes(CScript([item]))


def cltv_script(client: bytes, server: bytes, expiry: int) -> bytes:
    """protocol.md section 2's ``cltv`` witness script, built by hand."""
    return (
        OP_IF + push(server) + OP_CHECKSIGVERIFY + OP_ELSE + push(expiry)
        + OP_CLTV + OP_DROP + OP_ENDIF + push(client) + OP_CHECKSIG
    )


async def fund_cltv(
    rpc: RpcClient, expiry: int
) -> tuple[coincurve.PrivateKey, bytes, CTransaction]:
    client_key = coincurve.PrivateKey(os.urandom(32))
    server_pub = coincurve.PrivateKey(os.urandom(32)).public_key.format()
    wscript = cltv_script(client_key.public_key.format(), server_pub, expiry)
    funding = await fund_and_sign(rpc, [txout(200_000, p2wsh_script_pubkey(wscript))])
    await rpc.call("sendrawtransaction", funding.serialize().hex())
    await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
    return client_key, wscript, funding


def refund(
    key: coincurve.PrivateKey, wscript: bytes, funding: CTransaction, locktime: int, pay: bytes
) -> str:
    """T2: spend the funding output by the CLTV branch (witness: sig, false, script)."""
    spend = CTxIn(COutPoint(txid(funding), 0), CScript(), 0xFFFFFFFE)
    tx = CTransaction([spend], [txout(199_000, pay)], locktime, 2)
    digest = bip143_digest(tx, 0, wscript, 200_000)
    sig = key.sign(digest, hasher=None) + b"\x01"
    return with_witness(tx, [(sig, b"", wscript)]).serialize().hex()


async def test_cltv_refund_by_height(rpc: RpcClient) -> None:
    pay = await new_script(rpc)
    expiry = await rpc.call("getblockcount") + 4
    key, wscript, funding = await fund_cltv(rpc, expiry)
    with pytest.raises(RpcError) as info:
        await rpc.call("sendrawtransaction", refund(key, wscript, funding, expiry, pay))
    assert info.value.code == -26 and info.value.message == "non-final"
    # A final nLockTime below the script's expiry fails CHECKLOCKTIMEVERIFY itself.
    early = refund(key, wscript, funding, expiry - 3, pay)
    with pytest.raises(RpcError, match=r"mandatory-script-verify-flag-failed \(Locktime"):
        await rpc.call("sendrawtransaction", early)
    await rpc.call("generatetoaddress", 3, script_to_address(pay))
    txid = await rpc.call("sendrawtransaction", refund(key, wscript, funding, expiry, pay))
    [block] = await rpc.call("generatetoaddress", 1, script_to_address(pay))
    assert txid in (await rpc.call("getblock", block))["tx"]


async def test_cltv_refund_by_time(rpc: RpcClient) -> None:
    pay = await new_script(rpc)
    mtp = (await rpc.call("getblockchaininfo"))["mediantime"]
    expiry = mtp + 1200  # a time (>= 500,000,000), about 20 minutes ahead
    key, wscript, funding = await fund_cltv(rpc, expiry)
    tx = refund(key, wscript, funding, expiry, pay)
    with pytest.raises(RpcError, match=r"^non-final"):
        await rpc.call("sendrawtransaction", tx)
    # Move the clock past the expiry; MTP (median of 11 block times) follows.
    await rpc.call("setmocktime", expiry + 60)
    try:
        await rpc.call("generatetoaddress", 6, script_to_address(pay))
        assert (await rpc.call("getblockchaininfo"))["mediantime"] > expiry
        txid = await rpc.call("sendrawtransaction", tx)
        [block] = await rpc.call("generatetoaddress", 1, script_to_address(pay))
        assert txid in (await rpc.call("getblock", block))["tx"]
        assert (await rpc.call("getblock", block))["time"] >= expiry + 60
    finally:
        await rpc.call("setmocktime", 0)


async def test_kernel_rejected_block_never_becomes_tip(rpc: RpcClient) -> None:
    address = await rpc.call("getnewaddress")
    tip = await rpc.call("getbestblockhash")
    height = await rpc.call("getblockcount")
    bad = corrupt_signature(await fund_and_sign(rpc, [txout(70_000, address_to_script(address))]))
    with pytest.raises(RpcError) as info:
        await rpc.call("generateblock", address, [bad.serialize().hex()])
    assert info.value.code == -25
    assert "block-script-verify-flag-failed" in info.value.message
    assert await rpc.call("getbestblockhash") == tip
    assert await rpc.call("getblockcount") == height
    # A good transaction given by txid is mined.
    good = await fund_and_sign(rpc, [txout(70_000, address_to_script(address))])
    txid = await rpc.call("sendrawtransaction", good.serialize().hex())
    mined = await rpc.call("generateblock", address, [txid])
    assert await rpc.call("getbestblockhash") == mined["hash"]


async def test_rpc_errors(rpc: RpcClient, node: Any) -> None:
    with pytest.raises(RpcMethodNotFound):
        await rpc.call("getwalletinfo_nope")
    with pytest.raises(RpcError) as info:
        await rpc.call("getblockhash", 10**6)
    assert info.value.code == -8
    with pytest.raises(RpcError) as info:
        await rpc.call("getrawtransaction", "00" * 32)
    assert info.value.code == -5
    with pytest.raises(RpcError) as info:
        await rpc.call("sendrawtransaction", "zz")
    assert info.value.code == -22
    with pytest.raises(RpcError) as info:
        await rpc.call("sendtoaddress", "notanaddress", 1)
    assert info.value.code == -5
    with pytest.raises(RpcError) as info:
        await rpc.call("getblockcount", 1, 2)
    assert info.value.code == -1
    async with RpcClient(node.rpc_url, user="__cookie__", password="wrong") as bad:
        with pytest.raises(RpcAuthError, match="401"):
            await bad.call("getblockcount")
    named = await rpc.batch([("getblockcount", []), ("getblockhash", [0])])
    assert named[1] == "0f9188f13cb7b2c71f2a335e3a4fc328bf5beb436012afca590b1a11466e2206"


async def test_restart_keeps_tip_balance_utxos_and_mempool(node_factory: Any) -> None:
    started = node_factory("restart")
    async with started.client() as rpc:
        address = await rpc.call("getnewaddress")
        await rpc.call("sendtoaddress", address, 3)
        await rpc.call("generatetoaddress", 1, address)
        pending = await rpc.call("sendtoaddress", address, 1)
        before = (
            await rpc.call("getbestblockhash"),
            await rpc.call("getbalance"),
            sorted((c["txid"], c["vout"]) for c in await rpc.call("listunspent")),
        )
    started.restart()
    async with started.client() as rpc:
        after = (
            await rpc.call("getbestblockhash"),
            await rpc.call("getbalance"),
            sorted((c["txid"], c["vout"]) for c in await rpc.call("listunspent")),
        )
        assert after == before
        assert await rpc.call("getrawmempool") == [pending]
        assert await rpc.call("getblockcount") == 121


async def test_block_interval_mines_mempool_and_stop_rpc(node_factory: Any) -> None:
    started = node_factory("interval", block_interval=0.1, premine=101)
    async with started.client() as rpc:
        txid = await rpc.call("sendtoaddress", await rpc.call("getnewaddress"), 1)
        for _ in range(100):
            if not await rpc.call("getrawmempool"):
                break
            await asyncio.sleep(0.05)
        assert (await get_transaction(rpc, txid))["confirmations"] >= 1
        assert await rpc.call("stop") == "Bitcoin Core stopping"
        await asyncio.sleep(0.3)
        with pytest.raises(RpcTransportError):
            await rpc.call("getblockcount")


def test_cli_prints_url_and_stops_on_sigterm(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [GATEWAY, "node", "--datadir", str(tmp_path),
         "--rpc-port", "0", "--txindex"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
        url = lines[1].split("RPC URL: ")[1].strip()
        cookie = lines[2].split("cookie: ")[1].strip()
        assert Path(cookie) == tmp_path / "regtest" / ".cookie"

        async def height() -> int:
            async with RpcClient(url, cookie_path=cookie) as rpc:
                # --txindex: a confirmed transaction is found by its txid alone.
                coinbase = (await rpc.call("getblock", await rpc.call("getblockhash", 7)))["tx"][0]
                assert (await rpc.call("getrawtransaction", coinbase, True))["confirmations"] == 114
                return int(await rpc.call("getblockcount"))

        assert asyncio.run(height()) == 120
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not Path(cookie).exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_reports_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(
            [GATEWAY, "node", "--datadir", str(tmp_path),
             "--rpc-port", str(port)],
            capture_output=True, text=True, timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr.startswith("gateway: error: cannot listen")


def test_hash160_matches_known_vector() -> None:
    # Hash160 of the generator point's compressed key (well-known test vector).
    g = bytes.fromhex("0279be667ef9dcbbac55a06295ce870b07029bfcdb2dce28d959f2815b16f81798")
    assert hash160(g).hex() == "751e76e8199196d454941c45d1b3a323f1433bd6"


def test_kernel_process_block_reports_reason_and_keeps_tip(tmp_path: Path) -> None:
    from gateway.chain.blocks import assemble_block, block_subsidy
    from gateway.chain.kernel import Kernel

    kernel = Kernel(tmp_path)
    try:
        script = p2wpkh_script_pubkey(bytes(20))
        genesis = kernel.tip_hash
        when = kernel.median_time_past() + 1
        greedy = assemble_block(genesis, 1, when, [], [txout(block_subsidy(1) + 1, script)])
        accepted, reason = kernel.process_block(greedy.serialize())
        assert not accepted and reason is not None and reason.startswith("bad-cb-amount")
        wrong_height = assemble_block(genesis, 7, when, [], [txout(1, script)])
        assert kernel.process_block(wrong_height.serialize())[1] == (
            "bad-cb-height, block height mismatch in coinbase"
        )
        assert kernel.tip_height == 0 and kernel.tip_hash == genesis
        good = assemble_block(genesis, 1, when, [], [txout(block_subsidy(1), script)])
        assert kernel.process_block(good.serialize()) == (True, None)
        assert kernel.tip_hash == good.GetHash() and kernel.block_at(1) == good.serialize()
    finally:
        kernel.close()


async def test_a_full_mempool_is_mined_over_several_blocks_within_the_weight_limit(
    node_factory: Any,
) -> None:
    """Blocks are assembled up to the weight limit; the rest (and the children of
    what was left) wait for the next block. Before, the whole mempool went into
    one block, which the kernel refused (bad-blk-weight) past 4 MWU."""
    from gateway.chain.node import BLOCK_RESERVED_WEIGHT

    started = node_factory("full", premine=101)
    node = started.node
    async with started.client() as rpc:
        txids = [
            await rpc.call("sendtoaddress", await rpc.call("getnewaddress"), 1)
            for _ in range(7)
        ]
        weights = {t: (await rpc.call("getmempoolentry", t))["weight"] for t in txids}
        # Room for two of these transactions per block.
        node.max_block_weight = BLOCK_RESERVED_WEIGHT + 2 * max(weights.values())
        mined: list[list[str]] = []
        while await rpc.call("getrawmempool"):
            [block_hash] = await rpc.call("generatetoaddress", 1, await rpc.call("getnewaddress"))
            block = await rpc.call("getblock", block_hash)
            body = block["tx"][1:]
            assert body, "a block must take something from a non-empty mempool"
            assert sum(weights[t] for t in body) <= 2 * max(weights.values())
            mined.append(body)
        assert sorted(t for body in mined for t in body) == sorted(txids)
        assert len(mined) >= 4  # seven transactions, at most two per block
        for t in txids:
            assert (await get_transaction(rpc, t))["confirmations"] >= 1


async def test_txindex_opt_in_and_its_messages(node_factory: Any) -> None:
    """With txindex=True (bitcoind -txindex) confirmed transactions are found by txid."""
    started = node_factory("txindex", premine=101, txindex=True)
    async with started.client() as rpc:
        address = await rpc.call("getnewaddress")
        txid = await rpc.call("sendtoaddress", address, 1)
        [block_hash] = await rpc.call("generatetoaddress", 1, address)
        found = await rpc.call("getrawtransaction", txid, True)
        assert found["blockhash"] == block_hash and found["confirmations"] == 1
        assert "in_active_chain" not in found  # only when a block hash is given, as in Core
        coinbase = (await rpc.call("getblock", block_hash))["tx"][0]
        assert (await rpc.call("getrawtransaction", coinbase, 1))["blockhash"] == block_hash
        with pytest.raises(RpcError) as info:
            await rpc.call("getrawtransaction", "00" * 32)
        assert info.value.code == -5 and info.value.message == (
            "No such mempool or blockchain transaction. Use gettransaction for wallet "
            "transactions."
        )
        with pytest.raises(RpcError) as info:
            await rpc.call("getrawtransaction", txid, True, "11" * 32)
        assert info.value.code == -5 and info.value.message == "Block hash not found"
    # Started again without it: a stock node, whose index is dropped, not left stale.
    started.stop()
    started.options["txindex"] = False
    started.start()
    async with started.client() as rpc:
        with pytest.raises(RpcError) as info:
            await rpc.call("getrawtransaction", txid, True)
        assert info.value.message.startswith("No such mempool transaction. Use -txindex")
        await rpc.call("generatetoaddress", 1, address)
    # And with it again: the index is rebuilt over the whole active chain.
    started.stop()
    started.options["txindex"] = True
    started.start()
    async with started.client() as rpc:
        assert (await rpc.call("getrawtransaction", txid, True))["confirmations"] == 2


async def test_estimatesmartfee_learns_from_confirmed_mempool_transactions(
    node_factory: Any,
) -> None:
    started = node_factory("fees", premine=101)
    insufficient = {"errors": ["Insufficient data or no feerate found"], "blocks": 0}
    async with started.client() as rpc:
        assert await rpc.call("estimatesmartfee", 2) == insufficient
        address = await rpc.call("getnewaddress")
        for rate in (2, 5):  # sat/vB; two transactions are not enough yet
            await rpc.call("sendtoaddress", address, 1, "", "", False, True, None, "unset",
                           True, rate)
        await rpc.call("generatetoaddress", 1, address)
        assert await rpc.call("estimatesmartfee", 2) == insufficient
        # A block of outside transactions (generateblock with raw hex) adds nothing.
        tx = await fund_and_sign(rpc, [txout(10_000, address_to_script(address))])
        await rpc.call("generateblock", address, [tx.serialize().hex()])
        assert await rpc.call("estimatesmartfee", 2) == insufficient
        await rpc.call("sendtoaddress", address, 1, "", "", False, True, None, "unset",
                       True, 20)
        await rpc.call("generatetoaddress", 1, address)
        answer = await rpc.call("estimatesmartfee", 1)
        # Nearest-rank 90th percentile of {2, 5, 20} sat/vB, never below 1 sat/vB.
        assert answer["blocks"] == 2
        assert Decimal("0.00019") <= answer["feerate"] <= Decimal("0.00021")
        assert (await rpc.call("estimatesmartfee", 6, "conservative"))["blocks"] == 6
        for bad in ((0,), (1009,), (2, "fast")):
            with pytest.raises(RpcError) as info:
                await rpc.call("estimatesmartfee", *bad)
            assert info.value.code == -8
        with pytest.raises(RpcError) as info:
            await rpc.call("estimatesmartfee", "2")
        assert info.value.code == -3
    # Nothing is persisted: like Core without fee_estimates.dat.
    started.restart()
    async with started.client() as rpc:
        assert await rpc.call("estimatesmartfee", 2) == insufficient


def test_node_sqlite_is_private_and_tightened(tmp_path: Path, caplog: Any) -> None:
    """node.sqlite holds the wallet's keys: 0600 in a 0700 directory, tightened if looser."""
    import logging
    import stat as stat_module

    from gateway.chain.node.store import open_db

    netdir = tmp_path / "regtest"
    open_db(netdir).close()
    mode = lambda p: stat_module.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(netdir) == 0o700 and mode(netdir / "node.sqlite") == 0o600
    for path in netdir.glob("node.sqlite*"):
        assert mode(path) & 0o077 == 0
    os.chmod(netdir, 0o755)
    os.chmod(netdir / "node.sqlite", 0o644)
    with caplog.at_level(logging.WARNING, logger="gateway.chain.node.store"):
        open_db(netdir).close()
    assert mode(netdir) == 0o700 and mode(netdir / "node.sqlite") == 0o600
    assert sum("tightened permissions" in r.getMessage() for r in caplog.records) == 2


async def test_taproot_addresses_are_bech32m(rpc: RpcClient) -> None:
    """BIP350: v1+ witness addresses use bech32m; a v1 program with a bech32
    checksum, or v0 with bech32m, is not an address. Before, the node decoded
    with a bech32-only decoder: it refused bcrt1p... and took the wrong ones."""
    from helpers_bech32 import encode_with_checksum

    from gateway.protocol.scripts import _segwit_encode

    program = bytes(range(32))
    taproot = _segwit_encode("bcrt", 1, program)
    assert taproot.startswith("bcrt1p")
    txid = await rpc.call("sendtoaddress", taproot, Decimal("0.001"))
    tx = await rpc.call("getrawtransaction", txid, True)
    [out] = [o for o in tx["vout"] if o["scriptPubKey"]["type"] == "witness_v1_taproot"]
    assert out["scriptPubKey"]["address"] == taproot
    assert out["scriptPubKey"]["hex"] == "5120" + program.hex()
    for wrong in (
        encode_with_checksum("bcrt", 1, program, bech32m=False),  # v1 with bech32
        encode_with_checksum("bcrt", 0, bytes(20), bech32m=True),  # v0 with bech32m
    ):
        with pytest.raises(RpcError) as info:
            await rpc.call("sendtoaddress", wrong, Decimal("0.001"))
        assert info.value.code == -5


async def test_node_sqlite_from_before_the_blocks_table_is_upgraded(node_factory: Any) -> None:
    """Earlier nodes kept no blocks in node.sqlite and wrote the mempool at shutdown
    only: their data dirs start with the chain imported from the kernel."""
    import sqlite3

    started = node_factory("old", premine=101)
    async with started.client() as rpc:
        address = await rpc.call("getnewaddress")
        await rpc.call("generatetoaddress", 2, address)
        pending = await rpc.call("sendtoaddress", address, 1)
        before = (await rpc.call("getbestblockhash"), await rpc.call("getbalance"))
    started.stop()
    db = sqlite3.connect(started.datadir / "regtest" / "node.sqlite")
    with db:  # the earlier schema
        rows = db.execute("SELECT seq, raw, time FROM mempool").fetchall()
        db.execute("DROP TABLE blocks")
        db.execute("DROP TABLE mempool")
        db.execute("CREATE TABLE mempool (seq INTEGER PRIMARY KEY, raw BLOB, time INTEGER)")
        db.executemany("INSERT INTO mempool VALUES (?, ?, ?)", rows)
        db.execute("CREATE TABLE txindex (txid BLOB PRIMARY KEY, height INTEGER)")
    db.close()
    started.start()
    async with started.client() as rpc:
        assert (await rpc.call("getbestblockhash"), await rpc.call("getbalance")) == before
        assert await rpc.call("getrawmempool") == [pending]
        assert (await rpc.call("getblock", await rpc.call("getblockhash", 50)))["height"] == 50
        [mined] = await rpc.call("generatetoaddress", 1, address)
        assert pending in (await rpc.call("getblock", mined))["tx"]


async def test_bad_input_never_breaks_an_rpc(rpc: RpcClient) -> None:
    """Garbage parameters get a JSON-RPC error (Core's code), never a dropped connection."""
    methods = [
        "getblockchaininfo", "getblockcount", "getbestblockhash", "getblockhash",
        "getblockheader", "getblock", "getchaintips", "getrawtransaction",
        "decoderawtransaction", "gettxout", "invalidateblock", "reconsiderblock",
        "sendrawtransaction", "testmempoolaccept", "getrawmempool", "getmempoolentry",
        "getmempoolinfo", "gettxspendingprevout", "estimatesmartfee", "generateblock",
        "submitblock", "setmocktime", "getnewaddress", "getrawchangeaddress", "getbalance",
        "listunspent", "sendtoaddress", "fundrawtransaction", "signrawtransactionwithwallet",
    ]
    garbage: list[list[Any]] = [
        [None], ["x"], [-1], [1.5], [{"a": 1}], [[{"txid": 5}]], ["00" * 32, "y", "z"],
        [10**30], [list(range(20))], ["zz" * 32, {"b": []}],
    ]
    for method in methods:
        for params in garbage:
            try:
                await rpc.call(method, *params)
            except RpcError as exc:
                assert isinstance(exc.code, int) and exc.message, (method, params)
    with pytest.raises(RpcError) as info:
        await rpc.call("setmocktime", 10**12)
    assert info.value.code == -8
    assert await rpc.call("getblockcount") >= 120  # still serving


def test_gateway_node_does_not_import_gateway_cli() -> None:
    """``gateway node``'s module raises gateway.errors.CliError: no import cycle through
    gateway.cli (which imports every subcommand)."""
    code = (
        "import sys, gateway.chain.node.cli as c; "
        "from gateway.errors import CliError; import gateway.cli as g; "
        "assert g.CliError is CliError; "
        "print('gateway.cli' in sys.modules)"
    )
    before = subprocess.run(
        [sys.executable, "-c", code.replace("import gateway.cli as g; ", "").replace(
            "assert g.CliError is CliError; ", "")],
        capture_output=True, text=True, check=True,
    )
    assert before.stdout.strip() == "False"
    subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
