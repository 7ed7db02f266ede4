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


# -- item 1: slots, deadlines, proxies ------------------------------------------------


async def _silent_sockets(gw, n: int, **headers: str) -> list:
    import websockets

    return [
        await websockets.connect(ws_url(gw), additional_headers=headers or None)
        for _ in range(n)
    ]


async def test_silent_sockets_do_not_take_an_honest_viewers_slot(gateway_factory):
    """Sockets that never say hello count as half-open, not as sessions, and are closed."""
    gw = await gateway_factory(max_sessions_per_ip=4, handshake_timeout_s=1.0)
    silent = await _silent_sockets(gw, 16)
    honest = Viewer(ws_url(gw), node_rpc(gw))
    assert (await honest.connect()).network == "regtest"  # before: busy (1013)
    await asyncio.sleep(1.5)
    assert all(ws.close_code == 1008 for ws in silent), [ws.close_code for ws in silent]
    assert gw.half_open == 0
    await honest.disconnect()


async def test_half_open_sockets_are_capped(gateway_factory):
    """Past max_half_open, a new socket is refused before the upgrade (503)."""
    import websockets
    from websockets.exceptions import InvalidStatus

    gw = await gateway_factory(max_half_open=5, handshake_timeout_s=30.0)
    silent = await _silent_sockets(gw, 5)
    try:
        await websockets.connect(ws_url(gw))
    except InvalidStatus as exc:
        assert exc.response.status_code == 503
    else:  # pragma: no cover - the point of the test
        raise AssertionError("a sixth half-open socket was accepted")
    for ws in silent:
        await ws.close()


async def test_a_session_sitting_on_its_unpaid_due_is_closed_and_settled(gateway_factory):
    """Before: a stream parked on an unpaid due counted as playing and was never idle."""
    gw = await gateway_factory(unpaid_timeout_s=1.0)
    viewer = Viewer(ws_url(gw), node_rpc(gw))
    await viewer.connect()
    ready = await viewer.open_and_fund()
    from gateway.protocol.messages import Due, Play, Stream

    await viewer.send(Play(media="clip"))
    viewer.channel.on_stream(await viewer.expect(Stream))  # type: ignore[union-attr]
    await viewer.expect(Due)  # the reserve: never paid
    started = time.monotonic()
    while viewer.ws.close_code is None:
        assert time.monotonic() - started < 10, "the gateway kept the unpaid session"
        try:
            await viewer.recv(timeout=10)
        except Exception:
            break
    # Then the normal disconnect path: resume grace, then nothing to settle.
    await _wait_for(lambda: gw.store.read(
        "SELECT state FROM channels WHERE channel_id = ?", (ready.channel_id,)
    )[0]["state"] == "closed")


async def test_trusted_proxies_name_the_client(gateway_factory, tmp_path):
    """Per-address limits follow X-Forwarded-For only behind a trusted proxy."""
    async def hello(gw, forwarded: str):
        import json

        import websockets

        ws = await websockets.connect(ws_url(gw),
                                      additional_headers={"X-Forwarded-For": forwarded})
        await ws.send(json.dumps({"type": "hello", "version": 2, "agent": "t"}))
        return ws, json.loads(await ws.recv())

    trusting = await gateway_factory(max_sessions_per_ip=1, trusted_proxies="127.0.0.1")
    a, first = await hello(trusting, "198.51.100.1")
    b, second = await hello(trusting, "198.51.100.2")
    c, third = await hello(trusting, "203.0.113.9, 198.51.100.1")  # the rightmost is ours
    assert first["type"] == second["type"] == "hello"
    assert third["type"] == "error" and third["code"] == "busy"
    for ws in (a, b, c):
        await ws.close()
    plain = await gateway_factory(max_sessions_per_ip=1, datadir=tmp_path / "plain")
    d, fourth = await hello(plain, "198.51.100.1")
    e, fifth = await hello(plain, "198.51.100.2")  # ignored: both are 127.0.0.1
    assert fourth["type"] == "hello" and fifth["code"] == "busy"
    for ws in (d, e):
        await ws.close()


# -- item 4: HTTP methods, HEAD, pipelining ------------------------------------------


def _request(method: str, path: str) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()


