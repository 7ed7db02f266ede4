"""Mempool, mining, control and wallet RPCs (Bitcoin Core's ``rpc/mempool.cpp``,
``rpc/mining.cpp``, ``rpc/node.cpp`` and the wallet's ``rpc/spend.cpp``).

Whatever changes state runs under the node's lock through
``EmbeddedNode.exclusive`` and is committed to node.sqlite before the answer
is sent: a txid, an address or a block hash that an RPC returned survives a
kill -9 of the node.
"""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

from bitcoin.core import CTransaction, CTxOut
from bitcoin.core.script import CScript

from gateway.chain.blocks import block_hash_hex, parse_block
from gateway.chain.node import store
from gateway.chain.node.common import (
    DEFAULT_MAX_FEE_RATE,
    RPC_DESERIALIZATION_ERROR,
    RPC_INVALID_ADDRESS_OR_KEY,
    RPC_INVALID_PARAMETER,
    RPC_MISC_ERROR,
    RPC_TYPE_ERROR,
    RPC_VERIFY_ALREADY_IN_CHAIN,
    RPC_VERIFY_ERROR,
    NodeRpcError,
    TxRejected,
    address_of,
    btc,
    decode_tx_hex,
    expect_int,
    fee_rate_param,
    hex_to_hash,
    output_script,
    parse_amount,
)
from gateway.chain.node.context import NodeContext
from gateway.chain.node.mempool import MempoolEntry
from gateway.chain.node.walletops import WALLET_FEE_RATE
from gateway.protocol.tx import measure
from gateway.protocol.tx import txid as tx_id

_ESTIMATE_MODES = ("unset", "economical", "conservative")
#: Core's setmocktime bound: the seconds in std::chrono::nanoseconds::max().
_MAX_MOCKTIME = 9_223_372_036


