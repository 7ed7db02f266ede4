"""Shared test vectors: the browser's JavaScript core (player/web/paystream.js)
must produce exactly what the Python core produces for the same keys and inputs.

``build_vectors()`` makes ``tests/vectors/t3.json`` from the Python core:
channel scripts and addresses (protocol.md section 2), T3 digests and RFC 6979
signatures (section 3), resume proofs (section 5) and the client's metering
figures with and without a reserve (section 7), refunds (section 2: the
unsigned refund, the signed cltv refund at the page's own feerate, T2 with
the gateway's signature) and settlement checks (section 3, "What a batch
pays": batches built by the Python core, checked as ``check_settlement``
checks them, and broken on purpose). The checked-in file must equal a fresh
build, and node's test runner (player/web/test/vectors.test.js) checks the
JavaScript against it; every refund in it is valid by libbitcoinkernel.

Regenerate after an intended change: ``.venv/bin/python tests/test_js_vectors.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path
from typing import Any

import coincurve
import pytest
from bitcoin.core import CTransaction, CTxInWitness, CTxWitness
from bitcoin.core.script import CScriptWitness
from test_transactions import kernel_verify

from gateway.protocol.channel import resume_digest
from gateway.protocol.messages import MAX_INT, MAX_MONEY, Chunk, Due, Pay, Stream, encode_pay_binary
from gateway.protocol.metering import ClientMeter, OverchargeError, ServerMeter
from gateway.protocol.scripts import ChannelScript
from gateway.protocol.settlement import (
    ChannelClaim,
    build_batch,
    check_settlement,
    exit_fee,
    exit_vbytes,
)
from gateway.protocol.signatures import sign_digest
from gateway.protocol.transactions import (
    Outpoint,
    PaymentTemplate,
    build_refund,
    finalize_cltv_refund,
    finalize_multisig_refund,
    parse_tx,
    sign_payment,
    sign_refund_t2,
    txid_of,
)

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors" / "t3.json"
WEB = ROOT / "player" / "web"


def _key(label: str) -> bytes:
    return hashlib.sha256(f"paystream vector {label}".encode()).digest()


def _pub(secret: bytes) -> bytes:
    return coincurve.PrivateKey(secret).public_key.format(compressed=True)


#: The feerate (sat/vB) of the browser's refunds (player/web/paystream.js REFUND_FEERATE).
REFUND_FEERATE = 2


def _p2wpkh(pubkey: bytes) -> bytes:
    digest = hashlib.new("ripemd160", hashlib.sha256(pubkey).digest()).digest()
    return bytes.fromhex("0014") + digest


def _vsize(tx: bytes) -> int:
    parsed = parse_tx(tx)
    stripped = CTransaction(parsed.vin, parsed.vout, parsed.nLockTime, parsed.nVersion)
    return math.ceil((3 * len(stripped.serialize()) + len(tx)) / 4)


def _refund_vbytes_max(script: ChannelScript, unsigned: bytes) -> int:
    """The vsize of ``unsigned`` with the largest signatures (73 bytes each)."""
    sig = b"\x30" * 73
    witness = (
        [sig, b"", script.witness_script]
        if script.kind == "cltv"
        else [b"", sig, sig, script.witness_script]
    )
    parsed = parse_tx(unsigned)
    whole = CTransaction(parsed.vin, parsed.vout, parsed.nLockTime, parsed.nVersion,
                         CTxWitness([CTxInWitness(CScriptWitness(witness))]))
    return _vsize(whole.serialize())


def page_cltv_refund(
    script: ChannelScript, outpoint: Outpoint, value: int, dest: bytes, client: bytes
) -> tuple[bytes, int]:
    """The browser's cltv refund: at REFUND_FEERATE of its own exact vsize.

    Signed again with the fee its signed size needs until that fee is paid
    (the page's rule, docs/web.md); (signed refund, fee).
    """
    fee = 0
    while True:
        tx = finalize_cltv_refund(build_refund(script, outpoint, value, dest, fee), script,
                                  value, client)
        needed = math.ceil(REFUND_FEERATE * _vsize(tx))
        if needed <= fee:
            return tx, fee
        fee = needed


def _refund_case(
    script: ChannelScript, outpoint: Outpoint, value: int, change: bytes, client: bytes,
    server: bytes,
) -> dict[str, Any]:
    # A fixed fee first (the builder and signers), then the page's own fee rule.
    spent = [(script.script_pubkey, value)]
    unsigned = build_refund(script, outpoint, value, change, 1234)
    case: dict[str, Any] = {"fee": 1234, "unsigned": unsigned.hex(),
                            "vbytes_max": _refund_vbytes_max(script, unsigned)}
    if script.kind == "cltv":
        signed = finalize_cltv_refund(unsigned, script, value, client)
        auto, fee = page_cltv_refund(script, outpoint, value, change, client)
        case["auto"] = {"tx": auto.hex(), "fee": fee, "txid": txid_of(auto),
                        "vsize": _vsize(auto)}
        assert kernel_verify(auto, spent)
    else:
        server_sig = sign_refund_t2(unsigned, script, value, server)
        signed = finalize_multisig_refund(unsigned, script, value, client, server_sig)
        case["server_sig"] = server_sig.hex()
    assert kernel_verify(signed, spent)
    case.update(signed=signed.hex(), txid=txid_of(signed), vsize=_vsize(signed))
    return case


def _channel_cases() -> list[dict[str, Any]]:
    # Expiries cover every script-number width, the height/time threshold and
    # nLockTime values >= 2**31 (a signed-int trap); kinds, values and change
    # script types vary so every branch of the digest is exercised.
    expiries = [16, 17, 127, 128, 255, 32_767, 32_768, 800_000, 1_700_000_000, 2**31 + 5,
                0xFFFFFFFF]
    changes = [
        None,  # P2WPKH of K1, what the browser uses
        bytes.fromhex("5120") + _key("taproot"),
        bytes.fromhex("76a914") + hashlib.new("sha256", b"p2pkh").digest()[:20]
        + bytes.fromhex("88ac"),
    ]
    cases = []
    for i, expiry in enumerate(expiries):
        client, server = _key(f"client {i}"), _key(f"server {i}")
        kind = "multisig" if i % 4 == 3 else "cltv"
        script = ChannelScript.make(kind, _pub(client), _pub(server), expiry)
        change = changes[i % len(changes)]
        if change is None:
            change = bytes.fromhex("0014") + hashlib.new(
                "ripemd160", hashlib.sha256(_pub(client)).digest()
            ).digest()
        value = [10_000, 20_000, 123_456_789, 2_100_000_000_000_000][i % 4]
        outpoint = Outpoint(hashlib.sha256(f"funding {i}".encode()).hexdigest(), i * 7 % 5)
        template = PaymentTemplate(script, outpoint, value, change)
        balances = sorted({0, 546, 547, value // 2, value - 1, value})
        nonce = hashlib.sha256(f"nonce {i}".encode()).digest()
        cases.append(
            {
                "kind": kind,
                "client_secret": client.hex(),
                "client_pubkey": _pub(client).hex(),
                "server_pubkey": _pub(server).hex(),
                "expiry": expiry,
                "witness_script": script.witness_script.hex(),
                "funding_script": script.script_pubkey.hex(),
                "addresses": {net: script.address(net) for net in ("regtest", "main")},
                "txid": outpoint.txid,
                "vout": outpoint.vout,
                "value": value,
                "change_script": change.hex(),
                # The exit the gateway quotes in terms (settlement.py exit_vbytes).
                "exit_vbytes": exit_vbytes(script, change),
                "payments": [
                    {
                        "balance": b,
                        "digest": template.digest(b).hex(),
                        "sig": sign_payment(template, client, b).hex(),
                    }
                    for b in balances
                ],
                "refund": _refund_case(script, outpoint, value, change, client, server),
                "resume": {
                    "channel_id": outpoint.channel_id,
                    "nonce": nonce.hex(),
                    "digest": resume_digest(outpoint.channel_id, nonce).hex(),
                    "proof": sign_digest(client, resume_digest(outpoint.channel_id, nonce)).hex(),
                },
            }
        )
    return cases


def _meter_cases() -> list[dict[str, Any]]:
    # A gateway (ServerMeter) quotes each chunk, the initialization segment
    # (index -1) first; the client (ClientMeter) checks each due and records
    # its own figure; one more due, 1 sat above the last figure, must be
    # refused as an overcharge (section 7). With a reserve, the first due is
    # for the initialization segment and asks the reserve alone.
    specs = [
        (300_000, 3_000, 0, 0, [1000, 1000, 1000, 1000, 1500, 2000, 1000]),
        (150_500, 2_000, 1_200, 0, [1333, 1333, 1334, 2000, 1999]),
        (1, 0, 0, 0, [1000] * 5),
        (2_000_000_000, 60_000, 59_999, 0, [2000, 2000]),
        (300_000, 3_000, 0, 282, [1000, 2000, 1000, 1500, 2000]),
        (150_500, 60_000, 60_000, 141, [2000, 1999]),
        (0, 0, 0, 1_000, [2000, 2000]),
    ]
    cases = []
    for rate, free_ms, used, reserve, durations in specs:
        stream = Stream(media="m", title="t", mime="video/mp4", rate_msat=rate, free_ms=free_ms,
                        free_used_ms=used, duration_ms=sum(durations), chunks=len(durations))
        server = ServerMeter(0, {"m": used}, reserve=reserve)
        client = ClientMeter(reserve=reserve)
        client.on_stream(stream)
        paid, events, start = 0, [], 0
        for index, d in [(-1, 0), *enumerate(durations)]:
            quote = server.quote("m", index, d, rate_msat=rate, free_ms=free_ms)
            chunk = Chunk(media="m", index=index, start_ms=start, duration_ms=d, size=1)
            if quote.total > paid:
                due = Due(total=quote.total, media="m", index=index, duration_ms=d)
                figure = client.check_due(due)
                client.paid(due)
                paid = due.total
                events.append({"due": due.to_wire(), "figure": figure})
            events.append({"chunk": chunk.to_wire()})
            client.on_chunk(chunk)
            server.commit(quote)
            start += d
        extra = Due(total=0, media="m", index=len(durations), duration_ms=1000)
        figure = client.check_due(extra)
        bad = Due(total=figure + 1, media="m", index=len(durations), duration_ms=1000)
        with pytest.raises(OverchargeError):
            client.check_due(bad)
        events.append({"due": bad.to_wire(), "overcharge": figure})
        cases.append({"stream": stream.to_wire(), "reserve": reserve, "events": events,
                      "bill": str(client.bill), "figure": client.figure})
    return cases


def _claim(i: int, kind: str, value: int, paid: int, quoted: int) -> ChannelClaim:
    client, server = _key(f"settle client {i}"), _key(f"settle server {i}")
    script = ChannelScript.make(kind, _pub(client), _pub(server), 800_000 + i)
    change = _p2wpkh(_pub(client))
    outpoint = Outpoint(hashlib.sha256(f"settle funding {i}".encode()).hexdigest(), i % 3)
    template = PaymentTemplate(script, outpoint, value, change)
    vbytes = exit_vbytes(script, change)
    reserve = exit_fee(vbytes, Fraction(quoted))
    balance = value - max(paid, reserve)
    return ChannelClaim(
        template, balance, sign_payment(template, client, balance), server, reserve=reserve,
        quoted=Fraction(reserve, vbytes), payouts=((bytes.fromhex("0014" + "11" * 20), 1),),
    )


def _settlement_cases() -> list[dict[str, Any]]:
    # Batches the gateway would build (settlement.py build_batch), each of
    # its channels checked as its client checks it, then broken on purpose:
    # another balance, an outpoint not spent, input values that do not
    # match, a quote the batch does not reach.
    batches = [
        [_claim(0, "cltv", 20_000, 2_000, 2), _claim(1, "multisig", 50_000, 50_000, 3),
         _claim(2, "cltv", 10_000, 0, 2), _claim(3, "cltv", 123_456, 61_000, 5)],
        [_claim(4, "cltv", 10_000, 0, 2)],  # the reserve alone pays its transaction
    ]
    cases = []
    for claims in batches:
        result = build_batch(claims, bytes.fromhex("0014" + "33" * 20), Fraction(2))
        batch = result.batch
        assert batch is not None and not result.left_out
        by_id = {c.outpoint.channel_id: c for c in claims}
        spent_values = [by_id[o.channel_id].template.value for o in batch.channels]
        for claim in claims:
            args = {
                "txid": claim.outpoint.txid, "vout": claim.outpoint.vout,
                "value": claim.template.value, "change_script": claim.template.change_script.hex(),
                "balance": claim.balance, "exit_fee": claim.reserve,
                "exit_vbytes": exit_vbytes(claim.template.script, claim.template.change_script),
                "spent_values": spent_values,
            }
            variants = [args]
            if claim.balance:
                variants.append({**args, "balance": claim.balance + 1})
            variants += [
                {**args, "txid": hashlib.sha256(b"elsewhere").hexdigest()},
                {**args, "spent_values": spent_values[:-1] or [1]},
                {**args, "exit_fee": args["exit_vbytes"] * 40},
            ]
            for v in variants:
                try:
                    check_settlement(
                        batch.tx, outpoint=Outpoint(v["txid"], v["vout"]), value=v["value"],
                        change_script=bytes.fromhex(v["change_script"]), balance=v["balance"],
                        quoted=Fraction(v["exit_fee"], v["exit_vbytes"]),
                        spent_values=v["spent_values"],
                    )
                    error = None
                except ValueError as exc:
                    error = str(exc)
                cases.append({"tx": batch.tx.hex(), "fee": batch.fee, "vsize": batch.vsize,
                              "args": v, "error": error})
    return cases


def _pay_binary_cases(channels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Binary ``pay`` frames (protocol.md section 5a), the range edges included."""
    sigs = [p["sig"] for c in channels for p in c["payments"]][:3]
    fields = [(2, 12_345, sigs[0]), (MAX_INT, MAX_MONEY, sigs[1]), (0, 0, sigs[2]), (7, 546, "")]
    return [
        {"seq": seq, "balance": balance, "sig": sig,
         "frame": encode_pay_binary(Pay(seq=seq, balance=balance, sig=bytes.fromhex(sig))).hex()}
        for seq, balance, sig in fields
    ]


def build_vectors() -> dict[str, Any]:
    """The vectors as the Python core computes them (deterministic)."""
    channels = _channel_cases()
    return {
        "comment": "generated by tests/test_js_vectors.py from the Python core; do not edit",
        "refund_feerate": REFUND_FEERATE,
        "channels": channels,
        "meter": _meter_cases(),
        "settlements": _settlement_cases(),
        "pay_binary": _pay_binary_cases(channels),
    }


def _dump(vectors: dict[str, Any]) -> str:
    return json.dumps(vectors, indent=1, sort_keys=True) + "\n"


def test_vectors_file_is_the_python_core_output() -> None:
    """The checked-in vectors are exactly what the Python core computes now."""
    assert VECTORS.read_text() == _dump(build_vectors()), (
        "tests/vectors/t3.json is stale: run .venv/bin/python tests/test_js_vectors.py"
    )


def test_vectors_cover_both_sighash_types_and_kinds() -> None:
    """Every case family is present: a vector file that lost them would pass vacuously."""
    data = json.loads(VECTORS.read_text())
    sighashes = {p["sig"][-2:] for c in data["channels"] for p in c["payments"]}
    assert sighashes == {"82", "83"}
    assert {c["kind"] for c in data["channels"]} == {"cltv", "multisig"}
    assert any("overcharge" in e for m in data["meter"] for e in m["events"])
    assert any(m["reserve"] and m["events"][0]["due"]["index"] == -1 for m in data["meter"])
    assert {c["refund"].get("auto") is None for c in data["channels"]} == {True, False}
    errors = {c["error"] and " ".join(c["error"].split()[:3]) for c in data["settlements"]}
    assert None in errors and len(errors) == 5  # passes, and four distinct failures


def test_every_refund_in_the_vectors_is_valid_by_the_kernel() -> None:
    """libbitcoinkernel accepts each refund the JavaScript must reproduce byte for byte."""
    data = json.loads(VECTORS.read_text())
    for c in data["channels"]:
        spent = [(bytes.fromhex(c["funding_script"]), c["value"])]
        refund = c["refund"]
        for tx in [refund["signed"], refund.get("auto", {}).get("tx")]:
            if tx is None:
                continue
            assert kernel_verify(bytes.fromhex(tx), spent), c["kind"]
            parsed = parse_tx(bytes.fromhex(tx))
            assert parsed.nLockTime == c["expiry"] and parsed.vin[0].nSequence == 0xFFFFFFFE
            assert bytes(parsed.vout[0].scriptPubKey) == bytes.fromhex(c["change_script"])
        if "auto" in refund:  # the page's feerate on the exact vsize, not more than 1 sat over
            auto = refund["auto"]
            assert auto["fee"] >= REFUND_FEERATE * auto["vsize"]
            assert auto["fee"] <= REFUND_FEERATE * auto["vsize"] + REFUND_FEERATE


def _node() -> str:
    node = shutil.which("node")
    if node is None or not (WEB / "node_modules" / "@noble" / "curves").is_dir():
        pytest.fail("node and player/web/node_modules are required: run `npm ci --prefix "
                    "player/web` (see README)")
    return node


def test_javascript_core_matches_python_vectors() -> None:
    """node's test runner checks player/web/paystream.js against tests/vectors/t3.json."""
    result = subprocess.run(
        [_node(), "--test", "test/"],
        cwd=WEB,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PAYSTREAM_VECTORS": str(VECTORS), "NODE_OPTIONS": ""},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # The runner reports how many tests passed; none failing is not enough.
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout, result.stdout


if __name__ == "__main__":
    VECTORS.parent.mkdir(parents=True, exist_ok=True)
    VECTORS.write_text(_dump(build_vectors()))
    print(f"wrote {VECTORS}", file=sys.stderr)
