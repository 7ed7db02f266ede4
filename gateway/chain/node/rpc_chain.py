"""Blockchain RPCs: blocks, headers, transactions, UTXOs, chain tips, reorgs.

Answers follow Bitcoin Core 27+ (``rpc/blockchain.cpp``,
``rpc/rawtransaction.cpp``). Everything reads the node's committed view
(``ChainState.active`` and the UTXO index), so no answer shows a block that
is not yet durable. Stale blocks (off the active chain) stay readable with
``"confirmations": -1``, as in Core.
"""

from __future__ import annotations

from typing import Any

from bitcoin.core import CTransaction

from gateway.chain.blocks import block_txids
from gateway.chain.node.chainstate import ChainState
from gateway.chain.node.common import (
    RPC_INVALID_ADDRESS_OR_KEY,
    RPC_INVALID_PARAMETER,
    NodeRpcError,
    btc,
    decode_tx_hex,
    difficulty,
    expect_int,
    hex_to_hash,
    script_json,
    tx_json,
)
from gateway.chain.node.context import NodeContext
from gateway.chain.node.store import BlockInfo
from gateway.protocol.tx import measure

_NO_TX_IN_BLOCK = (
    "No such transaction found in the provided block. Use gettransaction for wallet transactions."
)
_NO_TX_WITHOUT_INDEX = (
    "No such mempool transaction. Use -txindex or provide a block hash to enable blockchain "
    "transaction queries. Use gettransaction for wallet transactions."
)
_NO_TX_WITH_INDEX = (
    "No such mempool or blockchain transaction. Use gettransaction for wallet transactions."
)
#: The genesis coinbase's txid (its merkle root): never in the UTXO set or an index.
_GENESIS_COINBASE = bytes.fromhex(
    "4a5e1e4baab89f3a32518a88c31bc87f618f76673e2cc77ab2127b7afdeda33b"
)[::-1]


