"""Every protocol.md message as a frozen dataclass: parse, validate, encode.

Theory of operation
-------------------

A text frame is one JSON object with a string ``type`` (protocol.md section 1).
:func:`parse_client_message` (used by the gateway) and
:func:`parse_server_message` (used by the player) turn a frame into one of the
dataclasses below or raise :class:`~gateway.protocol.errors.ProtocolError`
with code ``bad_message`` and a message naming the field; they never raise
anything else, whatever the input (deeply nested JSON, huge numbers, invalid
UTF-8...). :func:`encode` is the inverse: ``parse(encode(m)) == m``.

Each message class declares its wire fields once, as dataclass fields whose
metadata holds a *codec* (integer range, lowercase hex, enumerated string...).
The codec both validates the JSON value and writes it back, so a message's
wire shape is data, not code, and there is one table to read per message.

Section 1 rules enforced here:

- integers are JSON numbers without fraction or exponent; ``true``/``false``
  are not integers (``bool`` is a subclass of ``int`` in Python: checked);
- amounts (satoshi) are in 0 … 2 100 000 000 000 000, every other integer
  (``seq``, ``expiry``, media times, ``*_msat``) in 0 … 2^53 - 1, ``vout`` in
  0 … 2^32 - 1;
- keys, scripts, signatures and transactions are even-length lowercase hex,
  decoded to ``bytes``; txids stay display-order hex strings;
- unknown fields are ignored; an unknown ``type`` is ``bad_message``;
- ``hello.version`` other than 2 is ``unsupported_version`` (fatal).

Checks that need context (is this key a valid point? this script standard?
this signature strict DER?) belong to the channel state machines, which answer
with their own section 9 codes (``bad_key``, ``bad_script``,
``non_canonical_signature``...). Size caps here only bound the work done on
hostile input and are far above anything valid.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, TypeVar

from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.protocol.scripts import ChannelKind
from gateway.protocol.transactions import DUST_LIMIT

__all__ = [
    "FEATURE_PAY_BINARY",
    "MAX_INT",
    "MAX_MONEY",
    "NETWORKS",
    "PROTOCOL_VERSION",
    "ChannelKind",
    "Chunk",
    "ClientMessage",
    "Close",
    "Closed",
    "Due",
    "End",
    "Error",
    "Fund",
    "Funding",
    "Hello",
    "Interval",
    "Limits",
    "Message",
    "Open",
    "Paid",
    "Pay",
    "Play",
    "Ready",
    "Refund",
    "RefundSigned",
    "Resume",
    "ServerHello",
    "ServerMessage",
    "Stop",
    "Stream",
    "Terms",
    "WebrtcAnswer",
    "encode",
    "encode_pay_binary",
    "parse_client_binary",
    "parse_client_message",
    "parse_server_message",
]

PROTOCOL_VERSION: Final = 2
#: Largest amount in satoshi (protocol.md section 1: 21 million BTC).
MAX_MONEY: Final = 2_100_000_000_000_000
#: Largest non-amount integer (protocol.md section 1: 2^53 - 1, exact in JSON doubles).
MAX_INT: Final = 2**53 - 1

# Size caps (bytes after hex decoding). They bound hostile input only: a
# standard transaction is at most 100 000 bytes (400 000 weight units).
_MAX_TX: Final = 100_000
# Above the 10 000-byte script limit so that a long `change_script` is
# answered `bad_script` by the channel, as section 9 says, not `bad_message`.
_MAX_SCRIPT: Final = 20_000
_MAX_KEY: Final = 128
_MAX_SIG: Final = 128
_MAX_TEXT: Final = 1_000
#: An SDP offer or answer (section 11): a browser's is a few kilobytes.
_MAX_SDP: Final = 64_000

#: ``hello.network`` values (section 6).
NETWORKS: Final = frozenset({"regtest", "signet", "testnet", "main"})

#: ``hello.features`` entry: the gateway takes the binary ``pay`` frame (section 5a).
FEATURE_PAY_BINARY: Final = "pay_binary"

_LOWER_HEX = re.compile(r"[0-9a-f]*").fullmatch
_TXID = re.compile(r"[0-9a-f]{64}").fullmatch
# `txid:vout` exactly as written, vout without leading zeros (section 5: the
# resume proof signs the string, so there must be one spelling).
_CHANNEL_ID = re.compile(r"[0-9a-f]{64}:(?:0|[1-9][0-9]{0,15})").fullmatch


def _bad(where: str, what: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_MESSAGE, f"{where}: {what}")


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, _NotInteger):
        return "a number that is not an integer"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # pragma: no cover - JSON has no other types


# ---------------------------------------------------------------------------
# Codecs: one per kind of wire value. `parse` validates a decoded JSON value
# and returns the Python value; `dump` returns the JSON value.
# ---------------------------------------------------------------------------


class _Codec(ABC):
    @abstractmethod
    def parse(self, value: Any, where: str) -> Any:
        """The Python value of JSON ``value`` at ``where``, or ``bad_message``."""

    def dump(self, value: Any) -> Any:
        return value


class _Int(_Codec):
    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def parse(self, value: Any, where: str) -> int:
        # `type(...) is int` rejects bool (a subclass of int) in one test.
        if type(value) is not int:
            raise _bad(where, f"expected an integer, got {_type_name(value)}")
        if not self.lo <= value <= self.hi:
            raise _bad(where, f"integer out of range {self.lo}..{self.hi}")
        return value


class _Str(_Codec):
    def __init__(self, max_len: int = _MAX_TEXT, choices: frozenset[str] | None = None) -> None:
        self.max_len, self.choices = max_len, choices

    def parse(self, value: Any, where: str) -> str:
        if type(value) is not str:
            raise _bad(where, f"expected a string, got {_type_name(value)}")
        if self.choices is not None and value not in self.choices:
            raise _bad(where, f"expected one of {', '.join(sorted(self.choices))}")
        if len(value) > self.max_len:
            raise _bad(where, f"string longer than {self.max_len} characters")
        return value


class _NonEmptyStr(_Str):
    def parse(self, value: Any, where: str) -> str:
        text = super().parse(value, where)
        if not text:
            raise _bad(where, "empty string")
        return text


class _Kind(_Codec):
    """A channel kind (section 2), parsed to :class:`ChannelKind`."""

    def parse(self, value: Any, where: str) -> ChannelKind:
        if type(value) is not str:
            raise _bad(where, f"expected a string, got {_type_name(value)}")
        try:
            return ChannelKind(value)
        except ValueError:
            raise _bad(where, f"expected one of {', '.join(ChannelKind)}") from None

    def dump(self, value: Any) -> Any:
        return str(value)


class _Bool(_Codec):
    def parse(self, value: Any, where: str) -> bool:
        if type(value) is not bool:
            raise _bad(where, f"expected a boolean, got {_type_name(value)}")
        return value


class _Hex(_Codec):
    def __init__(self, max_bytes: int, exact: int | None = None) -> None:
        self.max_bytes, self.exact = max_bytes, exact

    def parse(self, value: Any, where: str) -> bytes:
        if type(value) is not str:
            raise _bad(where, f"expected a hex string, got {_type_name(value)}")
        n = len(value)
        if self.exact is not None and n != 2 * self.exact:
            raise _bad(where, f"expected {self.exact} bytes of hex")
        if n > 2 * self.max_bytes:
            raise _bad(where, f"hex longer than {self.max_bytes} bytes")
        if n % 2:
            raise _bad(where, "odd-length hex")
        if not _LOWER_HEX(value):
            raise _bad(where, "not lowercase hex")
        return bytes.fromhex(value)

    def dump(self, value: bytes) -> str:
        return value.hex()


class _Pattern(_Codec):
    def __init__(self, match: Callable[[str], object], what: str) -> None:
        self.match, self.what = match, what

    def parse(self, value: Any, where: str) -> str:
        if type(value) is not str:
            raise _bad(where, f"expected a string, got {_type_name(value)}")
        if len(value) > 100 or not self.match(value):
            raise _bad(where, f"expected {self.what}")
        return value


class _Nullable(_Codec):
    def __init__(self, inner: _Codec) -> None:
        self.inner = inner

    def parse(self, value: Any, where: str) -> Any:
        return None if value is None else self.inner.parse(value, where)

    def dump(self, value: Any) -> Any:
        return None if value is None else self.inner.dump(value)


class _Object(_Codec):
    def __init__(self, cls: type[_Wire]) -> None:
        self.cls = cls

    def parse(self, value: Any, where: str) -> Any:
        if type(value) is not dict:
            raise _bad(where, f"expected an object, got {_type_name(value)}")
        return self.cls._from_wire(value, where)

    def dump(self, value: _Wire) -> dict[str, Any]:
        return value._to_wire()


class _ErrorCodeCodec(_Codec):
    _codes: Final = frozenset(code.value for code in ErrorCode)

    def parse(self, value: Any, where: str) -> ErrorCode:
        if type(value) is not str or value not in self._codes:
            raise _bad(where, "expected a section 9 error code")
        return ErrorCode(value)

    def dump(self, value: ErrorCode) -> str:
        return value.value


class _Names(_Codec):
    """An array of short strings (``hello.features``), kept as a tuple."""

    def parse(self, value: Any, where: str) -> tuple[str, ...]:
        if type(value) is not list:
            raise _bad(where, f"expected an array, got {_type_name(value)}")
        if len(value) > 64:
            raise _bad(where, "more than 64 entries")
        return tuple(_Str(100).parse(item, where) for item in value)

    def dump(self, value: Any) -> Any:
        return list(value)


_AMOUNT: Final = _Int(0, MAX_MONEY)
_UINT: Final = _Int(0, MAX_INT)
#: An output index: 32 bits in a transaction (section 1).
_VOUT: Final = _Int(0, 0xFFFF_FFFF)
_TXID_CODEC: Final = _Pattern(_TXID, "a txid (64 lowercase hex digits)")
_CHANNEL_ID_CODEC: Final = _Pattern(_CHANNEL_ID, "a channel id 'txid:vout'")
_MEDIA: Final = _NonEmptyStr(256)


def _wired(codec: _Codec) -> dict[str, _Codec]:
    """Field metadata naming the field's wire codec."""
    return {"codec": codec}


