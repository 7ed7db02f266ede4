"""Helpers for tests of several gateway hosts on one PostgreSQL ledger.

The hosts share one chain (one node, reached with ``--rpc-url``) and one
master key; the checks read the ledger with the store itself and the chain
with a stock node's RPC (no transaction index).
"""

from __future__ import annotations

from typing import Any

from helpers_chain import get_transaction

from gateway.chain.rpc import RpcClient
from gateway.chain.watch import btc_to_sat
from gateway.ledger import PgStore


def ledger_rows(dsn: str, sql: str = "SELECT * FROM channels WHERE channel_id IS NOT NULL "
                "ORDER BY id", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    """Rows of the shared ledger, read with a store of the test's own."""
    import asyncio

    store = PgStore(dsn, name="paystream-test")
    try:
        return [dict(r) for r in store.read(sql, params)]
    finally:
        asyncio.run(store.close()) if not _in_loop() else store._reader.close()


def _in_loop() -> bool:
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


async def check_settled_once(rpc: RpcClient, rows: list[dict[str, Any]]) -> set[str]:
    """Every channel settled on the best chain, once, paying its client its stored balance.

    One spend of each funding output: the output is gone from the UTXO set and
    exactly one of the settlements seen spends it; the output beside that
    input pays the client's change script exactly the stored balance (the
    client's last signed one). The settlement txids.
    """
    txids: set[str] = set()
    spends: dict[tuple[str, int], int] = {}
    for row in rows:
        cid = row["channel_id"]
        assert row["state"] == "closed", (cid, row["state"])
        assert row["settle_txid"] is not None, cid
        txid, vout = cid.split(":")
        assert await rpc.call("gettxout", txid, int(vout), True) is None, f"{cid} unspent"
        tx = await get_transaction(rpc, row["settle_txid"])
        assert tx.get("confirmations", 0) >= 1, f"settlement of {cid} is not on the chain"
        if row["settle_txid"] not in txids:
            txids.add(row["settle_txid"])
            for i in tx["vin"]:
                spends[(i["txid"], i["vout"])] = spends.get((i["txid"], i["vout"]), 0) + 1
        index = [(i["txid"], i["vout"]) for i in tx["vin"]].index((txid, int(vout)))
        if row["balance"]:
            out = tx["vout"][index]
            assert out["scriptPubKey"]["hex"] == row["change_script"], cid
            assert btc_to_sat(out["value"]) == row["balance"], (cid, out, row["balance"])
    for row in rows:
        txid, vout = row["channel_id"].split(":")
        assert spends.get((txid, int(vout))) == 1, row["channel_id"]
    return txids
