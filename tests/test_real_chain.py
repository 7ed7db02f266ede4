"""The gateway against a chain as a stock node serves it (issue: real chains).

What a stock ``bitcoind`` does and the embedded node now does too: no
transaction index, fundings found with ``gettxout``, settlements followed
through the blocks. Here: ``fund`` checks before it relays, the settlement
duty survives an unreachable node, the data dir is private, and a mainnet
node with ``min_conf 0`` is refused.
"""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from bitcoin.core import CTransaction, CTxOut
from bitcoin.core.script import CScript
from conftest_gateway import Viewer, gateway_config, node_rpc, ws_url

from gateway.chain.rpc import RpcTransportError
from gateway.config import ConfigError
from gateway.protocol.messages import Error, Paid, Ready, Terms
from gateway.server import Gateway, GatewayStartError


async def _open(gw: Gateway) -> tuple[Viewer, Terms]:
    viewer = Viewer(ws_url(gw), node_rpc(gw))
    await viewer.connect()
    terms = await viewer.open_channel()
    return viewer, terms


async def test_fund_with_an_unrelated_tx_is_refused_and_never_relayed(gateway):
    viewer, terms = await _open(gateway)
    rpc = viewer.rpc
    # A valid, signed transaction that pays someone else, not the channel.
    unsigned = await rpc.call(
        "fundrawtransaction",
        CTransaction([], [CTxOut(50_000, CScript(bytes.fromhex("0014" + "33" * 20)))],
                     nVersion=2).serialize().hex(),
    )
    signed = await rpc.call("signrawtransactionwithwallet", unsigned["hex"])
    tx = bytes.fromhex(signed["hex"])
    before = set(await rpc.call("getrawmempool"))
    await viewer.send_raw({"type": "fund", "tx": tx.hex()})
    error = await viewer.expect(Error)
    assert error.code == "funding_mismatch" and not error.fatal
    # Never relayed: the node's mempool did not get it.
    assert set(await rpc.call("getrawmempool")) == before
    # Its txid with a wrong claim is refused the same way, still unrelayed.
    txid = CTransaction.deserialize(tx).GetTxid()[::-1].hex()
    await viewer.send_raw({"type": "fund", "txid": txid, "vout": 0, "tx": tx.hex()})
    assert (await viewer.expect(Error)).code == "funding_mismatch"
    assert set(await rpc.call("getrawmempool")) == before
    # A vout that no transaction can have is a bad message, not an internal error.
    await viewer.send_raw({"type": "fund", "txid": txid, "vout": 2**32})
    error = await viewer.expect(Error)
    assert error.code == "bad_message" and "vout" in error.message
    row = gateway.store.read("SELECT state, channel_id FROM channels")[0]
    assert (row["state"], row["channel_id"]) == ("open", None)
    # The channel still takes its real funding.
    outpoint, value = await viewer.pay_funding_address(terms, 20_000)
    await viewer.send(viewer.channel.fund(outpoint, value))
    assert (await viewer.expect(Ready)).value == value
    await rpc.close()


async def test_a_failing_node_call_does_not_end_the_settlement_round(gateway_factory):
    gw = await gateway_factory(limits={"resume_grace_s": 0})
    await gw.settler.stop()  # rounds are run by hand below
    viewers = []
    for _ in range(2):
        viewer = Viewer(ws_url(gw), node_rpc(gw))
        await viewer.connect()
        await viewer.open_and_fund()
        await viewer.send(viewer.channel.pay(2_000))
        await viewer.expect(Paid)
        await viewer.disconnect()
        viewers.append(viewer)
    await asyncio.sleep(0.3)  # both sessions ended: due at once (no grace)
    real_call, failed = gw.rpc.call, []

    async def flaky(method, *params):
        # The node's connection drops once, on the round's first call: the
        # fee estimate for the first channel's settlement.
        if method == "estimatesmartfee" and not failed:
            failed.append(method)
            raise RpcTransportError("connection reset by the node")
        return await real_call(method, *params)

    gw.settler._feerate = None  # the next estimate asks the node
    gw.rpc.call = flaky  # type: ignore[method-assign]
    await gw.settler.tick()
    gw.rpc.call = real_call  # type: ignore[method-assign]
    # The round went on past the failure: the first channel, closed but not
    # settled, stayed queued, and the second one's settlement took both.
    rows = gw.store.read("SELECT state, settle_txid FROM channels WHERE channel_id IS NOT NULL")
    assert failed == ["estimatesmartfee"]
    assert [r["state"] for r in rows] == ["closing", "closing"]
    txids = {r["settle_txid"] for r in rows}
    assert len(txids) == 1 and txids <= set(await real_call("getrawmempool"))
    for viewer in viewers:
        await viewer.rpc.close()


