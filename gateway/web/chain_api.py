"""What a page without a node of its own asks the gateway: the demo faucet, the
chain's tip and what leaving costs, a refund relayed, where a channel's money went."""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

import coincurve
from aiohttp import web
from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxOut, b2lx, lx
from bitcoin.core.script import (
    SIGHASH_ALL,
    CScript,
)

from gateway.chain.rpc import RpcError, RpcVerifyAlreadyInChain
from gateway.chain.watch import btc_to_sat
from gateway.protocol.errors import ProtocolError
from gateway.protocol.messages import ChannelKind
from gateway.protocol.scripts import (
    ChannelScript,
    address_to_script_pubkey,
    hash160,
    p2wpkh_script_pubkey,
)
from gateway.protocol.sighash import bip143_digest, p2wpkh_script_code
from gateway.protocol.signatures import sign_digest
from gateway.protocol.transactions import find_funding_output, parse_tx, txid_of
from gateway.protocol.tx import with_witness, witness_stack
from gateway.web.context import WebContext
from gateway.web.http import HttpError, form_params, int_param, json_response, query_params
from gateway.web.pages import exit_estimate

log = logging.getLogger(__name__)

#: A refund is one input and one output: no honest one comes near this size.
MAX_REFUND_BYTES = 4096
_TXID = re.compile(r"[0-9a-f]{64}")


# -- demo faucet (regtest only) -----------------------------------------------------


async def _wallet_pays(ctx: WebContext, script: bytes, amount: int) -> tuple[str, bytes]:
    """The node's wallet pays ``amount`` to ``script`` (broadcast); (txid, raw tx)."""
    # Built, signed and sent here rather than by sendtoaddress: the output
    # index is then known without asking the node where the transaction
    # is (a stock node forgets that once it is mined, without -txindex).
    template = CTransaction([], [CTxOut(amount, CScript(script))], nVersion=2)
    funded = await ctx.rpc.call("fundrawtransaction", template.serialize().hex())
    signed = await ctx.rpc.call("signrawtransactionwithwallet", funded["hex"])
    txid = str(await ctx.rpc.call("sendrawtransaction", signed["hex"]))
    return txid, bytes.fromhex(signed["hex"])


#: The fee of the demo faucet's unbroadcast T1 (one P2WPKH input, one output):
#: comfortably above the fee floor for its size.
_T1_FEE = 500


async def _unbroadcast_t1(ctx: WebContext, script: bytes, amount: int) -> bytes:
    """A signed T1 paying ``amount`` to ``script``, not broadcast (multisig, section 2).

    The wallet first pays a key of this call's own (broadcast), and T1 spends
    that output alone: T1's input is then no coin of the wallet's, which it
    would otherwise spend again before T1 is broadcast (the node's wallet
    cannot lock coins). It spends a segwit output only, so its txid is fixed
    before it is broadcast, as section 2 requires.
    """
    key = coincurve.PrivateKey()
    pub = key.public_key.format(compressed=True)
    keyhash = hash160(pub)
    own = p2wpkh_script_pubkey(keyhash)
    txid, raw = await _wallet_pays(ctx, own, amount + _T1_FEE)
    vout = find_funding_output(raw, own)[0]
    unsigned = CTransaction(
        [CTxIn(COutPoint(lx(txid), vout), nSequence=0xFFFFFFFF)],
        [CTxOut(amount, CScript(script))],
        nVersion=2,
    )
    digest = bip143_digest(unsigned, 0, p2wpkh_script_code(keyhash), amount + _T1_FEE)
    sig = sign_digest(key.secret, digest) + bytes([SIGHASH_ALL])
    return bytes(with_witness(unsigned, [[sig, pub]]).serialize())


