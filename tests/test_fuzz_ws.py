"""A hypothesis state machine against the real gateway over a real WebSocket.

One gateway with its embedded node (module scope, in its own thread and
event loop) serves every sequence; each sequence is one client on
127.0.0.1 sending random valid and invalid messages: hello, open, fund,
resume, play, pay (right, lower and higher amounts, replayed seq, raised
balance, dust balance, bad, non-canonical and mistyped signatures), stop,
close, garbage, binary frames, and unknown fields of every JSON type on
valid messages. After every step:

* no chunk arrives unpaid: after metering it (the client's own section 7
  bill) the channel's total is covered by what the gateway acknowledged
  (``paid``, ``ready``), which it had made durable first;
* no ``due`` names a total already paid, and none asks more than the
  client's own figure (an overcharge);
* each invalid input gets exactly section 9's ``error`` code, non-fatal on a
  ready channel, and changes nothing;
* the store (``Reports.channel`` over the gateway's SQLite file) holds the
  balance and seq the client was last told.

CI runs ``FUZZ_EXAMPLES`` sequences; ``PAYSTREAM_FUZZ_EXAMPLES=N`` runs N,
and ``PAYSTREAM_FUZZ_SECONDS=S`` repeats such rounds (each freshly seeded)
for S seconds: a long run outside CI. The test prints how many sequences and
messages ran (with ``-s``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import coincurve
import pytest
from conftest_gateway import gateway_config
from helpers_chain import get_transaction
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gateway.chain.rpc import RpcClient
from gateway.chain.watch import btc_to_sat
from gateway.ledger import Reports
from gateway.protocol.channel import ClientChannel, resume_digest
from gateway.protocol.errors import ErrorCode
from gateway.protocol.messages import (
    Chunk,
    Closed,
    Due,
    End,
    Error,
    Message,
    Paid,
    Pay,
    Ready,
    Resume,
    ServerHello,
    Stream,
    Terms,
    encode,
    parse_server_message,
)
from gateway.protocol.scripts import address_to_script_pubkey
from gateway.protocol.signatures import SECP256K1_ORDER, sign_digest
from gateway.protocol.transactions import Outpoint, sign_payment
from gateway.server import Gateway

#: Sequences in CI (each up to STEPS steps); PAYSTREAM_FUZZ_EXAMPLES overrides.
FUZZ_EXAMPLES = 60
STEPS = 40
#: Channel value: the sample media at its rates several times over.
VALUE = 20_000
#: Fundings between blocks (the faucet's unconfirmed chain stays short).
FUNDINGS_PER_BLOCK = 10
MEDIA = ("clip", "song")

RUNS: Counter[str] = Counter()


class _GatewayThread:
    """A gateway (embedded node) serving from its own thread and event loop."""

    def __init__(self, tmp: Path, media: Path) -> None:
        config = gateway_config(tmp, media)
        # One client at a time, many sessions over the module; a dropped
        # channel stays resumable for the whole run.
        config.max_sessions_per_ip = 10_000
        config.max_unfunded_per_ip = 10_000
        config.unpaid_timeout_s = 600.0
        config.idle_timeout_s = 600.0
        config.limits.resume_grace_s = 3600
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.gw = Gateway(config)
        self.call(self.gw.start())
        self.rpc = RpcClient(self.gw.node.rpc_url, cookie_path=self.gw.node.cookie_path)
        self.address = self.call(self.rpc.call("getnewaddress"))
        self.change = address_to_script_pubkey(self.address, "regtest")
        self.fundings = 0
        db = sqlite3.connect(f"file:{config.datadir / 'gateway.db'}?mode=ro", uri=True,
                             check_same_thread=False)
        db.row_factory = sqlite3.Row
        self.db = db
        self.reports = Reports(self)

    def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """The store, read-only (what :class:`Reports` reads through)."""
        return self.db.execute(sql, params).fetchall()

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def fund(self, terms: Terms) -> tuple[Outpoint, int]:
        """The node's wallet pays ``funding_address`` (unconfirmed; min_conf is 0)."""
        async def pay() -> tuple[Outpoint, int]:
            txid = await self.rpc.call("sendtoaddress", terms.funding_address,
                                       f"{VALUE / 1e8:.8f}")
            raw = await get_transaction(self.rpc, txid)
            vout = next(o["n"] for o in raw["vout"]
                        if o["scriptPubKey"]["hex"] == terms.funding_script.hex())
            self.fundings += 1
            if self.fundings % FUNDINGS_PER_BLOCK == 0:
                await self.rpc.call("generatetoaddress", 1, self.address)
            return Outpoint(txid, vout), btc_to_sat(raw["vout"][vout]["value"])

        return self.call(pay())

    def stop(self) -> None:
        self.db.close()
        self.call(self.rpc.close())
        self.call(self.gw.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)
        self.loop.close()