def _raw_http(gw, data: bytes) -> bytes:
    """Send ``data`` as is; everything the gateway answers until it closes."""
    import socket

    with socket.create_connection(("127.0.0.1", gw.port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_each_path_answers_only_its_methods(gateway, caplog):
    """405 with Allow for other methods; HEAD without a body; state changes on POST only."""
    for method in ("PUT", "DELETE", "TRACE", "OPTIONS", "PATCH"):
        for path in ("/", "/api/catalog", "/api/admin/settle", "/api/faucet", "/api/chain"):
            answer = await asyncio.to_thread(_raw_http, gateway, _request(method, path))
            head = answer.split(b"\r\n\r\n")[0].decode()
            assert head.startswith("HTTP/1.1 405"), (method, path, head)
            assert "\r\nAllow: " in head, head
    answer = await asyncio.to_thread(_raw_http, gateway, _request("GET", "/api/admin/settle"))
    assert answer.startswith(b"HTTP/1.1 405") and b"Allow: POST" in answer
    get = await asyncio.to_thread(_raw_http, gateway, _request("GET", "/"))
    head = await asyncio.to_thread(_raw_http, gateway, _request("HEAD", "/"))
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")  # no body
    assert len(get.split(b"\r\n\r\n", 1)[1]) > 100


async def test_pipelined_and_garbled_requests_leave_no_traceback(gateway, caplog):
    """Before: two pipelined requests logged AssertionError tracebacks from websockets."""
    import logging

    caplog.set_level(logging.DEBUG)
    two = (b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /api/chain HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    for _ in range(20):
        answer = await asyncio.to_thread(_raw_http, gateway, two)
        assert answer.count(b"HTTP/1.1 200") == 2
    for junk in (b"\x00\xff garbage\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                 b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n"):
        answer = await asyncio.to_thread(_raw_http, gateway, junk)
        assert answer == b"" or answer[:10] in (b"HTTP/1.1 4", b"HTTP/1.0 4"), answer[:80]
    assert not [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


# -- item 5: settling never waits on a client ----------------------------------------


async def test_the_operators_settle_does_not_wait_for_a_silent_viewer(gateway):
    """A viewer that stops reading (no close handshake) does not hold up the settle."""
    import urllib.request

    viewer = Viewer(ws_url(gateway), node_rpc(gateway))
    await viewer.connect()
    ready = await viewer.open_and_fund()
    viewer.ws.transport.pause_reading()  # it never reads our close frame, nor answers it
    request = urllib.request.Request(
        f"http://127.0.0.1:{gateway.port}/api/admin/settle?channel={ready.channel_id}",
        data=b"", method="POST",
        headers={"Authorization": f"Bearer {gateway.operator_token}"},
    )
    started = time.monotonic()
    with await asyncio.to_thread(urllib.request.urlopen, request, timeout=30) as answer:
        body = answer.read()
    elapsed = time.monotonic() - started
    assert b'"settled"' in body and ready.channel_id.encode() in body
    assert elapsed < 2.0, f"the settle waited {elapsed:.1f} s for the viewer"
    viewer.ws.transport.resume_reading()


async def test_the_hosts_endpoint_refuses_bad_requests_and_changes_nothing(gateway):
    """``POST /api/admin/host`` (the cluster's fan-out): 401 without the operator
    token, 400 for a question it does not answer or arguments that are not a
    JSON object, and no channel is settled by any of them."""
    import json
    import urllib.error
    import urllib.parse
    import urllib.request

    viewer = Viewer(ws_url(gateway), node_rpc(gateway))
    await viewer.connect()
    await viewer.open_and_fund()

    def post(form: dict[str, str], token: str | None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(
            f"http://127.0.0.1:{gateway.port}/api/admin/host",
            data=urllib.parse.urlencode(form).encode(), method="POST", headers=headers,
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as failed:
            return failed.code, json.load(failed)

    token = gateway.operator_token
    cases = [
        ({"what": "settle", "args": "{}"}, None, 401),
        ({"what": "settle", "args": "{}"}, "wrong", 401),
        ({"what": "drop_tables", "args": "{}"}, token, 400),
        ({"what": "settle", "args": "[1, 2]"}, token, 400),
        ({"what": "settle", "args": "{not json"}, token, 400),
    ]
    for form, given, status in cases:
        code, body = await asyncio.to_thread(post, form, given)
        assert (code, bool(body.get("error"))) == (status, True), (form, code, body)
    assert all(live.core.settlement_txid is None for live in gateway.channels.values())
    rows = gateway.store.read("SELECT state FROM channels WHERE channel_id IS NOT NULL", ())
    assert [r["state"] for r in rows] == ["ready"]
    code, body = await asyncio.to_thread(post, {"what": "stats", "args": "{}"}, token)
    assert code == 200 and "answer" in body


# -- soak: RSS flat -------------------------------------------------------------------


async def test_an_ended_socket_is_freed_without_the_cycle_collector(gateway):
    """Before: every ended socket was cyclic garbage (aiohttp's cycles), kept until a
    rare full collection, so the soak's RSS grew with the viewers that came and went."""
    import gc
    import weakref

    from gateway.protocol.messages import Play, Stream

    async def ended(leave: str) -> weakref.ref:
        viewer = Viewer(ws_url(gateway), node_rpc(gateway))
        await viewer.connect()
        if leave == "reset":  # a viewer whose connection drops mid-stream
            await viewer.open_and_fund()
            await viewer.send(Play(media="clip"))
            await viewer.expect(Stream)
        (server_side,) = gateway._sockets
        ref = weakref.ref(server_side)
        del server_side
        if leave == "reset":
            viewer.ws.transport.abort()
        else:
            await viewer.disconnect()
        started = time.monotonic()
        while gateway._sockets:
            assert time.monotonic() - started < 10, "the session did not end"
            await asyncio.sleep(0.05)
        for _ in range(5):  # let the server's handler task finish
            await asyncio.sleep(0)
        return ref

    gc.collect()
    gc.disable()
    try:
        for leave in ("close", "reset"):
            ref = await ended(leave)
            assert ref() is None, f"socket ended by {leave} is held: {gc.get_referrers(ref())}"
    finally:
        gc.enable()
