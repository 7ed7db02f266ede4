"""Settlements: many channels in one transaction, each paying its own exit.

Theory of operation (protocol.md sections 3 and 8)
--------------------------------------------------

Every increment is signed ``SIGHASH_SINGLE|ANYONECANPAY`` (or
``SIGHASH_NONE|ANYONECANPAY`` at balance 0): it binds only the channel's own
input and, at the same index, the client's change output. So one transaction
can settle many channels:

* inputs: each channel's funding output; those with change first, in the
  order of their outpoints, so that input *i* faces its change at output *i*;
  then the channels paid down to 0 (no output of their own);
* outputs: each client's change (exactly its last signed ``balance``), then
  one output per publisher and one for the operator, aggregated over every
  channel of the batch;
* one fee.

**Who pays what.** A channel's *exit* is the bytes it adds to a settlement:
its input, its change output and, so that a channel settled alone can pay
for itself, the transaction's fixed overhead (:func:`exit_vbytes`). The
client pays its exit at the feerate quoted in ``terms``, in advance, as the
channel's *reserve* (``terms.exit_fee``, the first thing it pays; section 7):
so the gateway can settle a channel promptly whatever the client paid for
media, even after a disconnect. Everything else the channel paid is the
server's share: publishers by what their items billed, the operator the
rounding. The server's outputs pay for their own bytes.

**The feerate a client can check.** A batch pays at least the highest feerate
quoted to any of its channels and at least the settlement feerate of the
moment: so every client finds on chain that the transaction's feerate is at
least the one it was quoted, and that its reserve — its own bytes at that
feerate — went to miners, not to anyone's output (:func:`check_settlement`).
A batch that cannot afford that for one channel leaves it out
(:attr:`BatchResult.left_out`): alone, a channel's reserve always pays its
own transaction.

Pure: amounts are integers, feerates ``Fraction`` sat/vB; the server signs
each input ``SIGHASH_ALL`` once the transaction is whole.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

from bitcoin.core import CTransaction, CTxIn, CTxInWitness, CTxOut, CTxWitness
from bitcoin.core.script import SIGHASH_ALL, CScript, CScriptWitness
from bitcoin.core.serialize import VarIntSerializer

from gateway.protocol.scripts import ChannelKind, ChannelScript
from gateway.protocol.signatures import sign_digest
from gateway.protocol.transactions import (
    DUST_LIMIT,
    FINAL_SEQUENCE,
    TX_VERSION,
    Outpoint,
    PaymentTemplate,
    parse_tx,
    sighash_all,
)
from gateway.protocol.tx import txid as tx_id
from gateway.protocol.tx import vsize as tx_vsize

__all__ = [
    "MAX_BATCH_CHANNELS",
    "TYPICAL_PAYOUT_SCRIPT",
    "Batch",
    "BatchResult",
    "ChannelClaim",
    "build_batch",
    "check_settlement",
    "exit_fee",
    "exit_vbytes",
    "feerate",
    "lone_payout_share",
    "split_payout",
]

#: The output of a settlement that pays neither client nor server: an empty
#: OP_RETURN carrying 4 bytes, so the transaction keeps the 65-byte minimum
#: non-witness size of relay policy and is never output-less (consensus).
NULL_OUTPUT_SCRIPT = b"\x6a\x04" + b"\x00" * 4
#: Largest signature: 72-byte DER plus the sighash byte.
_MAX_SIG = 73
#: Weight of a transaction's fixed parts: version and locktime (4 + 4 bytes),
#: one-byte input and output counts, at 4 weight units a byte; the segwit
#: marker and flag at 1 each (BIP141).
_FIXED_WEIGHT = 4 * (4 + 4 + 1 + 1) + 2
#: Weight of an input's non-witness part: outpoint (36), empty scriptSig
#: length (1), nSequence (4).
_INPUT_WEIGHT = 4 * (36 + 1 + 4)


def feerate(value: float | int | Decimal | Fraction | str) -> Fraction:
    """A feerate (sat/vB) as an exact fraction; ``1.1`` means 11/10, not its double."""
    rate = Fraction(str(value)) if isinstance(value, float | str) else Fraction(value)
    if rate < 0:
        raise ValueError("feerate must not be negative")
    return rate


def _var_len(n: int) -> int:
    return len(VarIntSerializer.serialize(n))


def _output_weight(script_pubkey: bytes) -> int:
    return 4 * (8 + _var_len(len(script_pubkey)) + len(script_pubkey))


def _witness_weight(script: ChannelScript) -> int:
    # protocol.md section 2: cltv `<sig_K1> <sig_K2> 01 <script>`; multisig
    # `<> <sig_K1> <sig_K2> <script>`; each item with its length prefix.
    ws = len(script.witness_script)
    items = 2 * (1 + _MAX_SIG) + _var_len(ws) + ws
    items += 2 if script.kind == ChannelKind.CLTV else 1
    return 1 + items


def exit_vbytes(script: ChannelScript, change_script: bytes) -> int:
    """The vbytes a channel's exit costs at most (protocol.md section 3).

    Its input with the largest signatures, its change output, and the fixed
    overhead of a transaction: what a settlement of this channel alone, with
    no server output, weighs. In a batch the overhead is shared, so the
    channel's reserve more than pays for its own bytes.
    """
    weight = (
        _FIXED_WEIGHT + _INPUT_WEIGHT + _witness_weight(script) + _output_weight(change_script)
    )
    return -(-weight // 4)


#: Channels per settlement: a standard transaction weighs at most 400,000 WU
#: (100,000 vB) and a channel's exit at most ~150 vB, with room to spare.
MAX_BATCH_CHANNELS = 500
#: A typical payout script: P2WSH or P2TR (34 bytes), the largest standard one.
TYPICAL_PAYOUT_SCRIPT = b"\x00\x20" + bytes(32)


def lone_payout_share(rate: Fraction, payout_script: bytes = TYPICAL_PAYOUT_SCRIPT) -> int:
    """The least a channel settled alone must pay beyond its reserve for a payout output.

    A publisher's output needs at least the dust limit, and pays for its own
    bytes at ``rate``; one sat more covers the rounding of the fee. Below
    this a lone channel's media payment all goes to the fee: its publisher
    earns only from a batch shared with other channels (protocol.md section 3).
    """
    return DUST_LIMIT + math.ceil(rate * _output_weight(payout_script) / 4) + 1


def exit_fee(vbytes: int, rate: Fraction) -> int:
    """The reserve (sat) that pays ``vbytes`` at ``rate`` sat/vB, rounded up."""
    return math.ceil(rate * vbytes)


@dataclass(frozen=True)
class ChannelClaim:
    """One channel's part in a settlement, as its core hands it over.

    ``balance`` and ``client_sig`` are the last increment; ``reserve`` the
    exit fee the client paid in advance at ``quoted`` sat/vB (0: none, a
    channel of protocol version 1); ``payouts`` the (script, weight) of the
    publishers whose items the channel billed.
    """

    template: PaymentTemplate
    balance: int
    client_sig: bytes
    server_privkey: bytes
    reserve: int = 0
    quoted: Fraction = Fraction(0)
    payouts: tuple[tuple[bytes, int], ...] = ()

    @property
    def outpoint(self) -> Outpoint:
        """The channel's funding outpoint (its id)."""
        return self.template.outpoint

    @property
    def share(self) -> int:
        """What the channel paid: value - balance."""
        return self.template.value - self.balance

    def __post_init__(self) -> None:
        self.template.outputs(self.balance)  # range check
        if not self.client_sig or self.client_sig[-1] != self.template.sighash_type(
            self.balance
        ):
            raise ValueError("client signature does not carry the sighash type for this balance")
        if any(isinstance(w, bool) or not isinstance(w, int) or w <= 0 for _, w in self.payouts):
            raise ValueError("payout weights must be positive integers")
        if not 0 <= self.reserve <= self.share:
            raise ValueError("the reserve must be paid out of the channel's share")


