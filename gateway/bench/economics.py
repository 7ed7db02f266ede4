"""``gateway bench --economics``: what settling a channel costs, single or batched.

Every figure comes from real transactions: channels with their own keys,
each client's increment signed, batches built by the settlement code the
gateway runs (``gateway/protocol/settlement.py``), every input checked by
libbitcoinkernel. Nothing needs a node.

Two tables (docs/economics.md):

* **Per settled channel**, for batches of 1, 10, 100 and 1,000 channels: the
  vbytes and the fee each channel's settlement takes, at 1, 5 and 20 sat/vB,
  next to protocol version 1's one transaction per channel (the channel's
  input, its change, a publisher output). A standard transaction weighs at
  most 100,000 vB, so 1,000 channels go out as two batches of 500.
* **Break-even price per minute of media**: the least a minute of paid media
  must cost for one viewer's minute to pay its publisher anything: version
  1 (the share pays the whole settlement and a 546-sat output); version 2
  with the channel settled alone (the viewer pays its exit; the share pays
  the publisher's 546-sat output and its bytes); version 2 in a batch of 100
  channels of one publisher (the output and its bytes shared).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import coincurve

from gateway.chain.kernel import prepare_transaction, verify_input
from gateway.protocol.scripts import ChannelKind, ChannelScript
from gateway.protocol.settlement import (
    MAX_BATCH_CHANNELS,
    TYPICAL_PAYOUT_SCRIPT,
    Batch,
    ChannelClaim,
    build_batch,
    exit_fee,
    exit_vbytes,
    lone_payout_share,
)
from gateway.protocol.transactions import DUST_LIMIT, Outpoint, PaymentTemplate, sign_payment

#: The rates of the tables (sat/vB).
RATES = (Fraction(1), Fraction(5), Fraction(20))
#: The batch sizes of the tables.
SIZES = (1, 10, 100, 1_000)
_SERVER = coincurve.PrivateKey(hashlib.sha256(b"economics server").digest())
_OPERATOR = b"\x00\x14" + bytes(20)
_VALUE = 100_000
#: What each channel paid for media in the tables: a few minutes at a few sat/s.
_MEDIA = 1_000
#: Version 1's channel paid enough for its settlement and a publisher output.
_V1_MEDIA = 20_000


@dataclass(frozen=True)
class Row:
    """One line of the per-channel table."""

    rate: float
    channels: int
    transactions: int
    vbytes_per_channel: float
    fee_per_channel: float
    exit_fee: int
    v1_vbytes: int
    v1_fee: int


def _claims(
    count: int, rate: Fraction, *, reserve: bool = True, media: int = _MEDIA
) -> list[ChannelClaim]:
    claims = []
    for n in range(count):
        client = coincurve.PrivateKey(hashlib.sha256(b"economics client %d" % n).digest())
        script = ChannelScript.make(ChannelKind.CLTV, client.public_key.format(),
                                    _SERVER.public_key.format(), 900_000)
        change = b"\x00\x14" + hashlib.sha256(b"change %d" % n).digest()[:20]
        outpoint = Outpoint(hashlib.sha256(b"funding %d" % n).hexdigest(), n % 3)
        template = PaymentTemplate(script, outpoint, _VALUE, change)
        fee = exit_fee(exit_vbytes(script, change), rate) if reserve else 0
        balance = _VALUE - fee - media
        claims.append(
            ChannelClaim(
                template=template,
                balance=balance,
                client_sig=sign_payment(template, client.secret, balance),
                server_privkey=_SERVER.secret,
                reserve=fee,
                quoted=Fraction(fee, exit_vbytes(script, change)) if reserve else Fraction(0),
                payouts=((TYPICAL_PAYOUT_SCRIPT, 1),),
            )
        )
    return claims


def _settle(claims: Sequence[ChannelClaim], rate: Fraction) -> list[Batch]:
    """Every claim settled, in standard-sized batches; each input checked by the kernel."""
    batches = []
    for start in range(0, len(claims), MAX_BATCH_CHANNELS):
        pending = list(claims[start : start + MAX_BATCH_CHANNELS])
        while pending:
            result = build_batch(pending, _OPERATOR, rate)
            assert result.batch is not None, "every claim here pays its exit"
            _verify(result.batch, pending)
            batches.append(result.batch)
            pending = list(result.left_out)
    return batches


def _verify(batch: Batch, claims: Sequence[ChannelClaim]) -> None:
    by_outpoint = {c.outpoint: c for c in claims}
    spent = [(by_outpoint[o].template.script.script_pubkey, _VALUE) for o in batch.channels]
    ktx, data, _ = prepare_transaction(batch.tx, spent)
    for index in range(len(spent)):
        verify_input(ktx, index, spent, txdata=data)


def per_channel() -> list[Row]:
    """The per-channel table: batch sizes by rates, next to one transaction per channel."""
    rows = []
    for rate in RATES:
        # Version 1: one transaction per channel, no reserve, the share pays it all.
        (v1,) = _settle(_claims(1, rate, reserve=False, media=_V1_MEDIA), rate)
        for size in SIZES:
            claims = _claims(size, rate)
            batches = _settle(claims, rate)
            rows.append(
                Row(
                    rate=float(rate),
                    channels=size,
                    transactions=len(batches),
                    vbytes_per_channel=round(sum(b.vsize for b in batches) / size, 1),
                    fee_per_channel=round(sum(b.fee for b in batches) / size, 1),
                    exit_fee=claims[0].reserve,
                    v1_vbytes=v1.vsize,
                    v1_fee=v1.fee,
                )
            )
    return rows


def break_even() -> list[dict[str, Any]]:
    """Least price (sat per minute of paid media) for one viewer's minute to pay its publisher."""
    rows = []
    for rate in RATES:
        (v1,) = _settle(_claims(1, rate, reserve=False, media=_V1_MEDIA), rate)
        # v1: the settlement's own fee plus a 546-sat output, all from the share.
        v1_minute = v1.vsize * rate + DUST_LIMIT
        # v2, a batch of 100 channels of one publisher: its output (546 sat
        # once, its bytes once) shared by the hundred channels.
        output_vb = Fraction(4 * (8 + 1 + len(TYPICAL_PAYOUT_SCRIPT)), 4)
        batched = (DUST_LIMIT + output_vb * rate) / 100
        rows.append(
            {
                "rate": float(rate),
                "v1_one_tx_per_channel": math.ceil(v1_minute),
                "v2_alone": lone_payout_share(rate),
                "v2_batch_of_100": math.ceil(batched),
            }
        )
    return rows


def markdown(rows: Sequence[Row], even: Sequence[dict[str, Any]]) -> str:
    """Both tables as Markdown (what docs/economics.md shows)."""
    lines = [
        "| sat/vB | channels | txs | vB per channel | fee per channel (sat) | "
        "exit fee (reserve) | v1: vB | v1: fee |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.rate:g} | {r.channels:,} | {r.transactions} | {r.vbytes_per_channel} | "
            f"{r.fee_per_channel} | {r.exit_fee} | {r.v1_vbytes} | {r.v1_fee} |"
        )
    lines += [
        "",
        "| sat/vB | v1, one tx per channel | v2, settled alone | v2, batch of 100 |",
        "|---|---|---|---|",
    ]
    for e in even:
        lines.append(
            f"| {e['rate']:g} | {e['v1_one_tx_per_channel']} | {e['v2_alone']} | "
            f"{e['v2_batch_of_100']} |"
        )
    return "\n".join(lines)
