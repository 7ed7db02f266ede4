"""After ``closed``: follow a channel's settlement and check it on chain.

Theory of operation (protocol.md sections 3 and 8)
--------------------------------------------------

``closed`` says what happens to a channel's value: its settlement's txid
(broadcast), ``settle_by`` (its batch goes out by then), or neither (nothing
will be broadcast; the client refunds after expiry). Section 8 promises the
client it can check on chain that what it added went to the fee and nowhere
else. :func:`follow` does that for one stored channel:

1. ask the gateway's ``GET /api/channel/<txid:vout>`` (the state, what was
   paid, ``settle_by``, and once broadcast the settlement transaction with
   the value of each input);
2. check the settlement as section 3 promises, with the pure core's
   :meth:`~gateway.protocol.channel.ClientChannel.check_settlement` on the
   channel rebuilt from the keystore: the transaction is the txid named, it
   spends our funding output, pays our change of exactly our last signed
   balance at our input's index, and with the inputs' values its feerate is
   at least the one our reserve was quoted at;
3. with a wallet RPC, ask our own node (``gettxout``, which a stock node
   answers while the output is unspent) that our change output exists with
   that value and script, and how deep.

Only a settlement that passed 2 and is confirmed in 3 makes the channel
``settled`` (final); a failed check leaves it as it was, so the refund after
expiry stays the way back if the settlement never confirms.

A settlement may pay our change *above* our last signed balance: the gateway
never got our last increment (lost in flight with a dropped connection) and
settled the one before. That is accepted and said: only a balance we signed
can be spent to on chain (our signature commits to the output at our index),
and it gives us more back.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Final
from urllib.parse import quote

from gateway.protocol.channel import LocalProtocolError
from gateway.protocol.errors import ProtocolError
from gateway.protocol.messages import Limits, ServerHello
from gateway.protocol.transactions import parse_tx, txid_of
from gateway.protocol.tx import vsize as tx_vsize
from player.catalog import web_url
from player.client import AGENT, PlayerError, format_feerate, restore_channel
from player.keystore import ChannelState, Keystore, StoredChannel
from player.wallet import Wallet

__all__ = [
    "CheckedSettlement",
    "Followed",
    "Outcome",
    "SettlementCheckFailed",
    "answer_confirmations",
    "channel_api",
    "check_served_settlement",
    "fetch_channel",
    "follow",
    "format_time",
    "unsettled_text",
]


class SettlementCheckFailed(PlayerError):
    """The settlement the gateway names does not do what protocol.md section 3 promises."""


class Outcome:
    """What :func:`follow` found: values of :attr:`Followed.outcome`."""

    PENDING: Final = "pending"  # waiting for its batch
    BROADCAST: Final = "broadcast"  # checked; not (yet) confirmed on our node
    SETTLED: Final = "settled"  # checked and confirmed on our node: final
    UNSETTLED: Final = "unsettled"  # nothing will be broadcast: refund after expiry
    OPEN: Final = "open"  # the gateway still takes payments on it
    REFUNDED: Final = "refunded"  # the gateway saw our refund spend it
    VOID: Final = "void"  # the funding was double-spent


@dataclass(frozen=True, slots=True)
class Followed:
    """One channel's settlement as :func:`follow` found it."""

    channel: StoredChannel
    outcome: str
    #: One line for the viewer.
    text: str
    #: The settlement's txid once broadcast.
    txid: str | None = None
    #: Confirmations on our own node (None without a wallet, or not seen there).
    confirmations: int | None = None


def format_time(unix: int) -> str:
    """``HH:MM:SS`` in local time (when a pending settlement goes out)."""
    return time.strftime("%H:%M:%S", time.localtime(unix))


def channel_api(gateway_url: str, channel_id: str) -> str:
    """The URL of ``GET /api/channel/<txid:vout>`` on the gateway of ``gateway_url``."""
    return f"{web_url(gateway_url)}/api/channel/{quote(channel_id, safe=':')}"