# ---------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------


class _Wire:
    """Base of every wire object: field table built by :func:`_wire`."""

    __slots__ = ()
    # (name, codec, "where" label, required) for each wire field, in order.
    _fields: ClassVar[tuple[tuple[str, _Codec, str, bool], ...]] = ()

    @classmethod
    def _from_wire(cls, obj: dict[str, Any], label: str) -> Any:
        values = {}
        for name, codec, where, required in cls._fields:
            if name in obj:
                values[name] = codec.parse(obj[name], where)
            elif required:
                raise _bad(where, "missing field")
        msg = cls(**values)
        msg._check()
        return msg

    def _check(self) -> None:
        """Cross-field checks; raise :class:`ProtocolError`."""

    def _to_wire(self) -> dict[str, Any]:
        # An optional field left at None is omitted (e.g. `fund` without txid).
        wire = {}
        for name, codec, _, required in self._fields:
            value = getattr(self, name)
            if value is not None or required:
                wire[name] = codec.dump(value)
        return wire


class Message(_Wire):
    """A top-level message: has a wire ``type``."""

    __slots__ = ()
    type: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of this message (``type`` first)."""
        return {"type": self.type, **self._to_wire()}


_W = TypeVar("_W", bound=type[Any])


def _wire(label: str) -> Callable[[_W], _W]:
    """Build the field table of a wire dataclass from its fields' codecs."""

    def wrap(dc: _W) -> _W:
        dc._fields = tuple(
            (
                f.name,
                f.metadata["codec"],
                f"{label}.{f.name}",
                f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
            )
            for f in dataclasses.fields(dc)
        )
        return dc

    return wrap