@dataclass(frozen=True)
class Batch:
    """A fully signed settlement of one or more channels, ready to broadcast.

    ``outputs`` are ``(script_pubkey, amount)`` in transaction order;
    ``channels`` the outpoints in input order; ``overhead`` the part of the
    fee the server side paid (the rest is the channels' reserves);
    ``media`` each channel's share beyond its reserve, in input order.
    """

    tx: bytes
    txid: str
    fee: int
    vsize: int
    outputs: tuple[tuple[bytes, int], ...]
    channels: tuple[Outpoint, ...]
    reserves: int
    server_outputs: tuple[tuple[bytes, int], ...]

    @property
    def feerate(self) -> Fraction:
        """The fee per vbyte this transaction pays."""
        return Fraction(self.fee, self.vsize)


@dataclass(frozen=True)
class BatchResult:
    """:func:`build_batch`'s answer: the batch (None if nothing can settle) and
    the claims left for another batch (their quoted feerate is not affordable here)."""

    batch: Batch | None
    left_out: tuple[ChannelClaim, ...]


def split_payout(
    total: int, payouts: Sequence[tuple[bytes, int]], operator_script: bytes
) -> list[tuple[bytes, int]]:
    """Split ``total`` by weight; floor each, the remainder and dust to the operator.

    Outputs keep the order of ``payouts`` (one per distinct script); the
    operator's output comes last. A dust operator share (a rounding
    remainder) goes to the largest payout instead: no output may be dust,
    and the sum must hold.
    """
    weight_sum = sum(weight for _, weight in payouts)
    amounts: dict[bytes, int] = {}
    for spk, weight in payouts:
        amounts[spk] = amounts.get(spk, 0) + total * weight // weight_sum
    amounts[operator_script] = amounts.get(operator_script, 0) + total - sum(amounts.values())
    for spk in list(amounts):
        if spk != operator_script and amounts[spk] < DUST_LIMIT:
            amounts[operator_script] += amounts.pop(spk)
    operator = amounts.pop(operator_script)
    if operator >= DUST_LIMIT:
        amounts[operator_script] = operator
    elif operator and amounts:
        largest = max(amounts, key=lambda spk: amounts[spk])
        amounts[largest] += operator
    return list(amounts.items())