async def test_data_dir_is_private_and_loose_modes_are_tightened(tmp_path, media_copy, caplog):
    config = gateway_config(tmp_path, media_copy)
    gw = Gateway(config)
    await gw.start()
    await gw.stop()
    datadir = config.datadir

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(datadir) == 0o700
    secrets = ["gateway.db", "master.key", "operator-token", "operator-address", "gateway.db-wal"]
    for name in secrets:
        if (datadir / name).exists():
            assert mode(datadir / name) == 0o600, name
    # A data dir made loose (by hand, or by an older version) is tightened, and said so.
    datadir.chmod(0o755)
    (datadir / "gateway.db").chmod(0o644)
    (datadir / "operator-address").chmod(0o664)
    gw = Gateway(config)
    await gw.start()
    await gw.stop()
    assert mode(datadir) == 0o700
    assert mode(datadir / "gateway.db") == 0o600
    assert mode(datadir / "operator-address") == 0o600
    assert "was open to others" in caplog.text


class _MainnetNode(BaseHTTPRequestHandler):
    """A node that says it is on mainnet (none can run here): getblockchaininfo only."""

    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        result = {"chain": "main", "blocks": 900_000, "bestblockhash": "00" * 32,
                  "mediantime": int(time.time())}
        body = json.dumps({"result": result, "error": None, "id": request["id"]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mainnet_node():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _MainnetNode)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


async def test_mainnet_refuses_min_conf_zero(tmp_path, media_copy, mainnet_node):
    config = gateway_config(tmp_path, media_copy, min_conf=0)
    config.rpc_url, config.rpc_user, config.rpc_password = mainnet_node, "u", "p"
    with pytest.raises(GatewayStartError, match="min_conf 0 on mainnet"):
        await Gateway(config).start()
    # The defaults are safe: 3 confirmations on main, 6 for a settlement to count.
    from gateway.config import Config

    defaults = Config()
    assert defaults.limits.resolve("main").min_conf == 3
    assert defaults.limits.resolve("signet").min_conf == 1
    assert defaults.limits.resolve("regtest").min_conf == 0
    assert (defaults.settle_depth("main"), defaults.settle_depth("regtest")) == (6, 1)
    defaults.allow_zero_conf = True
    defaults.limits.min_conf = 0
    defaults.check_network("main")  # the operator said so explicitly
    defaults.allow_zero_conf = False
    with pytest.raises(ConfigError):
        defaults.check_network("main")


def test_serve_on_mainnet_with_min_conf_zero_is_one_line_and_exit_1(tmp_path, mainnet_node):
    cookie = tmp_path / "cookie"
    cookie.write_text("__cookie__:x")
    args = ["serve", "--datadir", str(tmp_path / "gw"), "--media", str(tmp_path / "media"),
            "--rpc-url", mainnet_node, "--rpc-cookie", str(cookie), "--min-conf", "0",
            "--port", "0"]
    (tmp_path / "media").mkdir()
    done = subprocess.run([sys.executable, "-m", "gateway.cli", *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "min_conf 0 on mainnet" in lines[0], done.stderr
