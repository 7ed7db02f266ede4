"""protocol.md sections 1, 5, 6: every message parses, validates and round-trips."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.protocol.messages import (
    FEATURE_PAY_BINARY,
    MAX_INT,
    MAX_MONEY,
    Chunk,
    Close,
    Closed,
    Due,
    End,
    Error,
    Fund,
    Funding,
    Hello,
    Limits,
    Open,
    Paid,
    Pay,
    Play,
    Ready,
    Refund,
    RefundSigned,
    Resume,
    ServerHello,
    Stop,
    Stream,
    Terms,
    encode,
    encode_pay_binary,
    parse_client_binary,
    parse_client_message,
    parse_server_message,
)

TXID = "ab" * 32
KEY = b"\x02" + b"\x11" * 32
LIMITS = Limits(
    min_value=10_000,
    max_value=10_000_000,
    min_expiry_s=3_600,
    max_expiry_s=30 * 86_400,
    min_conf=1,
    settle_margin_s=3_600,
    resume_grace_s=120,
)

CLIENT_MESSAGES = [
    Hello(version=2, agent="player/0.1"),
    Open(client_pubkey=KEY, expiry=800_000, change_script=b"\x00\x14" + b"\x22" * 20),
    Open(client_pubkey=KEY, expiry=1_900_000_000, change_script=b"\x51", kind="multisig"),
    Refund(tx=b"\x02\x00\x00\x00", value=100_000),
    Fund(),
    Fund(txid=TXID, vout=1),
    Fund(txid=TXID, vout=0, tx=b"\x01\x02"),
    Fund(tx=b"\x01\x02"),
    Resume(channel_id=f"{TXID}:3", proof=b"\x30\x06"),
    Play(media="song-1"),
    Play(media="film", start_ms=61_000),
    Pay(seq=7, balance=99_000, sig=b"\x30" * 71 + b"\x83"),
    Pay(seq=MAX_INT, balance=MAX_MONEY, sig=b""),
    Stop(),
    Close(),
]

SERVER_MESSAGES = [
    ServerHello(version=2, agent="gw", network="regtest", nonce=b"\x07" * 32, limits=LIMITS),
    ServerHello(version=2, agent="gw", network="main", nonce=b"\x07" * 32, limits=LIMITS,
                features=(FEATURE_PAY_BINARY, "something_later")),
    Terms(
        kind="cltv",
        server_pubkey=KEY,
        witness_script=b"\x63",
        funding_address="bcrt1qxyz",
        funding_script=b"\x00\x20" + b"\x01" * 32,
        expiry=800_000,
        exit_fee=272,
        exit_vbytes=136,
    ),
    RefundSigned(sig=b"\x30\x01"),
    Funding(txid=TXID, vout=0, confirmations=0, needed=1),
    Ready(
        channel_id=f"{TXID}:0", value=100_000, balance=100_000, paid=0, expiry=800_000,
        exit_fee=272,
    ),
    Stream(
        media="song-1",
        title="Song",
        mime='audio/webm; codecs="opus"',
        rate_msat=2_500,
        free_ms=60_000,
        free_used_ms=60_000,
        duration_ms=180_000,
        chunks=90,
    ),
    Chunk(media="song-1", index=-1, start_ms=0, duration_ms=0, size=900),
    Chunk(media="song-1", index=4, start_ms=8_000, duration_ms=2_000, size=30_000),
    Due(total=3, media="song-1", index=31, duration_ms=2_000),
    Due(total=272, media="song-1", index=-1, duration_ms=0),  # the reserve
    Paid(seq=3, balance=99_997, paid=3),
    End(media="song-1", reason="finished"),
    Closed(txid=TXID, paid=3, balance=99_997, exit_fee=0),
    Closed(txid=None, paid=272, balance=99_728, exit_fee=272, settle_by=1_800_000_000),
    Closed(txid=None, paid=0, balance=100_000, exit_fee=272),
    Error(code=ErrorCode.BAD_STATE, message="no", fatal=False),
]


@pytest.mark.parametrize("msg", CLIENT_MESSAGES, ids=lambda m: m.type)
def test_client_round_trip(msg):
    text = encode(msg)
    assert json.loads(text)["type"] == msg.type
    assert parse_client_message(text) == msg
    assert parse_client_message(text.encode()) == msg


@pytest.mark.parametrize("msg", SERVER_MESSAGES, ids=lambda m: m.type)
def test_server_round_trip(msg):
    assert parse_server_message(encode(msg)) == msg


def test_wire_shape_is_protocol_shape():
    assert json.loads(encode(Pay(seq=1, balance=546, sig=b"\xab\x83"))) == {
        "type": "pay",
        "seq": 1,
        "balance": 546,
        "sig": "ab83",
    }
    assert json.loads(encode(Fund())) == {"type": "fund"}
    assert json.loads(encode(Closed(txid=None, paid=0, balance=5, exit_fee=0)))["txid"] is None
    hello = json.loads(encode(SERVER_MESSAGES[0]))
    assert hello["nonce"] == "07" * 32 and hello["limits"]["dust_limit"] == 546


def test_defaults_and_unknown_fields_ignored():
    msg = parse_client_message(
        '{"type":"open","client_pubkey":"02","expiry":5,"change_script":"51","extra":[1,{}]}'
    )
    assert msg == Open(client_pubkey=b"\x02", expiry=5, change_script=b"\x51", kind="cltv")
    assert parse_client_message('{"type":"play","media":"m"}') == Play(media="m", start_ms=0)


@pytest.mark.parametrize(
    "extra",
    ["0.5", "1e2", "-0.0", "NaN", "Infinity", "true", "null", '"x"', "[1.5, {}]",
     '{"a": 2.5, "b": [1e9]}', "123456789012345678901234567890"],
)
def test_unknown_fields_of_every_json_type_are_ignored(extra):
    """Section 1: unknown fields MUST be ignored, whatever their JSON value."""
    hello = f'{{"type":"hello","version":2,"agent":"a","x_ext":{extra}}}'
    assert parse_client_message(hello) == parse_client_message(
        '{"type":"hello","version":2,"agent":"a"}'
    )
    nested = _server_hello(**{"limits.x_ext": json.loads(extra.replace("NaN", "0.5")
                                                         .replace("Infinity", "1e9"))})
    assert parse_server_message(nested) == SERVER_MESSAGES[0]


def test_error_from_exception():
    exc = ProtocolError(ErrorCode.SESSION_REPLACED, "resumed elsewhere")
    error = Error.from_exception(exc)
    assert error == Error(code=ErrorCode.SESSION_REPLACED, message="resumed elsewhere", fatal=True)
    # errors.py's own wire shape is a valid section 6 `error`
    assert parse_server_message(json.dumps(exc.to_wire())) == error
    assert error.to_wire() == exc.to_wire()


def _pay(**fields):
    base = {"type": "pay", "seq": 1, "balance": 1000, "sig": "3083"}
    base.update(fields)
    return json.dumps(base)


BAD_CLIENT = [
    # (text, substring the message must contain)
    ("not json", "not valid JSON"),
    ("", "not valid JSON"),
    (b"\xff\xfe", "UTF-8"),
    ("[1, 2]", "expected a JSON object"),
    ('"pay"', "expected a JSON object"),
    ("{}", "message.type"),
    ('{"type": 5}', "message.type"),
    ('{"type": "teleport"}', "unknown type"),
    ('{"type": "ready"}', "unknown type"),  # a server message from a client
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (_pay(seq="1"), "pay.seq: expected an integer, got a string"),
    (_pay(seq=True), "pay.seq: expected an integer, got a boolean"),
    (_pay(seq=None), "pay.seq: expected an integer, got null"),
    (_pay(seq=-1), "pay.seq: integer out of range"),
    (_pay(seq=MAX_INT + 1), "pay.seq: integer out of range"),
    (_pay(balance=MAX_MONEY + 1), "pay.balance: integer out of range"),
    (_pay(balance=-5), "pay.balance: integer out of range"),
    ('{"type":"pay","seq":1.0,"balance":1,"sig":""}', "not an integer"),
    ('{"type":"pay","seq":1e2,"balance":1,"sig":""}', "not an integer"),
    ('{"type":"pay","seq":NaN,"balance":1,"sig":""}', "not an integer"),
    ('{"type":"pay","seq":Infinity,"balance":1,"sig":""}', "not an integer"),
    ('{"type":"pay","seq":' + "9" * 5000 + ',"balance":1,"sig":""}', "out of range"),
    ('{"type":"pay","seq":' + "9" * 400 + ',"balance":1,"sig":""}', "pay.seq"),
    (_pay(sig="ABCD"), "pay.sig: not lowercase hex"),
    (_pay(sig="abc"), "pay.sig: odd-length hex"),
    (_pay(sig="zz"), "pay.sig: not lowercase hex"),
    (_pay(sig=" ab"), "pay.sig: odd-length"),
    (_pay(sig="ab" * 129), "pay.sig: hex longer than 128 bytes"),
    (_pay(sig=["ab"]), "pay.sig: expected a hex string, got an array"),
    (_pay(sig={"a": 1}), "pay.sig: expected a hex string, got an object"),
    ('{"type":"pay","seq":1,"balance":1}', "pay.sig: missing field"),
    ('{"type":"hello","version":"1","agent":"x"}', "hello.version: expected an integer"),
    ('{"type":"hello","version":1}', "hello.agent: missing field"),
    ('{"type":"hello","version":1,"agent":"' + "a" * 1001 + '"}', "hello.agent: string longer"),
    (
        '{"type":"open","kind":"lightning","client_pubkey":"02","expiry":1,"change_script":"51"}',
        "open.kind: expected one of cltv, multisig",
    ),
    ('{"type":"open","client_pubkey":"02","expiry":1}', "open.change_script: missing"),
    ('{"type":"refund","tx":"00","value":2100000000000001}', "refund.value: integer out"),
    ('{"type":"fund","txid":"' + TXID + '"}', "fund: txid and vout go together"),
    ('{"type":"fund","vout":0}', "fund: txid and vout go together"),
    ('{"type":"fund","txid":"' + TXID.upper() + '","vout":0}', "fund.txid: expected a txid"),
    ('{"type":"fund","txid":"ab","vout":0}', "fund.txid: expected a txid"),
    # An output index is 32 bits (section 1): no transaction has output 2^32.
    (
        '{"type":"fund","txid":"' + TXID + '","vout":4294967296}',
        "fund.vout: integer out of range 0..4294967295",
    ),
    ('{"type":"fund","txid":null,"vout":null}', "fund.txid: expected a string, got null"),
    ('{"type":"resume","channel_id":"' + TXID + '","proof":""}', "resume.channel_id"),
    ('{"type":"resume","channel_id":"' + TXID + ':01","proof":""}', "resume.channel_id"),
    ('{"type":"resume","channel_id":"' + TXID + ':-1","proof":""}', "resume.channel_id"),
    ('{"type":"resume","channel_id":7,"proof":""}', "resume.channel_id: expected a string"),
    ('{"type":"play","media":""}', "play.media: empty string"),
    ('{"type":"play","media":"m","start_ms":-1}', "play.start_ms: integer out of range"),
]


@pytest.mark.parametrize(("text", "needle"), BAD_CLIENT)
def test_bad_client_messages(text, needle):
    with pytest.raises(ProtocolError) as info:
        parse_client_message(text)
    assert info.value.code is ErrorCode.BAD_MESSAGE
    assert needle in info.value.message
    assert info.value.fatal is False
    # the message never carries Python internals
    assert "Traceback" not in info.value.message and "sys." not in info.value.message


@pytest.mark.parametrize("version", [0, 1, 3, 99])
def test_unsupported_version_is_fatal(version):
    for parse, extra in (
        (parse_client_message, ""),
        (
            parse_server_message,
            ',"network":"main","nonce":"'
            + "00" * 32
            + '","limits":'
            + json.dumps(LIMITS.to_wire()),
        ),
    ):
        with pytest.raises(ProtocolError) as info:
            parse(f'{{"type":"hello","version":{version},"agent":"a"{extra}}}')
        assert info.value.code is ErrorCode.UNSUPPORTED_VERSION
        assert info.value.fatal is True


BAD_SERVER = [
    ('{"type":"pay","seq":1,"balance":1,"sig":""}', "unknown type"),
    ('{"type":"chunk","media":"m","index":-2,"start_ms":0,"duration_ms":1,"size":1}', "index"),
    ('{"type":"due","total":1,"media":"m","index":-2,"duration_ms":1}', "due.index"),
    ('{"type":"end","media":"m","reason":"bored"}', "end.reason"),
    ('{"type":"closed","txid":5,"paid":0,"balance":0}', "closed.txid"),
    ('{"type":"error","code":"oops","message":"","fatal":true}', "error.code"),
    ('{"type":"error","code":"busy","message":"","fatal":1}', "error.fatal: expected a boolean"),
    (
        '{"type":"stream","media":"m","title":"","mime":"","rate_msat":1,"free_ms":5,'
        '"free_used_ms":6,"duration_ms":1,"chunks":1}',
        "stream.free_used_ms: above free_ms",
    ),
    ('{"type":"refund_signed","sig":"0"}', "refund_signed.sig: odd-length"),
]


def _server_hello(**changes):
    obj = json.loads(encode(SERVER_MESSAGES[0]))
    for key, value in changes.items():
        if key.startswith("limits."):
            obj["limits"][key.removeprefix("limits.")] = value
        else:
            obj[key] = value
    return json.dumps(obj)


BAD_SERVER += [
    (_server_hello(nonce="00" * 31), "hello.nonce: expected 32 bytes"),
    (_server_hello(network="mainnet"), "hello.network"),
    (_server_hello(limits=[]), "hello.limits: expected an object"),
    (_server_hello(**{"limits.min_value": 10**9, "limits.max_value": 1}), "min_value above"),
    (_server_hello(**{"limits.min_expiry_s": 9, "limits.max_expiry_s": 1}), "min_expiry_s"),
    (_server_hello(**{"limits.min_conf": 1.5}), "not an integer"),
    (_server_hello(**{"limits.settle_margin_s": "x"}), "hello.limits.settle_margin_s"),
]


@pytest.mark.parametrize(("text", "needle"), BAD_SERVER)
def test_bad_server_messages(text, needle):
    with pytest.raises(ProtocolError) as info:
        parse_server_message(text)
    assert info.value.code is ErrorCode.BAD_MESSAGE
    assert needle in info.value.message


def test_boundaries_accepted():
    assert parse_client_message(_pay(seq=0, balance=0)) == Pay(seq=0, balance=0, sig=b"\x30\x83")
    top = Pay(seq=MAX_INT, balance=MAX_MONEY, sig=b"\x30\x83")
    assert parse_client_message(_pay(seq=MAX_INT, balance=MAX_MONEY)) == top
    assert parse_client_message('{"type":"pay","seq":-0,"balance":0,"sig":""}') == Pay(
        seq=0, balance=0, sig=b""
    )


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=12,
)
TYPES = st.sampled_from(
    [
        "hello",
        "open",
        "refund",
        "fund",
        "resume",
        "play",
        "pay",
        "stop",
        "close",
        "terms",
        "due",
        "chunk",
        "stream",
        "error",
        "closed",
        "ready",
        "x",
    ]
)
FIELDS = st.sampled_from(
    [
        "version",
        "agent",
        "kind",
        "client_pubkey",
        "expiry",
        "change_script",
        "tx",
        "value",
        "txid",
        "vout",
        "channel_id",
        "proof",
        "media",
        "start_ms",
        "seq",
        "balance",
        "sig",
        "nonce",
        "limits",
        "total",
        "index",
        "duration_ms",
        "code",
        "message",
        "fatal",
    ]
)


@settings(max_examples=400, deadline=None)
@given(TYPES, st.dictionaries(FIELDS, JSON_VALUES, max_size=6))
def test_fuzz_accept_or_documented_error(type_, fields):
    """Every input parses or raises ProtocolError (websockets fuzzing style)."""
    text = json.dumps({"type": type_, **fields})
    for parse in (parse_client_message, parse_server_message):
        try:
            msg = parse(text)
        except ProtocolError as exc:
            assert exc.code in (ErrorCode.BAD_MESSAGE, ErrorCode.UNSUPPORTED_VERSION)
        else:
            assert parse(encode(msg)) == msg


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64) | st.text(max_size=64))
def test_fuzz_raw_text(raw):
    for parse in (parse_client_message, parse_server_message):
        try:
            parse(raw)
        except ProtocolError as exc:
            assert exc.code in (ErrorCode.BAD_MESSAGE, ErrorCode.UNSUPPORTED_VERSION)


# -- hello.features and the binary pay (section 5a) -----------------------------------


def test_hello_features_are_optional_and_listed():
    wire = json.loads(encode(SERVER_MESSAGES[0]))
    del wire["features"]
    assert parse_server_message(json.dumps(wire)).features == ()  # an older gateway
    wire["features"] = ["pay_binary", "not_yet_invented"]
    assert parse_server_message(json.dumps(wire)).features == ("pay_binary", "not_yet_invented")
    for bad in ("pay_binary", [1], {"pay_binary": True}):
        with pytest.raises(ProtocolError) as info:
            parse_server_message(json.dumps({**wire, "features": bad}))
        assert info.value.code is ErrorCode.BAD_MESSAGE and "hello.features" in info.value.message


@pytest.mark.parametrize("pay", [m for m in CLIENT_MESSAGES if isinstance(m, Pay)]
                         + [Pay(seq=0, balance=0, sig=b"\x30" * 128)])
def test_binary_pay_round_trip_equals_json_pay(pay):
    frame = encode_pay_binary(pay)
    assert len(frame) == 17 + len(pay.sig)
    assert parse_client_binary(frame) == pay == parse_client_message(encode(pay))


def test_binary_pay_layout():
    frame = encode_pay_binary(Pay(seq=2, balance=0x0102, sig=b"\xab\x83"))
    assert frame == bytes([1]) + (2).to_bytes(8, "big") + (0x0102).to_bytes(8, "big") + b"\xab\x83"


def _binary(kind: int = 1, seq: int = 2, balance: int = 1000, sig: bytes = b"\x30\x83") -> bytes:
    return bytes([kind]) + seq.to_bytes(8, "big") + balance.to_bytes(8, "big") + sig


@pytest.mark.parametrize("frame, needle", [
    (b"", "too short"),
    (b"\x01" + b"\x00" * 15, "too short"),
    (_binary(kind=0), "unknown binary frame kind"),
    (_binary(kind=2), "unknown binary frame kind"),
    (_binary(seq=MAX_INT + 1), "pay.seq"),
    (_binary(seq=2**64 - 1), "pay.seq"),
    (_binary(balance=MAX_MONEY + 1), "pay.balance"),
    (_binary(sig=b"\x30" * 129), "pay.sig"),
])
def test_bad_binary_pay_is_bad_message(frame, needle):
    with pytest.raises(ProtocolError) as info:
        parse_client_binary(frame)
    assert info.value.code is ErrorCode.BAD_MESSAGE and not info.value.fatal
    assert needle in info.value.message


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_binary_frames(raw):
    try:
        pay = parse_client_binary(raw)
    except ProtocolError as exc:
        assert exc.code is ErrorCode.BAD_MESSAGE
    else:
        assert encode_pay_binary(pay) == raw


@settings(max_examples=300, deadline=None)
@given(
    st.text(min_size=1, max_size=40),
    st.integers(-1, MAX_INT),
    st.integers(0, MAX_INT),
    st.integers(0, MAX_MONEY),
)
def test_hand_written_hot_messages_are_the_generic_json(media, index, n, amount):
    """``paid``, ``chunk`` and ``due`` have their own encoders: the same text, byte for byte."""
    for msg in (
        Paid(seq=n, balance=amount, paid=amount // 2),
        Chunk(media=media, index=index, start_ms=n, duration_ms=n // 3, size=n // 7),
        Due(total=amount, media=media, index=index, duration_ms=n),
    ):
        generic = json.dumps(msg.to_wire(), separators=(",", ":"))
        assert encode(msg) == generic
        assert parse_server_message(encode(msg)) == msg
