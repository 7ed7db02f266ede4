"""``gateway serve`` and ``player`` as real processes on 127.0.0.1 port 0 (end-to-end tests).

:class:`Stack` runs ``gateway serve`` with its embedded node in a temp dir
and the ``player`` console script against it; the ``stack_factory`` fixture
(``conftest_gateway``) starts stacks and stops them at teardown.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from gateway.chain.rpc import RpcClient


class Proc:
    """A child process of this test: a console script, logging to a file."""

    def __init__(self, args: list[str], log: Path, cwd: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            args, stdout=log.open("ab"), stderr=subprocess.STDOUT, cwd=cwd
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def bin_path(name: str) -> str:
    """The console script ``name`` of this virtualenv."""
    return str(Path(sys.executable).with_name(name))


class Stack:
    """``gateway serve`` on port 0 with its embedded node, and player runs against it."""

    def __init__(self, tmp: Path, media: Path, *extra: str) -> None:
        self.tmp, self.media, self.extra = tmp, media, extra
        self.datadir = tmp / "gw"
        self.player_dir = tmp / "player"
        self.gateway: Proc | None = None
        self.info: dict[str, str] = {}

    async def start(self) -> None:
        (self.datadir / "gateway.json").unlink(missing_ok=True)
        self.gateway = Proc(
            [bin_path("gateway"), "serve", "--datadir", str(self.datadir), "--port", "0",
             "--rpc-port", "0", "--block-interval", "0", "--media", str(self.media),
             "-v", *self.extra],
            self.tmp / "gateway.log", self.tmp,
        )
        deadline = time.monotonic() + 60
        while not (self.datadir / "gateway.json").exists():
            assert self.gateway.proc.poll() is None, (self.tmp / "gateway.log").read_text()
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        self.info = json.loads((self.datadir / "gateway.json").read_text())

    def rpc(self) -> RpcClient:
        return RpcClient(self.info["rpc"], cookie_path=self.info["cookie"])

    async def player(
        self, *args: str, check: bool = True, wallet: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run ``player ARGS`` on this stack's player dir (with the node's wallet unless told)."""
        cmd = [bin_path("player"), *args, "--data-dir", str(self.player_dir)]
        if wallet and args[0] in ("play", "refund", "status"):
            cmd += ["--wallet-rpc", self.info["rpc"], "--wallet-cookie", self.info["cookie"]]
        done = await asyncio.to_thread(
            subprocess.run, cmd, capture_output=True, text=True, timeout=120, cwd=self.tmp
        )
        if check:
            assert done.returncode == 0, done.stderr
        return done

    def channel_row(self) -> dict:
        return self._row("SELECT * FROM channels WHERE channel_id IS NOT NULL "
                         "ORDER BY id DESC LIMIT 1")

    def settlement_row(self, txid: str) -> dict:
        return self._row("SELECT * FROM settlements WHERE txid = ?", (txid,))

    def _row(self, sql: str, params: tuple = ()) -> dict:
        import sqlite3

        conn = sqlite3.connect(self.datadir / "gateway.db")
        conn.row_factory = sqlite3.Row
        try:
            return dict(conn.execute(sql, params).fetchone())
        finally:
            conn.close()

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()