class NodeRpc:
    """The state-changing half of the RPC surface, plus mempool and wallet views."""

    def __init__(self, node: NodeContext) -> None:
        self.node = node

    # -- mempool ---------------------------------------------------------------

    async def rpc_sendrawtransaction(self, hexstring: Any, maxfeerate: Any = None) -> str:
        """Validate and relay (here: add to the mempool); return the txid."""
        tx = decode_tx_hex(hexstring)
        key = tx_id(tx)
        rate = DEFAULT_MAX_FEE_RATE if maxfeerate is None else fee_rate_param(maxfeerate)
        mempool = self.node.mempool

        async def accept() -> None:
            if key in mempool.entries:
                return  # Core: already in the mempool is success
            try:
                mempool.accept(tx, rate)
            except TxRejected as exc:
                if exc.reason == "max-fee-exceeded":
                    raise NodeRpcError(
                        RPC_VERIFY_ERROR,
                        "Fee exceeds maximum configured by user (e.g. -maxtxfee, maxfeerate)",
                    ) from exc
                if exc.reason == "txn-already-known":
                    raise NodeRpcError(
                        RPC_VERIFY_ALREADY_IN_CHAIN, "Transaction outputs already in utxo set"
                    ) from exc
                raise

        await self.node.exclusive(accept)
        return key[::-1].hex()

    async def rpc_testmempoolaccept(
        self, rawtxs: Any, maxfeerate: Any = None
    ) -> list[dict[str, Any]]:
        """Would each transaction be accepted? Nothing is added to the mempool."""
        if not isinstance(rawtxs, list) or not rawtxs:
            raise NodeRpcError(
                RPC_INVALID_PARAMETER, "Array must contain at least one transaction."
            )
        rate = DEFAULT_MAX_FEE_RATE if maxfeerate is None else fee_rate_param(maxfeerate)
        txs = [decode_tx_hex(raw) for raw in rawtxs]
        results = []
        for tx in txs:
            sizes = measure(tx)
            item: dict[str, Any] = {
                "txid": sizes.txid[::-1].hex(), "wtxid": sizes.wtxid[::-1].hex()
            }
            try:
                entry = self.node.mempool.check(tx, rate)
            except TxRejected as exc:
                item["allowed"] = False
                item["reject-reason"] = exc.reason
            else:
                item["allowed"] = True
                item["vsize"] = sizes.vsize
                item["fees"] = {"base": btc(entry.fee)}
            results.append(item)
        return results

    def _entry_json(self, txid: bytes, entry: MempoolEntry) -> dict[str, Any]:
        children = self.node.mempool.children(txid)
        return {
            "vsize": entry.vsize,
            "weight": entry.weight,
            "time": entry.time,
            "height": entry.height,
            "descendantcount": 1 + len(children),
            "ancestorcount": 1 + len(entry.parents),
            "wtxid": entry.wtxid[::-1].hex(),
            "fees": {
                "base": btc(entry.fee),
                "modified": btc(entry.fee),
                "ancestor": btc(entry.fee),
                "descendant": btc(entry.fee),
            },
            "depends": [p[::-1].hex() for p in sorted(entry.parents)],
            "spentby": [c[::-1].hex() for c in children],
            "bip125-replaceable": False,
            "unbroadcast": False,
        }

    async def rpc_getrawmempool(self, verbose: Any = False, mempool_sequence: Any = False) -> Any:
        """Mempool txids, or txid -> entry objects when verbose."""
        entries = self.node.mempool.entries
        if verbose:
            return {t[::-1].hex(): self._entry_json(t, e) for t, e in entries.items()}
        return [t[::-1].hex() for t in entries]

    async def rpc_getmempoolentry(self, txid: Any) -> dict[str, Any]:
        """One mempool entry."""
        key = hex_to_hash(txid, "parameter 1")
        entry = self.node.mempool.entries.get(key)
        if entry is None:
            raise NodeRpcError(RPC_INVALID_ADDRESS_OR_KEY, "Transaction not in mempool")
        return self._entry_json(key, entry)

    async def rpc_getmempoolinfo(self) -> dict[str, Any]:
        """Size and fee floor of the mempool."""
        entries = self.node.mempool.entries.values()
        return {
            "loaded": True,
            "size": len(entries),
            "bytes": sum(e.vsize for e in entries),
            "total_fee": btc(sum(e.fee for e in entries)),
            "mempoolminfee": btc(1000),
            "minrelaytxfee": btc(1000),
        }

    async def rpc_gettxspendingprevout(self, outputs: Any) -> list[dict[str, Any]]:
        """Which mempool transaction spends each given output (Core 24+, mempool only)."""
        if not isinstance(outputs, list):
            raise NodeRpcError(RPC_TYPE_ERROR, "outputs must be an array")
        if not outputs:
            raise NodeRpcError(RPC_INVALID_PARAMETER, "Invalid parameter, outputs are missing")
        prevouts = []
        for item in outputs:
            if not isinstance(item, dict) or set(item) - {"txid", "vout"}:
                raise NodeRpcError(RPC_TYPE_ERROR, "Expected an object with txid and vout")
            if "txid" not in item or "vout" not in item:
                raise NodeRpcError(RPC_TYPE_ERROR, "Missing txid or vout")
            key = hex_to_hash(item["txid"], "txid")
            vout = expect_int(item["vout"], "vout")
            if vout < 0:
                raise NodeRpcError(
                    RPC_INVALID_PARAMETER, "Invalid parameter, vout cannot be negative"
                )
            prevouts.append((key, vout))
        spent = self.node.mempool.spent
        result = []
        for key, vout in prevouts:
            answer: dict[str, Any] = {"txid": key[::-1].hex(), "vout": vout}
            spender = spent.get((key, vout))
            if spender is not None:
                answer["spendingtxid"] = spender[::-1].hex()
            result.append(answer)
        return result

    async def rpc_estimatesmartfee(
        self, conf_target: Any, estimate_mode: Any = "economical"
    ) -> Any:
        """BTC/kvB from fee rates this node saw confirmed (see ``fees``), or Core's error object."""
        expect_int(conf_target, "conf_target")
        if not 1 <= conf_target <= 1008:
            raise NodeRpcError(
                RPC_INVALID_PARAMETER, "Invalid conf_target, must be between 1 and 1008"
            )
        if not isinstance(estimate_mode, str) or estimate_mode.lower() not in _ESTIMATE_MODES:
            raise NodeRpcError(
                RPC_INVALID_PARAMETER,
                'Invalid estimate_mode parameter, must be one of: "unset", "economical", '
                '"conservative"',
            )
        rate = self.node.fees.estimate()
        if rate is None:
            return {"errors": ["Insufficient data or no feerate found"], "blocks": 0}
        # Core never answers for 1 block: its shortest horizon is 2.
        return {"feerate": btc(rate), "blocks": max(conf_target, 2)}

    # -- mining and control ------------------------------------------------------

    async def rpc_generatetoaddress(
        self, nblocks: Any, address: Any, maxtries: Any = 1_000_000
    ) -> list[str]:
        """Mine ``nblocks`` blocks (with the mempool) paying ``address``."""
        expect_int(nblocks, "nblocks")
        script = output_script(address)
        miner = self.node.miner

        async def mine() -> list[str]:
            hashes = []
            for _ in range(nblocks):
                block = await miner.mine(script, miner.mempool_block_txs())
                hashes.append(block_hash_hex(block))
            return hashes

        return await self.node.exclusive(mine)

    async def rpc_generateblock(
        self, output: Any, transactions: Any, submit: Any = True
    ) -> dict[str, str]:
        """Mine a block with exactly ``transactions`` (mempool txids or raw hex).

        As in Core, raw transactions need not be in the mempool and may even
        conflict with it: the block goes through the kernel like any other,
        and once connected, mempool transactions spending the same outputs are
        evicted. If the block is invalid the tip does not move and the error
        carries the kernel's reason.
        """
        script = output_script(output)
        if not isinstance(transactions, list):
            raise NodeRpcError(RPC_TYPE_ERROR, "transactions must be an array")
        mempool = self.node.mempool
        txs: list[CTransaction] = []
        for item in transactions:
            if isinstance(item, str) and len(item) == 64:
                entry = mempool.entries.get(hex_to_hash(item, "txid"))
                if entry is None:
                    raise NodeRpcError(
                        RPC_INVALID_ADDRESS_OR_KEY, f"Transaction {item} not in mempool."
                    )
                txs.append(entry.tx)
            else:
                try:
                    txs.append(decode_tx_hex(item))
                except NodeRpcError as exc:
                    raise NodeRpcError(
                        RPC_DESERIALIZATION_ERROR, f"Transaction decode failed for {item}. "
                        "Make sure the tx has at least one input."
                    ) from exc
        miner = self.node.miner

        async def generate() -> dict[str, str]:
            if not submit:
                block = miner.assemble(script, txs)
                return {"hash": block_hash_hex(block), "hex": block.serialize().hex()}
            block = await miner.mine(script, txs, fees=0)
            return {"hash": block_hash_hex(block)}

        return await self.node.exclusive(generate)

    async def rpc_submitblock(self, hexdata: Any, dummy: Any = None) -> str | None:
        """Process a serialized block: null when connected, else Core's BIP22 result string."""
        try:
            block = parse_block(bytes.fromhex(hexdata))
        except (ValueError, TypeError) as exc:
            raise NodeRpcError(RPC_DESERIALIZATION_ERROR, "Block decode failed") from exc
        outcome, reason = await self.node.exclusive(
            lambda: self.node.validator.submit(block)
        )
        if outcome == "connected":
            return None
        if outcome == "side":
            return "inconclusive"
        if outcome == "refused":
            return (reason or "rejected").split(",")[0]
        return outcome

    async def rpc_setmocktime(self, timestamp: Any) -> None:
        """Set the node clock (0 = system clock); block times follow it."""
        expect_int(timestamp, "timestamp")
        if not 0 <= timestamp <= _MAX_MOCKTIME:
            raise NodeRpcError(
                RPC_INVALID_PARAMETER,
                f"Mocktime must be in the range [0, {_MAX_MOCKTIME}], not {timestamp}.",
            )
        db = self.node.chain.db
        with db:
            store.set_meta(db, "mocktime", timestamp)
        self.node.mocktime = timestamp

    async def rpc_stop(self) -> str:
        """Shut the node down after answering."""
        # Answer first: the shutdown task starts on a later loop iteration.
        asyncio.get_running_loop().call_later(0.01, lambda: asyncio.ensure_future(self.node.stop()))
        return "Bitcoin Core stopping"

    # -- wallet ------------------------------------------------------------------

    async def rpc_getnewaddress(self, label: Any = "", address_type: Any = "bech32") -> str:
        """A new P2WPKH address of the faucet wallet (its key is on disk first)."""
        if address_type != "bech32":
            raise NodeRpcError(RPC_INVALID_ADDRESS_OR_KEY, f"Unknown address type '{address_type}'")
        address = address_of(self.node.wallet.keys.new_script())
        assert address is not None
        return address

    async def rpc_getrawchangeaddress(self, address_type: Any = "bech32") -> str:
        """A new address for change."""
        return await self.rpc_getnewaddress("", address_type)

    async def rpc_getbalance(
        self, dummy: Any = "*", minconf: Any = 0, include_watchonly: Any = False,
        avoid_reuse: Any = True,
    ) -> float:
        """Spendable balance: mature confirmed coins plus the wallet's own unconfirmed change."""
        coins = self.node.wallet.spendable()
        if minconf > 0:
            chain = self.node.chain
            tip = chain.tip_height
            coins = [c for c in coins if c[0] in chain.utxos and tip - c[1].height + 1 >= minconf]
        return btc(sum(c.value for _, c in coins))

    async def rpc_listunspent(
        self, minconf: Any = 1, maxconf: Any = 9_999_999, addresses: Any = None,
        include_unsafe: Any = True, query_options: Any = None,
    ) -> list[dict[str, Any]]:
        """Wallet coins (mature coinbases only), like Bitcoin Core's."""
        wanted = {output_script(a) for a in addresses} if addresses else None
        chain = self.node.chain
        tip = chain.tip_height
        out = []
        for (txid, n), coin in self.node.wallet.spendable():
            confirmations = tip - coin.height + 1 if (txid, n) in chain.utxos else 0
            if not minconf <= confirmations <= maxconf:
                continue
            if wanted is not None and coin.script not in wanted:
                continue
            out.append({
                "txid": txid[::-1].hex(),
                "vout": n,
                "address": address_of(coin.script),
                "label": "",
                "scriptPubKey": coin.script.hex(),
                "amount": btc(coin.value),
                "confirmations": confirmations,
                "spendable": True,
                "solvable": True,
                "safe": True,
            })
        return out

    async def rpc_sendtoaddress(
        self, address: Any, amount: Any, comment: Any = "", comment_to: Any = "",
        subtractfeefromamount: Any = False, replaceable: Any = True,
        conf_target: Any = None, estimate_mode: Any = "unset", avoid_reuse: Any = True,
        fee_rate: Any = None,
    ) -> str:
        """Pay ``amount`` BTC to ``address`` from the faucet wallet; return the txid."""
        script = output_script(address)
        value = parse_amount(amount)
        if value <= 0:
            raise NodeRpcError(RPC_TYPE_ERROR, "Invalid amount for send")
        rate = WALLET_FEE_RATE if fee_rate is None else int(Decimal(str(fee_rate)))
        wallet = self.node.wallet

        async def send() -> str:
            template = CTransaction([], [CTxOut(value, CScript(script))], 0, 2)
            funded, fee, _ = wallet.fund(template, rate)
            if subtractfeefromamount:
                outs = list(funded.vout)
                outs[0] = CTxOut(value - fee, CScript(script))
                funded = CTransaction(funded.vin, outs, funded.nLockTime, funded.nVersion)
            signed, unsigned = wallet.sign(funded)
            if unsigned:
                raise NodeRpcError(RPC_MISC_ERROR, "Signing transaction failed")
            return self.node.mempool.accept(signed, None).txid[::-1].hex()

        return await self.node.exclusive(send)

    async def rpc_fundrawtransaction(
        self, hexstring: Any, options: Any = None, iswitness: Any = None
    ) -> dict[str, Any]:
        """Add wallet inputs and change; fee rate from ``fee_rate`` (sat/vB) or ``feeRate``."""
        tx = decode_tx_hex(hexstring)
        options = options or {}
        if not isinstance(options, dict):
            raise NodeRpcError(RPC_TYPE_ERROR, "options must be an object")
        rate = WALLET_FEE_RATE
        if "fee_rate" in options:
            rate = int(
                Decimal(str(options["fee_rate"])).to_integral_value(rounding="ROUND_CEILING")
            )
        elif "feeRate" in options:
            per_kvb = parse_amount(options["feeRate"])
            rate = -(-per_kvb // 1000)
        change_position = options.get("changePosition")
        funded, fee, position = self.node.wallet.fund(tx, rate, change_position)
        return {"hex": funded.serialize().hex(), "fee": btc(fee), "changepos": position}

    async def rpc_signrawtransactionwithwallet(
        self, hexstring: Any, prevtxs: Any = None, sighashtype: Any = "ALL",
    ) -> dict[str, Any]:
        """Sign the inputs that spend wallet coins (P2WPKH, SIGHASH_ALL)."""
        if sighashtype != "ALL":
            raise NodeRpcError(
                RPC_INVALID_PARAMETER, f"{sighashtype} is not a valid sighash parameter."
            )
        tx = decode_tx_hex(hexstring)
        signed, unsigned = self.node.wallet.sign(tx)
        out: dict[str, Any] = {"hex": signed.serialize().hex(), "complete": not unsigned}
        if unsigned:
            out["errors"] = [
                {
                    "txid": tx.vin[i].prevout.hash[::-1].hex(),
                    "vout": tx.vin[i].prevout.n,
                    "witness": [],
                    "scriptSig": tx.vin[i].scriptSig.hex(),
                    "sequence": tx.vin[i].nSequence,
                    "error": "Input not found or already spent",
                }
                for i in unsigned
            ]
        return out
