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


class Host:
    """``gateway serve`` as a real process: one host of a cluster on ``dsn``.

    Its own data dir and port; the shared node (``rpc_url``), store and master
    key; short leases so tests see take-overs within seconds.
    """

    def __init__(self, tmp: Any, name: str, media: Any, *, dsn: str, node: Any, key: Any,
                 lease_s: float = 3.0, grace_s: int = 60) -> None:
        self.tmp, self.name = tmp / name, name
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.datadir = self.tmp / "gw"
        self.args = [
            "serve", "--datadir", str(self.datadir), "--port", "0", "--media", str(media),
            "--rpc-url", node.rpc_url, "--rpc-cookie", str(node.cookie_path),
            "--store", dsn, "--master-key", str(key), "--host-id", name,
        ]
        self.env = {
            "PAYSTREAM_LEASE_S": str(lease_s),
            "PAYSTREAM_SETTLE_INTERVAL_S": "0.2",
            "PAYSTREAM_LIMITS_RESUME_GRACE_S": str(grace_s),
            # Every test viewer comes from 127.0.0.1.
            "PAYSTREAM_MAX_UNFUNDED_PER_IP": "500",
            "PAYSTREAM_MAX_SESSIONS_PER_IP": "500",
        }
        self.proc: Any = None
        self.info: dict[str, Any] = {}

    @property
    def log(self) -> str:
        return (self.tmp / "gateway.log").read_text()

    async def start(self) -> Host:
        import asyncio
        import json
        import os
        import subprocess
        import time

        from helpers_stack import bin_path

        (self.datadir / "gateway.json").unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            [bin_path("gateway"), *self.args], stdout=(self.tmp / "gateway.log").open("ab"),
            stderr=subprocess.STDOUT, cwd=self.tmp, env={**os.environ, **self.env},
        )
        deadline = time.monotonic() + 60
        while not (self.datadir / "gateway.json").exists():
            assert self.proc.poll() is None, self.log
            assert time.monotonic() < deadline, self.log
            await asyncio.sleep(0.05)
        self.info = json.loads((self.datadir / "gateway.json").read_text())
        return self

    @property
    def ws(self) -> str:
        return str(self.info["ws"])

    def signal(self, sig: int) -> None:
        import os

        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        import signal
        import subprocess

        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