def _cooperative_witness(
    script: ChannelScript, client_sig: bytes, server_sig: bytes
) -> list[bytes]:
    # protocol.md section 2: cltv `<sig_K1> <sig_K2> 01 <script>` (OP_IF takes
    # the true branch); multisig `<> <sig_K1> <sig_K2> <script>` (the empty
    # element is CHECKMULTISIG's dummy, BIP147 NULLDUMMY).
    if script.kind == ChannelKind.CLTV:
        return [client_sig, server_sig, b"\x01", script.witness_script]
    return [b"", client_sig, server_sig, script.witness_script]


def _server_weights(claims: Sequence[ChannelClaim]) -> list[tuple[bytes, int]]:
    """Each payout script's weight over the batch: its part of each channel's media share."""
    gross: dict[bytes, int] = {}
    for claim in claims:
        media = claim.share - claim.reserve
        weight_sum = sum(w for _, w in claim.payouts)
        if media <= 0 or not weight_sum:
            continue
        for spk, weight in claim.payouts:
            # Weights are scaled by the channel's media share, so a publisher
            # of a well-paid channel outweighs one of a barely-paid channel.
            gross[spk] = gross.get(spk, 0) + media * weight * 1_000_000 // weight_sum
    return sorted(gross.items())


def _ordered(claims: Sequence[ChannelClaim]) -> list[ChannelClaim]:
    # Inputs with change first so that input i faces its change at output i
    # (SIGHASH_SINGLE, BIP143); then the channels paid down to 0.
    def key(claim: ChannelClaim) -> tuple[bool, bytes]:
        return (claim.balance == 0, claim.outpoint.serialize())

    return sorted(claims, key=key)


def _unsigned(claims: Sequence[ChannelClaim], outputs: Sequence[tuple[bytes, int]]) -> CTransaction:
    return CTransaction(
        [CTxIn(c.outpoint.to_coutpoint(), nSequence=FINAL_SEQUENCE) for c in claims],
        [CTxOut(amount, CScript(spk)) for spk, amount in outputs],
        nLockTime=0,
        nVersion=TX_VERSION,
    )


