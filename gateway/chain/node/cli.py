"""``gateway node``: run the embedded regtest node in the foreground.

Imports nothing of ``gateway.cli`` (which imports every subcommand): its
error class comes from ``gateway.errors``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from gateway.chain.kernel import KernelError
from gateway.chain.node.embedded import EmbeddedNode
from gateway.chain.node.http_server import DEFAULT_TIMEOUT
from gateway.errors import CliError


def register_cli(subparsers: Any) -> None:
    """Add ``gateway node`` to the ``gateway`` command."""
    parser = subparsers.add_parser(
        "node",
        help="run the embedded regtest node (Bitcoin Core consensus via libbitcoinkernel)",
        description="Run a regtest node with a Bitcoin Core-compatible JSON-RPC and a "
        "faucet wallet. Writes DIR/regtest/.cookie like bitcoind.",
    )
    parser.add_argument("--datadir", required=True, type=Path, help="data directory")
    parser.add_argument("--rpc-bind", default="127.0.0.1", help="RPC listen address")
    parser.add_argument("--rpc-port", default=18443, type=int, help="RPC port (0 = any)")
    parser.add_argument(
        "--rpc-timeout", default=DEFAULT_TIMEOUT, type=float, metavar="SECONDS",
        help="time a client has to send a whole request (bitcoind's -rpcservertimeout)",
    )
    parser.add_argument(
        "--block-interval", default=0.0, type=float, metavar="SECONDS",
        help="mine a block this often when the mempool is not empty (0 = only on request)",
    )
    parser.add_argument(
        "--txindex", action="store_true",
        help="keep a transaction index: getrawtransaction finds confirmed transactions "
        "without a block hash (bitcoind's -txindex)",
    )
    parser.add_argument(
        "--no-persistmempool", dest="persist_mempool", action="store_false",
        help="start with an empty mempool, forgetting the saved one (bitcoind's "
        "-persistmempool=0)",
    )
    parser.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    """Run the node until SIGINT, SIGTERM or the ``stop`` RPC."""
    if args.block_interval < 0:
        raise CliError("--block-interval must be >= 0")
    if args.rpc_timeout <= 0:
        raise CliError("--rpc-timeout must be > 0")
    if not 0 <= args.rpc_port <= 65535:
        raise CliError("--rpc-port must be between 0 and 65535")

    async def run() -> None:
        node = EmbeddedNode(
            args.datadir, rpc_bind=args.rpc_bind, rpc_port=args.rpc_port,
            block_interval=args.block_interval, txindex=args.txindex,
            persist_mempool=args.persist_mempool,
            rpc_timeout=args.rpc_timeout,
        )
        try:
            await node.start()
        except KernelError as exc:
            raise CliError(str(exc)) from exc
        except OSError as exc:
            raise CliError(f"cannot listen on {args.rpc_bind}:{args.rpc_port}: {exc}") from exc
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(node.stop()))
        print(f"regtest node at height {node.chain.tip_height}", flush=True)
        print(f"RPC URL: {node.rpc_url}", flush=True)
        print(f"cookie: {node.cookie_path}", flush=True)
        await node.wait_stopped()
        await node.stop()
        print("node stopped", flush=True)

    from gateway.lockfile import NODE_LOCK, DataDirInUse, lock_datadir

    try:
        lock = lock_datadir(args.datadir, NODE_LOCK, "node")  # a second node: one line
    except DataDirInUse as exc:
        raise CliError(str(exc)) from None
    with lock:
        asyncio.run(run())
    return 0