async def faucet_api(ctx: WebContext, request: web.Request) -> web.Response:
    """``POST /api/faucet?address=…&amount=SAT[&broadcast=0]``: regtest coins for an
    unfunded channel; with ``broadcast=0`` a signed T1 that is not broadcast."""
    if ctx.network != "regtest":
        raise HttpError(HTTPStatus.NOT_FOUND, "the demo faucet exists only on regtest")
    q = await form_params(request)
    address = q.get("address", "")
    amount = int_param(q, "amount")
    broadcast = q.get("broadcast", "1")
    if broadcast not in ("0", "1"):
        raise HttpError(HTTPStatus.BAD_REQUEST, "broadcast must be 0 or 1")
    limits = ctx.limits
    if not limits.min_value <= amount <= limits.max_value:
        raise HttpError(
            HTTPStatus.BAD_REQUEST,
            f"amount must be between {limits.min_value} and {limits.max_value} sat",
        )
    paid = ctx.faucet_paid
    if address in paid:
        raise HttpError(HTTPStatus.CONFLICT, "the faucet already paid this channel")
    try:
        script = address_to_script_pubkey(address, ctx.network)
    except ProtocolError:
        script = b""
    # One indexed lookup: nothing on a request path reads every channel.
    channel = ctx.ledger.reports.unfunded_channel(script) if script else None
    if channel is None:
        raise HttpError(HTTPStatus.BAD_REQUEST,
                        "not the funding address of an open, unfunded channel")
    if channel["kind"] == ChannelKind.MULTISIG and broadcast == "1":
        # protocol.md section 2: T1 goes out only once the gateway signed T2.
        raise HttpError(HTTPStatus.BAD_REQUEST, "a multisig channel's funding must not be "
                        "broadcast before its refund is signed: use broadcast=0")
    paid.add(address)
    try:
        if broadcast == "0":
            raw = await _unbroadcast_t1(ctx, script, amount)
            txid = txid_of(raw)
        else:
            txid, raw = await _wallet_pays(ctx, script, amount)
    except RpcError as exc:
        paid.discard(address)
        log.warning("demo faucet failed: %s", exc)
        raise HttpError(HTTPStatus.BAD_GATEWAY, "the node's wallet could not pay") from None
    vout = find_funding_output(raw, script)[0]
    answer: dict[str, Any] = {"txid": txid, "vout": vout, "amount": amount}
    if broadcast == "0":
        answer["tx"] = raw.hex()
    return json_response(HTTPStatus.OK, answer)


# -- the chain, for a page that has no node -------------------------------------------


async def chain_api(ctx: WebContext, request: web.Request) -> web.Response:
    """``GET /api/chain``: the node's tip and median-time-past, and what leaving costs now.

    A refund with nLockTime ``E`` fits in the next block once that block's
    height is above ``E`` (a height expiry) or once the tip's median-time-past
    is (a time expiry; protocol.md section 2): the page refunds then.
    """
    info = await ctx.rpc.call("getblockchaininfo")
    return json_response(
        HTTPStatus.OK,
        {
            "network": ctx.network,
            "height": int(info["blocks"]),
            "median_time": int(info["mediantime"]),
            **exit_estimate(await ctx.settler.feerate()),
        },
    )


async def _refund_status(ctx: WebContext, txid: str) -> web.Response:
    if not _TXID.fullmatch(txid):
        raise HttpError(HTTPStatus.BAD_REQUEST, "txid must be 64 lowercase hex digits")
    out = await ctx.rpc.call("gettxout", txid, 0, True)
    return json_response(
        HTTPStatus.OK,
        {
            "txid": txid,
            "seen": out is not None,
            "confirmations": out["confirmations"] if out is not None else None,
            "value": btc_to_sat(out["value"]) if out is not None else None,
            "script": out["scriptPubKey"]["hex"] if out is not None else None,
        },
    )


def _spends_a_channel_script(ctx: WebContext, tx: CTransaction) -> bool:
    """Does ``tx``'s input carry the witness script of a channel this gateway opened?

    For a funding the gateway never saw (paid after the page left, or closed
    before the gateway noticed it): the channel is known by its script, not by
    its outpoint. The node checks that the script is the one the spent output
    pays (P2WSH, BIP141), so such a tx spends nothing but a channel's funding.
    """
    witness = witness_stack(tx, 0)
    script = witness[-1] if witness else b""
    if script[:2] == b"\x63\x21":  # cltv: OP_IF <K2> ...
        server = script[2:35]
    elif script[:2] == b"\x52\x21" and script[35:36] == b"\x21":  # OP_2 <K1> <K2> ...
        server = script[36:69]
    else:
        return False
    for r in ctx.ledger.reports.channels_with_server_key(server):
        try:
            known = ChannelScript.make(r["kind"], bytes.fromhex(r["client_pubkey"]), server,
                                       r["expiry"])
        except Exception:  # a row that makes no script cannot match
            continue
        if known.witness_script == script:
            return True
    return False


