"""``EmbeddedNode``: the parts wired together, its lifecycle, and JSON-RPC dispatch."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import inspect
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from gateway.chain.node import store
from gateway.chain.node.chainstate import ChainState, ChainUpdate
from gateway.chain.node.common import (
    RPC_INVALID_REQUEST,
    RPC_METHOD_NOT_FOUND,
    RPC_MISC_ERROR,
    RPC_PARSE_ERROR,
    RPC_TYPE_ERROR,
    NodeRpcError,
    dumps,
)
from gateway.chain.node.fees import FeeEstimator
from gateway.chain.node.http_server import DEFAULT_TIMEOUT, RpcHttpServer
from gateway.chain.node.mempool import Mempool
from gateway.chain.node.miner import Miner
from gateway.chain.node.rpc_chain import ChainRpc
from gateway.chain.node.rpc_node import NodeRpc
from gateway.chain.node.validation import BlockValidator
from gateway.chain.node.wallet import Wallet
from gateway.chain.node.walletops import NodeWallet

log = logging.getLogger(__name__)

DEFAULT_PREMINE = 120  # 20 mature coinbases (1,000 BTC) at first start
T = TypeVar("T")


class EmbeddedNode:
    """A regtest node: kernel-validated chain, mempool, faucet wallet, JSON-RPC server.

    ``datadir`` gets a ``regtest/`` directory like bitcoind's. Stock by
    default: no transaction index, so ``getrawtransaction`` finds confirmed
    transactions only with a block hash; ``txindex=True`` is ``-txindex``.
    Use as::

        async with EmbeddedNode(tmp_path, rpc_port=0) as node:
            client = RpcClient(node.rpc_url, cookie_path=node.cookie_path)
    """

    def __init__(
        self,
        datadir: str | Path,
        *,
        rpc_bind: str = "127.0.0.1",
        rpc_port: int = 18443,
        block_interval: float = 0,
        premine: int = DEFAULT_PREMINE,
        txindex: bool = False,
        rpc_timeout: float = DEFAULT_TIMEOUT,
        persist_mempool: bool = True,
    ) -> None:
        self.datadir = Path(datadir)
        self.netdir = self.datadir / "regtest"
        self.cookie_path = self.netdir / ".cookie"
        self.rpc_bind = rpc_bind
        self.rpc_port = rpc_port
        self.block_interval = block_interval
        self.premine = premine
        self.txindex = txindex
        #: bitcoind's -persistmempool: False starts with an empty mempool.
        self.persist_mempool = persist_mempool
        self.mocktime = 0
        self.chain = ChainState(self.netdir, txindex=txindex)
        self.fees = FeeEstimator()
        self.mempool = Mempool(self.chain, self.now, self.fees)
        self.validator = BlockValidator(self.chain, self._on_chain_update)
        self.miner = Miner(self.chain, self.mempool, self.validator, self.now)
        self._wallet: NodeWallet | None = None
        self._lock = asyncio.Lock()
        self._open = False
        self._server = RpcHttpServer(self._handle_http, self._authorized, timeout=rpc_timeout)
        self._cookie = ""
        self._stopped = asyncio.Event()
        self._stopping: asyncio.Future[None] | None = None
        self._miner_task: asyncio.Task[None] | None = None
        self._methods: dict[str, Callable[..., Awaitable[Any]]] = {}
        for handler in (ChainRpc(self), NodeRpc(self)):
            for name in dir(handler):
                if name.startswith("rpc_"):
                    self._methods[name[4:]] = getattr(handler, name)

    # -- lifecycle -----------------------------------------------------------

    @property
    def rpc_url(self) -> str:
        """``http://host:port`` of the RPC server (valid after ``start``)."""
        return f"http://{self.rpc_bind}:{self.rpc_port}"

    @property
    def wallet(self) -> NodeWallet:
        """The faucet wallet (valid while the node runs)."""
        if self._wallet is None:
            raise NodeRpcError(RPC_MISC_ERROR, "node is not running")
        return self._wallet

    @property
    def max_block_weight(self) -> int:
        """Weight limit of the blocks this node assembles (BIP141; tests lower it)."""
        return self.miner.max_block_weight

    @max_block_weight.setter
    def max_block_weight(self, value: int) -> None:
        self.miner.max_block_weight = value

    async def __aenter__(self) -> EmbeddedNode:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Open node.sqlite and the kernel (replaying what a crash lost), premine, serve RPC."""
        chain = self.chain
        chain.open_db()
        try:
            keys = Wallet(chain.db)
            chain.owns = keys.owns
            self._wallet = NodeWallet(keys, self.mempool)
            self.mocktime = int(store.meta(chain.db, "mocktime") or 0)
            await chain.open()
            self._open = True
            if store.meta(chain.db, "premined") is None and chain.tip_height < self.premine:
                await self.miner.premine(keys.default_script(), self.premine)
                await chain.flush()
                with chain.db:
                    store.set_meta(chain.db, "premined", 1)
            if self.persist_mempool:
                self.mempool.load()
            else:
                self.mempool.forget_saved()
            self.rpc_port = await self._server.start(self.rpc_bind, self.rpc_port)
        except BaseException:
            self._open = False
            await chain.close()
            raise
        self._write_cookie()
        if self.block_interval > 0:
            self._miner_task = asyncio.create_task(self._mine_periodically())

    async def stop(self) -> None:
        """Stop serving, flush and release the chainstate.

        Idempotent and safe to call from a signal handler, the ``stop`` RPC and
        the owner at the same time: all of them await the same shutdown.
        """
        self._stopped.set()
        if self._stopping is None:
            self._stopping = asyncio.ensure_future(self._shutdown())
        await asyncio.shield(self._stopping)

    async def _shutdown(self) -> None:
        if self._miner_task is not None:
            self._miner_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._miner_task
        await self._server.close()
        async with self._lock:  # waits for work that was running to completion
            self._open = False
            await self.chain.close()
        with contextlib.suppress(FileNotFoundError):
            self.cookie_path.unlink()

    async def wait_stopped(self) -> None:
        """Wait until ``stop`` (the RPC or a signal) has been requested."""
        await self._stopped.wait()

    def _write_cookie(self) -> None:
        # bitcoind: "__cookie__:<64 hex>", readable by the owner only.
        self._cookie = "__cookie__:" + os.urandom(32).hex()
        fd = os.open(self.cookie_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self._cookie)

    # -- shared helpers for the RPC handlers ---------------------------------

    def now(self) -> int:
        """Node clock: the mock time if set (``setmocktime``), else the system clock."""
        return self.mocktime or int(time.time())

    def _on_chain_update(self, update: ChainUpdate) -> None:
        self.mempool.on_chain_update(update)

    async def exclusive(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` under the node's lock, to completion even if the caller is cancelled.

        A kernel call running in a thread cannot be cancelled: giving up the
        lock before it ends would let another call build on a kernel that
        moved under the index. So the work runs in its own task; a cancelled
        caller waits for it, then gives in.
        """

        async def run() -> T:
            async with self._lock:
                if not self._open:
                    raise NodeRpcError(RPC_MISC_ERROR, "node is not running")
                return await work()

        task = asyncio.ensure_future(run())
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            while not task.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([task])
            if not task.cancelled():
                task.exception()  # retrieved: the caller's cancellation wins
            raise

    async def _mine_periodically(self) -> None:
        miner = self.miner
        while True:
            await asyncio.sleep(self.block_interval)
            if not self.mempool.entries:
                continue

            async def mine() -> None:
                await miner.mine(self.wallet.keys.default_script(), miner.mempool_block_txs())

            try:
                await self.exclusive(mine)
            except NodeRpcError as exc:
                log.error("scheduled block rejected: %s", exc.message)

    # -- JSON-RPC --------------------------------------------------------------

    async def dispatch(self, request: Any) -> dict[str, Any]:
        """Run one JSON-RPC request object; return the response object."""
        request_id = request.get("id") if isinstance(request, dict) else None
        try:
            if not isinstance(request, dict) or not isinstance(request.get("method"), str):
                raise NodeRpcError(RPC_INVALID_REQUEST, "Method must be a string")
            method = self._methods.get(request["method"])
            if method is None:
                raise NodeRpcError(RPC_METHOD_NOT_FOUND, "Method not found")
            params = request.get("params")
            if params is None:
                params = []
            try:
                signature = inspect.signature(method)
                bound = (
                    signature.bind(**params) if isinstance(params, dict)
                    else signature.bind(*params)
                )
            except TypeError as exc:
                raise NodeRpcError(RPC_MISC_ERROR, f"{request['method']}: {exc}") from exc
            result = await method(*bound.args, **bound.kwargs)
        except NodeRpcError as exc:
            return {"result": None, "error": {"code": exc.code, "message": exc.message},
                    "id": request_id}
        except (TypeError, ValueError, IndexError, KeyError, AttributeError) as exc:
            # A parameter of the wrong JSON type surfaces here: never a crash.
            return {"result": None, "error": {"code": RPC_TYPE_ERROR, "message": str(exc)},
                    "id": request_id}
        except Exception as exc:
            # Core answers an unexpected std::exception as RPC_MISC_ERROR with its
            # text; the connection and the node carry on.
            log.exception("RPC %s failed", request.get("method"))
            return {"result": None, "error": {"code": RPC_MISC_ERROR, "message": str(exc)},
                    "id": request_id}
        return {"result": result, "error": None, "id": request_id}

    async def _handle_http(self, body: bytes) -> tuple[int, bytes]:
        """An authorized POST body to (HTTP status, JSON reply): bitcoind's ``HTTPReq_JSONRPC``."""
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, ValueError):
            reply = {"result": None, "id": None,
                     "error": {"code": RPC_PARSE_ERROR, "message": "Parse error"}}
            return 500, dumps(reply)
        if isinstance(request, list):
            return 200, dumps([await self.dispatch(item) for item in request])
        reply = await self.dispatch(request)
        error = reply["error"]
        if error is None:
            return 200, dumps(reply)
        # JSON-RPC 1.0 over bitcoind's HTTP server: errors come with 400/404/500.
        if error["code"] == RPC_METHOD_NOT_FOUND:
            return 404, dumps(reply)
        if error["code"] == RPC_INVALID_REQUEST:
            return 400, dumps(reply)
        return 500, dumps(reply)

    def _authorized(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic" or not self._cookie:
            return False
        try:
            supplied = base64.b64decode(token.strip(), validate=True).decode()
        except (ValueError, UnicodeDecodeError):
            return False
        return hmac.compare_digest(supplied.encode(), self._cookie.encode())
