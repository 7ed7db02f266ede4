"""Channel transactions: T2 refund, T3 payment template (settlements: settlement.py).

protocol.md sections 2 and 3. Serialisation goes through python-bitcoinlib
(``CTransaction`` and friends); signatures through coincurve
(:mod:`gateway.protocol.signatures`). Nothing here validates scripts: that is
libbitcoinkernel's job, in the tests and in the node.

The per-payment path is :meth:`PaymentTemplate.digest` plus one verify. The
client signs input 0 of T3 with BIP143 and ``SIGHASH_SINGLE|ANYONECANPAY``
(0x83), or ``SIGHASH_NONE|ANYONECANPAY`` (0x82) when its balance is 0. With
ANYONECANPAY, hashPrevouts and hashSequence are zero; SINGLE commits to
output 0 only, NONE to no output. So everything but the 8-byte amount of
output 0 is fixed per channel: the template hashes the fixed prefix once and
each digest costs three short SHA-256 runs.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from bitcoin.core import (
    COutPoint,
    CTransaction,
    CTxIn,
    CTxInWitness,
    CTxOut,
    CTxWitness,
    b2lx,
    lx,
)
from bitcoin.core.script import (
    SIGHASH_ALL,
    SIGHASH_ANYONECANPAY,
    SIGHASH_NONE,
    SIGHASH_SINGLE,
    CScript,
    CScriptWitness,
)

from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.protocol.scripts import ChannelKind, ChannelScript
from gateway.protocol.sighash import (
    ZERO_HASH,
    bip143_digest,
    preimage_head,
    preimage_tail,
    var_bytes,
)
from gateway.protocol.signatures import (
    Verifier,
    check_der_low_s,
    sign_digest,
    split_sighash,
    verifier_for,
)
from gateway.protocol.tx import deserialize, txid

__all__ = [
    "DUST_LIMIT",
    "FINAL_SEQUENCE",
    "MAX_MONEY",
    "PAYMENT_SIGHASH",
    "PAYMENT_SIGHASH_ZERO",
    "REFUND_SEQUENCE",
    "TX_VERSION",
    "Outpoint",
    "PaymentTemplate",
    "build_refund",
    "check_payment_signature",
    "check_refund_t2",
    "check_refund_t2_signature",
    "finalize_cltv_refund",
    "finalize_multisig_refund",
    "find_funding_output",
    "parse_tx",
    "sighash_all",
    "sign_payment",
    "sign_refund_t2",
    "txid_of",
]

#: The dust limit of protocol.md v1 (section 3), fixed.
DUST_LIMIT = 546
#: 21 million bitcoin in satoshi: the largest amount (protocol.md section 1).
MAX_MONEY = 2_100_000_000_000_000
#: Sighash type of a T3 signature while ``balance > 0`` (section 3).
PAYMENT_SIGHASH = SIGHASH_SINGLE | SIGHASH_ANYONECANPAY  # 0x83
#: Sighash type of a T3 signature with ``balance == 0`` (section 3).
PAYMENT_SIGHASH_ZERO = SIGHASH_NONE | SIGHASH_ANYONECANPAY  # 0x82
#: nSequence of every refund: not final, so nLockTime applies (BIP65).
REFUND_SEQUENCE = 0xFFFFFFFE
#: nSequence of T3's input: final, so nLockTime 0 and no relative lock apply.
FINAL_SEQUENCE = 0xFFFFFFFF
#: T2, T3 and every settlement are version 2 transactions (BIP68).
TX_VERSION = 2


def sighash_all(tx: CTransaction, index: int, script: ChannelScript, value: int) -> bytes:
    """BIP143 SIGHASH_ALL digest of input ``index`` spending a channel output of ``value``.

    The scriptCode of a P2WSH input is its witness script (BIP143).
    """
    return bip143_digest(tx, index, script.witness_script, value, SIGHASH_ALL)


def parse_tx(tx: bytes) -> CTransaction:
    """Deserialise a whole transaction (``ValueError`` if it is not one)."""
    return deserialize(tx)


def txid_of(tx: bytes) -> str:
    """The txid of a serialised transaction, in display hex as RPC shows it.

    Raises ``bad_message`` if ``tx`` is not a transaction.
    """
    try:
        parsed = parse_tx(tx)
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "tx is not a valid transaction") from None
    return txid(parsed)[::-1].hex()


@dataclass(frozen=True)
class Outpoint:
    """A transaction output: ``txid`` in display hex (as RPC shows it), ``vout``."""

    txid: str
    vout: int

    def __post_init__(self) -> None:
        if (
            not isinstance(self.txid, str)
            or len(self.txid) != 64
            or any(c not in "0123456789abcdef" for c in self.txid)
        ):
            raise ValueError("txid must be 64 lowercase hex digits")
        if isinstance(self.vout, bool) or not isinstance(self.vout, int):
            raise ValueError("vout must be an integer")
        if not 0 <= self.vout <= 0xFFFFFFFF:
            raise ValueError("vout out of range")

    @property
    def channel_id(self) -> str:
        """``txid:vout``, the channel id of protocol.md sections 5 and 6."""
        return f"{self.txid}:{self.vout}"

    @classmethod
    def parse(cls, channel_id: str) -> Outpoint:
        """Parse ``txid:vout`` (``ValueError`` unless exactly that, canonical)."""
        if not isinstance(channel_id, str):
            raise ValueError("channel id must be a string")
        txid, sep, vout = channel_id.partition(":")
        # Canonical decimal only: no sign, spaces, leading zeros or non-ASCII digits.
        if not sep or not vout.isascii() or not vout.isdigit() or vout != str(int(vout)):
            raise ValueError("channel id must be txid:vout")
        return cls(txid, int(vout))

    def to_coutpoint(self) -> COutPoint:
        """The python-bitcoinlib outpoint (internal byte order)."""
        return COutPoint(lx(self.txid), self.vout)

    def serialize(self) -> bytes:
        """The 36-byte consensus serialisation."""
        return lx(self.txid) + struct.pack("<I", self.vout)


class PaymentTemplate:
    """The T3 template of protocol.md section 3 for one channel.

    ``digest(balance)`` is the BIP143 sighash of input 0 that the client
    signs for ``balance``; every part that does not depend on the balance is
    computed here, once.
    """

    __slots__ = (
        "_none_digest",
        "_output_tail",
        "_prefix",
        "_single_tail",
        "change_script",
        "outpoint",
        "script",
        "value",
    )

    def __init__(
        self, script: ChannelScript, outpoint: Outpoint, value: int, change_script: bytes
    ) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_MONEY:
            raise ValueError("value out of range")
        self.script = script
        self.outpoint = outpoint
        self.value = value
        self.change_script = bytes(change_script)
        # ANYONECANPAY zeroes hashPrevouts and hashSequence (BIP143), so the
        # preimage head is fixed per channel: hash it once.
        self._prefix = hashlib.sha256(
            preimage_head(
                TX_VERSION,
                ZERO_HASH,
                ZERO_HASH,
                outpoint.serialize(),
                script.witness_script,
                value,
                FINAL_SEQUENCE,
            )
        )
        self._output_tail = var_bytes(self.change_script)
        self._single_tail = preimage_tail(0, PAYMENT_SIGHASH)
        # SIGHASH_NONE commits to no output: one digest serves every channel
        # state with balance 0.
        none_hash = self._prefix.copy()
        none_hash.update(ZERO_HASH + preimage_tail(0, PAYMENT_SIGHASH_ZERO))
        self._none_digest = hashlib.sha256(none_hash.digest()).digest()

    @staticmethod
    def sighash_type(balance: int) -> int:
        """0x83 while ``balance > 0``, 0x82 at ``balance == 0`` (section 3)."""
        return PAYMENT_SIGHASH if balance else PAYMENT_SIGHASH_ZERO

    def _check_balance(self, balance: int) -> None:
        if not 0 <= balance <= self.value or 0 < balance < DUST_LIMIT:
            raise ValueError("balance must be 0 or between 546 and the channel value")

    def digest(self, balance: int) -> bytes:
        """The BIP143 digest the client signs for ``balance`` (witness v0).

        ``ValueError`` for a balance that no T3 may carry: negative, 1-545
        or above the channel value (the channel checks these first).
        """
        if not balance:
            return self._none_digest
        self._check_balance(balance)
        # SIGHASH_SINGLE: hashOutputs = SHA256d(output 0) (BIP143); the same
        # bytes as sighash.output_bytes, with the script's part encoded once.
        output = struct.pack("<q", balance) + self._output_tail
        hasher = self._prefix.copy()
        hasher.update(hashlib.sha256(hashlib.sha256(output).digest()).digest())
        hasher.update(self._single_tail)
        return hashlib.sha256(hasher.digest()).digest()

    def outputs(self, balance: int) -> list[tuple[bytes, int]]:
        """T3's own outputs: the client's change while ``balance > 0``."""
        self._check_balance(balance)
        return [(self.change_script, balance)] if balance else []

    def unsigned_tx(self, balance: int) -> bytes:
        """T3 for ``balance`` with no witness and no server outputs."""
        return bytes(self._tx(self.outputs(balance)).serialize())

    def _tx(
        self, outputs: Sequence[tuple[bytes, int]], witness: Sequence[bytes] | None = None
    ) -> CTransaction:
        wit = CTxWitness([CTxInWitness(CScriptWitness(witness))]) if witness else CTxWitness()
        return CTransaction(
            [CTxIn(self.outpoint.to_coutpoint(), nSequence=FINAL_SEQUENCE)],
            [CTxOut(amount, CScript(spk)) for spk, amount in outputs],
            nLockTime=0,
            nVersion=TX_VERSION,
            witness=wit,
        )


def sign_payment(template: PaymentTemplate, client_privkey: bytes, balance: int) -> bytes:
    """The client's T3 signature for ``balance``: DER + sighash byte (section 3)."""
    der = sign_digest(client_privkey, template.digest(balance))
    return der + bytes([template.sighash_type(balance)])


