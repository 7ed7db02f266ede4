"""Reorgs on the embedded node: invalidateblock, reconsiderblock, competing blocks.

Everything goes through RpcClient over HTTP on 127.0.0.1 against the real
kernel; the expected answers are Bitcoin Core's (Core 27+).
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from bitcoin.core import CTransaction, CTxOut
from bitcoin.core.script import CScript

from gateway.chain.blocks import block_hash_hex
from gateway.chain.rpc import RpcClient, RpcError
from gateway.protocol.scripts import address_to_script_pubkey
from gateway.protocol.tx import decode_canonical
from gateway.protocol.tx import txid as tx_id


async def tip(rpc: RpcClient) -> tuple[int, str]:
    """(height, hash) of the tip, checked against getblockchaininfo and getblockhash."""
    info = await rpc.call("getblockchaininfo")
    best = await rpc.call("getbestblockhash")
    assert info["bestblockhash"] == best
    assert await rpc.call("getblockhash", info["blocks"]) == best
    return info["blocks"], best


async def output_index(rpc: RpcClient, txid: str, address: str) -> int:
    tx = await rpc.call("getrawtransaction", txid, True)
    return next(o["n"] for o in tx["vout"] if o["scriptPubKey"].get("address") == address)


async def test_invalidate_conflict_and_reconsider(node_factory: Any) -> None:
    started = node_factory("reorg")
    async with started.client() as rpc:
        miner = await rpc.call("getnewaddress")
        payee = await rpc.call("getnewaddress")
        base_height, base = await tip(rpc)
        # A funding-like payment, confirmed in block B, then C on top of it.
        txid = await rpc.call("sendtoaddress", payee, Decimal("2"))
        vout = await output_index(rpc, txid, payee)
        funding = decode_canonical(bytes.fromhex(await rpc.call("getrawtransaction", txid)))
        balance_at_base = await rpc.call("getbalance")
        [block_b, block_c] = await rpc.call("generatetoaddress", 2, miner)
        assert (await rpc.call("gettxout", txid, vout))["confirmations"] == 2
        balance = await rpc.call("getbalance")

        assert await rpc.call("invalidateblock", block_b) is None
        assert await tip(rpc) == (base_height, base)
        # Core: the disconnected transaction is back in the mempool, unconfirmed.
        assert await rpc.call("getrawmempool") == [txid]
        assert (await rpc.call("gettxout", txid, vout))["confirmations"] == 0
        # The wallet follows: the coinbases B and C matured are immature again.
        assert await rpc.call("getbalance") == balance_at_base
        # Stale blocks stay readable, with confirmations -1.
        for stale in (block_b, block_c):
            assert (await rpc.call("getblockheader", stale))["confirmations"] == -1
            assert (await rpc.call("getblock", stale))["confirmations"] == -1
        tx_in_b = await rpc.call("getrawtransaction", txid, True, block_b)
        assert tx_in_b["in_active_chain"] is False and tx_in_b["confirmations"] == 0
        assert "nextblockhash" not in await rpc.call("getblockheader", base)

        # A double spend of the same wallet input, mined directly with generateblock
        # although it conflicts with the mempool (Core allows it and evicts the other).
        spent = [(i.prevout.hash[::-1].hex(), i.prevout.n) for i in funding.vin]
        payout = CScript(address_to_script_pubkey(miner, "regtest"))
        conflict_template = CTransaction(
            funding.vin, [CTxOut(sum_value(funding) - 50_000, payout)], 0, 2
        )
        signed = await rpc.call(
            "signrawtransactionwithwallet", conflict_template.serialize().hex()
        )
        assert signed["complete"]
        conflict_txid = tx_id(decode_canonical(bytes.fromhex(signed["hex"])))[::-1].hex()
        spending = await rpc.call(
            "gettxspendingprevout", [{"txid": t, "vout": n} for t, n in spent]
        )
        assert [s["spendingtxid"] for s in spending] == [txid] * len(spent)
        block_d = (await rpc.call("generateblock", miner, [signed["hex"]]))["hash"]
        assert await tip(rpc) == (base_height + 1, block_d)
        assert await rpc.call("getrawmempool") == []
        assert await rpc.call("gettxout", txid, vout) is None
        assert (await rpc.call("gettxout", conflict_txid, 0))["confirmations"] == 1
        spending = await rpc.call(
            "gettxspendingprevout", [{"txid": t, "vout": n} for t, n in spent]
        )
        assert all("spendingtxid" not in s for s in spending)

        # Reconsider B: its branch (B, C) has more work than D: the node switches back.
        assert await rpc.call("reconsiderblock", block_b) is None
        assert await tip(rpc) == (base_height + 2, block_c)
        assert (await rpc.call("gettxout", txid, vout))["confirmations"] == 2
        assert await rpc.call("gettxout", conflict_txid, 0) is None
        assert await rpc.call("getrawmempool") == []  # the conflict lost to the chain
        assert (await rpc.call("getblockheader", block_d))["confirmations"] == -1
        assert (await rpc.call("getblockheader", block_b))["nextblockhash"] == block_c
        tips = {t["hash"]: t for t in await rpc.call("getchaintips")}
        assert tips[block_c]["status"] == "active" and tips[block_c]["branchlen"] == 0
        assert tips[block_d]["status"] == "valid-fork" and tips[block_d]["branchlen"] == 1
        assert await rpc.call("getbalance") == balance

        # Equal work: C invalidated, E mined on B; reconsidering C keeps E (first seen).
        await rpc.call("invalidateblock", block_c)
        assert await tip(rpc) == (base_height + 1, block_b)
        [block_e] = await rpc.call("generatetoaddress", 1, miner)
        await rpc.call("reconsiderblock", block_c)
        assert await tip(rpc) == (base_height + 2, block_e)
        tips = {t["hash"]: t["status"] for t in await rpc.call("getchaintips")}
        assert tips[block_c] == "valid-fork"
        chain_before = [await rpc.call("getblockhash", h) for h in range(base_height + 3)]
    # Everything survives a restart: the chain, its stale branches, the index.
    started.restart()
    async with started.client() as rpc:
        assert await tip(rpc) == (base_height + 2, block_e)
        assert [await rpc.call("getblockhash", h) for h in range(base_height + 3)] == chain_before
        assert (await rpc.call("gettxout", txid, vout))["confirmations"] == 2
        assert (await rpc.call("getblockheader", block_d))["confirmations"] == -1
        assert await rpc.call("getbalance") == balance


def sum_value(tx: CTransaction) -> int:
    """Total output value of ``tx`` (its inputs pay at least that)."""
    return sum(o.nValue for o in tx.vout)


async def test_invalidate_errors_and_side_branches(node_factory: Any) -> None:
    started = node_factory("errors", premine=101)
    async with started.client() as rpc:
        with pytest.raises(RpcError) as info:
            await rpc.call("invalidateblock", "11" * 32)
        assert info.value.code == -5 and info.value.message == "Block not found"
        with pytest.raises(RpcError) as info:
            await rpc.call("reconsiderblock", "zz")
        assert info.value.code == -8
        genesis = await rpc.call("getblockhash", 0)
        with pytest.raises(RpcError) as info:
            await rpc.call("invalidateblock", genesis)
        assert info.value.code == -20
        miner = await rpc.call("getnewaddress")
        height, top = await tip(rpc)
        # Invalidating a block off the active chain leaves the tip alone.
        await rpc.call("invalidateblock", top)
        [side] = await rpc.call("generatetoaddress", 1, miner)
        await rpc.call("invalidateblock", top)  # again: a no-op on a stale block
        assert await tip(rpc) == (height, side)
        # A block built on an invalid one is refused (Core: bad-prevblk).
        proposal = await rpc.call("generateblock", miner, [], False)
        raw = bytearray(bytes.fromhex(proposal["hex"]))
        raw[4:36] = bytes.fromhex(top)[::-1]
        assert await rpc.call("submitblock", raw.hex()) == "bad-prevblk"
        # Reconsidered, the old tip's branch has the same work: the current tip stays.
        await rpc.call("reconsiderblock", top)
        assert await tip(rpc) == (height, side)
        tips = {t["hash"]: t["status"] for t in await rpc.call("getchaintips")}
        assert tips == {side: "active", top: "valid-fork"}
        # The proposal (built on the tip) is connected by submitblock, once.
        assert await rpc.call("submitblock", proposal["hex"]) is None
        assert await tip(rpc) == (height + 1, proposal["hash"])
        assert await rpc.call("submitblock", proposal["hex"]) == "duplicate"


async def test_a_longer_competing_branch_from_submitblock_wins(node_factory: Any) -> None:
    """Blocks built elsewhere on an older block: side branch first, reorg once longer."""
    from gateway.chain.blocks import assemble_block, block_subsidy

    started = node_factory("compete", premine=101)
    async with started.client() as rpc:
        address = await rpc.call("getnewaddress")
        script = address_to_script_pubkey(address, "regtest")
        txid = await rpc.call("sendtoaddress", address, 1)
        [mined] = await rpc.call("generatetoaddress", 1, address)
        height, top = await tip(rpc)
        header = await rpc.call("getblockheader", top)
        fork = header["previousblockhash"]
        when = header["time"]
        branch = []
        prev = bytes.fromhex(fork)[::-1]
        for offset in range(2):  # two empty blocks on the parent of the tip
            block = assemble_block(
                prev, height + offset, when + 1 + offset, [],
                [CTxOut(block_subsidy(height + offset), CScript(script))], extra_nonce=b"other",
            )
            branch.append(block)
            prev = block.GetHash()
        assert await rpc.call("submitblock", branch[0].serialize().hex()) == "inconclusive"
        assert await tip(rpc) == (height, top)  # equal work: first seen stays
        assert (await rpc.call("getblockheader", block_hash_hex(branch[0])))["confirmations"] == -1
        assert await rpc.call("submitblock", branch[1].serialize().hex()) is None
        assert await tip(rpc) == (height + 1, block_hash_hex(branch[1]))
        assert (await rpc.call("getblockheader", mined))["confirmations"] == -1
        # The transaction of the block that lost is back in the mempool.
        assert await rpc.call("getrawmempool") == [txid]
        tips = {t["hash"]: t["status"] for t in await rpc.call("getchaintips")}
        assert tips == {block_hash_hex(branch[1]): "active", mined: "valid-fork"}
        assert await rpc.call("submitblock", branch[0].serialize().hex()) == "duplicate"
        with pytest.raises(RpcError) as info:
            await rpc.call("submitblock", "00")
        assert info.value.code == -22 and info.value.message == "Block decode failed"


async def test_mining_again_on_the_same_parent_makes_a_new_block(node_factory: Any) -> None:
    """Invalidate the tip and mine at once, in the same second, to the same address:
    the node's block must still differ from the invalid one (an extra nonce)."""
    started = node_factory("again", premine=101)
    async with started.client() as rpc:
        address = await rpc.call("getnewaddress")
        await rpc.call("setmocktime", (await rpc.call("getblockchaininfo"))["time"] + 60)
        for _ in range(3):
            [first] = await rpc.call("generatetoaddress", 1, address)
            await rpc.call("invalidateblock", first)
            [second] = await rpc.call("generatetoaddress", 1, address)
            assert second != first
            assert await rpc.call("getbestblockhash") == second
