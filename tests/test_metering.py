"""protocol.md section 7: the metering arithmetic on both ends."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.protocol.messages import Chunk, Due, Stream
from gateway.protocol.metering import (
    ClientMeter,
    OverchargeError,
    ServerMeter,
    charged_ms,
    total_due,
)


def stream(media="m", rate_msat=2_000, free_ms=60_000, free_used_ms=0):
    return Stream(
        media=media,
        title="t",
        mime="video/webm",
        rate_msat=rate_msat,
        free_ms=free_ms,
        free_used_ms=free_used_ms,
        duration_ms=600_000,
        chunks=300,
    )


def chunk(index, duration_ms=2_000, media="m"):
    return Chunk(media=media, index=index, start_ms=0, duration_ms=duration_ms, size=1)


@pytest.mark.parametrize(
    ("u", "d", "free", "c"),
    [
        (0, 2_000, 60_000, 0),  # inside the allowance
        (59_000, 2_000, 60_000, 1_000),  # straddles: only the part beyond
        (60_000, 2_000, 60_000, 2_000),  # beyond
        (90_000, 1_500, 60_000, 1_500),
        (0, 2_000, 0, 2_000),  # no allowance
        (58_000, 2_000, 60_000, 0),  # ends exactly on the boundary
    ],
)
def test_charged_ms(u, d, free, c):
    assert charged_ms(u, d, free) == c


def test_total_due_rounds_up_exactly():
    # 1.5 sat/s (1500 msat/s) for 1 s -> 1.5 sat -> 2 sat
    assert total_due(0, 1_500, 1_000) == 2
    # the bill carries the exact fraction: the second second makes it 3.0
    assert total_due(1_500 * 1_000, 1_500, 1_000) == 3
    assert total_due(0, 0, 5_000) == 0
    assert total_due(1, 0, 0) == 1


def test_server_meter_quote_commit():
    meter = ServerMeter()
    init = meter.quote("m", -1, 0, rate_msat=2_000, free_ms=2_000)
    assert init.free and init.total == 0
    meter.commit(init)
    q1 = meter.quote("m", 0, 1_500, rate_msat=2_000, free_ms=2_000)
    assert (q1.charged_ms, q1.total, q1.free) == (0, 0, True)
    assert meter.quote("m", 0, 1_500, rate_msat=2_000, free_ms=2_000) == q1  # no side effect
    meter.commit(q1)
    q2 = meter.quote("m", 1, 1_500, rate_msat=2_000, free_ms=2_000)
    assert (q2.charged_ms, q2.total) == (1_000, 2)  # 1000 ms at 2 sat/s
    meter.commit(q2)
    assert meter.bill == 2_000_000 and meter.delivered_ms == {"m": 3_000}
    assert meter.free_used_ms("m", 2_000) == 2_000
    assert meter.free_used_ms("other", 2_000) == 0
    assert meter.billed == 2
    # the allowance is per media: another item starts free
    assert meter.quote("n", 0, 1_000, rate_msat=9_000, free_ms=2_000).total == 2


def test_server_meter_stale_quote_and_bad_input():
    meter = ServerMeter()
    q = meter.quote("m", 0, 2_000, rate_msat=1_000, free_ms=0)
    meter.commit(q)
    with pytest.raises(ValueError, match="stale"):
        meter.commit(q)
    assert meter.bill == 2_000_000
    with pytest.raises(ValueError):
        meter.quote("m", 0, -1, rate_msat=1, free_ms=0)
    with pytest.raises(ValueError):
        meter.quote("m", -2, 1, rate_msat=1, free_ms=0)
    with pytest.raises(ValueError):
        ServerMeter(bill=-1)


def test_server_meter_restores_state():
    meter = ServerMeter()
    for i in range(40):
        meter.commit(meter.quote("m", i, 1_999, rate_msat=1_337, free_ms=60_000))
    copy = ServerMeter(meter.bill, meter.delivered_ms)
    assert copy.quote("m", 40, 2_000, rate_msat=1_337, free_ms=60_000) == meter.quote(
        "m", 40, 2_000, rate_msat=1_337, free_ms=60_000
    )


def test_client_accepts_exact_due_and_rejects_overcharge():
    client = ClientMeter()
    client.on_stream(stream(rate_msat=1_500, free_ms=1_000))
    client.on_chunk(chunk(-1, 0))
    client.on_chunk(chunk(0, 1_000))  # free
    due = Due(total=2, media="m", index=1, duration_ms=1_000)
    assert client.check_due(due) == 2
    client.paid(due)
    client.on_chunk(chunk(1, 1_000))  # the paid chunk arrives: not billed twice
    assert client.bill == 1_500_000
    greedy = Due(total=4, media="m", index=2, duration_ms=1_000)
    with pytest.raises(OverchargeError) as info:
        client.check_due(greedy)
    assert info.value.figure == 3 and isinstance(info.value, ProtocolError)
    assert client.bill == 1_500_000  # a refused due changes nothing
    # a due that asks for less than the figure is fine (the gateway's choice)
    assert client.check_due(Due(total=1, media="m", index=2, duration_ms=1_000)) == 3


def test_client_lost_chunk_billed_once():
    client = ClientMeter()
    client.on_stream(stream(rate_msat=1_000, free_ms=0))
    due = Due(total=2, media="m", index=0, duration_ms=2_000)
    client.check_due(due)
    client.paid(due)
    # the connection drops before chunk 0 arrives; the same due comes again
    # after a resume (new stream, the gateway counted chunk 0 as sent)
    assert client.check_due(due) == 2  # not 4: chunk 0 stays billed once
    client.paid(due)
    client.on_stream(stream(rate_msat=1_000, free_ms=0))
    nxt = Due(total=4, media="m", index=1, duration_ms=2_000)
    assert client.check_due(nxt) == 4
    assert client.bill == 2_000_000


def test_client_never_more_than_one_chunk_ahead():
    client = ClientMeter()
    client.on_stream(stream(rate_msat=1_000, free_ms=0))
    first = Due(total=2, media="m", index=0, duration_ms=2_000)
    client.check_due(first)
    client.paid(first)
    with pytest.raises(ProtocolError) as info:
        client.check_due(Due(total=4, media="m", index=1, duration_ms=2_000))
    assert info.value.code is ErrorCode.BAD_STATE


def test_client_rejects_unknown_media_and_unmatched_paid():
    client = ClientMeter()
    with pytest.raises(ProtocolError):
        client.check_due(Due(total=0, media="x", index=0, duration_ms=1))
    with pytest.raises(ValueError):
        client.paid(Due(total=0, media="x", index=0, duration_ms=1))


def test_client_uses_free_used_ms_from_stream():
    client = ClientMeter()
    client.on_stream(stream(rate_msat=1_000, free_ms=60_000, free_used_ms=59_000))
    assert client.check_due(Due(total=1, media="m", index=30, duration_ms=2_000)) == 1


@settings(max_examples=150, deadline=None)
@given(
    rate=st.integers(0, 50_000),
    free_ms=st.integers(0, 10_000),
    plan=st.lists(
        st.tuples(st.sampled_from(["a", "b"]), st.integers(1, 2_500), st.booleans()),
        max_size=40,
    ),
)
def test_client_and_server_agree(rate, free_ms, plan):
    """The server's `due` totals are exactly the client's own figures."""
    server = ServerMeter()
    client = ClientMeter()
    paid = 0
    index = {"a": 0, "b": 0}
    announced = set()
    for media, duration, overpay in plan:
        if media not in announced:
            announced.add(media)
            client.on_stream(stream(media, rate, free_ms, server.free_used_ms(media, free_ms)))
        q = server.quote(media, index[media], duration, rate_msat=rate, free_ms=free_ms)
        if paid < q.total:
            due = Due(total=q.total, media=media, index=q.index, duration_ms=duration)
            assert client.check_due(due) == q.total
            client.paid(due)
            paid = q.total + (1 if overpay else 0)
        server.commit(q)
        client.on_chunk(chunk(q.index, duration, media))
        index[media] += 1
        assert client.bill == server.bill
        assert paid >= math.ceil(server.bill / 1_000_000)
