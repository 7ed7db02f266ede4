"""The soak (``gateway bench --soak``) in short, and the bugs it found, each failing before its fix.

The short soak runs the real thing — ``gateway node`` and ``gateway serve``
as processes, honest viewers that drop, resume, close and stop, abusive
clients — for half a minute with 40 viewers (CI time; the bench's default is
10 minutes and 1,000 viewers), and asserts its
correctness checks only (never a timing, nor the RSS figure: a resource
figure of a shared CI box belongs to the bench's report).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from conftest_gateway import Viewer, node_rpc, ws_url

from gateway.cli import main
from gateway.protocol.messages import Due, Play, Stream

#: The CI size.
SOAK_MINUTES = "0.5"
SOAK_VIEWERS = "40"


def test_a_short_soak_settles_every_channel_exactly(capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["bench", "--soak", SOAK_MINUTES, "--viewers", SOAK_VIEWERS, "--json"])
    out = capsys.readouterr().out
    r = json.loads(out)
    checks = r["checks"]
    assert checks["every channel closed or refunded"], r["store"]
    assert checks["stored balance = last signed, every channel"], r["mismatches"]
    assert checks["no honest viewer saw an error"], r["honest_errors"]
    assert checks["every abusive attempt got section 9's answer"], r["abuse_unexpected"]
    # The run did what a soak is for: churn, abuse and paid media.
    assert r["resumes"] > 0 and r["closes"] > 0 and r["paid_chunks"] > 0
    assert r["store"]["channels"] >= r["channels"] and r["store"]["settlements"] > 0
    for kind in ("idle_socket", "bad_signature", "lower_amount", "balance_increased"):
        assert sum(r["abuse"].get(kind, {}).values()) > 0, (kind, r["abuse"])
    # The exit status follows every check (RSS included: not asserted here).
    assert status == (0 if r["ok"] else 1)


async def test_a_drop_right_after_a_pay_still_settles_the_channel(gateway_factory, caplog):
    """Found by the soak: a viewer that dropped its socket with a pay in flight, while
    the stream waited on that pay, left the channel held by a dead session: the
    session's cleanup raised ConnectionClosed sending the ``paid`` left for the
    stream, before it released the channel. Never released, the channel was never
    settled after the resume grace (and a traceback was logged)."""
    caplog.set_level(logging.INFO)
    gw = await gateway_factory()
    rpc = node_rpc(gw)
    channels = []
    for _ in range(4):
        viewer = Viewer(ws_url(gw), rpc)
        await viewer.connect()
        ready = await viewer.open_and_fund()
        channel = viewer.channel
        assert channel is not None
        await viewer.send(Play(media="clip"))
        channel.on_stream(await viewer.expect(Stream))
        due = await viewer.expect(Due)  # the reserve: the stream waits on it
        await viewer.send(channel.pay_due(due))
        viewer.ws.transport.abort()  # gone, without reading the answer
        channels.append(ready.channel_id)
    deadline = time.monotonic() + 20
    while True:
        states = [gw.ledger.reports.channel(c)["state"] for c in channels]
        # Taken by the settler after the grace (closing until its batch confirms).
        if all(s in ("closing", "closed") for s in states):
            break
        assert time.monotonic() < deadline, states
        await asyncio.sleep(0.2)
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