@pytest.fixture(scope="module")
def fuzz_gateway(sample_media: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One gateway for every sequence of the module (fast examples)."""
    tmp = tmp_path_factory.mktemp("fuzz")
    media = tmp / "media"
    shutil.copytree(sample_media, media)
    gt = _GatewayThread(tmp, media)
    yield gt
    gt.stop()


# -- strategies -------------------------------------------------------------------------

_json_leaf = (st.none() | st.booleans() | st.integers(-(2**60), 2**60)
              | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8))
json_values = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=6,
)
#: Unknown fields (section 1: ignored); the "x_" prefix keeps them off every real name.
unknown_fields = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=6).map(lambda k: "x_" + k), json_values, max_size=3
)
#: One field of every JSON type at once.
EVERY_TYPE = {"x_null": None, "x_true": True, "x_int": 3, "x_float": 0.5, "x_str": "s",
              "x_array": [None, 1, "a"], "x_object": {"k": [{}]}}
extras = unknown_fields | st.just(EVERY_TYPE)

GARBAGE = st.sampled_from([
    "not json", "[1, 2]", "42", '"hello"', "null", '{"type": "frobnicate"}', "{}",
    '{"type": 7}', '{"type": "pay", "seq": "1", "balance": 1, "sig": "00"}',
    '{"type": "pay", "seq": 1.0, "balance": 1, "sig": "00"}',
    '{"type": "pay", "seq": -1, "balance": 1, "sig": "00"}',
    '{"type": "play", "media": true}', '{"type": "hello", "version": "2", "agent": "x"}',
    '{"type": "resume", "channel_id": "zz:0", "proof": "00"}', b"\x00binary",
])


def _high_s(sig: bytes) -> bytes:
    """The same signature with S replaced by n - S (valid ECDSA, not low-S: BIP146)."""
    der, sighash = sig[:-1], sig[-1]
    len_r = der[3]
    r = der[4 : 4 + len_r]
    s = SECP256K1_ORDER - int.from_bytes(der[6 + len_r :], "big")
    s_bytes = s.to_bytes((s.bit_length() + 8) // 8, "big")
    body = b"\x02" + bytes([len(r)]) + r + b"\x02" + bytes([len(s_bytes)]) + s_bytes
    return b"\x30" + bytes([len(body)]) + body + bytes([sighash])


# -- the machine -------------------------------------------------------------------------


class GatewayMachine(RuleBasedStateMachine):
    """One client of the gateway: what it was told, and what the gateway must do."""

    gt: _GatewayThread

    def __init__(self) -> None:
        super().__init__()
        RUNS["sequences"] += 1
        self.ws: Any = None
        self.hello: ServerHello | None = None
        #: A channel opened in this session, not funded.
        self.pending: ClientChannel | None = None
        self.terms: Terms | None = None
        #: The funded channel (across sessions until closed) and whether this session holds it.
        self.channel: ClientChannel | None = None
        self.held = False
        #: Channels this client closed (a resume of one is channel_closed).
        self.closed: list[ClientChannel] = []
        #: What the gateway acknowledged: (total paid, balance, seq) of the funded channel.
        self.acked_paid = 0
        self.acked_balance: int | None = None
        self.acked_seq = 0
        self.playing = False
        self.due: Due | None = None

    # -- wire ---------------------------------------------------------------------------

    def _send(self, obj: Any) -> None:
        RUNS["steps"] += 1
        if isinstance(obj, Message):
            obj = encode(obj)
        elif isinstance(obj, dict):
            obj = json.dumps(obj)
        self.ws.send(obj)

    def _recv(self) -> Message:
        raw = self.ws.recv(timeout=20)
        assert isinstance(raw, str), "a binary frame without its chunk message (section 1)"
        msg = parse_server_message(raw)
        self._check(msg)
        return msg

    def _check(self, msg: Message) -> None:
        """The invariants every server message must keep."""
        ch = self.channel if self.held else None
        if isinstance(msg, Due):
            assert ch is not None and self.playing, f"due without a stream: {msg}"
            assert msg.total > self.acked_paid, f"due for a total already paid: {msg}"
            ch.meter.check_due(msg)  # OverchargeError: more than section 7 gives
            self.due = msg
        elif isinstance(msg, Chunk):
            assert ch is not None and self.playing, f"chunk without a stream: {msg}"
            data = self.ws.recv(timeout=20)
            assert isinstance(data, bytes) and len(data) == msg.size
            ch.on_chunk(msg)
            assert ch.meter.figure <= self.acked_paid, (
                f"chunk {msg.media}#{msg.index} sent with {self.acked_paid} sat paid; "
                f"it needs {ch.meter.figure}"
            )
            if self.due is not None and (self.due.media, self.due.index) == (msg.media, msg.index):
                self.due = None
            RUNS["chunks"] += 1
        elif isinstance(msg, Paid):
            assert ch is not None
            ch.on_paid(msg)
            assert (msg.seq, msg.balance) == (ch.seq, ch.balance), (msg, ch.seq, ch.balance)
            self.acked_paid, self.acked_balance, self.acked_seq = msg.paid, msg.balance, msg.seq
        elif isinstance(msg, Stream):
            assert ch is not None
            ch.on_stream(msg)
            RUNS["streams"] += 1
        elif isinstance(msg, End):
            self.playing, self.due = False, None

    def _until(self, kind: type[Any]) -> Any:
        while True:
            msg = self._recv()
            if isinstance(msg, kind):
                return msg
            assert not isinstance(msg, Error), f"expected {kind.__name__}, got {msg}"

    def _error(self, code: ErrorCode, *, fatal: bool = False) -> None:
        """The next message is section 9's ``error`` ``code``; nothing changed."""
        before = self._stored()
        msg = self._recv()
        assert isinstance(msg, Error), f"expected error {code.value}, got {msg}"
        assert (msg.code, msg.fatal) == (code, fatal), msg
        RUNS[f"error {code.value}"] += 1
        if fatal:
            self._gone()
        assert self._stored() == before

    def _settle_stream(self) -> None:
        """Read what the stream sends until it waits on a due or ends."""
        while self.held and self.playing and self.due is None:
            msg = self._recv()
            assert not isinstance(msg, Error), msg

    def _gone(self) -> None:
        """The socket is over (fatal error, close, disconnect)."""
        if self.ws is not None:
            self.ws.close()
        self.ws, self.hello, self.pending, self.held = None, None, None, False
        self.playing, self.due = False, None

    def _stored(self) -> tuple[Any, ...] | None:
        if self.channel is None or self.channel.outpoint is None:
            return None
        cid = self.channel.outpoint.channel_id
        row = self.gt.reports.channel(cid)
        seq = self.gt.read("SELECT seq FROM channels WHERE channel_id = ?", (cid,))[0]["seq"]
        assert row is not None
        return row["state"], row["balance"], seq

    @invariant()
    def store_agrees_with_what_the_client_was_told(self) -> None:
        if self.channel is None or self.channel.outpoint is None:
            return
        stored = self._stored()
        assert stored is not None
        state, balance, seq = stored
        assert state == "ready", stored  # open, resumable: nothing settles it meanwhile
        if balance is None:  # nothing paid yet
            balance = self.channel.value
        assert (balance, seq or 0) == (self.acked_balance, self.acked_seq), (stored,
                                                                              self.acked_balance)

    # -- rules ------------------------------------------------------------------------------

    def _connect(self) -> None:
        self.ws = connect(f"ws://127.0.0.1:{self.gt.gw.port}/paystream/2", compression=None,
                          max_size=None, legacy=True)

    @initialize(start=st.sampled_from(["ready", "ready", "ready", "hello", "socket"]))
    def start(self, start: str) -> None:
        """Most sequences start on a ready channel: the paid path is where the money is."""
        self._connect()
        if start != "socket":
            self.say_hello(extra={})
        if start == "ready":
            self.open_channel(extra={}, bad=None)
            self.fund_channel(extra={}, unknown_output=False)

    @precondition(lambda self: self.ws is None)
    @rule()
    def reconnect(self) -> None:
        self._connect()

    @precondition(lambda self: self.ws is not None and self.hello is None)
    @rule(extra=extras)
    def say_hello(self, extra: dict[str, Any]) -> None:
        self._send({"type": "hello", "version": 2, "agent": "fuzz", **extra})
        if self.hello is not None:
            self._error(ErrorCode.BAD_STATE)
            return
        msg = self._recv()
        assert isinstance(msg, ServerHello), msg
        self.hello = msg

    @precondition(lambda self: self.ws is not None)
    @rule(now=st.integers(0, 5))
    def hello_version_1(self, now: int) -> None:
        if now < 5:  # fatal: not too often, or sequences never reach the money
            return
        self._send({"type": "hello", "version": 1, "agent": "fuzz"})
        self._error(ErrorCode.UNSUPPORTED_VERSION, fatal=True)

    @precondition(lambda self: self.hello is not None and not self.held and self.pending is None)
    @rule(extra=extras, bad=st.sampled_from([None, None, "key", "expiry"]))
    def open_channel(self, extra: dict[str, Any], bad: str | None) -> None:
        if self.hello is None:
            key = coincurve.PrivateKey().public_key.format().hex()
            self._send({"type": "open", "client_pubkey": key,
                        "expiry": int(time.time()) + 7200, "change_script": "0014" + "00" * 20})
            self._error(ErrorCode.BAD_STATE)
            return
        channel = ClientChannel(coincurve.PrivateKey().secret, self.hello, budget=VALUE)
        msg = json.loads(encode(channel.open(expiry=int(time.time()) + 6 * 3600,
                                             change_script=self.gt.change)))
        if bad == "key":
            msg["client_pubkey"] = "02" + "00" * 32  # x = 0 is not on the curve
        elif bad == "expiry":
            msg["expiry"] = int(time.time()) - 60
        self._send({**msg, **extra})
        if self.pending is not None or self.held:
            self._error(ErrorCode.BAD_STATE)
        elif bad is not None:
            self._error(ErrorCode.BAD_KEY if bad == "key" else ErrorCode.BAD_EXPIRY)
        else:
            terms = self._recv()
            assert isinstance(terms, Terms), terms
            channel.accept_terms(terms)
            self.pending, self.terms = channel, terms

    @precondition(lambda self: self.pending is not None)
    @rule(extra=extras, unknown_output=st.sampled_from([False, False, True]))
    def fund_channel(self, extra: dict[str, Any], unknown_output: bool) -> None:
        pending = self.pending
        if pending is None or unknown_output:
            self._send({"type": "fund", "txid": "ab" * 32, "vout": 0, **extra})
            self._error(ErrorCode.BAD_STATE if pending is None else ErrorCode.FUNDING_NOT_FOUND)
            return
        assert self.terms is not None
        outpoint, value = self.gt.fund(self.terms)
        self._send({**json.loads(encode(pending.fund(outpoint, value))), **extra})
        ready = self._until(Ready)
        pending.on_ready(ready)
        # An earlier channel is left (resumable, then settled): no longer followed.
        self.channel, self.pending, self.held = pending, None, True
        self.acked_paid, self.acked_balance, self.acked_seq = ready.paid, ready.balance, 0
        self.playing, self.due = False, None
        RUNS["channels"] += 1

    @precondition(lambda self: self.hello is not None and not self.held and self.pending is None)
    @rule(proof=st.sampled_from(["valid", "valid", "wrong_key", "unknown", "closed"]))
    def resume(self, proof: str) -> None:
        assert self.hello is not None
        channel = self.channel
        if proof == "closed" and self.closed:
            gone = self.closed[-1]
            assert gone.outpoint is not None
            cid = gone.outpoint.channel_id
            msg = Resume(channel_id=cid, proof=sign_digest(gone._privkey,
                                                          resume_digest(cid, self.hello.nonce)))
        elif proof in ("unknown", "closed") or channel is None or channel.outpoint is None:
            msg = Resume(channel_id="cd" * 32 + ":7",
                         proof=sign_digest(coincurve.PrivateKey().secret, b"\x01" * 32))
            proof = "unknown"
        elif proof == "wrong_key" or self.held or self.pending is not None:
            cid = channel.outpoint.channel_id
            msg = Resume(channel_id=cid, proof=sign_digest(coincurve.PrivateKey().secret,
                                                          resume_digest(cid, self.hello.nonce)))
            proof = "wrong_key" if proof != "valid" else proof
        else:
            msg = channel.resume(self.hello)
        self._send(msg)
        if self.held or self.pending is not None:
            self._error(ErrorCode.BAD_STATE)
        elif proof == "unknown":
            self._error(ErrorCode.CHANNEL_UNKNOWN)
        elif proof == "wrong_key":
            self._error(ErrorCode.BAD_SIGNATURE)
        elif proof == "closed":
            self._error(ErrorCode.CHANNEL_CLOSED, fatal=True)
        else:
            assert channel is not None
            ready = self._until(Ready)
            channel.on_ready(ready)
            assert (ready.balance, ready.paid) == (self.acked_balance, self.acked_paid)
            self.held, self.playing, self.due = True, False, None
            RUNS["resumes"] += 1

    @precondition(lambda self: self.held)
    @rule(media=st.sampled_from([*MEDIA, *MEDIA, "nope"]), extra=extras)
    def play(self, media: str, extra: dict[str, Any]) -> None:
        self._send({"type": "play", "media": media, **extra})
        if not self.held:
            self._error(ErrorCode.BAD_STATE)
        elif media == "nope":
            self._error(ErrorCode.MEDIA_UNKNOWN)
        else:
            if self.playing:
                end = self._until(End)
                assert end.reason == "stopped"
            self.due = None
            self.playing = True
            stream = self._until(Stream)
            assert stream.media == media
            self._settle_stream()

    @precondition(lambda self: self.held)
    @rule(how=st.sampled_from(["exact", "exact", "lower", "over", "bad_sig", "high_s",
                               "sighash", "not_der", "seq_replay", "balance_up", "dust"]),
          extra=extras, data=st.data())
    def pay(self, how: str, extra: dict[str, Any], data: st.DataObject) -> None:
        ch = self.channel
        assert ch is not None and ch.value is not None and ch._template is not None
        target = self.due.total if self.due is not None else ch.paid + 1
        balance_now = ch.balance if ch.balance is not None else ch.value
        if how == "lower" and target - ch.paid >= 2:
            total = data.draw(st.integers(ch.paid + 1, target - 1))
        elif how == "over":
            total = target + data.draw(st.integers(1, 40))
        else:
            total = target
        if ch.value - total < 546 and how not in ("dust",):
            total = ch.value  # pay out the rest: balance 0 (section 3)
        if how in ("exact", "lower", "over"):
            if total <= ch.paid:
                return
            pay = ch.pay_due(self.due) if (how == "exact" and self.due is not None
                                          and total == self.due.total) else ch.pay(total)
            self._send({**json.loads(encode(pay)), **extra})
            paid = self._until(Paid)
            assert paid.paid == total
            RUNS["paid"] += 1
            if self.due is not None and total < self.due.total:
                again = self._until(Due)  # section 7: the same due again
                assert again.total == self.due.total
            else:
                self.due = None if (self.due is not None and total >= self.due.total) else self.due
                self._settle_stream()
            return
        seq, balance = ch.seq + 1, ch.value - total
        expected = ErrorCode.BAD_SIGNATURE
        sig = sign_payment(ch._template, ch._privkey, balance)
        if how == "bad_sig":
            sig = sign_payment(ch._template, coincurve.PrivateKey().secret, balance)
        elif how == "high_s":
            sig, expected = _high_s(sig), ErrorCode.NON_CANONICAL_SIGNATURE
        elif how == "sighash":
            sig, expected = sig[:-1] + b"\x01", ErrorCode.NON_CANONICAL_SIGNATURE
        elif how == "not_der":
            sig, expected = b"\x30\x02\x02\x00\x83", ErrorCode.NON_CANONICAL_SIGNATURE
        elif how == "seq_replay":
            if ch.seq == 0:  # nothing recorded yet: any first seq rises (section 5)
                return
            seq, expected = ch.seq, ErrorCode.SEQ_NOT_INCREASING
        elif how == "balance_up":
            # Checked before the signature (section 9's order): any signature will do.
            balance, expected = balance_now + 1, ErrorCode.BALANCE_INCREASED
            sig = sign_payment(ch._template, ch._privkey, balance_now)
        elif how == "dust":
            if balance_now < 1:
                return
            balance = data.draw(st.integers(1, min(545, balance_now)))
            expected = ErrorCode.VALUE_OUT_OF_RANGE
        self._send({**json.loads(encode(Pay(seq=seq, balance=balance, sig=sig))), **extra})
        self._error(expected)

    @precondition(lambda self: self.held and self.playing)
    @rule(extra=extras)
    def stop(self, extra: dict[str, Any]) -> None:
        self._send({"type": "stop", **extra})
        if not self.held or not self.playing:
            self._error(ErrorCode.BAD_STATE)
            return
        end = self._until(End)
        assert end.reason == "stopped"

    @precondition(lambda self: self.held or self.pending is not None)
    @rule(extra=extras, now=st.integers(0, 3))
    def close(self, extra: dict[str, Any], now: int) -> None:
        if now < 3:  # it ends the channel: not too often
            return
        self._send({"type": "close", **extra})
        if not self.held and self.pending is None:
            self._error(ErrorCode.BAD_STATE)
            return
        closed = self._until(Closed)
        if self.held:
            assert self.channel is not None and self.channel.outpoint is not None
            assert closed.paid == self.acked_paid
            stored = self._stored()
            assert stored is not None and stored[0] in ("closing", "closed"), stored
            self.closed.append(self.channel)
            self.channel = None
        else:
            assert closed.txid is None and closed.paid == 0
        with pytest.raises(ConnectionClosed):
            self.ws.recv(timeout=10)
        self._gone()
        RUNS["closes"] += 1

    @precondition(lambda self: self.ws is not None)
    @rule(frame=GARBAGE)
    def garbage(self, frame: str | bytes) -> None:
        self._send(frame)
        self._error(ErrorCode.BAD_MESSAGE)

    @precondition(lambda self: self.ws is not None)
    @rule(data=st.data(), extra=extras)
    def out_of_order(self, data: st.DataObject, extra: dict[str, Any]) -> None:
        """A valid message the session's state does not allow (section 4): bad_state."""
        key = coincurve.PrivateKey().public_key.format().hex()
        choices = [{"type": "close"}]
        if self.hello is None:
            choices += [{"type": "stop"}, {"type": "open", "client_pubkey": key,
                        "expiry": int(time.time()) + 7200, "change_script": "0014" + "00" * 20}]
        else:
            choices += [{"type": "hello", "version": 2, "agent": "again"},
                        {"type": "fund", "txid": "ab" * 32, "vout": 1}]
        if not self.held:
            choices += [{"type": "play", "media": "clip"}, {"type": "stop"},
                        {"type": "pay", "seq": 1, "balance": 1000, "sig": "300602010102010183"}]
        elif not self.playing:
            choices.append({"type": "stop"})
        if self.held or self.pending is not None:
            choices += [{"type": "open", "client_pubkey": key, "expiry": int(time.time()) + 7200,
                         "change_script": "0014" + "00" * 20},
                        {"type": "resume", "channel_id": "ab" * 32 + ":0",
                         "proof": "3006020101020101"}]
        msg = data.draw(st.sampled_from(choices))
        if msg["type"] == "close" and (self.held or self.pending is not None) \
                and self.hello is not None:
            return  # a valid close: the close rule's
        if msg["type"] == "fund" and self.pending is not None:
            return  # funding_not_found: the fund rule's
        self._send({**msg, **extra})
        self._error(ErrorCode.BAD_STATE)

    @precondition(lambda self: self.ws is not None)
    @rule(now=st.integers(0, 3))
    def disconnect(self, now: int) -> None:
        if now < 3:
            return
        self._gone()
        RUNS["disconnects"] += 1

    def teardown(self) -> None:
        self._gone()


def test_random_message_sequences_keep_every_money_rule(fuzz_gateway: _GatewayThread) -> None:
    GatewayMachine.gt = fuzz_gateway
    examples = int(os.environ.get("PAYSTREAM_FUZZ_EXAMPLES", FUZZ_EXAMPLES))
    # A long run outside CI: rounds of `examples` sequences, each freshly seeded,
    # until this many seconds have passed.
    seconds = float(os.environ.get("PAYSTREAM_FUZZ_SECONDS", 0))
    RUNS.clear()
    started = time.monotonic()
    while True:
        run_state_machine_as_test(GatewayMachine, settings=settings(
            max_examples=examples, stateful_step_count=STEPS, deadline=None,
            suppress_health_check=list(HealthCheck), database=None,
        ))
        RUNS["rounds"] += 1
        # Random sequences may miss the paid path in a short run: another
        # round (at most five) until they reached it.
        covered = RUNS["paid"] > 0 and RUNS["chunks"] > 0
        if time.monotonic() - started >= seconds and (covered or RUNS["rounds"] >= 5):
            break
    print(f"\nfuzz: {RUNS['sequences']} sequences, {RUNS['steps']} messages sent "
          f"in {time.monotonic() - started:.0f} s; {dict(sorted(RUNS.items()))}")
    assert RUNS["sequences"] >= examples and RUNS["paid"] > 0 and RUNS["chunks"] > 0