def _message(type_: str) -> Callable[[_W], _W]:
    def wrap(cls: _W) -> _W:
        cls.type = type_
        return _wire(type_)(cls)

    return wrap


def _check_version(label: str, version: int) -> None:
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            ErrorCode.UNSUPPORTED_VERSION,
            f"{label}.version {version} is not supported (this is version {PROTOCOL_VERSION})",
            fatal=True,
        )


# -- client to gateway (protocol.md section 5) ------------------------------


@_message("hello")
@dataclass(frozen=True, slots=True)
class Hello(Message):
    """Client ``hello``: first message of a session."""

    version: int = field(metadata=_wired(_UINT))
    agent: str = field(metadata=_wired(_Str()))

    def _check(self) -> None:
        _check_version("hello", self.version)


@_message("open")
@dataclass(frozen=True, slots=True)
class Open(Message):
    """Propose a channel (section 5); ``kind`` defaults to ``cltv``."""

    client_pubkey: bytes = field(metadata=_wired(_Hex(_MAX_KEY)))
    expiry: int = field(metadata=_wired(_UINT))
    change_script: bytes = field(metadata=_wired(_Hex(_MAX_SCRIPT)))
    kind: ChannelKind = field(default=ChannelKind.CLTV, metadata=_wired(_Kind()))


