"""Shared test vectors: the browser's JavaScript core (player/web/paystream.js)
must produce exactly what the Python core produces for the same keys and inputs.

``build_vectors()`` makes ``tests/vectors/t3.json`` from the Python core:
channel scripts and addresses (protocol.md section 2), T3 digests and RFC 6979
signatures (section 3), resume proofs (section 5) and the client's metering
figures (section 7). The checked-in file must equal a fresh build, and node's
test runner (player/web/test/vectors.test.js) checks the JavaScript against it.

Regenerate after an intended change: ``.venv/bin/python tests/test_js_vectors.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import coincurve
import pytest

from gateway.protocol.channel import resume_digest
from gateway.protocol.messages import Chunk, Due, Stream
from gateway.protocol.metering import ClientMeter, OverchargeError, ServerMeter
from gateway.protocol.scripts import ChannelScript
from gateway.protocol.settlement import exit_vbytes
from gateway.protocol.signatures import sign_digest
from gateway.protocol.transactions import Outpoint, PaymentTemplate, sign_payment

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "tests" / "vectors" / "t3.json"
WEB = ROOT / "player" / "web"


def _key(label: str) -> bytes:
    return hashlib.sha256(f"paystream vector {label}".encode()).digest()


def _pub(secret: bytes) -> bytes:
    return coincurve.PrivateKey(secret).public_key.format(compressed=True)


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
    # A gateway (ServerMeter) quotes each chunk; the client (ClientMeter)
    # checks each due and records its own figure; one more due, 1 sat above
    # the last figure, must be refused as an overcharge (section 7).
    specs = [
        (300_000, 3_000, 0, [1000, 1000, 1000, 1000, 1500, 2000, 1000]),
        (150_500, 2_000, 1_200, [1333, 1333, 1334, 2000, 1999]),
        (1, 0, 0, [1000] * 5),
        (2_000_000_000, 60_000, 59_999, [2000, 2000]),
    ]
    cases = []
    for rate, free_ms, used, durations in specs:
        stream = Stream(media="m", title="t", mime="video/mp4", rate_msat=rate, free_ms=free_ms,
                        free_used_ms=used, duration_ms=sum(durations), chunks=len(durations))
        server = ServerMeter(0, {"m": used})
        client = ClientMeter()
        client.on_stream(stream)
        paid, events, start = 0, [], 0
        for index, d in enumerate(durations):
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
        cases.append({"stream": stream.to_wire(), "events": events, "bill": str(client.bill)})
    return cases


def build_vectors() -> dict[str, Any]:
    """The vectors as the Python core computes them (deterministic)."""
    return {
        "comment": "generated by tests/test_js_vectors.py from the Python core; do not edit",
        "channels": _channel_cases(),
        "meter": _meter_cases(),
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
