"""Chain look-ups that work against a stock node (no ``-txindex``), like bitcoind's.

A stock node answers ``getrawtransaction TXID`` only for mempool transactions;
a confirmed one needs the hash of its block. ``get_transaction`` finds that
block by walking back from the tip, then asks with the hash.
"""

from __future__ import annotations

from typing import Any

from gateway.chain.rpc import RpcClient, RpcInvalidAddressOrKey

_BATCH = 50


async def find_block_of(rpc: RpcClient, txid: str, *, depth: int | None = None) -> str | None:
    """Hash of the active-chain block holding ``txid``, newest first; None if not found.

    ``depth`` bounds how many blocks back from the tip are searched (all by default).
    """
    tip = int(await rpc.call("getblockcount"))
    lowest = 0 if depth is None else max(0, tip - depth + 1)
    top = tip
    while top >= lowest:
        heights = list(range(top, max(lowest, top - _BATCH + 1) - 1, -1))
        hashes = await rpc.batch([("getblockhash", [h]) for h in heights])
        blocks = await rpc.batch([("getblock", [h, 1]) for h in hashes])
        for block_hash, block in zip(hashes, blocks, strict=True):
            if isinstance(block, dict) and txid in block["tx"]:
                return str(block_hash)
        top = heights[-1] - 1
    return None


async def get_transaction(
    rpc: RpcClient, txid: str, *, depth: int | None = None, verbose: bool = True
) -> Any:
    """``getrawtransaction txid verbose`` for a mempool or confirmed transaction on a stock node.

    Raises ``RpcInvalidAddressOrKey`` (-5) as the node does when the
    transaction is neither in the mempool nor in the searched blocks.
    """
    try:
        return await rpc.call("getrawtransaction", txid, verbose)
    except RpcInvalidAddressOrKey:
        block_hash = await find_block_of(rpc, txid, depth=depth)
        if block_hash is None:
            raise
    return await rpc.call("getrawtransaction", txid, verbose, block_hash)
