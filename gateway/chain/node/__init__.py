"""Embedded regtest node: Bitcoin Core's consensus, a Bitcoin Core-compatible JSON-RPC.

Theory of operation
-------------------
Consensus is libbitcoinkernel's (``gateway.chain.kernel``): every block,
whether mined here or handed in through ``generateblock``/``submitblock``,
goes through ``ChainstateManager.process_block``, and the kernel alone decides
which chain is active. Beside it the node keeps what the kernel's C API does
not expose, in ``DIR/regtest/node.sqlite``: every accepted block (the durable
record the kernel's files are rebuilt from), a UTXO index with undo records,
an optional txid index (``-txindex``), the mempool and the faucet wallet's
keys. The node behaves as a stock ``bitcoind -regtest`` (Core 27+) for the
RPCs it has, survives kill -9 at any moment, and follows real reorgs
(``invalidateblock``/``reconsiderblock``, competing ``submitblock`` branches).

One module per job:

- ``store``: node.sqlite's tables, permissions and upgrades;
- ``chainstate``: stored blocks, the active chain, the kernel's replay/flush;
- ``index``: the UTXO index with undo records, and the optional txid index;
- ``validation``: new blocks, ``invalidateblock``, ``reconsiderblock``;
- ``mempool`` and ``policy``: acceptance (Core's order and reasons), persistence;
- ``fees``: ``estimatesmartfee``'s estimator;
- ``miner``: block assembly; ``walletops``: the faucet wallet's coins;
- ``rpc_chain`` and ``rpc_node``: the RPC methods, typed against ``context``'s
  ``NodeContext`` (so they do not import the node that builds them);
- ``http_server``: HTTP/1.1 on h11 with Core's limits; ``embedded``: the node;
- ``cli``: ``gateway node``.
"""

from gateway.chain.node.common import NodeRpcError, TxRejected
from gateway.chain.node.embedded import DEFAULT_PREMINE, EmbeddedNode
from gateway.chain.node.miner import BLOCK_RESERVED_WEIGHT, MAX_BLOCK_WEIGHT

__all__ = [
    "BLOCK_RESERVED_WEIGHT",
    "DEFAULT_PREMINE",
    "MAX_BLOCK_WEIGHT",
    "EmbeddedNode",
    "NodeRpcError",
    "TxRejected",
]
