"""Protocol errors: the one error shape of protocol.md section 9.

Hierarchy::

    ProtocolError            a section 9 ``code`` + human ``message`` + ``fatal``
    └── (raised by the pure core for bad input from the peer)

The pure core raises :class:`ProtocolError` for anything the peer got wrong;
the I/O layer turns it into an ``error`` message. Internal failures are not
``ProtocolError``: the I/O layer answers them with ``internal`` and never
sends their text to the peer (protocol.md section 9).
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """Every ``error.code`` of protocol.md section 9."""

    BAD_MESSAGE = "bad_message"
    UNSUPPORTED_VERSION = "unsupported_version"
    BAD_STATE = "bad_state"
    BAD_KEY = "bad_key"
    BAD_EXPIRY = "bad_expiry"
    BAD_SCRIPT = "bad_script"
    BAD_REFUND = "bad_refund"
    VALUE_OUT_OF_RANGE = "value_out_of_range"
    FUNDING_NOT_FOUND = "funding_not_found"
    FUNDING_MISMATCH = "funding_mismatch"
    FUNDING_SPENT = "funding_spent"
    FUNDING_LOST = "funding_lost"
    SEQ_NOT_INCREASING = "seq_not_increasing"
    BALANCE_INCREASED = "balance_increased"
    NON_CANONICAL_SIGNATURE = "non_canonical_signature"
    BAD_SIGNATURE = "bad_signature"
    CHANNEL_UNKNOWN = "channel_unknown"
    CHANNEL_CLOSED = "channel_closed"
    CHANNEL_EXPIRING = "channel_expiring"
    SESSION_REPLACED = "session_replaced"
    MEDIA_UNKNOWN = "media_unknown"
    BUSY = "busy"
    INTERNAL = "internal"


#: Codes that always close the session (protocol.md section 9: errors that
#: answer ``pay``/``play``/``stop`` on a ready channel are never fatal).
FATAL_BY_DEFAULT = frozenset({ErrorCode.UNSUPPORTED_VERSION, ErrorCode.SESSION_REPLACED})


class ProtocolError(Exception):
    """Bad input from the peer, answered on the wire as ``error``.

    ``message`` is written for a human and is safe to send: it never carries
    internal exception text.
    """

    def __init__(self, code: ErrorCode, message: str, *, fatal: bool | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = ErrorCode(code)
        self.message = message
        self.fatal = code in FATAL_BY_DEFAULT if fatal is None else fatal

    def to_wire(self) -> dict[str, object]:
        """The ``error`` message of protocol.md section 6 for this error."""
        return {
            "type": "error",
            "code": self.code.value,
            "message": self.message,
            "fatal": self.fatal,
        }