@_message("refund")
@dataclass(frozen=True, slots=True)
class Refund(Message):
    """Ask the server to sign the unsigned refund T2 (multisig only)."""

    tx: bytes = field(metadata=_wired(_Hex(_MAX_TX)))
    value: int = field(metadata=_wired(_AMOUNT))


@_message("fund")
@dataclass(frozen=True, slots=True)
class Fund(Message):
    """The funding output exists: ``txid``+``vout``, a signed ``tx``, or neither."""

    txid: str | None = field(default=None, metadata=_wired(_TXID_CODEC))
    vout: int | None = field(default=None, metadata=_wired(_VOUT))
    tx: bytes | None = field(default=None, metadata=_wired(_Hex(_MAX_TX)))

    def _check(self) -> None:
        if (self.txid is None) != (self.vout is None):
            raise _bad("fund", "txid and vout go together")


@_message("resume")
@dataclass(frozen=True, slots=True)
class Resume(Message):
    """Reuse an open channel; ``proof`` is K1's DER signature (section 5)."""

    channel_id: str = field(metadata=_wired(_CHANNEL_ID_CODEC))
    proof: bytes = field(metadata=_wired(_Hex(_MAX_SIG)))


@_message("play")
@dataclass(frozen=True, slots=True)
class Play(Message):
    """Start (or switch to) a media stream."""

    media: str = field(metadata=_wired(_MEDIA))
    start_ms: int = field(default=0, metadata=_wired(_UINT))
    #: A live item over WebRTC (section 11): the viewer's SDP offer to receive.
    webrtc: str | None = field(default=None, metadata=_wired(_Str(_MAX_SDP)))


@_message("pay")
@dataclass(frozen=True, slots=True)
class Pay(Message):
    """A T3 increment (section 3): ``sig`` is DER + one sighash byte."""

    seq: int = field(metadata=_wired(_UINT))
    balance: int = field(metadata=_wired(_AMOUNT))
    sig: bytes = field(metadata=_wired(_Hex(_MAX_SIG)))


@_message("stop")
@dataclass(frozen=True, slots=True)
class Stop(Message):
    """Stop the current stream, keep the channel."""


@_message("close")
@dataclass(frozen=True, slots=True)
class Close(Message):
    """Settle now."""


