"""What the RPC handlers see of the node: a Protocol, so they need not import it.

``EmbeddedNode`` builds the RPC handlers (``rpc_chain``, ``rpc_node``) and
hands them itself; typed against this Protocol, the handlers import only
the parts below the node, and ``gateway.chain`` has no import cycle.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from gateway.chain.node.chainstate import ChainState
from gateway.chain.node.fees import FeeEstimator
from gateway.chain.node.mempool import Mempool
from gateway.chain.node.miner import Miner
from gateway.chain.node.validation import BlockValidator
from gateway.chain.node.walletops import NodeWallet

T = TypeVar("T")


class NodeContext(Protocol):
    """The node's parts and the two services the RPC handlers call back."""

    chain: ChainState
    mempool: Mempool
    miner: Miner
    validator: BlockValidator
    fees: FeeEstimator
    #: ``setmocktime``'s clock (0: the system clock).
    mocktime: int

    @property
    def wallet(self) -> NodeWallet:
        """The faucet wallet (raises while the node is not running)."""
        ...

    async def exclusive(self, work: Callable[[], Awaitable[T]]) -> T:
        """Run ``work`` under the node's lock, to completion."""
        ...

    async def stop(self) -> None:
        """Shut the node down."""
        ...
