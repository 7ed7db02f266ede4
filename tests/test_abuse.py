"""Abuse of a running gateway (hardening issue): each test failed before its fix.

Real gateway with its embedded node, real WebSockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import time

from conftest_gateway import Viewer, node_rpc, ws_url

from gateway.protocol.errors import ErrorCode
from gateway.protocol.messages import Error, Terms


async def _wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


def _states(gw) -> list[str]:
    return [r["state"] for r in gw.store.read("SELECT state FROM channels ORDER BY id")]


async def test_concurrent_opens_from_one_address_respect_the_unfunded_limit(gateway_factory):
    """Item 3: sixty opens at once from one address: exactly the limit get terms."""
    gw = await gateway_factory(max_unfunded_per_ip=8, max_sessions_per_ip=100)
    rpc = node_rpc(gw)
    viewers = [Viewer(ws_url(gw), rpc) for _ in range(60)]
    await asyncio.gather(*(v.connect() for v in viewers))

    async def open_one(viewer: Viewer) -> object:
        try:
            return await viewer.open_channel()
        except AssertionError:
            return viewer.log[-1]

    answers = await asyncio.gather(*(open_one(v) for v in viewers))
    terms = [a for a in answers if isinstance(a, Terms)]
    busy = [a for a in answers if isinstance(a, Error) and a.code is ErrorCode.BUSY]
    assert (len(terms), len(busy)) == (8, 52)
    assert len(_states(gw)) == 8
    for viewer in viewers:
        await viewer.disconnect()


async def test_an_unfunded_channel_is_abandoned_when_its_session_ends(gateway_factory):
    """Item 2: open, then leave: the row is closed at once (its key index stays used)."""
    gw = await gateway_factory()
    viewer = Viewer(ws_url(gw), node_rpc(gw))
    await viewer.connect()
    terms = await viewer.open_channel()
    assert _states(gw) == ["open"]
    await viewer.disconnect()
    await _wait_for(lambda: _states(gw) == ["closed"])
    # The faucet no longer pays its address: it is no open, unfunded channel.
    assert gw.ledger.reports.unfunded_channel(terms.funding_script) is None
    # A new channel gets a new index (never the abandoned one's key).
    again = Viewer(ws_url(gw), node_rpc(gw))
    await again.connect()
    second = await again.open_channel()
    assert second.server_pubkey != terms.server_pubkey
    await again.disconnect()


async def test_an_unfunded_channel_expires_at_its_funding_deadline(gateway_factory):
    """Item 2: an open never funded is abandoned after funding_timeout_s; fatal error."""
    gw = await gateway_factory(funding_timeout_s=1.0)
    viewer = Viewer(ws_url(gw), node_rpc(gw))
    await viewer.connect()
    await viewer.open_channel()
    error = await viewer.expect(Error, timeout=10)
    assert error.code is ErrorCode.FUNDING_NOT_FOUND and error.fatal
    assert _states(gw) == ["closed"]


async def test_unfunded_rows_a_crash_left_are_swept_at_start(gateway_factory, tmp_path):
    """Item 2: a row left open by a killed gateway is abandoned by the next start."""
    gw = await gateway_factory(funding_timeout_s=0.2)
    viewer = Viewer(ws_url(gw), node_rpc(gw))
    await viewer.connect()
    await viewer.open_channel()
    # As a SIGKILL leaves it: the row open, no session (the store is the ledger's).
    gw.ledger.note_unfunded = lambda peer, delta: None  # type: ignore[method-assign]
    gw.ledger.abandoned = _never  # type: ignore[method-assign]
    await viewer.disconnect()
    await asyncio.sleep(1.0)  # past the sweep's age (three funding timeouts)
    assert _states(gw) == ["open"]
    await gw.stop()
    again = await gateway_factory(funding_timeout_s=0.2)
    await _wait_for(lambda: _states(again) == ["closed"])


async def _never(*args: object) -> None:
    raise OSError("killed before this write")


def test_the_faucet_finds_a_channel_by_an_index_not_a_scan(tmp_path):
    """Item 2: the funding-address lookup searches one index, whatever the number of rows."""
    from gateway.ledger import Reports
    from gateway.ledger.store import connect, create_schema

    conn = connect(tmp_path / "g.db")
    create_schema(conn)
    asked: list[tuple[str, tuple]] = []

    class Recording:
        def read(self, sql: str, params: tuple = ()) -> list:
            asked.append((sql, params))
            return conn.execute(sql, params).fetchall()

    assert Reports(Recording()).unfunded_channel(b"\x00\x20" + bytes(32)) is None
    ((sql, params),) = asked
    plan = [tuple(r)[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
    assert plan == ["SEARCH channels USING INDEX idx_channels_funding_script (funding_script=?)"]