# -- gateway to client (protocol.md section 6) ------------------------------


@_wire("hello.limits")
@dataclass(frozen=True, slots=True)
class Limits(_Wire):
    """``hello.limits``: what the gateway accepts (section 6)."""

    min_value: int = field(metadata=_wired(_AMOUNT))
    max_value: int = field(metadata=_wired(_AMOUNT))
    min_expiry_s: int = field(metadata=_wired(_UINT))
    max_expiry_s: int = field(metadata=_wired(_UINT))
    min_conf: int = field(metadata=_wired(_UINT))
    settle_margin_s: int = field(metadata=_wired(_UINT))
    resume_grace_s: int = field(metadata=_wired(_UINT))
    dust_limit: int = field(default=DUST_LIMIT, metadata=_wired(_AMOUNT))

    def _check(self) -> None:
        if self.min_value > self.max_value:
            raise _bad("hello.limits", "min_value above max_value")
        if self.min_expiry_s > self.max_expiry_s:
            raise _bad("hello.limits", "min_expiry_s above max_expiry_s")

    def to_wire(self) -> dict[str, Any]:
        """The JSON object of these limits."""
        return self._to_wire()


@_message("hello")
@dataclass(frozen=True, slots=True)
class ServerHello(Message):
    """Gateway ``hello``: network, the session nonce and the limits."""

    version: int = field(metadata=_wired(_UINT))
    agent: str = field(metadata=_wired(_Str()))
    network: str = field(metadata=_wired(_Str(choices=NETWORKS)))
    nonce: bytes = field(metadata=_wired(_Hex(32, exact=32)))
    limits: Limits = field(metadata=_wired(_Object(Limits)))
    #: Optional additions the gateway takes (section 6), e.g. ``pay_binary``;
    #: a version 2 gateway without the field offers none.
    features: tuple[str, ...] = field(default=(), metadata=_wired(_Names()))

    def _check(self) -> None:
        _check_version("hello", self.version)


@_message("terms")
@dataclass(frozen=True, slots=True)
class Terms(Message):
    """The channel's script and where to fund it."""

    kind: ChannelKind = field(metadata=_wired(_Kind()))
    server_pubkey: bytes = field(metadata=_wired(_Hex(_MAX_KEY)))
    witness_script: bytes = field(metadata=_wired(_Hex(_MAX_SCRIPT)))
    funding_address: str = field(metadata=_wired(_NonEmptyStr(200)))
    funding_script: bytes = field(metadata=_wired(_Hex(_MAX_SCRIPT)))
    expiry: int = field(metadata=_wired(_UINT))
    #: The reserve: what the client pays first, for its own exit (section 3).
    exit_fee: int = field(metadata=_wired(_AMOUNT))
    #: The vbytes that reserve pays for; exit_fee / exit_vbytes is the quoted feerate.
    exit_vbytes: int = field(metadata=_wired(_UINT))


@_message("refund_signed")
@dataclass(frozen=True, slots=True)
class RefundSigned(Message):
    """The server's signature on T2 (DER + 0x01)."""

    sig: bytes = field(metadata=_wired(_Hex(_MAX_SIG)))


@_message("funding")
@dataclass(frozen=True, slots=True)
class Funding(Message):
    """Funding progress while confirmations < ``needed``."""

    txid: str = field(metadata=_wired(_TXID_CODEC))
    vout: int = field(metadata=_wired(_VOUT))
    confirmations: int = field(metadata=_wired(_UINT))
    needed: int = field(metadata=_wired(_UINT))


@_message("ready")
@dataclass(frozen=True, slots=True)
class Ready(Message):
    """The channel takes payments."""

    channel_id: str = field(metadata=_wired(_CHANNEL_ID_CODEC))
    value: int = field(metadata=_wired(_AMOUNT))
    balance: int = field(metadata=_wired(_AMOUNT))
    paid: int = field(metadata=_wired(_AMOUNT))
    expiry: int = field(metadata=_wired(_UINT))
    exit_fee: int = field(metadata=_wired(_AMOUNT))