def check_payment_signature(
    template: PaymentTemplate, balance: int, sig: bytes, verifier: Verifier
) -> None:
    """Check a ``pay.sig`` in protocol.md section 9 order.

    Encoding and sighash type first (``non_canonical_signature``), then the
    signature itself (``bad_signature``). ``verifier`` is the client key's
    :class:`~gateway.protocol.signatures.Verifier`; ``balance`` has already
    passed the channel's balance checks.
    """
    der, sighash = split_sighash(sig)
    check_der_low_s(der)
    expected = template.sighash_type(balance)
    if sighash != expected:
        raise ProtocolError(
            ErrorCode.NON_CANONICAL_SIGNATURE,
            f"sighash type must be 0x{expected:02x} for balance {balance}, got 0x{sighash:02x}",
        )
    if not verifier.verify(template.digest(balance), der):
        raise ProtocolError(ErrorCode.BAD_SIGNATURE, "signature does not verify")


# -- refunds (section 2) ---------------------------------------------------------


def check_refund_t2(tx: bytes, script: ChannelScript, value: int) -> Outpoint:
    """Check a multisig refund T2 against protocol.md section 2; its outpoint.

    Version 2, exactly one input with nSequence 0xfffffffe, nLockTime equal
    to the channel's expiry, at least one output, outputs totalling at most
    ``value``. Anything else is ``bad_refund`` (``bad_state`` for a cltv
    channel, which needs no T2).
    """
    if script.kind != ChannelKind.MULTISIG:
        raise ProtocolError(ErrorCode.BAD_STATE, "refund is only for multisig channels")
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_MONEY:
        raise ProtocolError(ErrorCode.VALUE_OUT_OF_RANGE, "funding value out of range")

    def bad(message: str) -> ProtocolError:
        return ProtocolError(ErrorCode.BAD_REFUND, message)

    try:
        parsed = parse_tx(tx)
    except ValueError:
        raise bad("refund tx is not a transaction") from None
    if parsed.nVersion != TX_VERSION:
        raise bad("refund tx must have version 2")
    if len(parsed.vin) != 1:
        raise bad("refund tx must have exactly one input")
    txin = parsed.vin[0]
    if txin.nSequence != REFUND_SEQUENCE:
        raise bad("refund input must have nSequence 0xfffffffe")
    if txin.scriptSig:
        # A P2WSH spend with a scriptSig is invalid (BIP141): never valid.
        raise bad("refund input must have an empty scriptSig")
    if parsed.nLockTime != script.expiry:
        raise bad("refund nLockTime must equal the channel expiry")
    if not parsed.vout:
        raise bad("refund tx must have at least one output")
    if any(not 0 <= out.nValue <= MAX_MONEY for out in parsed.vout):
        raise bad("refund output amount out of range")
    if sum(out.nValue for out in parsed.vout) > value:
        raise bad("refund outputs exceed the funding value")
    return Outpoint(str(b2lx(txin.prevout.hash)), txin.prevout.n)


