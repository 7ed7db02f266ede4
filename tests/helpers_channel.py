"""A ClientChannel and a ServerChannel joined in memory (h11's ConnectionPair).

Every message between them goes through ``encode`` and the real parser, so
the pair also exercises protocol.md's wire shapes. :meth:`ChannelPair.play`
is a minimal gateway loop of section 7 (quote, ``due``, ``pay``, ``paid``,
chunk, commit) with the money invariants asserted at every step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from fractions import Fraction

from gateway.protocol.channel import ClientChannel, PaymentRecord, ServerChannel, ServerState
from gateway.protocol.messages import (
    Chunk,
    Due,
    Limits,
    Message,
    ServerHello,
    Stream,
    encode,
    parse_client_message,
    parse_server_message,
)
from gateway.protocol.metering import ServerMeter
from gateway.protocol.transactions import Outpoint

NOW = 1_800_000_000  # unix seconds, 2027
TIP = 900_000  # block height
DAY = 86_400
NETWORK = "regtest"
LIMITS = Limits(
    min_value=10_000,
    max_value=10_000_000,
    min_expiry_s=3 * 3_600,
    max_expiry_s=30 * DAY,
    min_conf=1,
    settle_margin_s=3_600,
    resume_grace_s=120,
)


def key(label: str) -> bytes:
    """A deterministic private key."""
    return hashlib.sha256(label.encode()).digest()


SERVER_KEY = key("server K2")
CLIENT_KEY = key("client K1")
NONCE = hashlib.sha256(b"nonce").digest()
CHANGE_SCRIPT = b"\x00\x14" + hashlib.sha256(b"change").digest()[:20]  # P2WPKH
REFUND_SCRIPT = b"\x00\x14" + hashlib.sha256(b"refund").digest()[:20]
OPERATOR_SCRIPT = b"\x00\x14" + hashlib.sha256(b"operator").digest()[:20]


def hello(nonce: bytes = NONCE) -> ServerHello:
    """The gateway's ``hello`` for these tests."""
    return ServerHello(version=2, agent="test", network=NETWORK, nonce=nonce, limits=LIMITS)


def to_server(msg: Message):
    """Send a client message over the wire: encode, then the gateway's parser."""
    return parse_client_message(encode(msg))


def to_client(msg: Message):
    """Send a gateway message over the wire: encode, then the player's parser."""
    return parse_server_message(encode(msg))


def funding_outpoint(label: str = "T1") -> Outpoint:
    """A made-up funding outpoint (the pure core never looks at the chain)."""
    return Outpoint(hashlib.sha256(label.encode()).hexdigest(), 1)


@dataclass
class ChannelPair:
    """A funded, ready channel between a ClientChannel and a ServerChannel."""

    kind: str = "cltv"
    value: int = 100_000
    budget: int = 10**9
    expiry: int = NOW + 7 * DAY
    now: int = NOW
    tip: int = TIP
    #: The settlement feerate that prices the reserve (0: no reserve).
    feerate: Fraction = Fraction(0)
    client: ClientChannel = field(init=False)
    server: ServerChannel = field(init=False)
    meter: ServerMeter = field(default_factory=ServerMeter)
    records: list[PaymentRecord] = field(default_factory=list)
    released: list[tuple[str, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client = ClientChannel(CLIENT_KEY, hello(), budget=self.budget)
        self.open()
        self.fund()

    def open(self) -> None:
        """``open`` -> ``terms``."""
        msg = to_server(
            self.client.open(expiry=self.expiry, change_script=CHANGE_SCRIPT, kind=self.kind)
        )
        self.server = ServerChannel.open(
            msg,
            server_privkey=SERVER_KEY,
            limits=LIMITS,
            network=NETWORK,
            now=self.now,
            tip_height=self.tip,
            feerate=self.feerate,
        )
        self.meter.reserve = self.server.exit_fee
        self.client.accept_terms(to_client(self.server.terms()))

    def fund(self) -> None:
        """(multisig: ``refund`` -> ``refund_signed``), ``fund`` -> ``ready``."""
        outpoint = funding_outpoint(self.kind)
        if self.kind == "multisig":
            refund = self.client.refund_request(
                outpoint, self.value, dest_script=REFUND_SCRIPT, fee=300
            )
            signed = self.server.sign_refund(to_server(refund))
            self.client.accept_refund_signed(to_client(signed))
        fund = to_server(self.client.fund(outpoint, self.value))
        assert fund.txid is not None and fund.vout is not None
        self.server.accept_funding(
            Outpoint(fund.txid, fund.vout), self.value, self.server.script.script_pubkey
        )
        self.client.on_ready(to_client(self.server.confirm()))
        assert self.server.state is ServerState.READY

    def pay(self, total: int) -> PaymentRecord:
        """The client pays up to ``total``; the gateway records it; ``paid`` back."""
        record = self.server.receive_payment(
            to_server(self.client.pay(total)), now=self.now, tip_height=self.tip
        )
        self.records.append(record)  # "stored durably", then the core commits it
        self.server.commit_payment(record)
        self.client.on_paid(to_client(self.server.paid_message()))
        return record

    def stream(self, media: str, rate_msat: int, free_ms: int) -> None:
        """``play`` answered by ``stream``."""
        self.client.on_stream(
            to_client(
                Stream(
                    media=media,
                    title=media,
                    mime="video/webm",
                    rate_msat=rate_msat,
                    free_ms=free_ms,
                    free_used_ms=self.meter.free_used_ms(media, free_ms),
                    duration_ms=3_600_000,
                    chunks=1_800,
                )
            )
        )

    def deliver(self, media: str, index: int, duration_ms: int, rate_msat: int, free_ms: int):
        """Section 7 for one chunk: ``due`` until paid, then the chunk.

        Returns the chunk released. Asserts no chunk goes out before the
        channel's durable total covers it.
        """
        quote = self.meter.quote(media, index, duration_ms, rate_msat=rate_msat, free_ms=free_ms)
        if self.server.paid < quote.total:
            due = to_client(
                Due(total=quote.total, media=media, index=index, duration_ms=duration_ms)
            )
            pay = to_server(self.client.pay_due(due))
            record = self.server.receive_payment(pay, now=self.now, tip_height=self.tip)
            self.records.append(record)  # "stored durably"
            self.server.commit_payment(record)
            self.client.on_paid(to_client(self.server.paid_message()))
        # Money rule: released only when a stored increment covers it.
        stored = self.records[-1].paid if self.records else 0
        assert stored >= quote.total, (stored, quote)
        self.meter.commit(quote)
        chunk = Chunk(media=media, index=index, start_ms=0, duration_ms=duration_ms, size=1)
        self.client.on_chunk(to_client(chunk))
        self.released.append((media, index, quote.total))
        return chunk
