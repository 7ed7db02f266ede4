"""The two channel state machines: :class:`ServerChannel` and :class:`ClientChannel`.

Theory of operation
-------------------

A payment channel (protocol.md sections 2-5, 8) moves through one lifecycle,
seen from each end::

    OPEN ──refund──► REFUND_SIGNED ──fund──┐        (multisig)
    OPEN ──────────────────────────fund────┤        (cltv)
                                           ▼
                                       FUNDING ──confirm──► READY ◄─┐ pay, resume
                                                              │ └───┘
                                settle (no more payments: a settlement is due)
                                                              ▼
                                                           CLOSING ──closed──► CLOSED
    OPEN/REFUND_SIGNED/FUNDING/READY/CLOSING ──abandon (nothing to broadcast)──► CLOSED
    FUNDING/READY/CLOSING/CLOSED ──refunded (the client's refund spent it)──► REFUNDED
    READY ──unconfirm (a reorg took the funding's confirmations)──► FUNDING
    FUNDING/READY ──void (the funding transaction was double-spent)──► VOID

The server's machine (:class:`ServerChannel`) is driven by client messages
and by what the I/O layer learned from the chain; the client's
(:class:`ClientChannel`) adds two states before ``OPEN``: ``NEW`` and
``PROPOSED`` (``open`` sent, no ``terms`` yet), and goes back from
``READY`` to ``FUNDING`` on ``resume`` until ``ready`` comes again. Every
legal move is a row of one table per machine (``_SERVER_TRANSITIONS``,
``_CLIENT_TRANSITIONS``); anything else is ``bad_state`` (a
:class:`LocalProtocolError` for our own side's requests), with a message
naming role, kind, state and event (h11's ``_state.py``).

Nothing here does I/O: ``now`` (unix seconds) and ``tip_height`` are passed
in; methods return what to send (a message), to store (a
:class:`PaymentRecord` or :meth:`ServerChannel.snapshot`) or to broadcast
(a :class:`~gateway.protocol.transactions.Settlement`). Every method
validates fully first and only then changes state, so bad input from the peer
(a :class:`ProtocolError`) leaves the channel exactly as it was (section 9).

A ``pay`` is checked in section 9 order: state (``bad_state``), the settle
margin (``channel_expiring``, section 8: a channel that may no longer be paid
is refused before any signature work), ``seq``, ``balance`` (increased, then
range), signature encoding and sighash type, signature.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Final, TypeVar

import coincurve

from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.protocol.messages import (
    Chunk,
    Close,
    Closed,
    Due,
    Fund,
    Interval,
    Limits,
    Open,
    Paid,
    Pay,
    Ready,
    Refund,
    RefundSigned,
    Resume,
    ServerHello,
    Stream,
    Terms,
)
from gateway.protocol.metering import ClientMeter
from gateway.protocol.scripts import (
    ChannelKind,
    ChannelScript,
    is_height_expiry,
    is_standard_output_script,
)
from gateway.protocol.settlement import ChannelClaim, check_settlement, exit_vbytes
from gateway.protocol.signatures import (
    Verifier,
    is_low_s_der,
    is_valid_pubkey,
    sign_digest,
)
from gateway.protocol.transactions import (
    DUST_LIMIT,
    Outpoint,
    PaymentTemplate,
    build_refund,
    check_payment_signature,
    check_refund_t2,
    check_refund_t2_signature,
    finalize_cltv_refund,
    finalize_multisig_refund,
    find_funding_output,
    sign_payment,
    sign_refund_t2,
    txid_of,
)

__all__ = [
    "DEFAULT_MAX_FEERATE",
    "RESUME_TAG",
    "ChannelRecord",
    "ClientChannel",
    "ClientState",
    "Event",
    "FundingClaim",
    "LocalProtocolError",
    "PaymentRecord",
    "ServerChannel",
    "ServerState",
    "is_expiring",
    "resume_digest",
]

#: Tag of the resume proof digest (protocol.md section 5).
RESUME_TAG: Final = b"paystream/1 resume"
#: Seconds per block when converting a height expiry (section 6).
_BLOCK_S: Final = 600
#: `change_script` size limit (section 9, `bad_script`).
_MAX_CHANGE_SCRIPT: Final = 10_000
#: The highest exit feerate (sat/vB) a client accepts unless told otherwise.
DEFAULT_MAX_FEERATE: Final = Fraction(20)


class ServerState(enum.Enum):
    """Lifecycle of a channel at the gateway."""

    OPEN = "open"  # terms sent; waiting for `refund` (multisig) or `fund`
    REFUND_SIGNED = "refund_signed"  # multisig: T2 signed; waiting for `fund`
    FUNDING = "funding"  # funding output known; waiting for confirmations
    READY = "ready"  # takes payments
    CLOSING = "closing"  # settlement built; broadcast until confirmed
    CLOSED = "closed"  # settled, or left to the client's refund
    REFUNDED = "refunded"  # the funding output was spent by the refund
    VOID = "void"  # the funding never made it into the best chain: double-spent


class ClientState(enum.Enum):
    """Lifecycle of a channel at the player."""

    NEW = "new"  # nothing sent yet
    PROPOSED = "proposed"  # `open` sent; waiting for `terms`
    OPEN = "open"  # terms checked; fund it (multisig: get T2 signed first)
    REFUND_SIGNED = "refund_signed"  # multisig: T2 signed by the server
    FUNDING = "funding"  # `fund` sent; waiting for `ready`
    READY = "ready"  # paying for chunks
    CLOSING = "closing"  # `close` sent
    CLOSED = "closed"  # `closed` received
    REFUNDED = "refunded"  # the client's refund spent the funding output


class Event(enum.Enum):
    """What happens to a channel: the columns of the transition tables."""

    OPEN = "open"
    TERMS = "terms"
    REFUND = "refund"
    REFUND_SIGNED = "refund_signed"
    FUND = "fund"
    CONFIRM = "confirm"
    PAY = "pay"
    RESUME = "resume"
    SETTLE = "settle"
    ABANDON = "abandon"
    CLOSE = "close"
    CLOSED = "closed"
    REFUNDED = "refunded"
    UNCONFIRM = "unconfirm"
    VOID = "void"


_S = ServerState
_C = ClientState
#: Server states in which a channel takes nothing more (``channel_closed``).
_ENDED: Final = frozenset({_S.CLOSING, _S.CLOSED, _S.REFUNDED, _S.VOID})
_E = Event
_MULTISIG_ONLY: Final = frozenset({ChannelKind.MULTISIG})
_CLTV_ONLY: Final = frozenset({ChannelKind.CLTV})
_ANY: Final = frozenset(ChannelKind)

#: (state, event) -> (next state, channel kinds the row applies to).
_SERVER_TRANSITIONS: Final[
    Mapping[tuple[ServerState, Event], tuple[ServerState, frozenset[ChannelKind]]]
] = {
    (_S.OPEN, _E.REFUND): (_S.REFUND_SIGNED, _MULTISIG_ONLY),
    (_S.REFUND_SIGNED, _E.REFUND): (_S.REFUND_SIGNED, _MULTISIG_ONLY),  # replaces the last
    (_S.OPEN, _E.FUND): (_S.FUNDING, _CLTV_ONLY),
    (_S.REFUND_SIGNED, _E.FUND): (_S.FUNDING, _MULTISIG_ONLY),
    (_S.FUNDING, _E.CONFIRM): (_S.READY, _ANY),
    (_S.FUNDING, _E.RESUME): (_S.FUNDING, _ANY),
    (_S.READY, _E.RESUME): (_S.READY, _ANY),
    (_S.READY, _E.PAY): (_S.READY, _ANY),
    (_S.READY, _E.SETTLE): (_S.CLOSING, _ANY),
    (_S.FUNDING, _E.SETTLE): (_S.CLOSING, _ANY),  # paid, then a reorg: settle what was paid
    (_S.CLOSING, _E.SETTLE): (_S.CLOSING, _ANY),  # idempotent: a close asked twice
    (_S.CLOSING, _E.CLOSED): (_S.CLOSED, _ANY),
    (_S.CLOSING, _E.ABANDON): (_S.CLOSED, _ANY),  # nothing to broadcast after all
    (_S.OPEN, _E.ABANDON): (_S.CLOSED, _ANY),
    (_S.REFUND_SIGNED, _E.ABANDON): (_S.CLOSED, _ANY),
    (_S.FUNDING, _E.ABANDON): (_S.CLOSED, _ANY),
    (_S.READY, _E.ABANDON): (_S.CLOSED, _ANY),
    (_S.FUNDING, _E.REFUNDED): (_S.REFUNDED, _ANY),
    (_S.READY, _E.REFUNDED): (_S.REFUNDED, _ANY),
    (_S.CLOSING, _E.REFUNDED): (_S.REFUNDED, _ANY),
    (_S.CLOSED, _E.REFUNDED): (_S.REFUNDED, _ANY),
    (_S.READY, _E.UNCONFIRM): (_S.FUNDING, _ANY),  # a reorg: wait for confirmations again
    (_S.FUNDING, _E.VOID): (_S.VOID, _ANY),
    (_S.READY, _E.VOID): (_S.VOID, _ANY),
}

_CLIENT_TRANSITIONS: Final[
    Mapping[tuple[ClientState, Event], tuple[ClientState, frozenset[ChannelKind]]]
] = {
    (_C.NEW, _E.OPEN): (_C.PROPOSED, _ANY),
    (_C.PROPOSED, _E.TERMS): (_C.OPEN, _ANY),
    (_C.OPEN, _E.REFUND): (_C.OPEN, _MULTISIG_ONLY),
    (_C.REFUND_SIGNED, _E.REFUND): (_C.OPEN, _MULTISIG_ONLY),  # a new T2 replaces the last
    (_C.OPEN, _E.REFUND_SIGNED): (_C.REFUND_SIGNED, _MULTISIG_ONLY),
    (_C.OPEN, _E.FUND): (_C.FUNDING, _CLTV_ONLY),
    (_C.REFUND_SIGNED, _E.FUND): (_C.FUNDING, _MULTISIG_ONLY),
    (_C.FUNDING, _E.CONFIRM): (_C.READY, _ANY),
    (_C.READY, _E.RESUME): (_C.FUNDING, _ANY),  # `ready` comes again
    (_C.READY, _E.PAY): (_C.READY, _ANY),
    (_C.READY, _E.CLOSE): (_C.CLOSING, _ANY),
    (_C.FUNDING, _E.CLOSE): (_C.CLOSING, _ANY),
    (_C.CLOSING, _E.CLOSED): (_C.CLOSED, _ANY),
    (_C.READY, _E.CLOSED): (_C.CLOSED, _ANY),  # expiry: the gateway closes first
    (_C.FUNDING, _E.REFUNDED): (_C.REFUNDED, _ANY),
    (_C.READY, _E.REFUNDED): (_C.REFUNDED, _ANY),
    (_C.CLOSING, _E.REFUNDED): (_C.REFUNDED, _ANY),
    (_C.CLOSED, _E.REFUNDED): (_C.REFUNDED, _ANY),
    (_C.READY, _E.UNCONFIRM): (_C.FUNDING, _ANY),  # `funding_lost`: `ready` comes again
}


class LocalProtocolError(Exception):
    """Our own side asked for something the protocol forbids.

    Raised by :class:`ClientChannel` for local requests (pay beyond the
    budget, a balance that would rise, an action out of order). Unlike
    :class:`ProtocolError` it is never sent to the peer: it is a bug or a
    refusal in this process (h11's ``LocalProtocolError``).
    """


_St = TypeVar("_St", ServerState, ClientState)


def _next_state(
    table: Mapping[tuple[_St, Event], tuple[_St, frozenset[ChannelKind]]],
    role: str,
    kind: ChannelKind,
    state: _St,
    event: Event,
    *,
    local: bool = False,
) -> _St:
    row = table.get((state, event))
    if row is None or kind not in row[1]:
        message = f"{role} {kind} channel in state {state.value!r} cannot handle {event.value!r}"
        if local:
            raise LocalProtocolError(message)
        raise ProtocolError(ErrorCode.BAD_STATE, message)
    return row[0]


def resume_digest(channel_id: str, nonce: bytes) -> bytes:
    """``sha256("paystream/1 resume" ‖ channel_id ‖ nonce)`` (section 5)."""
    return hashlib.sha256(RESUME_TAG + channel_id.encode("ascii") + nonce).digest()


def is_expiring(expiry: int, settle_margin_s: int, now: int, tip_height: int) -> bool:
    """True once payments must stop (protocol.md section 8).

    Time expiry: ``now ≥ expiry - settle_margin_s``. Height expiry: the next
    block's height ``tip_height + 1 ≥ expiry - ceil(settle_margin_s / 600)``.
    """
    if is_height_expiry(expiry):
        margin_blocks = -(-settle_margin_s // _BLOCK_S)
        return tip_height + 1 >= expiry - margin_blocks
    return now >= expiry - settle_margin_s


def _seconds_until(expiry: int, now: int, tip_height: int) -> int:
    # Section 6: a height expiry converts at 600 s per block from the tip.
    if is_height_expiry(expiry):
        return (expiry - tip_height) * _BLOCK_S
    return expiry - now


def _pubkey_of(privkey: bytes) -> bytes:
    return bytes(coincurve.PrivateKey(privkey).public_key.format(compressed=True))


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    """An accepted increment: store it durably before releasing what it pays for.

    ``paid`` = value - balance (section 7). ``sig`` is the client's T3
    signature for ``balance`` (DER + sighash byte).
    """

    channel_id: str
    seq: int
    balance: int
    sig: bytes
    paid: int


@dataclass(frozen=True, slots=True)
class FundingClaim:
    """What a ``fund`` message says about the funding output.

    ``outpoint`` None: watch ``funding_address``. ``value`` None: ask the
    node. ``tx``: the signed T1 to broadcast (its funding output is known).
    """

    outpoint: Outpoint | None
    value: int | None
    tx: bytes | None


@dataclass(frozen=True, slots=True)
class ChannelRecord:
    """Everything that defines a :class:`ServerChannel`: store it, restore it.

    :meth:`ServerChannel.snapshot` writes one, :meth:`ServerChannel.restore`
    reads one back (restart recovery, section 8). Tests compare snapshots to
    show that bad input changed nothing.
    """

    state: ServerState
    kind: ChannelKind
    client_pubkey: bytes
    expiry: int
    change_script: bytes
    network: str
    outpoint: Outpoint | None = None
    value: int | None = None
    refund_outpoint: Outpoint | None = None
    refund_value: int | None = None
    seq: int | None = None
    balance: int | None = None
    sig: bytes | None = None
    settlement_txid: str | None = None
    #: The reserve quoted in ``terms`` (0: a channel of protocol version 1).
    exit_fee: int = 0


class ServerChannel:
    """The gateway's side of one channel (holds K2's private key).

    Create with :meth:`open` (answering an ``open``), or :meth:`restore`.
    """

    __slots__ = (
        "_privkey",
        "_template",
        "_verifier",
        "balance",
        "change_script",
        "exit_fee",
        "exit_vbytes",
        "limits",
        "network",
        "outpoint",
        "refund_outpoint",
        "refund_value",
        "script",
        "seq",
        "settlement_txid",
        "sig",
        "state",
        "value",
    )

    role: Final = "server"

    def __init__(
        self,
        script: ChannelScript,
        change_script: bytes,
        network: str,
        server_privkey: bytes,
        limits: Limits,
        exit_fee: int = 0,
    ) -> None:
        # Use open() or restore(): they validate; this only assembles.
        self.script = script
        self.change_script = change_script
        self.network = network
        self.limits = limits
        #: The client's exit (section 3): vbytes, and the reserve that pays them.
        self.exit_vbytes = exit_vbytes(script, change_script)
        self.exit_fee = exit_fee
        self._privkey = server_privkey
        self._verifier = Verifier(script.client_pubkey)
        self._template: PaymentTemplate | None = None
        self.state = ServerState.OPEN
        self.outpoint: Outpoint | None = None
        self.value: int | None = None
        self.refund_outpoint: Outpoint | None = None
        self.refund_value: int | None = None
        self.seq: int | None = None
        self.balance: int | None = None
        self.sig: bytes | None = None
        self.settlement_txid: str | None = None

    # -- creation -------------------------------------------------------------

    @classmethod
    def open(
        cls,
        msg: Open,
        *,
        server_privkey: bytes,
        limits: Limits,
        network: str,
        now: int,
        tip_height: int,
        feerate: Fraction = Fraction(1),
    ) -> ServerChannel:
        """Validate an ``open`` (section 5) and make the channel; then send :meth:`terms`.

        ``bad_key`` (K1), ``bad_expiry`` (outside ``min_expiry_s`` …
        ``max_expiry_s`` from now, converting heights at 600 s per block, or
        already inside the settle margin), ``bad_script`` (``change_script``).
        ``feerate`` (sat/vB) prices the client's exit: the reserve of
        ``terms.exit_fee`` (section 3).
        """
        if not is_valid_pubkey(msg.client_pubkey):
            raise ProtocolError(ErrorCode.BAD_KEY, "client_pubkey is not a compressed SEC point")
        expiry = msg.expiry
        if not 0 < expiry <= 0xFFFFFFFF:
            raise ProtocolError(ErrorCode.BAD_EXPIRY, "expiry does not fit nLockTime")
        seconds = _seconds_until(expiry, now, tip_height)
        if not limits.min_expiry_s <= seconds <= limits.max_expiry_s:
            raise ProtocolError(
                ErrorCode.BAD_EXPIRY,
                f"expiry is {seconds} s away; accepted: {limits.min_expiry_s}"
                f"..{limits.max_expiry_s} s",
            )
        if is_expiring(expiry, limits.settle_margin_s, now, tip_height):
            raise ProtocolError(ErrorCode.BAD_EXPIRY, "expiry is inside the settle margin")
        change = msg.change_script
        if not change or len(change) > _MAX_CHANGE_SCRIPT:
            raise ProtocolError(ErrorCode.BAD_SCRIPT, "change_script must be 1..10000 bytes")
        if not is_standard_output_script(change):
            raise ProtocolError(ErrorCode.BAD_SCRIPT, "change_script is not a standard output")
        script = ChannelScript.make(msg.kind, msg.client_pubkey, _pubkey_of(server_privkey), expiry)
        channel = cls(script, change, network, server_privkey, limits)
        channel.exit_fee = math.ceil(feerate * channel.exit_vbytes)
        return channel

    @classmethod
    def restore(
        cls, record: ChannelRecord, *, server_privkey: bytes, limits: Limits
    ) -> ServerChannel:
        """Rebuild a channel from :meth:`snapshot` (restart recovery, section 8)."""
        script = ChannelScript.make(
            record.kind, record.client_pubkey, _pubkey_of(server_privkey), record.expiry
        )
        channel = cls(
            script, record.change_script, record.network, server_privkey, limits, record.exit_fee
        )
        channel.state = record.state
        channel.outpoint = record.outpoint
        channel.value = record.value
        channel.refund_outpoint = record.refund_outpoint
        channel.refund_value = record.refund_value
        channel.seq = record.seq
        channel.balance = record.balance
        channel.sig = record.sig
        channel.settlement_txid = record.settlement_txid
        if record.outpoint is not None and record.value is not None:
            channel._template = PaymentTemplate(
                script, record.outpoint, record.value, record.change_script
            )
        return channel

    def snapshot(self) -> ChannelRecord:
        """The channel's whole state, for the store (and for tests)."""
        return ChannelRecord(
            state=self.state,
            kind=self.script.kind,
            client_pubkey=self.script.client_pubkey,
            expiry=self.script.expiry,
            change_script=self.change_script,
            network=self.network,
            outpoint=self.outpoint,
            value=self.value,
            refund_outpoint=self.refund_outpoint,
            refund_value=self.refund_value,
            seq=self.seq,
            balance=self.balance,
            sig=self.sig,
            settlement_txid=self.settlement_txid,
            exit_fee=self.exit_fee,
        )

    # -- read-only views --------------------------------------------------------

    @property
    def kind(self) -> ChannelKind:
        """``cltv`` or ``multisig``."""
        return self.script.kind

    @property
    def expiry(self) -> int:
        """The channel's expiry (height or unix time, section 2)."""
        return self.script.expiry

    @property
    def channel_id(self) -> str | None:
        """``txid:vout`` once funded."""
        return None if self.outpoint is None else self.outpoint.channel_id

    @property
    def paid(self) -> int:
        """Sat paid so far: value - balance (0 before funding)."""
        if self.value is None or self.balance is None:
            return 0
        return self.value - self.balance

    def is_expiring(self, now: int, tip_height: int) -> bool:
        """True once payments must stop and the channel settle (section 8)."""
        return is_expiring(self.expiry, self.limits.settle_margin_s, now, tip_height)

    def _next(self, event: Event) -> ServerState:
        return _next_state(_SERVER_TRANSITIONS, self.role, self.kind, self.state, event)

    # -- messages ------------------------------------------------------------

    def terms(self) -> Terms:
        """The ``terms`` answering ``open`` (section 6)."""
        return Terms(
            kind=self.kind,
            server_pubkey=self.script.server_pubkey,
            witness_script=self.script.witness_script,
            funding_address=self.script.address(self.network),
            funding_script=self.script.script_pubkey,
            expiry=self.expiry,
            exit_fee=self.exit_fee,
            exit_vbytes=self.exit_vbytes,
        )

    def _check_value(self, value: int, what: str) -> None:
        if not self.limits.min_value <= value <= self.limits.max_value:
            raise ProtocolError(
                ErrorCode.VALUE_OUT_OF_RANGE,
                f"{what} {value} outside {self.limits.min_value}..{self.limits.max_value}",
            )

    def sign_refund(self, msg: Refund) -> RefundSigned:
        """Sign the multisig refund T2 (section 5 ``refund``); replaces an earlier one.

        ``bad_state`` (cltv, or after ``fund``), ``value_out_of_range``,
        ``bad_refund`` (T2 not as section 2 says).
        """
        new_state = self._next(Event.REFUND)
        self._check_value(msg.value, "refund.value")
        outpoint = check_refund_t2(msg.tx, self.script, msg.value)
        sig = sign_refund_t2(msg.tx, self.script, msg.value, self._privkey)
        self.refund_outpoint, self.refund_value = outpoint, msg.value
        self.state = new_state
        return RefundSigned(sig=sig)

    def resolve_fund(self, msg: Fund) -> FundingClaim:
        """What a ``fund`` message claims (section 5); changes nothing.

        ``bad_state`` (multisig before ``refund``, or not awaiting funding),
        ``bad_message`` (``tx`` is not a transaction), ``funding_mismatch``
        (``tx`` whose txid is not ``txid``, or whose output does not pay
        ``funding_script``). Checked before anything is broadcast: a ``tx``
        that does not fund this channel is never relayed. The I/O layer then
        looks up what the claim leaves open (the node for a bare outpoint,
        the address watch for nothing) and calls :meth:`accept_funding`.
        """
        self._next(Event.FUND)
        if msg.tx is None:
            if msg.txid is not None and msg.vout is not None:
                return FundingClaim(Outpoint(msg.txid, msg.vout), None, None)
            # Watch funding_address; multisig: it can only be T2's outpoint.
            return FundingClaim(self.refund_outpoint, None, None)
        txid = txid_of(msg.tx)
        if msg.txid is not None and msg.txid != txid:
            raise ProtocolError(ErrorCode.FUNDING_MISMATCH, "tx does not have that txid")
        spk = self.script.script_pubkey
        vout, value = find_funding_output(msg.tx, spk)
        if msg.vout is not None and msg.vout != vout:
            raise ProtocolError(
                ErrorCode.FUNDING_MISMATCH, f"output {msg.vout} of tx is not the funding output"
            )
        return FundingClaim(Outpoint(txid, vout), value, msg.tx)

    def accept_funding(self, outpoint: Outpoint, value: int, script_pubkey: bytes) -> None:
        """The funding output exists (from ``fund``, the node, or a watched address).

        ``bad_state`` (multisig before ``refund``), ``funding_mismatch`` (it
        does not pay ``funding_script``; multisig: not T2's outpoint or
        value), ``value_out_of_range``. Then wait for confirmations and call
        :meth:`confirm`.
        """
        new_state = self._next(Event.FUND)
        if script_pubkey != self.script.script_pubkey:
            raise ProtocolError(ErrorCode.FUNDING_MISMATCH, "output does not pay funding_script")
        if self.kind == ChannelKind.MULTISIG and (outpoint, value) != (
            self.refund_outpoint,
            self.refund_value,
        ):
            raise ProtocolError(
                ErrorCode.FUNDING_MISMATCH, "funding output is not the one the refund spends"
            )
        self._check_value(value, "funding value")
        self._template = PaymentTemplate(self.script, outpoint, value, self.change_script)
        self.outpoint, self.value = outpoint, value
        self.balance = value
        self.state = new_state

    def confirm(self) -> Ready:
        """Enough confirmations (``min_conf``): the channel takes payments."""
        self.state = self._next(Event.CONFIRM)
        return self.ready()

    def unconfirm(self) -> None:
        """A reorg took the funding below ``min_conf``: no payments until :meth:`confirm`."""
        self.state = self._next(Event.UNCONFIRM)

    def void(self) -> None:
        """The funding transaction was double-spent: nothing to settle, ever (section 8)."""
        self.state = self._next(Event.VOID)

    def ready(self) -> Ready:
        """The ``ready`` message for the channel as it is (also after ``resume``)."""
        if self.outpoint is None or self.value is None or self.balance is None:
            raise ProtocolError(ErrorCode.BAD_STATE, "channel is not funded")
        return Ready(
            channel_id=self.outpoint.channel_id,
            value=self.value,
            balance=self.balance,
            paid=self.paid,
            expiry=self.expiry,
            exit_fee=self.exit_fee,
        )

    def receive_payment(self, pay: Pay, *, now: int, tip_height: int) -> PaymentRecord:
        """Check a ``pay`` in section 9 order; return the increment to record.

        Changes nothing: the caller stores the record durably, then
        :meth:`commit_payment` s it, and only then sends ``paid`` or any chunk
        it pays for (section 7). So the channel never runs ahead of the store.
        Any :class:`ProtocolError` is the peer's: nothing changed.
        """
        self._next(Event.PAY)  # bad_state
        template = self._template
        assert template is not None and self.balance is not None  # READY implies funded
        if self.is_expiring(now, tip_height):
            raise ProtocolError(
                ErrorCode.CHANNEL_EXPIRING, "the channel is inside its settle margin"
            )
        if self.seq is not None and pay.seq <= self.seq:
            raise ProtocolError(
                ErrorCode.SEQ_NOT_INCREASING, f"seq {pay.seq} is not above {self.seq}"
            )
        balance = pay.balance
        if balance > self.balance:
            raise ProtocolError(
                ErrorCode.BALANCE_INCREASED, f"balance {balance} is above {self.balance}"
            )
        if 0 < balance < DUST_LIMIT:
            raise ProtocolError(
                ErrorCode.VALUE_OUT_OF_RANGE, f"balance {balance} is dust (1..{DUST_LIMIT - 1})"
            )
        check_payment_signature(template, balance, pay.sig, self._verifier)
        assert self.outpoint is not None
        return PaymentRecord(
            channel_id=self.outpoint.channel_id,
            seq=pay.seq,
            balance=balance,
            sig=pay.sig,
            paid=template.value - balance,
        )

    def commit_payment(self, record: PaymentRecord) -> None:
        """The increment :meth:`receive_payment` accepted is durable: it is the channel's now."""
        if self.state is not ServerState.READY or self.balance is None:
            raise LocalProtocolError("only a ready channel takes a payment")
        if (self.seq is not None and record.seq <= self.seq) or record.balance > self.balance:
            raise LocalProtocolError("not the increment after the channel's last one")
        self.seq, self.balance, self.sig = record.seq, record.balance, record.sig

    def paid_message(self) -> Paid:
        """The ``paid`` answer once the last increment is stored."""
        if self.seq is None or self.balance is None:
            raise ProtocolError(ErrorCode.BAD_STATE, "no payment recorded")
        return Paid(seq=self.seq, balance=self.balance, paid=self.paid)

    def check_resume(self, msg: Resume, *, nonce: bytes, now: int, tip_height: int) -> Ready:
        """Check a ``resume`` of this channel (section 5); answer ``ready``.

        The I/O layer has already found the channel (``channel_unknown``).
        Then, in order: the proof (``bad_signature``: strict DER low-S by K1
        over :func:`resume_digest`, no sighash byte), ``channel_closed``,
        ``channel_expiring``. Changes nothing; taking the channel over from
        another session is the I/O layer's job.
        """
        if self.outpoint is None or msg.channel_id != self.outpoint.channel_id:
            raise ProtocolError(ErrorCode.CHANNEL_UNKNOWN, "no such channel")
        digest = resume_digest(msg.channel_id, nonce)
        if not is_low_s_der(msg.proof) or not self._verifier.verify(digest, msg.proof):
            raise ProtocolError(
                ErrorCode.BAD_SIGNATURE, "resume proof is not a low-S DER signature by K1"
            )
        if self.state in _ENDED:
            raise ProtocolError(ErrorCode.CHANNEL_CLOSED, "the channel is closed", fatal=True)
        if self.is_expiring(now, tip_height):
            raise ProtocolError(
                ErrorCode.CHANNEL_EXPIRING, "the channel is inside its settle margin", fatal=True
            )
        self._next(Event.RESUME)
        return self.ready()

    # -- closing ----------------------------------------------------------------

    def close(self) -> None:
        """No more payments: a settlement is due (sections 3, 8). Idempotent.

        Then :meth:`claim` what settles it, and :meth:`settled_in` the batch
        that does, or :meth:`abandon` when there is nothing to broadcast.
        """
        self.state = self._next(Event.SETTLE)

    @property
    def quoted(self) -> Fraction:
        """The feerate (sat/vB) the reserve was quoted at: ``exit_fee / exit_vbytes``."""
        return Fraction(self.exit_fee, self.exit_vbytes)

    def claim(self, payouts: Sequence[tuple[bytes, int]] = ()) -> ChannelClaim | None:
        """A closing channel's part in a settlement; None if it has nothing to settle.

        Nothing paid means nothing to settle (section 8): the client keeps its
        refund. The reserve counts only once the client paid it whole.
        ``payouts`` are the publishers' (script, weight), by what they billed.
        """
        if self.state is not ServerState.CLOSING:
            raise ProtocolError(ErrorCode.BAD_STATE, "only a closing channel is settled")
        template, balance, sig = self._template, self.balance, self.sig
        if template is None or balance is None or sig is None or self.paid <= 0:
            return None
        reserved = self.exit_fee if self.paid >= self.exit_fee else 0
        return ChannelClaim(
            template=template,
            balance=balance,
            client_sig=sig,
            server_privkey=self._privkey,
            reserve=reserved,
            quoted=self.quoted if reserved else Fraction(0),
            payouts=tuple(payouts),
        )

    def settled_in(self, txid: str) -> None:
        """The settlement ``txid`` (a batch) carries this closing channel."""
        if self.state is not ServerState.CLOSING:
            raise ProtocolError(ErrorCode.BAD_STATE, "only a closing channel is settled")
        self.settlement_txid = txid

    def unsettle(self) -> None:
        """The batch carrying this closing channel will never confirm: settle it again."""
        if self.state is not ServerState.CLOSING:
            raise ProtocolError(ErrorCode.BAD_STATE, "only a closing channel is settled")
        self.settlement_txid = None

    def abandon(self) -> None:
        """Nothing to broadcast: ``closed``, the client keeps its refund (section 8)."""
        self.state = self._next(Event.ABANDON)

    def mark_closed(self, txid: str | None = None) -> None:
        """The settlement ``txid`` confirmed (default: the one :meth:`settle` built)."""
        new_state = self._next(Event.CLOSED)
        if txid is not None:
            self.settlement_txid = txid
        self.state = new_state

    def mark_refunded(self) -> None:
        """The funding output was spent by the client's refund (section 8)."""
        self.state = self._next(Event.REFUNDED)

    def closed_message(self, settle_by: int | None = None) -> Closed:
        """The ``closed`` message: ``txid`` null until broadcast (section 6).

        ``settle_by``: when the batch carrying a pending settlement goes out
        (None when nothing will be broadcast).
        """
        return Closed(
            txid=self.settlement_txid,
            paid=self.paid,
            balance=self.balance or 0,
            exit_fee=self.exit_fee,
            settle_by=None if self.settlement_txid else settle_by,
        )