def sign_refund_t2(tx: bytes, script: ChannelScript, value: int, server_privkey: bytes) -> bytes:
    """The server's ``refund_signed.sig`` on T2: DER + 0x01 (SIGHASH_ALL).

    T2 is checked first (:func:`check_refund_t2`): a T2 that breaks section
    2 is never signed. BIP143 commits to ``value``, so the signature is only
    valid if the client told the truth about the funding output.
    """
    check_refund_t2(tx, script, value)
    digest = sighash_all(parse_tx(tx), 0, script, value)
    return sign_digest(server_privkey, digest) + bytes([SIGHASH_ALL])


def check_refund_t2_signature(
    tx: bytes, script: ChannelScript, value: int, server_sig: bytes
) -> None:
    """Client side: check ``refund_signed.sig`` before broadcasting T1.

    ``non_canonical_signature`` for a bad encoding or a type other than
    SIGHASH_ALL, ``bad_signature`` if it does not verify by K2.
    """
    der, sighash = split_sighash(server_sig)
    check_der_low_s(der)
    if sighash != SIGHASH_ALL:
        raise ProtocolError(ErrorCode.NON_CANONICAL_SIGNATURE, "refund signature must be 0x01")
    digest = sighash_all(parse_tx(tx), 0, script, value)
    if not verifier_for(script.server_pubkey).verify(digest, der):
        raise ProtocolError(ErrorCode.BAD_SIGNATURE, "refund signature does not verify")


