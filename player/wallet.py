"""Funding a channel through any Bitcoin Core-compatible wallet RPC.

The player holds only K1; the viewer's coins stay in their own wallet
(``bitcoind``'s, or the embedded node's faucet wallet in the demo). Everything
goes through :class:`gateway.chain.rpc.RpcClient`, so the calls are plain
Bitcoin Core RPCs:

- T1 is always *signed but not broadcast* first (:meth:`Wallet.build_funding_tx`:
  ``fundrawtransaction`` adds inputs and change, ``signrawtransactionwithwallet``
  signs), so the player stores it with its refund before any coin moves.
- ``cltv`` (protocol.md section 2): the client signs its refund alone, so
  any coins will do.
- ``multisig``: the gateway signs the refund T2 before T1 is broadcast, and
  T1 must spend only segwit outputs so its txid cannot be changed by anyone
  before it confirms: segwit coins are preselected (``listunspent``) and
  every input must carry a witness.
- the change/refund destination: ``getnewaddress``, converted to its output
  script with ``getaddressinfo`` when the RPC has it, else locally.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxOut, lx
from bitcoin.core.script import CScript

from gateway.chain.rpc import RpcClient, RpcException, RpcMethodNotFound
from gateway.protocol.errors import ProtocolError
from gateway.protocol.scripts import address_to_script_pubkey
from gateway.protocol.transactions import Outpoint, find_funding_output, parse_tx, txid_of

__all__ = ["COIN", "FundingTx", "Wallet", "WalletError", "chain_to_network", "is_segwit_script"]

#: Satoshi per BTC (RPC amounts are BTC).
COIN: Final = 100_000_000
_SEQUENCE_RBF: Final = 0xFFFFFFFD

#: ``getblockchaininfo.chain`` -> ``hello.network`` (protocol.md section 6).
_CHAINS: Final = {
    "regtest": "regtest",
    "signet": "signet",
    "test": "testnet",
    "testnet4": "testnet",
    "main": "main",
}


class WalletError(Exception):
    """The wallet RPC failed or returned something unusable (a one-line message)."""


def chain_to_network(chain: str) -> str:
    """Map Bitcoin Core's chain name to a protocol.md network name."""
    try:
        return _CHAINS[chain]
    except KeyError:
        raise WalletError(f"unknown chain {chain!r} from the wallet RPC") from None


def is_segwit_script(spk: bytes) -> bool:
    """True for a witness program output (BIP141: OP_n then a 2-40 byte push)."""
    return (
        4 <= len(spk) <= 42 and (spk[0] == 0 or 0x51 <= spk[0] <= 0x60) and spk[1] == len(spk) - 2
    )


def _sat(amount: Any) -> int:
    return int(Decimal(str(amount)) * COIN)


@dataclass(frozen=True, slots=True)
class FundingTx:
    """A signed funding transaction T1 and the output that pays the channel."""

    tx: bytes
    outpoint: Outpoint
    value: int


