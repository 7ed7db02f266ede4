"""Funding a channel through any Bitcoin Core-compatible wallet RPC.

The player holds only K1; the viewer's coins stay in their own wallet
(``bitcoind``'s, or the embedded node's faucet wallet in the demo). Everything
goes through :class:`gateway.chain.rpc.RpcClient`, so the calls are plain
Bitcoin Core RPCs:

- ``cltv`` (PROTOCOL.md section 2): ``sendtoaddress`` to the funding address;
  the client can refund alone, so the wallet may broadcast at once.
- ``multisig``: T1 must be *signed but not broadcast* before the gateway signs
  the refund T2, and T1 must spend only segwit outputs so its txid cannot be
  changed by anyone before it confirms. :meth:`Wallet.build_funding_tx`
  preselects segwit coins (``listunspent``), lets the wallet add change
  (``fundrawtransaction``), signs (``signrawtransactionwithwallet``) and checks
  that every input carries a witness.
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

from gateway.chain.rpc import RpcClient, RpcError, RpcException, RpcMethodNotFound
from gateway.protocol.errors import ProtocolError
from gateway.protocol.scripts import address_to_script_pubkey
from gateway.protocol.transactions import Outpoint, find_funding_output, parse_tx, txid_of

__all__ = ["COIN", "FundingTx", "Wallet", "WalletError", "chain_to_network", "is_segwit_script"]

#: Satoshi per BTC (RPC amounts are BTC).
COIN: Final = 100_000_000
_SEQUENCE_RBF: Final = 0xFFFFFFFD

#: ``getblockchaininfo.chain`` -> ``hello.network`` (PROTOCOL.md section 6).
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
    """Map Bitcoin Core's chain name to a PROTOCOL.md network name."""
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


def _btc(sat: int) -> str:
    # A string: both bitcoind and the embedded node take it exactly (no float, no exponent).
    return f"{Decimal(sat) / COIN:.8f}"


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
        """The wallet's network, as PROTOCOL.md names it."""
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

    async def _raw_tx(self, txid: str) -> bytes:
        try:
            return bytes.fromhex(await self.rpc.call("getrawtransaction", txid))
        except RpcError:
            # Core without -txindex: a wallet transaction is still in gettransaction.
            tx = await self._call("gettransaction", txid)
            return bytes.fromhex(tx["hex"])

    async def send_to(self, address: str, script_pubkey: bytes, value: int) -> FundingTx:
        """cltv funding: ``sendtoaddress`` ``value`` sat to ``address`` (broadcast at once)."""
        txid = await self._call("sendtoaddress", address, _btc(value))
        tx = await self._raw_tx(txid)
        return self._funding(tx, script_pubkey, value)

    @staticmethod
    def _funding(tx: bytes, script_pubkey: bytes, value: int) -> FundingTx:
        try:
            vout, paid = find_funding_output(tx, script_pubkey)
        except ProtocolError as exc:
            raise WalletError(f"funding transaction: {exc.message}") from None
        if paid != value:
            raise WalletError(f"funding output pays {paid} sat, not {value}")
        return FundingTx(tx=tx, outpoint=Outpoint(txid_of(tx), vout), value=value)

    async def build_funding_tx(self, script_pubkey: bytes, value: int) -> FundingTx:
        """multisig funding: a signed T1 paying ``value`` to ``script_pubkey``, NOT broadcast.

        Preselects confirmed segwit coins covering ``value`` (a transaction
        with no inputs is ambiguous to decode, and this keeps T1 segwit-only),
        lets the wallet add fee inputs and change, signs, and checks that
        every input has a witness (PROTOCOL.md section 2).
        """
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
            [CTxOut(value, CScript(script_pubkey))],
            nVersion=2,
        )
        funded = await self._call("fundrawtransaction", bytes(unsigned.serialize()).hex())
        signed = await self._call("signrawtransactionwithwallet", funded["hex"])
        if not signed.get("complete"):
            raise WalletError("the wallet could not sign every input of the funding transaction")
        tx = bytes.fromhex(signed["hex"])
        parsed = parse_tx(tx)
        witnesses = list(parsed.wit.vtxinwit) if parsed.wit is not None else []
        if len(witnesses) != len(parsed.vin) or any(not w.scriptWitness.stack for w in witnesses):
            # A non-segwit input lets a third party change T1's txid, which
            # would orphan the signed T2 (the flaw of the original construction).
            raise WalletError("the funding transaction spends a non-segwit output; refusing it")
        return self._funding(tx, script_pubkey, value)

    async def broadcast(self, tx: bytes) -> str:
        """``sendrawtransaction``; returns the txid. Raises the RPC's error as is."""
        txid: str = await self.rpc.call("sendrawtransaction", tx.hex())
        return txid
