"""Micro-benchmark of the pure channel core (issue 2): increments verified per
second by ``ServerChannel.receive_payment`` on one core, next to the raw
crypto ceiling measured in the same run (coincurve verifies/s and BIP143
digests/s). A benchmark, not a timed test: it reports, it asserts nothing.

Run ``python -m gateway.bench.core [--increments N]``; ``gateway bench``
prints the same ceiling beside its end-to-end figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import coincurve

from gateway.protocol.channel import ClientChannel, ServerChannel
from gateway.protocol.messages import (
    Limits,
    Ready,
    ServerHello,
    encode,
    parse_client_message,
)
from gateway.protocol.scripts import p2wsh_script_pubkey
from gateway.protocol.transactions import Outpoint

_NOW = 1_800_000_000
_TIP = 900_000
_VALUE = 10_000_000
_LIMITS = Limits(
    min_value=10_000,
    max_value=_VALUE,
    min_expiry_s=3600,
    max_expiry_s=30 * 86_400,
    min_conf=0,
    settle_margin_s=3600,
    resume_grace_s=120,
)


def _key(label: str) -> bytes:
    return hashlib.sha256(label.encode()).digest()


def _pair() -> tuple[ClientChannel, ServerChannel]:
    """A ready cltv channel between a client and a server, in memory."""
    hello = ServerHello(version=2, agent="bench", network="regtest", nonce=bytes(32),
                        limits=_LIMITS)
    client = ClientChannel(_key("K1"), hello, budget=_VALUE)
    change = b"\x00\x14" + _key("change")[:20]
    opening = client.open(expiry=_NOW + 86_400, change_script=change)
    server = ServerChannel.open(opening, server_privkey=_key("K2"), limits=_LIMITS,
                                network="regtest", now=_NOW, tip_height=_TIP)
    client.accept_terms(server.terms())
    outpoint = Outpoint("ab" * 32, 0)
    client.fund(outpoint, _VALUE)
    server.accept_funding(outpoint, _VALUE, p2wsh_script_pubkey(server.script.witness_script))
    ready: Ready = server.confirm()
    client.on_ready(ready)
    return client, server


def _best(run: Callable[[], None], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure(increments: int = 5000, repeats: int = 3) -> dict[str, Any]:
    """Per-second rates on this core: raw verify, digest, core verify, parse+verify."""
    client, server = _pair()
    pays = [client.pay(total) for total in range(1, increments + 1)]
    texts = [encode(p) for p in pays]
    snapshot = server.snapshot()
    template = server._template  # the core's own precomputed T3 template
    assert template is not None
    pubkey = coincurve.PublicKey(client.client_pubkey)
    digests = [template.digest(p.balance) for p in pays]
    ders = [p.sig[:-1] for p in pays]

    def raw_verify() -> None:
        for digest, der in zip(digests, ders, strict=True):
            pubkey.verify(der, digest, hasher=None)

    def raw_digest() -> None:
        for p in pays:
            template.digest(p.balance)

    def core(parse: bool) -> Callable[[], None]:
        def run() -> None:
            channel = ServerChannel.restore(snapshot, server_privkey=_key("K2"), limits=_LIMITS)
            for text, pay in zip(texts, pays, strict=True):
                msg = parse_client_message(text) if parse else pay
                record = channel.receive_payment(msg, now=_NOW, tip_height=_TIP)  # type: ignore[arg-type]
                channel.commit_payment(record)

        return run

    rates = {
        "raw_verify_per_s": increments / _best(raw_verify, repeats),
        "digest_per_s": increments / _best(raw_digest, repeats),
        "receive_payment_per_s": increments / _best(core(False), repeats),
        "parse_and_receive_per_s": increments / _best(core(True), repeats),
    }
    rates["core_to_raw_ratio"] = rates["receive_payment_per_s"] / rates["raw_verify_per_s"]
    return {k: round(v, 3) if k.endswith("ratio") else round(v) for k, v in rates.items()}


def main(argv: list[str] | None = None) -> int:
    """Print the figures (``--json`` for scripts)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--increments", type=int, default=5000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    figures = measure(args.increments)
    if args.json:
        print(json.dumps(figures))
    else:
        for name, value in figures.items():
            print(f"{name:>26}: {value:,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