class Wallet:
    """A viewer's wallet behind a Bitcoin Core-compatible JSON-RPC endpoint."""

    def __init__(self, rpc: RpcClient) -> None:
        self.rpc = rpc

    @classmethod
    def connect(cls, url: str, *, cookie_path: str | Path | None = None) -> Wallet:
        """A wallet for ``url`` (``http://host:port[/wallet/NAME]``), authenticated by cookie."""
        try:
            return cls(RpcClient(url, cookie_path=cookie_path))
        except ValueError as exc:
            raise WalletError(str(exc)) from None

    async def close(self) -> None:
        """Close the RPC connections."""
        await self.rpc.close()

    async def _call(self, method: str, *params: Any) -> Any:
        try:
            return await self.rpc.call(method, *params)
        except RpcException as exc:
            raise WalletError(f"wallet RPC {method} failed: {exc}") from None

    async def network(self) -> str:
        """The wallet's network, as protocol.md names it."""
        info = await self._call("getblockchaininfo")
        return chain_to_network(str(info.get("chain")))

    async def tip_height(self) -> int:
        """The current block height."""
        return int(await self._call("getblockcount"))

    async def new_output_script(self, network: str) -> bytes:
        """A fresh address of the wallet as an output script (change and refund)."""
        address = await self._call("getnewaddress")
        try:
            info = await self.rpc.call("getaddressinfo", address)
            return bytes.fromhex(info["scriptPubKey"])
        except (RpcMethodNotFound, KeyError, TypeError, ValueError):
            pass  # a node without getaddressinfo: decode the address ourselves
        except RpcException as exc:
            raise WalletError(f"wallet RPC getaddressinfo failed: {exc}") from None
        try:
            return address_to_script_pubkey(address, network)
        except ValueError as exc:
            raise WalletError(f"wallet gave address {address!r}: {exc}") from None

    @staticmethod
    def _funding(tx: bytes, script_pubkey: bytes, value: int) -> FundingTx:
        try:
            vout, paid = find_funding_output(tx, script_pubkey)
        except ProtocolError as exc:
            raise WalletError(f"funding transaction: {exc.message}") from None
        if paid != value:
            raise WalletError(f"funding output pays {paid} sat, not {value}")
        return FundingTx(tx=tx, outpoint=Outpoint(txid_of(tx), vout), value=value)

    async def build_funding_tx(
        self, script_pubkey: bytes, value: int, *, segwit_only: bool = True
    ) -> FundingTx:
        """A signed T1 paying ``value`` to ``script_pubkey``, NOT broadcast.

        The player stores T1 and its refund before broadcasting, so no crash
        leaves money at an output it cannot refund. By default (multisig,
        whose refund T2 spends T1 by txid) it preselects confirmed segwit
        coins covering ``value``, lets the wallet add fee inputs and change,
        signs, and checks that every input has a witness, so no one can
        change T1's txid (protocol.md section 2). ``segwit_only=False``
        (cltv, whose refund the client signs after T1 is final) hands the
        wallet an input-less template, as ``createrawtransaction`` +
        ``fundrawtransaction`` do, and lets it pick any coins.
        """
        output = CTxOut(value, CScript(script_pubkey))
        if not segwit_only:
            tx = await self._fund_and_sign(CTransaction([], [output], nVersion=2))
            return self._funding(tx, script_pubkey, value)
        coins = await self._call("listunspent", 1)
        chosen: list[dict[str, Any]] = []
        total = 0
        for coin in sorted(coins, key=lambda c: -_sat(c["amount"])):
            if total >= value:
                break
            if not coin.get("spendable", True) or not coin.get("safe", True):
                continue
            if not is_segwit_script(bytes.fromhex(coin["scriptPubKey"])):
                continue
            chosen.append(coin)
            total += _sat(coin["amount"])
        if total < value:
            raise WalletError(f"the wallet has {total} sat in confirmed segwit coins; need {value}")
        unsigned = CTransaction(
            [
                CTxIn(COutPoint(lx(c["txid"]), int(c["vout"])), nSequence=_SEQUENCE_RBF)
                for c in chosen
            ],
            [output],
            nVersion=2,
        )
        tx = await self._fund_and_sign(unsigned)
        parsed = parse_tx(tx)
        witnesses = list(parsed.wit.vtxinwit) if parsed.wit is not None else []
        if len(witnesses) != len(parsed.vin) or any(not w.scriptWitness.stack for w in witnesses):
            # A non-segwit input lets a third party change T1's txid, which
            # would orphan the signed T2 (the flaw of the original construction).
            raise WalletError("the funding transaction spends a non-segwit output; refusing it")
        return self._funding(tx, script_pubkey, value)

    async def _fund_and_sign(self, template: CTransaction) -> bytes:
        """The wallet adds inputs, fee and change to ``template`` and signs it (not broadcast)."""
        # lockUnspents: T1 is broadcast only after it is stored with its
        # refund; meanwhile another payment from this wallet must not pick
        # the same coins (bitcoind keeps the lock until they are spent).
        funded = await self._call(
            "fundrawtransaction", bytes(template.serialize()).hex(), {"lockUnspents": True}
        )
        signed = await self._call("signrawtransactionwithwallet", funded["hex"])
        if not signed.get("complete"):
            raise WalletError("the wallet could not sign every input of the funding transaction")
        return bytes.fromhex(signed["hex"])

    async def txout(self, txid: str, vout: int) -> tuple[int, bytes, int] | None:
        """``gettxout`` (mempool included): (value sat, script, confirmations), None if none.

        A stock node answers it for any unspent output, with no transaction
        index: how the player sees its settled change on chain.
        """
        found = await self._call("gettxout", txid, vout, True)
        if found is None:
            return None
        try:
            return (
                _sat(found["value"]),
                bytes.fromhex(found["scriptPubKey"]["hex"]),
                int(found["confirmations"]),
            )
        except (KeyError, TypeError, ValueError):
            raise WalletError(
                f"wallet RPC gettxout gave an unusable answer for {txid}:{vout}"
            ) from None

    async def broadcast(self, tx: bytes) -> str:
        """``sendrawtransaction``; returns the txid. Raises the RPC's error as is."""
        txid: str = await self.rpc.call("sendrawtransaction", tx.hex())
        return txid