class ClientChannel:
    """The player's side of one channel (holds K1's private key).

    ``budget`` is the most the viewer will ever pay on this channel (sat):
    the channel refuses to sign beyond it, beyond what a ``due`` asks, or
    beyond its own section 7 figure (:class:`~gateway.protocol.metering.ClientMeter`).
    """

    role: Final = "client"

    def __init__(
        self,
        client_privkey: bytes,
        hello: ServerHello,
        *,
        budget: int,
        max_feerate: Fraction = DEFAULT_MAX_FEERATE,
    ) -> None:
        self._privkey = client_privkey
        self.client_pubkey = _pubkey_of(client_privkey)
        self.hello = hello
        self.budget = budget
        #: The highest feerate (sat/vB) this client's exit may be quoted at.
        self.max_feerate = max_feerate
        #: The reserve accepted with ``terms`` (sat): the client's own exit fee.
        self.exit_fee = 0
        self.exit_vbytes = 0
        self.meter = ClientMeter()
        self.state = ClientState.NEW
        self.kind = ChannelKind.CLTV
        self.expiry = 0
        self.change_script = b""
        self.script: ChannelScript | None = None
        self.outpoint: Outpoint | None = None
        self.value: int | None = None
        self.refund_tx: bytes | None = None  # multisig: the T2 to get signed
        self.signed_refund: bytes | None = None  # a refund ready to broadcast at expiry
        self.seq = 0
        self.balance: int | None = None
        self._template: PaymentTemplate | None = None
        self._last_pay: Pay | None = None

    def _next(self, event: Event, *, local: bool) -> ClientState:
        return _next_state(
            _CLIENT_TRANSITIONS, self.role, self.kind, self.state, event, local=local
        )

    @property
    def paid(self) -> int:
        """Sat paid so far (value - balance)."""
        if self.value is None or self.balance is None:
            return 0
        return self.value - self.balance

    # -- opening ----------------------------------------------------------------

    def open(
        self, *, expiry: int, change_script: bytes, kind: ChannelKind = ChannelKind.CLTV
    ) -> Open:
        """The ``open`` proposing this channel (section 5)."""
        try:
            kind = ChannelKind(kind)
        except ValueError:
            raise LocalProtocolError(f"unknown channel kind {kind!r}") from None
        self.state = _next_state(
            _CLIENT_TRANSITIONS, self.role, kind, self.state, Event.OPEN, local=True
        )
        self.kind, self.expiry, self.change_script = kind, expiry, change_script
        return Open(
            client_pubkey=self.client_pubkey, expiry=expiry, change_script=change_script, kind=kind
        )

    def accept_terms(self, terms: Terms) -> None:
        """Check ``terms`` against what was proposed and recompute every script.

        Never trusts the server's script or address: a mismatch is a fatal
        :class:`ProtocolError` and nothing is funded.
        """
        new_state = self._next(Event.TERMS, local=False)

        def bad(code: ErrorCode, what: str) -> ProtocolError:
            return ProtocolError(code, f"terms: {what}", fatal=True)

        if terms.kind != self.kind:
            raise bad(ErrorCode.BAD_STATE, "kind differs from the one proposed")
        if terms.expiry != self.expiry:
            raise bad(ErrorCode.BAD_EXPIRY, "expiry differs from the one proposed")
        if not is_valid_pubkey(terms.server_pubkey):
            raise bad(ErrorCode.BAD_KEY, "server_pubkey is not a compressed SEC point")
        script = ChannelScript.make(self.kind, self.client_pubkey, terms.server_pubkey, self.expiry)
        if terms.witness_script != script.witness_script:
            raise bad(ErrorCode.BAD_SCRIPT, "witness_script is not the section 2 script")
        if terms.funding_script != script.script_pubkey:
            raise bad(ErrorCode.BAD_SCRIPT, "funding_script is not P2WSH of the script")
        if terms.funding_address != script.address(self.hello.network):
            raise bad(ErrorCode.BAD_SCRIPT, "funding_address does not pay the script")
        vbytes = exit_vbytes(script, self.change_script)
        if terms.exit_vbytes != vbytes:
            raise bad(ErrorCode.BAD_STATE, f"exit_vbytes is not this channel's {vbytes}")
        if Fraction(terms.exit_fee, vbytes) > self.max_feerate:
            raise bad(
                ErrorCode.BAD_STATE,
                f"exit_fee {terms.exit_fee} sat is above {float(self.max_feerate):g} sat/vB "
                f"for {vbytes} vB",
            )
        self.script = script
        self.exit_fee, self.exit_vbytes = terms.exit_fee, vbytes
        self.meter.reserve = terms.exit_fee
        self.state = new_state

    def _script(self) -> ChannelScript:
        if self.script is None:
            raise LocalProtocolError("no terms accepted yet")
        return self.script

    def refund_request(
        self, outpoint: Outpoint, value: int, *, dest_script: bytes, fee: int
    ) -> Refund:
        """Multisig: the ``refund`` asking the server to sign T2 for ``outpoint``.

        Sent before T1 is broadcast; a later call replaces the earlier T2.
        """
        script = self._script()
        new_state = self._next(Event.REFUND, local=True)
        tx = build_refund(script, outpoint, value, dest_script, fee)
        self.refund_tx, self.outpoint, self.value = tx, outpoint, value
        self.signed_refund = None
        self.state = new_state
        return Refund(tx=tx, value=value)

    def accept_refund_signed(self, msg: RefundSigned) -> bytes:
        """Check the server's T2 signature; return the fully signed T2.

        Only now may T1 be broadcast (section 2).
        """
        new_state = self._next(Event.REFUND_SIGNED, local=False)
        script = self._script()
        if self.refund_tx is None or self.value is None:
            raise ProtocolError(ErrorCode.BAD_STATE, "refund_signed without a refund", fatal=True)
        try:
            check_refund_t2_signature(self.refund_tx, script, self.value, msg.sig)
        except ProtocolError as exc:
            raise ProtocolError(exc.code, exc.message, fatal=True) from None
        signed = finalize_multisig_refund(
            self.refund_tx, script, self.value, self._privkey, msg.sig
        )
        self.signed_refund = signed
        self.state = new_state
        return signed

    def fund(self, outpoint: Outpoint, value: int, *, tx: bytes | None = None) -> Fund:
        """The ``fund`` message for the funding output (section 5).

        Multisig: the outpoint and value must be those of the signed T2.
        """
        script = self._script()
        new_state = self._next(Event.FUND, local=True)
        if self.kind == ChannelKind.MULTISIG and (outpoint, value) != (self.outpoint, self.value):
            raise LocalProtocolError("funding output is not the one T2 refunds")
        self.outpoint, self.value = outpoint, value
        self._template = PaymentTemplate(script, outpoint, value, self.change_script)
        self.state = new_state
        return Fund(txid=outpoint.txid, vout=outpoint.vout, tx=tx)

    def cltv_refund(self, *, dest_script: bytes, fee: int) -> bytes:
        """cltv: the signed refund, valid once the expiry has passed (section 2)."""
        script = self._script()
        if self.kind != ChannelKind.CLTV or self.outpoint is None or self.value is None:
            raise LocalProtocolError("cltv refund needs a funded cltv channel")
        tx = build_refund(script, self.outpoint, self.value, dest_script, fee)
        self.signed_refund = finalize_cltv_refund(tx, script, self.value, self._privkey)
        return self.signed_refund

    def on_ready(self, ready: Ready) -> None:
        """``ready``: the gateway's view must match ours (id, value, expiry, balance)."""
        new_state = self._next(Event.CONFIRM, local=False)
        if self.outpoint is None or ready.channel_id != self.outpoint.channel_id:
            raise ProtocolError(ErrorCode.BAD_STATE, "ready: not our channel", fatal=True)
        # After a resume the gateway may not have our last increment (lost in
        # flight): its balance may be higher than ours, never lower. We keep
        # ours, so we never sign the same chunk twice.
        own_balance = self.value if self.balance is None else self.balance
        assert own_balance is not None
        if (
            (ready.value, ready.expiry, ready.exit_fee) != (self.value, self.expiry, self.exit_fee)
            or ready.balance < own_balance
        ):
            raise ProtocolError(
                ErrorCode.BAD_STATE, "ready: value, expiry, exit_fee or balance differ",
                fatal=True,
            )
        if ready.balance > own_balance:
            # It never got our last increment, so it never sent the chunk
            # that increment paid for: unbill it (section 7). Asked again, we
            # send that same increment again (pay_due).
            self.meter.unpay()
        self.balance = own_balance
        self.state = new_state

    def on_funding_lost(self) -> None:
        """``error funding_lost``: a reorg took the funding back; wait for ``ready`` again."""
        self.state = self._next(Event.UNCONFIRM, local=False)

    # -- resuming ------------------------------------------------------------

    def resume(self, hello: ServerHello) -> Resume:
        """A new session's ``resume`` of this ready channel: proof over its nonce."""
        new_state = self._next(Event.RESUME, local=True)
        if self.outpoint is None:  # pragma: no cover - READY implies funded
            raise LocalProtocolError("no channel to resume")
        channel_id = self.outpoint.channel_id
        proof = sign_digest(self._privkey, resume_digest(channel_id, hello.nonce))
        self.hello = hello
        self.state = new_state
        return Resume(channel_id=channel_id, proof=proof)

    # -- paying ---------------------------------------------------------------

    def on_stream(self, stream: Stream) -> None:
        """``stream``: price and allowance for the metering (section 7)."""
        self.meter.on_stream(stream)

    def on_chunk(self, chunk: Chunk | Interval) -> None:
        """``chunk`` or a live ``interval``: meter it (sections 7, 11)."""
        self.meter.on_chunk(chunk)

    def pay_due(self, due: Due) -> Pay:
        """Pay exactly what ``due`` asks after checking it against our own bill.

        :class:`~gateway.protocol.metering.OverchargeError` if the gateway asks
        more than section 7 gives; :class:`LocalProtocolError` beyond the
        budget or the channel value. Nothing changes on refusal. A ``due`` we
        have already covered means the gateway lost our last increment (a
        dropped connection): that same increment is sent again, nothing new
        is signed.
        """
        self._next(Event.PAY, local=True)
        self.meter.check_due(due)
        if due.total > self.paid:
            pay = self._sign_total(due.total)
        elif self._last_pay is not None:
            pay = self._last_pay
        else:
            raise LocalProtocolError(f"due.total {due.total}: nothing to pay")
        self.meter.paid(due)
        return pay

    def pay(self, total: int) -> Pay:
        """Sign an increment bringing the total paid to ``total`` sat."""
        self._next(Event.PAY, local=True)
        if total <= self.paid:
            raise LocalProtocolError(f"total {total} is not above {self.paid}: nothing to sign")
        return self._sign_total(total)

    def _sign_total(self, total: int) -> Pay:
        template = self._template
        if template is None or self.value is None:  # pragma: no cover - READY implies funded
            raise LocalProtocolError("channel not funded")
        if total > self.budget:
            raise LocalProtocolError(f"total {total} is above the budget {self.budget}")
        balance = self.value - total
        if balance < 0:
            raise LocalProtocolError(f"total {total} is above the channel value {self.value}")
        if 0 < balance < DUST_LIMIT:
            raise LocalProtocolError(f"balance {balance} would be dust")
        sig = sign_payment(template, self._privkey, balance)
        self.seq += 1
        self.balance = balance
        self._last_pay = Pay(seq=self.seq, balance=balance, sig=sig)
        return self._last_pay

    def on_paid(self, paid: Paid) -> None:
        """``paid``: the gateway recorded an increment we signed."""
        if paid.seq > self.seq or paid.balance < (self.balance or 0):
            raise ProtocolError(ErrorCode.BAD_STATE, "paid: not an increment we signed", fatal=True)

    # -- closing --------------------------------------------------------------

    def close(self) -> Close:
        """The ``close`` message: settle now (also after an overcharge)."""
        self.state = self._next(Event.CLOSE, local=True)
        return Close()

    def on_closed(self, closed: Closed) -> None:
        """``closed``: the gateway settles (or left the channel to our refund)."""
        self.state = self._next(Event.CLOSED, local=False)

    @property
    def quoted(self) -> Fraction:
        """The feerate the reserve was quoted at: ``exit_fee / exit_vbytes``."""
        return Fraction(self.exit_fee, self.exit_vbytes) if self.exit_vbytes else Fraction(0)

    def reserve_fits(self, value: int) -> bool:
        """Can a channel of ``value`` pay its reserve and keep a change output?

        If not (the reserve would leave dust), its change comes back only by
        the refund after expiry: say so before funding (section 3).
        """
        return value - self.exit_fee >= DUST_LIMIT

    def check_settlement(self, tx: bytes, spent_values: Sequence[int] | None = None) -> None:
        """Check a settlement of this channel as section 8 promises (``ValueError``).

        It spends our funding output and pays our last signed balance at our
        input's index; with every input's value, its feerate is at least the
        one our reserve was quoted at.
        """
        if self.outpoint is None or self.value is None:
            raise LocalProtocolError("the channel is not funded")
        check_settlement(
            tx,
            outpoint=self.outpoint,
            value=self.value,
            change_script=self.change_script,
            balance=self.value if self.balance is None else self.balance,
            quoted=self.quoted,
            spent_values=spent_values,
        )

    def mark_refunded(self) -> None:
        """Our refund spent the funding output."""
        self.state = self._next(Event.REFUNDED, local=True)