async def refund_api(ctx: WebContext, request: web.Request) -> web.Response:
    """``POST /api/refund?tx=HEX[&channel=TXID:VOUT]``: relay a channel's refund to the node.

    Only a transaction whose one input is the funding output of a channel
    this gateway knows (protocol.md section 2: a refund has exactly that
    input) — by its outpoint, or by the channel's witness script when the
    gateway never saw the funding — never anything else: the gateway is no
    open relay. 400 for what is not such a transaction (or does not spend
    ``channel``), 404 for an output that funds no channel here, 409 with the
    node's reason when it refuses (``non-final`` before the expiry has passed).

    ``GET /api/refund?txid=TXID``: whether that refund's output 0 is on
    chain or in the mempool, what it pays and how deep — a stock node finds
    a transaction by an unspent output of it, without a transaction index.
    """
    if request.method in ("GET", "HEAD"):
        return await _refund_status(ctx, query_params(request).get("txid", ""))
    q = await form_params(request)
    raw = q.get("tx", "")
    if not re.fullmatch(r"(?:[0-9a-f]{2})+", raw) or len(raw) > 2 * MAX_REFUND_BYTES:
        raise HttpError(HTTPStatus.BAD_REQUEST, "tx must be a transaction in lowercase hex")
    try:
        parsed = parse_tx(bytes.fromhex(raw))
    except ValueError:
        raise HttpError(HTTPStatus.BAD_REQUEST, "tx is not a transaction") from None
    if len(parsed.vin) != 1:
        raise HttpError(HTTPStatus.BAD_REQUEST,
                        "a refund has one input: the channel's funding output")
    spent = f"{b2lx(parsed.vin[0].prevout.hash)}:{parsed.vin[0].prevout.n}"
    named = q.get("channel", spent)
    if named != spent:
        raise HttpError(HTTPStatus.BAD_REQUEST, f"tx does not spend the funding of {named}")
    if not ctx.ledger.known_outpoint(spent) and not _spends_a_channel_script(ctx, parsed):
        raise HttpError(HTTPStatus.NOT_FOUND, f"no channel {named} here")
    try:
        txid = str(await ctx.rpc.call("sendrawtransaction", raw))
    except RpcVerifyAlreadyInChain:
        txid = txid_of(bytes.fromhex(raw))
    except RpcError as exc:
        return json_response(HTTPStatus.CONFLICT,
                             {"error": f"the node refused it: {exc.message}",
                              "reason": exc.message})
    log.info("relayed refund %s of channel %s", txid, spent)
    return json_response(HTTPStatus.OK, {"txid": txid, "channel_id": spent})


# -- a channel's settlement, for its client ----------------------------------------------


async def channel_api(ctx: WebContext, request: web.Request) -> web.Response:
    """``GET /api/channel/<txid:vout>``: where a channel's money went (protocol.md section 8).

    For the client that funded it, to follow and check its settlement: the
    state, what was paid (the reserve included), ``settle_by`` while its batch
    is pending, then the settlement transaction, the value of each input in
    order (so the client can compute the fee and feerate it pays) and its
    confirmations. ``funding`` says whether the funding output is still
    unspent (the node's ``gettxout``, mempool included). Public: the channel
    id is an outpoint and all of this is on chain for anyone to read.
    """
    channel_id = request.match_info["channel_id"]
    row = ctx.ledger.reports.channel(channel_id)
    if row is None:
        raise HttpError(HTTPStatus.NOT_FOUND, f"no channel {channel_id}")
    value, balance = row["value"] or 0, row["balance"] if row["balance"] is not None else 0
    live = ctx.ledger.channels.get(channel_id)
    answer: dict[str, Any] = {
        "channel_id": channel_id,
        "state": live.core.state.value if live is not None else row["state"],
        "value": value,
        "paid": value - balance,
        "balance": balance,
        "exit_fee": row["exit_fee"] or 0,
        "settle_by": ctx.settler.settle_by(live) if live is not None else None,
        "settlement": None,
    }
    txid = live.core.settlement_txid if live is not None else row["settle_txid"]
    if txid:
        batch = ctx.ledger.reports.settlement(txid)
        values = ctx.ledger.reports.settled_values(txid)
        if batch is not None:
            tx = parse_tx(bytes.fromhex(batch["tx"]))
            inputs = [f"{b2lx(i.prevout.hash)}:{i.prevout.n}" for i in tx.vin]
            seen = ctx.follower.confirmed(txid)
            height = batch["confirmed_height"] or (seen.height if seen else None)
            answer["settlement"] = {
                "txid": txid,
                "tx": batch["tx"],
                "fee": batch["fee"],
                "vsize": batch["vsize"],
                "input_values": [values.get(i) for i in inputs],
                "state": batch["state"],
                "confirmations": None if height is None else ctx.follower.height - height + 1,
            }
    txid_, _, vout = channel_id.partition(":")
    funding = await ctx.rpc.call("gettxout", txid_, int(vout), True)
    answer["funding"] = {
        "unspent": funding is not None,
        "confirmations": funding["confirmations"] if funding is not None else None,
    }
    return json_response(HTTPStatus.OK, answer)


