"""What ``gateway serve`` logs by default (issue 14 item 14): one line per
session start and end, funding, settlement and error sent to a client, and
never a key, token, signature or raw transaction.

The gateway is a real ``gateway serve`` process (embedded node, port 0); the
viewer is the tests' protocol-level :class:`conftest_gateway.Viewer`, which
here also keeps every message it sends.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from conftest_gateway import Viewer

from gateway.chain.rpc import RpcClient
from gateway.protocol.messages import Error, Pay, Play


class RecordingViewer(Viewer):
    """The test viewer, keeping what it sent (to look for it in the log)."""

    sent: list[Any]

    async def send(self, msg: Any) -> None:
        """Send ``msg`` and keep it."""
        self.__dict__.setdefault("sent", []).append(msg)
        await super().send(msg)


async def test_serve_logs_sessions_funding_settlement_and_errors_but_no_secret(
    tmp_path: Path, media_copy: Path
) -> None:
    datadir = tmp_path / "gw"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "serve", "--datadir", str(datadir),
             "--port", "0", "--rpc-port", "0", "--block-interval", "0",
             "--media", str(media_copy)],
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while not (datadir / "gateway.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        info = json.loads((datadir / "gateway.json").read_text())
        rpc = RpcClient(info["rpc"], cookie_path=Path(info["cookie"]))
        viewer = RecordingViewer(info["ws"], rpc)
        await viewer.connect()
        await viewer.open_and_fund(kind="multisig")  # fund.tx carries the raw T1
        await viewer.play_and_pay("clip", chunks=6)
        await viewer.send(Play(media="no-such-media"))
        error = await viewer.expect(Error)
        assert error.code.value == "media_unknown"
        closed = await viewer.close_channel()
        settlement = await rpc.call("getrawtransaction", closed.txid, False)
        await rpc.close()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    text = log.read_text()
    assert viewer.channel is not None and viewer.channel.outpoint is not None
    cid = viewer.channel.outpoint.channel_id
    lines = text.splitlines()

    def one(pattern: str) -> str:
        found = [line for line in lines if re.search(pattern, line)]
        assert len(found) == 1, (pattern, text)
        return found[0]

    one(r"INFO .*session from 127\.0\.0\.1 started")
    one(rf"INFO .*channel {cid} funded: \d+ sat, from 127\.0\.0\.1")
    one(rf"INFO .*error media_unknown to 127\.0\.0\.1 \(channel {cid}\)")
    one(rf"INFO .*closing {cid} \(close\): paid {closed.paid}")
    one(rf"INFO .*settlement {closed.txid}: 1 channel\(s\), \d+ vB, fee \d+ sat")
    one(rf"INFO .*session from 127\.0\.0\.1 ended \(channel {cid}\)")
    # Nothing secret: the operator token, any signature or transaction the client sent,
    # the settlement transaction, the master key.
    secrets = [(datadir / "operator-token").read_text().strip(), settlement]
    for msg in viewer.sent:
        if isinstance(msg, Pay):
            secrets.append(msg.sig.hex())
        for name in ("tx", "sig", "proof"):
            value = getattr(msg, name, None)
            if isinstance(value, bytes):
                secrets.append(value.hex())
    assert any(isinstance(m, Pay) for m in viewer.sent) and len(secrets) > 4
    for secret in secrets:
        assert secret not in text
    assert (datadir / "master.key").read_text().strip() not in text