def fetch_channel(gateway_url: str, channel_id: str, *, timeout: float = 30.0) -> dict[str, Any]:
    """The gateway's answer about ``channel_id`` (blocking; :class:`PlayerError` if none)."""
    url = channel_api(gateway_url, channel_id)
    request = urllib.request.Request(url, headers={"User-Agent": AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            body = json.load(answer)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            raise PlayerError(f"the gateway does not know channel {channel_id}") from None
        raise PlayerError(f"cannot ask {url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PlayerError(f"cannot ask {url}: {reason}") from None
    except ValueError:
        raise PlayerError(f"the gateway's answer at {url} is not JSON") from None
    if not isinstance(body, dict) or body.get("channel_id") != channel_id:
        raise PlayerError(f"the gateway's answer at {url} is not about channel {channel_id}")
    return body


def _offline_hello(network: str) -> ServerHello:
    # restore_channel replays the channel's own steps, which read only the
    # network from `hello`: no session is involved in checking a settlement.
    limits = Limits(
        min_value=0, max_value=0, min_expiry_s=0, max_expiry_s=0, min_conf=0,
        settle_margin_s=0, resume_grace_s=0,
    )
    return ServerHello(version=2, agent=AGENT, network=network, nonce=bytes(32), limits=limits)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _balance(rec: StoredChannel) -> int:
    return rec.balance if rec.balance is not None else (rec.value or 0)


@dataclass(frozen=True, slots=True)
class CheckedSettlement:
    """A settlement that passed :func:`check_served_settlement`."""

    txid: str
    #: Our input's index, where our change output is.
    index: int
    #: Our change in it (sat): our last signed balance, or an earlier one (module docstring).
    balance: int
    #: What it pays, with the input values the gateway listed, and what we were quoted.
    feerate: Fraction
    quoted: Fraction
    #: Said after the amounts ("" or an earlier increment's "sat more back").
    note: str
    #: How many outputs the transaction has.
    outputs: int


def check_served_settlement(
    rec: StoredChannel, privkey: bytes, settlement: Any
) -> CheckedSettlement:
    """Check the channel API's ``settlement`` object for ``rec`` (module docstring, step 2).

    Raises :class:`SettlementCheckFailed` naming what is wrong.
    """
    where = f"channel {rec.id}"

    def fail(why: str) -> SettlementCheckFailed:
        txid = settlement.get("txid") if isinstance(settlement, dict) else None
        name = f"settlement {txid}" if isinstance(txid, str) else "the settlement"
        return SettlementCheckFailed(f"{where}: {name} FAILS the check: {why}")

    if not isinstance(settlement, dict):
        raise fail("the gateway's answer has no settlement object")
    txid, tx_hex = settlement.get("txid"), settlement.get("tx")
    values = settlement.get("input_values")
    if not isinstance(txid, str) or not isinstance(tx_hex, str):
        raise fail("the gateway's answer lacks the txid or the transaction")
    try:
        tx = bytes.fromhex(tx_hex)
        parsed = parse_tx(tx)
    except (ValueError, ProtocolError):
        raise fail("the transaction served does not parse") from None
    if txid_of(tx) != txid:
        raise fail(f"the transaction served is {txid_of(tx)}, not {txid}")
    if not isinstance(values, list) or not all(_int(v) for v in values):
        raise fail("the gateway does not list the value of every input")
    try:
        channel = restore_channel(rec, privkey, _offline_hello(rec.network))
    except (PlayerError, ProtocolError, LocalProtocolError, ValueError) as exc:
        raise PlayerError(f"{where}: the stored channel is inconsistent: {exc}") from None
    assert channel.outpoint is not None and channel.value is not None
    ours = channel.outpoint.to_coutpoint()
    index = next((i for i, txin in enumerate(parsed.vin) if txin.prevout == ours), None)
    note = ""
    own = _balance(rec)
    if index is not None and index < len(parsed.vout) and own:
        out = parsed.vout[index]
        if bytes(out.scriptPubKey) == rec.change_script and own < out.nValue <= channel.value:
            # Our last increment never reached the gateway: it settled an
            # earlier one of ours (module docstring).
            channel.balance = out.nValue
            note = f"; it settles an earlier increment: {out.nValue - own} sat more back"
    try:
        channel.check_settlement(tx, values)
    except ValueError as exc:
        raise fail(str(exc)) from None
    assert index is not None  # check_settlement found our input
    fee = sum(values) - sum(out.nValue for out in parsed.vout)
    vsize = tx_vsize(parsed)  # BIP141
    return CheckedSettlement(
        txid=txid,
        index=index,
        balance=channel.balance if channel.balance is not None else channel.value,
        feerate=Fraction(fee, vsize),
        quoted=channel.quoted,
        note=note,
        outputs=len(parsed.vout),
    )


async def _on_chain(wallet: Wallet, rec: StoredChannel, checked: CheckedSettlement) -> int | None:
    """Our change output's confirmations on our node (any output's at balance 0); None: unseen.

    :class:`SettlementCheckFailed` if our node shows another value or script there.
    """
    if checked.balance:
        found = await wallet.txout(checked.txid, checked.index)
        if found is None:
            return None
        value, script, confirmations = found
        if value != checked.balance or script != rec.change_script:
            whose = "our change script" if script == rec.change_script else "another script"
            raise SettlementCheckFailed(
                f"channel {rec.id}: settlement {checked.txid} FAILS the check: your node "
                f"shows {value} sat to {whose} at our index, not our change of "
                f"{checked.balance} sat"
            )
        return confirmations
    # Paid down to 0: no output of ours; any unspent output shows the transaction's depth.
    for n in range(checked.outputs):
        found = await wallet.txout(checked.txid, n)
        if found is not None:
            return found[2]
    return None


async def follow(
    store: Keystore,
    rec: StoredChannel,
    *,
    wallet: Wallet | None,
    gateway_url: str | None = None,
    timeout: float = 30.0,
) -> Followed:
    """Ask the gateway about ``rec``'s settlement, check it, and store what is true.

    ``gateway_url``: ask this gateway instead of the one stored with the
    channel. Raises :class:`SettlementCheckFailed` (nothing stored) when the
    settlement named does not pass the check, :class:`PlayerError` when the
    gateway cannot be asked.
    """
    channel_id = rec.channel_id
    if channel_id is None:
        raise PlayerError(f"channel {rec.id} was never funded")
    answer = await asyncio.to_thread(
        fetch_channel, gateway_url or rec.gateway_url, channel_id, timeout=timeout
    )
    balance = _balance(rec)
    settlement = answer.get("settlement")
    if settlement is None:
        return _unbroadcast(store, rec, answer, balance)
    checked = check_served_settlement(rec, store.privkey, settlement)
    confirmations: int | None = None
    if wallet is not None:
        confirmations = await _on_chain(wallet, rec, checked)
    final = confirmations is not None and confirmations >= 1
    state = ChannelState.SETTLED if final else ChannelState.SETTLING
    if rec.state == ChannelState.SETTLED:
        state = ChannelState.SETTLED  # once final on our node, it stays so
    rec = store.update(rec.id, state=state, closing_txid=checked.txid, settle_by=None)
    what = (
        f"your change of {checked.balance} sat"
        if checked.balance
        else "no change (everything was paid)"
    )
    paid = (rec.value or 0) - checked.balance
    money = (
        f"{what}, paid {paid} sat (exit fee {rec.exit_fee} sat); it pays "
        f"{format_feerate(checked.feerate)} sat/vB, quoted {format_feerate(checked.quoted)}"
        f"{checked.note}"
    )
    if final:
        plural = "s" if confirmations != 1 else ""
        text = (
            f"settled by {checked.txid}, checked and confirmed on your node "
            f"({confirmations} confirmation{plural}): {money}"
        )
        outcome = Outcome.SETTLED
    else:
        if wallet is None:
            seen = answer_confirmations(settlement)
            where = (
                f"{seen} confirmation{'s' if seen != 1 else ''} by the gateway's word"
                if seen
                else "not confirmed yet by the gateway's word"
            )
            where += "; --wallet-rpc confirms it on your node"
        elif confirmations == 0:
            where = "in your node's mempool, not confirmed yet"
        else:
            where = "not on your node yet (or our change is already spent)"
        text = f"settled by {checked.txid}, checked: {money}; {where}"
        outcome = Outcome.BROADCAST
    return Followed(rec, outcome, text, checked.txid, confirmations)


def answer_confirmations(settlement: dict[str, Any]) -> int:
    """The confirmations the gateway reports for a settlement (0 if none or not a number)."""
    seen = settlement.get("confirmations")
    return seen if isinstance(seen, int) and not isinstance(seen, bool) and seen > 0 else 0


def _unbroadcast(
    store: Keystore, rec: StoredChannel, answer: dict[str, Any], balance: int
) -> Followed:
    """No settlement broadcast: pending, nothing to broadcast, or not closed at all."""
    state = answer.get("state")
    given = answer.get("settle_by")
    settle_by = given if isinstance(given, int) and not isinstance(given, bool) else None
    if state == "closing":
        when = (
            f" by {format_time(settle_by)}" if settle_by else " with the gateway's next batch"
        )
        rec = store.update(rec.id, state=ChannelState.PENDING, settle_by=settle_by)
        return Followed(
            rec,
            Outcome.PENDING,
            f"settlement pending: your change of {balance} sat goes out{when} "
            f"(exit fee {rec.exit_fee} sat)",
        )
    if state == "closed":
        rec = store.update(rec.id, state=ChannelState.UNSETTLED, settle_by=None)
        return Followed(rec, Outcome.UNSETTLED, unsettled_text(rec))
    if state == "refunded":
        return Followed(rec, Outcome.REFUNDED, "the gateway saw the funding spent by a refund")
    if state == "void":
        return Followed(rec, Outcome.VOID, "void: the funding transaction was double-spent")
    return Followed(
        rec, Outcome.OPEN, f"open at the gateway ({state}): `player play` resumes it"
    )


def unsettled_text(rec: StoredChannel) -> str:
    """What to say of a channel the gateway broadcasts nothing for (section 8)."""
    how = f"refund after expiry with `player refund {rec.id}`"
    if rec.paid == 0:
        return f"nothing was paid: {how}"
    return (
        f"the gateway broadcasts no settlement: your {rec.value or 0} sat come back by "
        f"{how}"
    )