class ChainRpc:
    """``getblock``, ``getrawtransaction``, ``invalidateblock``... over a node."""

    def __init__(self, node: NodeContext) -> None:
        self.node = node

    @property
    def _chain(self) -> ChainState:
        return self.node.chain

    def _block_info(self, value: Any, name: str = "blockhash") -> BlockInfo:
        info = self._chain.headers.get(hex_to_hash(value, name))
        if info is None:
            raise NodeRpcError(RPC_INVALID_ADDRESS_OR_KEY, "Block not found")
        return info

    def _header_json(self, info: BlockInfo) -> dict[str, Any]:
        chain = self._chain
        header = info.header
        version = int.from_bytes(header[:4], "little", signed=True)
        confirmations = chain.confirmations(info)
        out: dict[str, Any] = {
            "hash": info.hash[::-1].hex(),
            "confirmations": confirmations,
            "height": info.height,
            "version": version,
            "versionHex": f"{version & 0xFFFFFFFF:08x}",
            "merkleroot": header[36:68][::-1].hex(),
            "time": info.time,
            "mediantime": chain.median_time_past(info.hash),
            "nonce": int.from_bytes(header[76:80], "little"),
            "bits": f"{info.bits:08x}",
            "difficulty": difficulty(info.bits),
            "chainwork": f"{info.chainwork:064x}",
            "nTx": info.ntx,
        }
        if info.height > 0:
            out["previousblockhash"] = info.prev[::-1].hex()
        if confirmations > 1:
            out["nextblockhash"] = chain.active[info.height + 1][::-1].hex()
        return out

    async def rpc_getblockchaininfo(self) -> dict[str, Any]:
        """Bitcoin Core ``getblockchaininfo`` (regtest subset)."""
        chain = self._chain
        tip = chain.tip
        return {
            "chain": "regtest",
            "blocks": tip.height,
            "headers": tip.height,
            "bestblockhash": tip.hash[::-1].hex(),
            "bits": f"{tip.bits:08x}",
            "difficulty": difficulty(tip.bits),
            "time": tip.time,
            "mediantime": chain.median_time_past(),
            "verificationprogress": 1,
            "initialblockdownload": False,
            "chainwork": f"{tip.chainwork:064x}",
            "pruned": False,
            "warnings": [],
        }

    async def rpc_getblockcount(self) -> int:
        """Height of the tip."""
        return int(self._chain.tip_height)

    async def rpc_getbestblockhash(self) -> str:
        """Tip hash (display order)."""
        return str(self._chain.tip_hash[::-1].hex())

    async def rpc_getblockhash(self, height: Any) -> str:
        """Active-chain block hash at ``height``."""
        expect_int(height, "height")
        if not 0 <= height <= self._chain.tip_height:
            raise NodeRpcError(RPC_INVALID_PARAMETER, "Block height out of range")
        return str(self._chain.active[height][::-1].hex())

    async def rpc_getblockheader(self, blockhash: Any, verbose: Any = True) -> Any:
        """Header as hex (verbose=false) or object; any stored block, active or not."""
        info = self._block_info(blockhash)
        if not verbose:
            return info.header.hex()
        return self._header_json(info)

    async def rpc_getblock(self, blockhash: Any, verbosity: Any = 1) -> Any:
        """Block as hex (0), with txids (1) or with decoded transactions (2, 3)."""
        if isinstance(verbosity, bool):
            verbosity = int(verbosity)
        expect_int(verbosity, "verbosity")
        info = self._block_info(blockhash)
        raw = self._chain.raw_block(info.hash)
        if verbosity <= 0:
            return raw.hex()
        block = self._chain.block(info.hash)
        out = self._header_json(info)
        # Core's block sizes: without witnesses, with them, and BIP141 weight.
        sizes = [measure(t) for t in block.vtx]
        stripped = len(raw) - sum(s.size - s.base_size for s in sizes)
        out["strippedsize"] = stripped
        out["size"] = len(raw)
        out["weight"] = stripped * 3 + len(raw)
        if verbosity == 1:
            out["tx"] = [s.txid[::-1].hex() for s in sizes]
        else:
            txs = []
            for t, s in zip(block.vtx, sizes, strict=True):
                item = tx_json(t, s)
                item["hex"] = s.serialized.hex()
                txs.append(item)
            out["tx"] = txs
        return out

    async def rpc_getchaintips(self) -> list[dict[str, Any]]:
        """Every branch tip of the stored block tree (Core's ``getchaintips``)."""
        chain = self._chain
        leaves = [h for h in chain.headers if not chain.children.get(h)]
        if chain.tip_hash not in leaves:
            leaves.append(chain.tip_hash)
        out = []
        for leaf in leaves:
            info = chain.headers[leaf]
            cursor = leaf
            branch: list[bytes] = []
            while not chain.is_active(cursor):
                branch.append(cursor)
                cursor = chain.headers[cursor].prev
            if not branch:
                status = "active"
            elif chain.is_invalid(leaf):
                status = "invalid"
            elif all(chain.has_undo(h) for h in branch):
                status = "valid-fork"
            else:
                status = "valid-headers"
            out.append({"height": info.height, "hash": leaf[::-1].hex(),
                        "branchlen": len(branch), "status": status})
        return sorted(out, key=lambda item: -item["height"])

    async def rpc_getrawtransaction(
        self, txid: Any, verbose: Any = 0, blockhash: Any = None
    ) -> Any:
        """A mempool transaction, or a chain one from ``blockhash`` or the txindex (Core's rules).

        Without ``-txindex`` a confirmed transaction is found only in the block
        given by ``blockhash``, exactly as a stock node: the mempool is
        searched only when no block is given.
        """
        key = hex_to_hash(txid, "parameter 1")
        if isinstance(verbose, bool):
            verbosity = int(verbose)
        elif verbose is None:
            verbosity = 0
        else:
            verbosity = expect_int(verbose, "verbosity")
        chain = self._chain
        if key == _GENESIS_COINBASE:
            raise NodeRpcError(
                RPC_INVALID_ADDRESS_OR_KEY,
                "The genesis block coinbase is not considered an ordinary transaction and "
                "cannot be retrieved",
            )
        tx: CTransaction | None = None
        info: BlockInfo | None = None
        given = blockhash is not None
        if given:
            info = self._chain.headers.get(hex_to_hash(blockhash, "parameter 3"))
            if info is None:
                raise NodeRpcError(RPC_INVALID_ADDRESS_OR_KEY, "Block hash not found")
            tx = self._find_tx(info, key)
            if tx is None:
                raise NodeRpcError(RPC_INVALID_ADDRESS_OR_KEY, _NO_TX_IN_BLOCK)
        else:
            entry = self.node.mempool.entries.get(key)
            if entry is not None:
                tx = entry.tx
            elif chain.txindex is not None and key in chain.txindex:
                info = chain.headers.get(chain.txindex[key])
                if info is not None:
                    tx = self._find_tx(info, key)
            if tx is None:
                raise NodeRpcError(
                    RPC_INVALID_ADDRESS_OR_KEY,
                    _NO_TX_WITHOUT_INDEX if chain.txindex is None else _NO_TX_WITH_INDEX,
                )
        if verbosity <= 0:
            return tx.serialize().hex()
        out: dict[str, Any] = {}
        if given:
            out["in_active_chain"] = chain.is_active(info.hash) if info else False
        sizes = measure(tx)
        out.update(tx_json(tx, sizes))
        out["hex"] = sizes.serialized.hex()
        if info is not None:
            out["blockhash"] = info.hash[::-1].hex()
            if chain.is_active(info.hash):
                out["confirmations"] = chain.tip_height - info.height + 1
                out["time"] = out["blocktime"] = info.time
            else:
                out["confirmations"] = 0
        return out

    def _find_tx(self, info: BlockInfo, key: bytes) -> CTransaction | None:
        block = self._chain.block(info.hash)
        txids = block_txids(block)
        return next((t for t, h in zip(block.vtx, txids, strict=True) if h == key), None)

    async def rpc_decoderawtransaction(self, hexstring: Any, iswitness: Any = None) -> Any:
        """Decode a raw transaction."""
        return tx_json(decode_tx_hex(hexstring))

    async def rpc_gettxout(self, txid: Any, n: Any, include_mempool: Any = True) -> Any:
        """An unspent output, or null when spent or unknown."""
        key = hex_to_hash(txid, "txid")
        expect_int(n, "n")
        outpoint = (key, n)
        chain = self._chain
        mempool = self.node.mempool
        if include_mempool and outpoint in mempool.spent:
            return None
        coin = chain.utxos.get(outpoint)
        confirmations = 0
        if coin is not None:
            confirmations = chain.tip_height - coin.height + 1
        elif include_mempool:
            coin = mempool.lookup_coin(outpoint)
        if coin is None:
            return None
        return {
            "bestblock": chain.tip_hash[::-1].hex(),
            "confirmations": confirmations,
            "value": btc(coin.value),
            "scriptPubKey": script_json(coin.script),
            "coinbase": coin.coinbase,
        }

    async def rpc_invalidateblock(self, blockhash: Any) -> None:
        """Mark a block invalid: it and its descendants leave the active chain."""
        info = self._block_info(blockhash)
        await self.node.exclusive(lambda: self.node.validator.invalidate(info.hash))

    async def rpc_reconsiderblock(self, blockhash: Any) -> None:
        """Undo ``invalidateblock``: the most-work valid chain becomes active again."""
        info = self._block_info(blockhash)
        await self.node.exclusive(lambda: self.node.validator.reconsider(info.hash))