def build_refund(
    script: ChannelScript, outpoint: Outpoint, value: int, dest_script: bytes, fee: int
) -> bytes:
    """Client side: the unsigned refund (T2 for multisig, the CLTV refund).

    Version 2, one input (the funding outpoint, nSequence 0xfffffffe),
    nLockTime = expiry, one output paying ``value - fee`` to ``dest_script``
    (``ValueError`` if that is dust or the fee is negative).
    """
    if fee < 0 or value - fee < DUST_LIMIT:
        raise ValueError("refund output would be dust")
    tx = CTransaction(
        [CTxIn(outpoint.to_coutpoint(), nSequence=REFUND_SEQUENCE)],
        [CTxOut(value - fee, CScript(dest_script))],
        nLockTime=script.expiry,
        nVersion=TX_VERSION,
    )
    return bytes(tx.serialize())


def _with_witness(tx: CTransaction, witness: list[bytes]) -> bytes:
    signed = CTransaction(
        tx.vin,
        tx.vout,
        tx.nLockTime,
        tx.nVersion,
        CTxWitness([CTxInWitness(CScriptWitness(witness))]),
    )
    return bytes(signed.serialize())


def finalize_cltv_refund(
    tx: bytes, script: ChannelScript, value: int, client_privkey: bytes
) -> bytes:
    """Client side: sign a cltv refund; witness ``<sig_K1> <> <script>`` (section 2)."""
    parsed = parse_tx(tx)
    sig = sign_digest(client_privkey, sighash_all(parsed, 0, script, value))
    return _with_witness(parsed, [sig + bytes([SIGHASH_ALL]), b"", script.witness_script])


def finalize_multisig_refund(
    tx: bytes, script: ChannelScript, value: int, client_privkey: bytes, server_sig: bytes
) -> bytes:
    """Client side: sign T2; witness ``<> <sig_K1> <sig_K2> <script>`` (section 2)."""
    parsed = parse_tx(tx)
    sig = sign_digest(client_privkey, sighash_all(parsed, 0, script, value))
    witness = [b"", sig + bytes([SIGHASH_ALL]), server_sig, script.witness_script]
    return _with_witness(parsed, witness)


def find_funding_output(tx: bytes, script_pubkey: bytes) -> tuple[int, int]:
    """(vout, value) of the first output of ``tx`` paying ``script_pubkey``.

    ``bad_message`` if ``tx`` is not a transaction, ``funding_mismatch`` if
    no output pays the script (protocol.md section 5, ``fund``).
    """
    try:
        parsed = parse_tx(tx)
    except ValueError:
        raise ProtocolError(ErrorCode.BAD_MESSAGE, "tx is not a valid transaction") from None
    for vout, out in enumerate(parsed.vout):
        if bytes(out.scriptPubKey) == script_pubkey:
            return vout, out.nValue
    raise ProtocolError(ErrorCode.FUNDING_MISMATCH, "no output of tx pays funding_script")