@_message("stream")
@dataclass(frozen=True, slots=True)
class Stream(Message):
    """What ``play`` delivers and at what price (``rate_msat`` per second)."""

    media: str = field(metadata=_wired(_MEDIA))
    title: str = field(metadata=_wired(_Str()))
    mime: str = field(metadata=_wired(_Str()))
    rate_msat: int = field(metadata=_wired(_UINT))
    free_ms: int = field(metadata=_wired(_UINT))
    free_used_ms: int = field(metadata=_wired(_UINT))
    duration_ms: int = field(metadata=_wired(_UINT))
    chunks: int = field(metadata=_wired(_UINT))
    #: A live item (section 11): no end known, ``duration_ms`` and ``chunks`` 0.
    live: bool | None = field(default=None, metadata=_wired(_Bool()))

    def _check(self) -> None:
        if self.free_used_ms > self.free_ms:
            raise _bad("stream.free_used_ms", "above free_ms")


@_message("webrtc_answer")
@dataclass(frozen=True, slots=True)
class WebrtcAnswer(Message):
    """The gateway's SDP answer to ``play.webrtc`` (section 11)."""

    media: str = field(metadata=_wired(_MEDIA))
    sdp: str = field(metadata=_wired(_NonEmptyStr(_MAX_SDP)))


@_message("interval")
@dataclass(frozen=True, slots=True)
class Interval(Message):
    """Live interval ``index`` flows over WebRTC (section 11): a chunk without bytes."""

    media: str = field(metadata=_wired(_MEDIA))
    index: int = field(metadata=_wired(_UINT))
    start_ms: int = field(metadata=_wired(_UINT))
    duration_ms: int = field(metadata=_wired(_UINT))


@_message("chunk")
@dataclass(frozen=True, slots=True)
class Chunk(Message):
    """The next binary frame; ``index`` -1 is the initialization segment."""

    media: str = field(metadata=_wired(_MEDIA))
    index: int = field(metadata=_wired(_Int(-1, MAX_INT)))
    start_ms: int = field(metadata=_wired(_UINT))
    duration_ms: int = field(metadata=_wired(_UINT))
    size: int = field(metadata=_wired(_UINT))


@_message("due")
@dataclass(frozen=True, slots=True)
class Due(Message):
    """Chunk ``index`` goes out once the channel has paid ``total`` sat.

    ``index`` -1, the initialization segment, is due for the channel's
    reserve (section 7).
    """

    total: int = field(metadata=_wired(_AMOUNT))
    media: str = field(metadata=_wired(_MEDIA))
    index: int = field(metadata=_wired(_Int(-1, MAX_INT)))
    duration_ms: int = field(metadata=_wired(_UINT))


@_message("paid")
@dataclass(frozen=True, slots=True)
class Paid(Message):
    """The increment ``seq`` is durably recorded."""

    seq: int = field(metadata=_wired(_UINT))
    balance: int = field(metadata=_wired(_AMOUNT))
    paid: int = field(metadata=_wired(_AMOUNT))


@_message("end")
@dataclass(frozen=True, slots=True)
class End(Message):
    """The stream ended."""

    media: str = field(metadata=_wired(_MEDIA))
    reason: str = field(metadata=_wired(_Str(choices=frozenset({"finished", "stopped"}))))


@_message("closed")
@dataclass(frozen=True, slots=True)
class Closed(Message):
    """The channel takes nothing more (section 8).

    ``txid``: its settlement once broadcast; None while it waits for its
    batch (then ``settle_by`` says until when, unix time) or when nothing will
    be broadcast (``settle_by`` None too: the client refunds at expiry).
    ``paid`` includes ``exit_fee``, the reserve.
    """

    txid: str | None = field(metadata=_wired(_Nullable(_TXID_CODEC)))
    paid: int = field(metadata=_wired(_AMOUNT))
    balance: int = field(metadata=_wired(_AMOUNT))
    exit_fee: int = field(metadata=_wired(_AMOUNT))
    settle_by: int | None = field(default=None, metadata=_wired(_Nullable(_UINT)))


