"""Channel transactions inside real regtest blocks, judged by libbitcoinkernel.

Each test runs its own chainstate in a temp dir (``gateway.chain.kernel``)
and builds blocks with ``gateway.chain.blocks``. The kernel accepts or
refuses whole blocks: a block that fails while connecting returns normally
and the tip does not move, so every step compares the tip (design.md,
"Traps"). protocol.md section 2: a refund with nLockTime ``E`` first fits
in block ``E + 1`` (height) or once median-time-past exceeds ``E`` (time).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import coincurve
import pytest
from bitcoin.core import COutPoint, CTransaction, CTxIn, CTxInWitness, CTxOut, CTxWitness
from bitcoin.core.script import CScript, CScriptWitness

from gateway.chain.blocks import assemble_block, block_subsidy, block_txids
from gateway.chain.kernel import Kernel
from gateway.protocol.scripts import ChannelScript, p2wsh_script_pubkey
from gateway.protocol.settlement import Batch, ChannelClaim, build_batch
from gateway.protocol.signatures import verifier_for
from gateway.protocol.transactions import (
    Outpoint,
    PaymentTemplate,
    build_refund,
    check_payment_signature,
    check_refund_t2,
    finalize_cltv_refund,
    finalize_multisig_refund,
    find_funding_output,
    sign_payment,
    sign_refund_t2,
    txid_of,
)

CLIENT = coincurve.PrivateKey(hashlib.sha256(b"kernel client").digest())
SERVER = coincurve.PrivateKey(hashlib.sha256(b"kernel server").digest())
K1 = CLIENT.public_key.format()
K2 = SERVER.public_key.format()
# Mined coins go to P2WSH(OP_TRUE): spendable with the script alone.
OP_TRUE = b"\x51"
MINER = p2wsh_script_pubkey(OP_TRUE)
CHANGE = b"\x00\x14" + b"\x33" * 20
OPERATOR = b"\x00\x14" + b"\x66" * 20
PUBLISHERS = [(b"\x00\x20" + b"\x44" * 32, 2), (b"\x51\x20" + b"\x55" * 32, 1)]
VALUE = 2_000_000
NONFINAL = "bad-txns-nonfinal"
SPENT = "bad-txns-inputs-missingorspent"


def _settle(
    template: PaymentTemplate,
    balance: int,
    sig: bytes,
    payouts: list[tuple[bytes, int]],
    rate: int | Fraction,
) -> Batch:
    """The settlement of one channel (a batch of one), as the gateway builds it."""
    claim = ChannelClaim(template, balance, sig, SERVER.secret, payouts=tuple(payouts))
    batch = build_batch([claim], OPERATOR, Fraction(rate)).batch
    assert batch is not None
    return batch


class Regtest:
    """A fresh regtest chain with mature coinbase coins paying P2WSH(OP_TRUE)."""

    def __init__(self, datadir: Path) -> None:
        self.kernel = Kernel(datadir)
        self.genesis_time = self.kernel.block_time_at(0)
        self.coinbases: list[tuple[bytes, int]] = []  # (txid, value), oldest first
        for _ in range(101):  # coinbase maturity is 100 blocks
            assert self.mine() is None

    def block_time(self, height: int) -> int:
        return self.genesis_time + 600 * height

    @property
    def height(self) -> int:
        return self.kernel.tip_height

    def mine(self, txs: tuple[bytes, ...] = ()) -> str | None:
        """Mine one block with ``txs``; None if it became the tip, else the reason."""
        height = self.height + 1
        before = self.kernel.tip_hash
        block = assemble_block(
            before,
            height,
            self.block_time(height),
            [CTransaction.deserialize(tx) for tx in txs],
            [CTxOut(block_subsidy(height), CScript(MINER))],
        )
        accepted, reason = self.kernel.process_block(block.serialize())
        # The tip is the truth: it moved to this block, or did not move at all.
        after = self.kernel.tip_hash
        assert accepted == (after == block.GetHash())
        if not accepted:
            assert after == before and self.height == height - 1
            return reason or "rejected"
        self.coinbases.append((block_txids(block)[0], block_subsidy(height)))
        return None

    def mine_to(self, height: int) -> None:
        while self.height < height:
            assert self.mine() is None

    def fund(self, scripts: list[ChannelScript]) -> tuple[bytes, list[Outpoint]]:
        """T1 spending the oldest coinbase: one VALUE output per channel, then change."""
        txid, coin = self.coinbases.pop(0)
        outputs = [CTxOut(VALUE, CScript(s.script_pubkey)) for s in scripts]
        change = coin - VALUE * len(scripts) - 10_000
        tx = CTransaction(
            [CTxIn(COutPoint(txid, 0), nSequence=0xFFFFFFFD)],
            [*outputs, CTxOut(change, CScript(MINER))],
            nVersion=2,
            witness=CTxWitness([CTxInWitness(CScriptWitness([OP_TRUE]))]),
        )
        raw = bytes(tx.serialize())
        outpoints = []
        for script in scripts:
            vout, value = find_funding_output(raw, script.script_pubkey)
            assert value == VALUE
            outpoints.append(Outpoint(txid_of(raw), vout))
        return raw, outpoints


@pytest.fixture
def chain(tmp_path: Path) -> Iterator[Regtest]:
    regtest = Regtest(tmp_path / "node")
    yield regtest
    regtest.kernel.close()


def refund_for(script: ChannelScript, outpoint: Outpoint) -> bytes:
    """The client's signed refund: CLTV alone, or T2 countersigned by the server."""
    unsigned = build_refund(script, outpoint, VALUE, CHANGE, 1_000)
    if script.kind == "cltv":
        return finalize_cltv_refund(unsigned, script, VALUE, CLIENT.secret)
    assert check_refund_t2(unsigned, script, VALUE) == outpoint
    server_sig = sign_refund_t2(unsigned, script, VALUE, SERVER.secret)
    return finalize_multisig_refund(unsigned, script, VALUE, CLIENT.secret, server_sig)