def _max_vsize(claims: Sequence[ChannelClaim], outputs: Sequence[tuple[bytes, int]]) -> int:
    weight = 4 * len(_unsigned(claims, outputs).serialize()) + 2
    weight += sum(_witness_weight(c.template.script) for c in claims)
    return -(-weight // 4)


def _sign(claims: Sequence[ChannelClaim], outputs: Sequence[tuple[bytes, int]]) -> CTransaction:
    unsigned = _unsigned(claims, outputs)
    witnesses = []
    for index, claim in enumerate(claims):
        script = claim.template.script
        digest = sighash_all(unsigned, index, script, claim.template.value)
        server_sig = sign_digest(claim.server_privkey, digest) + bytes([SIGHASH_ALL])
        witness = _cooperative_witness(script, claim.client_sig, server_sig)
        witnesses.append(CTxInWitness(CScriptWitness(witness)))
    return CTransaction(
        unsigned.vin, unsigned.vout, unsigned.nLockTime, unsigned.nVersion, CTxWitness(witnesses)
    )


def build_batch(
    claims: Sequence[ChannelClaim],
    operator_script: bytes,
    rate: Fraction,
    *,
    min_relay: Fraction = Fraction(1),
) -> BatchResult:
    """Settle ``claims`` in one transaction at ``rate`` sat/vB or more (module docstring).

    The feerate is the highest of ``rate`` and every claim's quoted feerate.
    The fee is at least the claims' reserves; the server side (publishers by
    weight, the operator the rest, dust folded into the operator) gets what
    the channels paid beyond the fee. When the server side cannot pay for the
    batch's feerate, it has no output and everything is fee; a claim whose
    quoted feerate even that cannot reach is left out, the highest first.
    A claim that cannot pay even the relay minimum alone is left out too.
    """
    pending = _ordered(claims)
    left: list[ChannelClaim] = []
    while pending:
        outcome = _try_batch(pending, operator_script, rate, min_relay)
        if isinstance(outcome, Batch):
            return BatchResult(outcome, tuple(left))
        pending.remove(outcome)
        left.append(outcome)
    return BatchResult(None, tuple(left))


def _try_batch(
    claims: list[ChannelClaim], operator_script: bytes, rate: Fraction, min_relay: Fraction
) -> Batch | ChannelClaim:
    """The batch of ``claims``, or the claim that keeps it from its feerate."""
    target = max([rate, min_relay, *(c.quoted for c in claims if c.reserve)])
    changes = [(c.template.change_script, c.balance) for c in claims if c.balance]
    shares = sum(c.share for c in claims)
    reserves = sum(c.reserve for c in claims)
    weights = _server_weights(claims)
    # The fee depends on the outputs, which depend on the fee (dust folding):
    # raise it until it covers the transaction it leaves. It only grows.
    fee = reserves
    while shares - fee >= DUST_LIMIT:
        server = split_payout(shares - fee, weights, operator_script) if weights else []
        if not weights:
            server = [(operator_script, shares - fee)]
        needed = max(reserves, math.ceil(target * _max_vsize(claims, changes + server)))
        if needed <= fee:
            return _finish(claims, changes + server, fee, reserves, tuple(server))
        fee = needed
    # No server output: everything the channels paid is fee.
    outputs = changes or [(NULL_OUTPUT_SCRIPT, 0)]
    vsize = _max_vsize(claims, outputs)
    if shares >= math.ceil(target * vsize):
        return _finish(claims, outputs, shares, reserves, ())
    # Short of the target: the claim with the highest quote (or the least
    # paid, when none has a reserve) goes to a batch of its own.
    return max(claims, key=lambda c: (c.quoted if c.reserve else Fraction(0), -c.share))


def _finish(
    claims: list[ChannelClaim],
    outputs: list[tuple[bytes, int]],
    fee: int,
    reserves: int,
    server: tuple[tuple[bytes, int], ...],
) -> Batch:
    tx = _sign(claims, outputs)
    return Batch(
        tx=bytes(tx.serialize()),
        txid=tx_id(tx)[::-1].hex(),
        fee=fee,
        vsize=tx_vsize(tx),
        outputs=tuple((bytes(out.scriptPubKey), out.nValue) for out in tx.vout),
        channels=tuple(c.outpoint for c in claims),
        reserves=reserves,
        server_outputs=server,
    )


def check_settlement(
    tx: bytes,
    *,
    outpoint: Outpoint,
    value: int,
    change_script: bytes,
    balance: int,
    quoted: Fraction,
    spent_values: Sequence[int] | None = None,
) -> None:
    """Client side: check a settlement of our channel (protocol.md section 8).

    It spends our funding ``outpoint``; our change ``balance`` (if any) sits
    at our input's index; and, given every input's value (``spent_values``,
    in input order: the funding outputs of a batch, which the gateway's
    channel API lists), its feerate is at least the one we were ``quoted``,
    so our reserve paid miners and no one's output. ``ValueError`` names
    what is wrong.
    """
    parsed = parse_tx(tx)
    index = next(
        (i for i, txin in enumerate(parsed.vin) if txin.prevout == outpoint.to_coutpoint()),
        None,
    )
    if index is None:
        raise ValueError("the settlement does not spend our funding output")
    if balance:
        if index >= len(parsed.vout):
            raise ValueError("the settlement has no output at our input's index")
        out = parsed.vout[index]
        if bytes(out.scriptPubKey) != change_script or out.nValue != balance:
            raise ValueError("our change output is not our last signed balance")
    if spent_values is None:
        return
    if len(spent_values) != len(parsed.vin) or spent_values[index] != value:
        raise ValueError("the input values do not match the settlement")
    fee = sum(spent_values) - sum(out.nValue for out in parsed.vout)
    size = tx_vsize(parsed)
    if Fraction(fee, size) < quoted:
        raise ValueError(
            f"the settlement pays {fee} sat for {size} vB, below the quoted "
            f"{float(quoted):g} sat/vB: our reserve did not all go to the fee"
        )