@_message("error")
@dataclass(frozen=True, slots=True)
class Error(Message):
    """A section 9 error."""

    code: ErrorCode = field(metadata=_wired(_ErrorCodeCodec()))
    message: str = field(metadata=_wired(_Str(4_000)))
    fatal: bool = field(metadata=_wired(_Bool()))

    @classmethod
    def from_exception(cls, exc: ProtocolError) -> Error:
        """The wire error for a :class:`ProtocolError`."""
        return cls(code=exc.code, message=exc.message, fatal=exc.fatal)


ClientMessage = Hello | Open | Refund | Fund | Resume | Play | Pay | Stop | Close
ServerMessage = (
    ServerHello
    | Terms
    | RefundSigned
    | Funding
    | Ready
    | Stream
    | Chunk
    | Due
    | Paid
    | End
    | Closed
    | Error
    | WebrtcAnswer
    | Interval
)

_CLIENT_TYPES: Final[dict[str, type[Message]]] = {
    cls.type: cls for cls in (Hello, Open, Refund, Fund, Resume, Play, Pay, Stop, Close)
}
_SERVER_TYPES: Final[dict[str, type[Message]]] = {
    cls.type: cls
    for cls in (
        ServerHello,
        Terms,
        RefundSigned,
        Funding,
        Ready,
        Stream,
        Chunk,
        Due,
        Paid,
        End,
        Closed,
        Error,
        WebrtcAnswer,
        Interval,
    )
}


class _NotInteger:
    """A JSON number that is not an integer (``100.0``, ``1e2``, ``NaN``).

    Section 1: the protocol's numbers are integers, and unknown fields MUST
    be ignored. So such a number is kept as this marker rather than refused
    while parsing: in a field of the protocol no codec accepts it
    (``bad_message``), in an unknown field it is ignored with the field.
    """

    __slots__ = ()


_NOT_INTEGER = _NotInteger()


def _not_integer(token: str) -> Any:
    # Called by the JSON scanner for floats, exponents and NaN/Infinity.
    return _NOT_INTEGER


# One decoder, built once: json.loads(...) with hooks builds a new one per call.
_decoder = json.JSONDecoder(parse_float=_not_integer, parse_constant=_not_integer)


def _parse(text: str | bytes, table: dict[str, type[Message]]) -> Any:
    try:
        if isinstance(text, bytes | bytearray):
            text = bytes(text).decode("utf-8")
        obj = _decoder.decode(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError(
            ErrorCode.BAD_MESSAGE, f"not valid JSON ({exc.msg} at offset {exc.pos})"
        ) from None
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "not valid UTF-8") from None
    except RecursionError:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "JSON nested too deeply") from None
    except ValueError:
        # Raised by int() for integers over Python's 4300-digit limit.
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "an integer is far out of range") from None
    if type(obj) is not dict:
        raise _bad("message", f"expected a JSON object, got {_type_name(obj)}")
    kind = obj.get("type")
    if type(kind) is not str:
        raise _bad("message.type", "missing or not a string")
    cls = table.get(kind)
    if cls is None:
        raise _bad("message.type", f"unknown type {kind[:40]!r}")
    return cls._from_wire(obj, kind)


def parse_client_message(text: str | bytes) -> ClientMessage:
    """Parse one client-to-gateway text frame (protocol.md section 5).

    Raises :class:`ProtocolError` (``bad_message``, or ``unsupported_version``
    for a ``hello`` of another version) and nothing else.
    """
    msg: ClientMessage = _parse(text, _CLIENT_TYPES)
    return msg


