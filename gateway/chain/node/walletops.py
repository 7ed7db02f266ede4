"""The faucet wallet's coin selection, funding and signing over the node's state.

The keys are ``gateway.chain.node.wallet.Wallet``'s (in node.sqlite, committed
before an address is handed out); the coins are not stored at all: they are
the UTXO index's and the mempool's outputs paying those keys, so a crash, a
restart or a reorg can never leave a wallet balance that disagrees with the
chain.
"""

from __future__ import annotations

from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxOut
from bitcoin.core.script import CScript

from gateway.chain.node.common import (
    COINBASE_MATURITY,
    RPC_INVALID_ADDRESS_OR_KEY,
    RPC_INVALID_PARAMETER,
    RPC_WALLET_INSUFFICIENT_FUNDS,
    Coin,
    NodeRpcError,
    Outpoint,
)
from gateway.chain.node.mempool import Mempool
from gateway.chain.node.policy import dust_threshold
from gateway.chain.node.wallet import Wallet

#: sat/vB for the faucet wallet's own transactions.
WALLET_FEE_RATE = 2


class NodeWallet:
    """Wallet views and transactions built from the chain index and the mempool."""

    def __init__(self, keys: Wallet, mempool: Mempool) -> None:
        self.keys = keys
        self.mempool = mempool

    def spendable(self) -> list[tuple[Outpoint, Coin]]:
        """Mature wallet coins not spent by the mempool, plus unconfirmed wallet change."""
        chain = self.mempool.chain
        utxos = chain.utxos
        spent = self.mempool.spent
        next_height = chain.tip_height + 1
        coins = [
            (o, utxos[o])
            for o in chain.wallet_utxos
            if o not in spent
            and not (utxos[o].coinbase and next_height - utxos[o].height < COINBASE_MATURITY)
        ]
        entries = self.mempool.entries
        for txid, entry in entries.items():
            # Only outputs of transactions the wallet itself funded are trusted.
            if not all(
                (i.prevout.hash, i.prevout.n) in chain.wallet_utxos or i.prevout.hash in entries
                for i in entry.tx.vin
            ):
                continue
            for n, out in enumerate(entry.tx.vout):
                if self.keys.owns(out.scriptPubKey) and (txid, n) not in spent:
                    coin = Coin(out.nValue, bytes(out.scriptPubKey), next_height, False)
                    coins.append(((txid, n), coin))
        return coins

    def fund(
        self, tx: CTransaction, fee_rate: int, change_position: int | None = None
    ) -> tuple[CTransaction, int, int]:
        """Add wallet inputs and a change output to cover outputs + fee at ``fee_rate`` sat/vB."""
        preset: list[Coin] = []
        for txin in tx.vin:
            coin = self.mempool.lookup_coin((txin.prevout.hash, txin.prevout.n))
            if coin is None:
                raise NodeRpcError(RPC_INVALID_ADDRESS_OR_KEY, "Unable to find UTXO for input")
            preset.append(coin)
        target = sum(o.nValue for o in tx.vout)
        have = sum(c.value for c in preset)
        used = {(i.prevout.hash, i.prevout.n) for i in tx.vin}
        candidates = sorted(
            (c for c in self.spendable() if c[0] not in used), key=lambda item: -item[1].value
        )
        inputs = list(tx.vin)
        change_script = self.keys.default_script()
        out_vbytes = sum(9 + len(o.scriptPubKey) for o in tx.vout)
        while True:
            # P2WPKH input <= 68 vB with a 72-byte signature; change output 31 vB.
            vsize = 11 + 68 * len(inputs) + out_vbytes + 31
            fee = vsize * fee_rate
            if have >= target + fee:
                break
            if not candidates:
                raise NodeRpcError(RPC_WALLET_INSUFFICIENT_FUNDS, "Insufficient funds")
            outpoint, coin = candidates.pop(0)
            inputs.append(CTxIn(COutPoint(outpoint[0], outpoint[1]), CScript(), 0xFFFFFFFD))
            have += coin.value
        outputs = list(tx.vout)
        change = have - target - fee
        position = -1
        if change >= dust_threshold(change_script):
            position = len(outputs) if change_position is None else change_position
            if not 0 <= position <= len(outputs):
                raise NodeRpcError(RPC_INVALID_PARAMETER, "changePosition out of bounds")
            outputs.insert(position, CTxOut(change, CScript(change_script)))
        else:
            fee += change
        funded = CTransaction(inputs, outputs, tx.nLockTime, tx.nVersion)
        return funded, fee, position

    def sign(self, tx: CTransaction) -> tuple[CTransaction, list[int]]:
        """Sign the inputs spending wallet coins; return the tx and the unsigned indexes."""
        spent: list[tuple[bytes, int] | None] = []
        for txin in tx.vin:
            coin = self.mempool.lookup_coin((txin.prevout.hash, txin.prevout.n))
            spent.append(None if coin is None else (coin.script, coin.value))
        return self.keys.sign(tx, spent)