@pytest.mark.parametrize("kind", ["cltv", "multisig"])
def test_refund_height_expiry(chain: Regtest, kind: str) -> None:
    expiry = 110
    script = ChannelScript.make(kind, K1, K2, expiry)
    funding, (outpoint,) = chain.fund([script])
    assert chain.mine((funding,)) is None  # T1 confirms at 102
    refund = refund_for(script, outpoint)

    chain.mine_to(expiry - 1)
    # Block `expiry` itself: nLockTime must be below the block height.
    assert NONFINAL in (chain.mine((refund,)) or "")
    assert chain.height == expiry - 1
    assert chain.mine() is None  # an empty block at `expiry`
    assert chain.mine((refund,)) is None  # block expiry + 1 takes it
    assert chain.height == expiry + 1


@pytest.mark.parametrize("kind", ["cltv", "multisig"])
def test_refund_time_expiry(chain: Regtest, kind: str) -> None:
    # BIP113: a time lock compares with the median time of the 11 blocks
    # before the one being connected, which must exceed the expiry.
    expiry = chain.block_time(106)
    script = ChannelScript.make(kind, K1, K2, expiry)
    funding, (outpoint,) = chain.fund([script])
    assert chain.mine((funding,)) is None
    refund = refund_for(script, outpoint)

    rejected = 0
    while chain.kernel.median_time_past() <= expiry:
        assert NONFINAL in (chain.mine((refund,)) or "")
        rejected += 1
        assert chain.mine() is None
    assert rejected >= 5
    assert chain.kernel.median_time_past() == expiry + 600  # the first MTP past it
    assert chain.mine((refund,)) is None


@pytest.mark.parametrize("kind", ["cltv", "multisig"])
def test_settlement_confirms_and_refund_is_then_a_double_spend(chain: Regtest, kind: str) -> None:
    expiry = 115
    script = ChannelScript.make(kind, K1, K2, expiry)
    funding, (outpoint,) = chain.fund([script])
    assert chain.mine((funding,)) is None
    template = PaymentTemplate(script, outpoint, VALUE, CHANGE)
    verifier = verifier_for(K1)

    # Increments as a session sees them, each signature checked and each
    # settled into a T3; only the last T3 is mined, and an earlier one then
    # conflicts with it.
    settlements = []
    for balance in (VALUE - 10_000, VALUE - 250_000, VALUE - 900_000):
        sig = sign_payment(template, CLIENT.secret, balance)
        check_payment_signature(template, balance, sig, verifier)
        settlement = _settle(template, balance, sig, [*PUBLISHERS, (OPERATOR, 1)], 3)
        settlements.append(settlement)
    last = settlements[-1]
    assert last.outputs[0] == (CHANGE, VALUE - 900_000)
    assert [spk for spk, _ in last.outputs[1:]] == [PUBLISHERS[0][0], PUBLISHERS[1][0], OPERATOR]

    assert chain.mine((last.tx,)) is None  # settles before expiry: nLockTime 0
    # An earlier increment and the refund both spend the settled output.
    assert SPENT in (chain.mine((settlements[0].tx,)) or "")
    chain.mine_to(expiry)
    refund = refund_for(script, outpoint)
    assert SPENT in (chain.mine((refund,)) or "")
    assert chain.height == expiry


def test_settlement_with_zero_balance_and_refunds_share_a_block(chain: Regtest) -> None:
    # Two channels funded by one T1: one settles with everything to the
    # server (0x82 signature), the other refunds at expiry, in one block.
    expiry = 105
    settled = ChannelScript.make("multisig", K1, K2, expiry)
    refunded = ChannelScript.make("cltv", K1, K2, expiry)
    funding, (out_settled, out_refunded) = chain.fund([settled, refunded])
    assert chain.mine((funding,)) is None
    template = PaymentTemplate(settled, out_settled, VALUE, CHANGE)
    sig = sign_payment(template, CLIENT.secret, 0)
    settlement = _settle(template, 0, sig, PUBLISHERS, Fraction(3, 2))
    assert CHANGE not in dict(settlement.outputs)
    chain.mine_to(expiry)
    assert chain.mine((settlement.tx, refund_for(refunded, out_refunded))) is None
