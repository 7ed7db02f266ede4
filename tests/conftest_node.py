"""Pytest fixtures for the embedded regtest node (imported by tests/conftest.py).

The node runs on its own event loop in a background thread, so one node can
be shared by every test of a module whatever loop each test runs on; tests
reach it only over real HTTP on 127.0.0.1 through ``gateway.chain.rpc``.

- ``node_factory``: start extra nodes in ``tmp_path`` (``.stop()``/``.restart()``).
- ``node``: one node per test module (port 0, temp data dir, 120-block premine).
- ``rpc``: an ``RpcClient`` connected to ``node`` with its cookie.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.chain.node import EmbeddedNode
from gateway.chain.rpc import RpcClient


class NodeThread:
    """An ``EmbeddedNode`` served from a dedicated thread and event loop."""

    def __init__(self, datadir: Path, **options: Any) -> None:
        self.datadir = datadir
        self.options = options
        self.node: EmbeddedNode | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def rpc_url(self) -> str:
        """The node's ``http://127.0.0.1:PORT``."""
        assert self.node is not None
        return self.node.rpc_url

    @property
    def cookie_path(self) -> Path:
        """``DATADIR/regtest/.cookie``."""
        return self.datadir / "regtest" / ".cookie"

    def client(self, **kwargs: Any) -> RpcClient:
        """A new RPC client using the cookie (close it after use)."""
        return RpcClient(self.rpc_url, cookie_path=self.cookie_path, **kwargs)

    def start(self) -> NodeThread:
        """Start the node; returns once its RPC port is listening."""
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        loop = asyncio.new_event_loop()
        self._loop = loop

        def run() -> None:
            asyncio.set_event_loop(loop)
            self.node = EmbeddedNode(self.datadir, rpc_port=0, **self.options)
            try:
                loop.run_until_complete(self.node.start())
            except BaseException as exc:
                started.set_exception(exc)
                return
            started.set_result(None)
            loop.run_until_complete(self.node.wait_stopped())
            loop.run_until_complete(self.node.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name="embedded-node", daemon=True)
        self._thread.start()
        started.result(timeout=60)
        return self

    def stop(self) -> None:
        """Stop the node cleanly and wait for its thread."""
        if self._thread is None or self._loop is None or self.node is None:
            return
        if not self._loop.is_closed():
            node = self.node
            # The loop may close while stop() is being scheduled: that is fine.
            with contextlib.suppress(RuntimeError):
                asyncio.run_coroutine_threadsafe(node.stop(), self._loop).result(timeout=60)
        self._thread.join(timeout=60)
        self._thread = None

    def restart(self) -> NodeThread:
        """Stop, then start again on the same data dir (a new port and cookie)."""
        self.stop()
        return self.start()


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[Any]:
    """Start nodes in sub-directories of ``tmp_path``; all are stopped at teardown."""
    nodes: list[NodeThread] = []

    def make(name: str = "node", **options: Any) -> NodeThread:
        started = NodeThread(tmp_path / name, **options).start()
        nodes.append(started)
        return started

    yield make
    for started in nodes:
        started.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeThread]:
    """One embedded regtest node shared by a test module."""
    started = NodeThread(tmp_path_factory.mktemp("node")).start()
    yield started
    started.stop()


@pytest.fixture
async def rpc(node: NodeThread) -> AsyncIterator[RpcClient]:
    """An ``RpcClient`` on ``node``, authenticated with its cookie file."""
    async with node.client(timeout=30) as client:
        yield client