def parse_server_message(text: str | bytes) -> ServerMessage:
    """Parse one gateway-to-client text frame (protocol.md section 6).

    Raises :class:`ProtocolError` (``bad_message``, or ``unsupported_version``
    for a ``hello`` of another version) and nothing else.
    """
    msg: ServerMessage = _parse(text, _SERVER_TYPES)
    return msg


# -- the binary ``pay`` frame (protocol.md section 5a) ---------------------------

#: Section 5a: kind byte 0x01, then ``seq`` and ``balance`` as unsigned 64-bit
#: big-endian integers, then ``sig`` (DER + sighash byte) to the frame's end.
_PAY_HEAD: Final = struct.Struct(">BQQ")
_PAY_KIND: Final = 0x01


def encode_pay_binary(pay: Pay) -> bytes:
    """The binary frame of ``pay`` (section 5a): 17 bytes and the signature."""
    return _PAY_HEAD.pack(_PAY_KIND, pay.seq, pay.balance) + pay.sig


def parse_client_binary(data: bytes) -> Pay:
    """Parse one client-to-gateway binary frame: a ``pay`` (section 5a).

    The same ranges as the JSON ``pay`` and the same answer to anything
    else: :class:`ProtocolError` ``bad_message``, naming the field. What
    needs the channel (the signature's encoding, ``seq`` and ``balance``
    against the last increment) is checked by the channel, as for JSON.
    """
    if len(data) < _PAY_HEAD.size:
        raise _bad("pay", f"a binary frame of {len(data)} bytes is too short for a pay")
    kind, seq, balance = _PAY_HEAD.unpack_from(data)
    if kind != _PAY_KIND:
        raise _bad("message", f"unknown binary frame kind {kind}")
    if seq > MAX_INT:
        raise _bad("pay.seq", f"integer out of range 0..{MAX_INT}")
    if balance > MAX_MONEY:
        raise _bad("pay.balance", f"integer out of range 0..{MAX_MONEY}")
    if len(data) - _PAY_HEAD.size > _MAX_SIG:
        raise _bad("pay.sig", f"longer than {_MAX_SIG} bytes")
    return Pay(seq=seq, balance=balance, sig=bytes(data[_PAY_HEAD.size :]))


#: ``json.dumps`` with any non-default argument builds a new encoder per call;
#: three messages go out per paid chunk, so one is kept (``gateway bench``).
_ENCODER = json.JSONEncoder(separators=(",", ":"))


_json_string = functools.lru_cache(maxsize=1024)(_ENCODER.encode)


def _paid_json(m: Paid) -> str:
    return f'{{"type":"paid","seq":{m.seq:d},"balance":{m.balance:d},"paid":{m.paid:d}}}'


def _chunk_json(m: Chunk) -> str:
    return (
        f'{{"type":"chunk","media":{_json_string(m.media)},"index":{m.index:d},'
        f'"start_ms":{m.start_ms:d},"duration_ms":{m.duration_ms:d},"size":{m.size:d}}}'
    )


def _due_json(m: Due) -> str:
    return (
        f'{{"type":"due","total":{m.total:d},"media":{_json_string(m.media)},'
        f'"index":{m.index:d},"duration_ms":{m.duration_ms:d}}}'
    )


#: The three messages of every paid chunk, written by hand: the same text as
#: the generic path (tests/test_messages.py checks it), at a tenth of its cost
#: (``gateway bench``, docs/performance.md "Per-core speed").
_FAST: Final[dict[type[Message], Callable[[Any], str]]] = {
    Paid: _paid_json,
    Chunk: _chunk_json,
    Due: _due_json,
}


def encode(msg: Message) -> str:
    """The compact JSON text frame for ``msg``."""
    fast = _FAST.get(type(msg))
    if fast is not None:
        return fast(msg)
    return _ENCODER.encode(msg.to_wire())
