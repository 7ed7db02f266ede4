"""Metering: the price of each chunk, exactly as protocol.md section 7 says.

Theory of operation
-------------------

Every chunk of ``d`` ms of a media item with rate ``rate_msat`` (msat per
second of media) is charged for ``c`` ms, where ``u`` is the media already
*delivered* for that (channel, media) and ``free_ms`` the free allowance::

    c = max(0, u + d - free_ms) - max(0, u - free_ms)

The channel keeps one exact integer ``bill = Σ rate_msat * c`` (msat·ms/s, so
no rounding ever accumulates), and the total (sat) the channel must have paid
before the chunk goes out is ``ceil((bill + rate_msat * c) / 1 000 000)``.
Initialization segments (``index`` -1) are free and count as no media time.

Every total also includes the channel's *reserve* (``terms.exit_fee``,
section 3): the client's own exit fee, paid before any media — so the first
``due`` of a channel, for its first initialization segment, asks for just
the reserve, and the free minute stays free of media charges.

Both ends run the same arithmetic:

- :class:`ServerMeter` (the gateway): :meth:`ServerMeter.quote` answers
  "what total must be paid before this chunk goes out?" without changing
  anything; :meth:`ServerMeter.commit` records "this chunk was sent". A quote
  is tied to the meter state it was made from, so a stale quote cannot be
  committed.
- :class:`ClientMeter` (the player): keeps its own bill from ``stream``
  (``rate_msat``, ``free_ms``, ``free_used_ms``), every ``due`` it pays and
  every chunk it receives without a ``due``. :meth:`ClientMeter.check_due`
  returns the client's own figure for a ``due`` and raises
  :class:`OverchargeError` when the gateway asks for more. A paid ``due``
  adds its chunk once, even if the chunk never arrives (a dropped
  connection) unless the gateway shows, after a resume, that it never got
  that increment (:meth:`ClientMeter.unpay`); the player never pays more
  than one chunk ahead.

Pure: no clock, no I/O. The numbers to persist are plain ints and dicts
(:attr:`ServerMeter.bill`, :attr:`ServerMeter.delivered_ms`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.protocol.messages import Chunk, Due, Interval, Stream

__all__ = [
    "DEFAULT_FREE_MS",
    "INIT_SEGMENT",
    "ClientMeter",
    "OverchargeError",
    "Quote",
    "ServerMeter",
    "charged_ms",
    "total_due",
]

#: Default free allowance per (channel, media), section 7.
DEFAULT_FREE_MS: Final = 60_000
#: ``chunk.index`` of an initialization segment (free, section 7).
INIT_SEGMENT: Final = -1
# bill is msat·ms/s: /1000 for ms -> s, /1000 for msat -> sat.
_BILL_PER_SAT: Final = 1_000_000


def charged_ms(delivered_ms: int, duration_ms: int, free_ms: int) -> int:
    """Milliseconds of a ``duration_ms`` chunk beyond the free allowance.

    ``delivered_ms`` (``u``) is the media already delivered for this
    (channel, media); a chunk straddling ``free_ms`` pays only for its part
    beyond it (section 7).
    """
    u, d = delivered_ms, duration_ms
    return max(0, u + d - free_ms) - max(0, u - free_ms)


def total_due(bill: int, rate_msat: int, charged: int) -> int:
    """Total (sat) paid before a chunk of ``charged`` ms goes out: ceil((bill + rate*c)/1e6)."""
    return -(-(bill + rate_msat * charged) // _BILL_PER_SAT)


@dataclass(frozen=True, slots=True)
class Quote:
    """The price of one chunk, from :meth:`ServerMeter.quote`.

    ``total`` is what the channel must have paid (sat) before the chunk goes
    out; ``charged_ms`` the part of it beyond the free allowance.
    """

    media: str
    index: int
    duration_ms: int
    rate_msat: int
    charged_ms: int
    total: int
    #: meter state the quote was made from (bill, delivered ms of ``media``)
    basis: tuple[int, int]

    @property
    def free(self) -> bool:
        """True when the chunk costs nothing beyond what is already billed."""
        return self.charged_ms == 0 or self.rate_msat == 0


class ServerMeter:
    """The gateway's meter for one channel (all media of that channel).

    ``bill`` and ``delivered_ms`` are the whole state; pass them back in to
    restore a meter (resume, restart).
    """

    __slots__ = ("_delivered", "bill", "reserve")

    def __init__(
        self, bill: int = 0, delivered_ms: Mapping[str, int] | None = None, *, reserve: int = 0
    ) -> None:
        if bill < 0 or reserve < 0 or any(v < 0 for v in (delivered_ms or {}).values()):
            raise ValueError("meter state must be non-negative")
        #: Σ rate_msat * c over every chunk sent (msat·ms/s, exact).
        self.bill = bill
        #: The channel's reserve (sat): part of every total (``terms.exit_fee``).
        self.reserve = reserve
        self._delivered: dict[str, int] = dict(delivered_ms or {})

    @property
    def delivered_ms(self) -> Mapping[str, int]:
        """Media ms delivered so far, per media (a copy)."""
        return dict(self._delivered)

    def free_used_ms(self, media: str, free_ms: int) -> int:
        """``stream.free_used_ms``: the part of the allowance already used."""
        return min(free_ms, self._delivered.get(media, 0))

    @property
    def billed(self) -> int:
        """Sat the channel has been billed for chunks already sent (rounded up)."""
        return total_due(self.bill, 0, 0)

    def quote(
        self, media: str, index: int, duration_ms: int, *, rate_msat: int, free_ms: int
    ) -> Quote:
        """What must be paid before chunk (``media``, ``index``, ``duration_ms``) goes out.

        Changes nothing; follow with :meth:`commit` once the chunk is sent.
        """
        if duration_ms < 0 or rate_msat < 0 or free_ms < 0 or index < INIT_SEGMENT:
            raise ValueError("negative duration, rate, allowance or index")
        u = self._delivered.get(media, 0)
        c = 0 if index == INIT_SEGMENT else charged_ms(u, duration_ms, free_ms)
        return Quote(
            media=media,
            index=index,
            duration_ms=duration_ms,
            rate_msat=rate_msat,
            charged_ms=c,
            total=self.reserve + total_due(self.bill, rate_msat, c),
            basis=(self.bill, u),
        )

    def commit(self, quote: Quote) -> None:
        """Record that the quoted chunk was sent.

        Raises :class:`ValueError` if the meter changed since the quote (a
        programming error: quotes must be committed in order).
        """
        if quote.basis != (self.bill, self._delivered.get(quote.media, 0)):
            raise ValueError("stale quote: the meter changed since it was made")
        if quote.index == INIT_SEGMENT:
            return
        self.bill += quote.rate_msat * quote.charged_ms
        self._delivered[quote.media] = quote.basis[1] + quote.duration_ms


class OverchargeError(ProtocolError):
    """The gateway asked for more than the client's own section 7 figure.

    Raised on the client side; the player answers with ``close`` and stops
    paying (section 5). ``figure`` is the client's own total.
    """

    def __init__(self, due: Due, figure: int) -> None:
        super().__init__(
            ErrorCode.BAD_MESSAGE,
            f"gateway overcharges: due.total {due.total} sat for {due.media}#{due.index} "
            f"but the metered total is {figure} sat",
            fatal=True,
        )
        self.due = due
        self.figure = figure


class ClientMeter:
    """The player's own bill for one channel (section 7).

    Feed it every ``stream``, ``chunk`` and ``due`` in order. Before paying a
    ``due`` call :meth:`check_due`; once the increment is signed, call
    :meth:`paid`.
    """

    __slots__ = (
        "_free",
        "_outstanding",
        "_outstanding_cost",
        "_pending",
        "_rates",
        "_used",
        "bill",
        "reserve",
    )

    def __init__(self, bill: int = 0, *, reserve: int = 0) -> None:
        #: Σ rate_msat * c over every chunk paid for or received (msat·ms/s).
        self.bill = bill
        #: The reserve accepted with ``terms`` (sat): part of every total.
        self.reserve = reserve
        self._rates: dict[str, int] = {}
        self._free: dict[str, int] = {}
        self._used: dict[str, int] = {}
        # (media, index) of the chunk paid for but not yet received: the
        # player never pays more than one chunk ahead.
        self._outstanding: tuple[str, int] | None = None
        # what paying for it added: (bill, media ms)
        self._outstanding_cost = (0, 0)
        # the due checked last and not yet paid: (due, charged ms)
        self._pending: tuple[Due, int] | None = None

    @property
    def figure(self) -> int:
        """Sat owed for everything metered so far (rounded up), reserve included."""
        return self.reserve + total_due(self.bill, 0, 0)

    def on_stream(self, stream: Stream) -> None:
        """A ``stream`` message: this media's price and used allowance.

        A new stream (or a resumed session) forgets a chunk paid for but not
        received: it stays billed, once.
        """
        self._rates[stream.media] = stream.rate_msat
        self._free[stream.media] = stream.free_ms
        self._used[stream.media] = stream.free_used_ms
        self._outstanding = None
        self._pending = None

    def _charge(self, media: str, duration_ms: int) -> int:
        if media not in self._rates:
            raise ProtocolError(
                ErrorCode.BAD_STATE, f"no stream announced for {media!r}", fatal=True
            )
        return charged_ms(self._used[media], duration_ms, self._free[media])

    def on_chunk(self, chunk: Chunk | Interval) -> None:
        """A ``chunk`` (or a live ``interval``, section 11): meter it unless a paid ``due`` did."""
        key = (chunk.media, chunk.index)
        if key == self._outstanding:
            self._outstanding = None
            return
        if chunk.index == INIT_SEGMENT:
            return
        # A chunk sent without a `due`: the channel had already paid enough
        # (rounding, overpayment) or it is free. It is still billed.
        c = self._charge(chunk.media, chunk.duration_ms)
        self.bill += self._rates[chunk.media] * c
        self._used[chunk.media] += chunk.duration_ms

    def check_due(self, due: Due) -> int:
        """The client's own total for ``due``; raise :class:`OverchargeError` above it.

        Also refuses (``bad_state``) a ``due`` for another chunk while a paid
        chunk has not arrived: never more than one chunk ahead.
        """
        key = (due.media, due.index)
        if key == self._outstanding:
            # the same due again after a partial payment: already billed
            figure = self.figure
            charged = 0
        else:
            if self._outstanding is not None:
                raise ProtocolError(
                    ErrorCode.BAD_STATE,
                    f"due for {due.media}#{due.index} before paid chunk "
                    f"{self._outstanding[0]}#{self._outstanding[1]} arrived",
                    fatal=True,
                )
            charged = 0
            if due.index != INIT_SEGMENT:  # the init segment is due for the reserve only
                charged = self._charge(due.media, due.duration_ms)
            elif due.media not in self._rates:
                self._charge(due.media, 0)  # bad_state: no stream announced
            figure = self.reserve + total_due(self.bill, self._rates[due.media], charged)
        if due.total > figure:
            raise OverchargeError(due, figure)
        self._pending = (due, charged)
        return figure

    def paid(self, due: Due) -> None:
        """The increment for ``due`` (checked by :meth:`check_due`) was signed.

        Adds the named chunk to the bill once, received or not.
        """
        if self._pending is None or self._pending[0] != due:
            raise ValueError("paid() without a matching check_due()")
        _, charged = self._pending
        self._pending = None
        key = (due.media, due.index)
        if key == self._outstanding:
            return
        cost = self._rates[due.media] * charged
        self.bill += cost
        self._used[due.media] += due.duration_ms
        self._outstanding = key
        self._outstanding_cost = (cost, due.duration_ms)

    def unpay(self) -> None:
        """The gateway never got the increment for the outstanding chunk.

        It learned so from ``ready.balance`` after a resume: the gateway sends
        a chunk only once it holds the increment, so that chunk was never
        sent and leaves the bill; a later ``due`` for it bills it again, once.
        """
        if self._outstanding is None:
            return
        cost, duration = self._outstanding_cost
        self.bill -= cost
        self._used[self._outstanding[0]] -= duration
        self._outstanding = None
