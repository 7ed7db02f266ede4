"""RpcClient against a tiny fake HTTP server on 127.0.0.1: typed errors, no hangs."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path

import pytest

from gateway.chain.rpc import (
    RpcAuthError,
    RpcClient,
    RpcError,
    RpcMethodNotFound,
    RpcTimeoutError,
    RpcTransportError,
    RpcVerifyRejected,
)

Handler = Callable[[dict[str, str], bytes], Awaitable[bytes | None]]


def http(status: int, body: bytes, *, close: bool = False, chunked: bool = False) -> bytes:
    """One raw HTTP/1.1 response."""
    head = [f"HTTP/1.1 {status} X", "Content-Type: application/json"]
    if close:
        head.append("Connection: close")
    if chunked:
        head.append("Transfer-Encoding: chunked")
        half = len(body) // 2
        payload = b"".join(
            f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (body[:half], body[half:])
        ) + b"0\r\n\r\n"
    else:
        head.append(f"Content-Length: {len(body)}")
        payload = body
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


class FakeServer:
    """Answers each request with ``handler(headers, body)``; None = never answer."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[dict[str, str]] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> FakeServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/"

    def drop_connections(self) -> None:
        """Close every open server-side connection."""
        for writer in self.writers:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.requests.append(headers)
                answer = await self.handler(headers, body)
                if answer is None:
                    await asyncio.sleep(3600)
                    return
                writer.write(answer)
                await writer.drain()
                if b"Connection: close" in answer:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.close()


def result(body: bytes, value: object) -> bytes:
    request = json.loads(body)
    return json.dumps({"result": value, "error": None, "id": request["id"]}).encode()


@pytest.fixture
async def echo() -> AsyncIterator[FakeServer]:
    async def handler(headers: dict[str, str], body: bytes) -> bytes:
        request = json.loads(body)
        if isinstance(request, list):
            answers = [
                {"result": None, "error": {"code": -32601, "message": "Method not found"},
                 "id": r["id"]}
                if r["method"] == "nope"
                else {"result": r["params"], "error": None, "id": r["id"]}
                for r in reversed(request)  # order must not matter: ids match
            ]
            return http(200, json.dumps(answers).encode())
        return http(200, result(body, request["params"]))

    async with FakeServer(handler) as server:
        yield server


async def test_call_reuses_one_keep_alive_connection(echo: FakeServer) -> None:
    async with RpcClient(echo.url, user="u", password="p") as client:
        for i in range(3):
            assert await client.call("echo", i, "x") == [i, "x"]
    assert echo.connections == 1
    assert echo.requests[0]["authorization"] == "Basic dTpw"


async def test_amounts_are_decimal(echo: FakeServer) -> None:
    async with RpcClient(echo.url) as client:
        assert await client.call("echo", Decimal("0.00010000")) == [Decimal("0.0001")]


async def test_batch_matches_ids_and_keeps_errors(echo: FakeServer) -> None:
    async with RpcClient(echo.url) as client:
        answers = await client.batch([("a", [1]), ("nope", []), ("b", [2])])
    assert answers[0] == [1]
    assert isinstance(answers[1], RpcMethodNotFound) and answers[1].code == -32601
    assert answers[2] == [2]


async def test_http_500_with_json_error_is_typed() -> None:
    async def handler(headers: dict[str, str], body: bytes) -> bytes:
        error = {"code": -26, "message": "non-final"}
        reply = {"result": None, "error": error, "id": json.loads(body)["id"]}
        return http(500, json.dumps(reply).encode())

    async with FakeServer(handler) as server, RpcClient(server.url) as client:
        with pytest.raises(RpcVerifyRejected) as info:
            await client.call("sendrawtransaction", "00")
    assert info.value.code == -26 and info.value.message == "non-final"
    assert isinstance(info.value, RpcError)


async def test_non_json_answer_is_transport_error() -> None:
    async def handler(headers: dict[str, str], body: bytes) -> bytes:
        return http(200, b"<html>proxy error</html>")

    async with FakeServer(handler) as server, RpcClient(server.url) as client:
        with pytest.raises(RpcTransportError, match="non-JSON"):
            await client.call("getblockcount")


async def test_http_500_without_json_rpc_error() -> None:
    async def handler(headers: dict[str, str], body: bytes) -> bytes:
        return http(500, b'{"oops": 1}')

    async with FakeServer(handler) as server, RpcClient(server.url) as client:
        with pytest.raises(RpcTransportError, match="HTTP 500"):
            await client.call("getblockcount")


async def test_timeout_does_not_hang() -> None:
    async def handler(headers: dict[str, str], body: bytes) -> None:
        return None

    async with FakeServer(handler) as server, RpcClient(server.url, timeout=0.2) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(RpcTimeoutError):
            await client.call("getblockcount")
        assert loop.time() - start < 2


async def test_truncated_body_is_transport_error() -> None:
    async def handler(headers: dict[str, str], body: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\n{\"res"

    async with FakeServer(handler) as server, RpcClient(server.url) as client:
        with pytest.raises(RpcTransportError):
            await client.call("getblockcount")


async def test_malformed_status_line() -> None:
    async def handler(headers: dict[str, str], body: bytes) -> bytes:
        return b"SSH-2.0-OpenSSH\r\n\r\n"

    async with FakeServer(handler) as server, RpcClient(server.url) as client:
        with pytest.raises(RpcTransportError, match="status line"):
            await client.call("getblockcount")


async def test_connection_refused() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    async with RpcClient(f"http://127.0.0.1:{port}", timeout=5) as client:
        with pytest.raises(RpcTransportError, match="cannot connect"):
            await client.call("getblockcount")


async def test_chunked_and_connection_close() -> None:
    async def handler(headers: dict[str, str], body: bytes) -> bytes:
        return http(200, result(body, "chunky"), chunked=True, close=True)

    async with FakeServer(handler) as server, RpcClient(server.url) as client:
        assert await client.call("a") == "chunky"
        assert await client.call("b") == "chunky"
        assert server.connections == 2


async def test_idle_connection_closed_by_server_is_replaced() -> None:
    async def handler(headers: dict[str, str], body: bytes) -> bytes:
        return http(200, result(body, "ok"))

    async with FakeServer(handler) as server, RpcClient(server.url) as client:
        assert await client.call("a") == "ok"
        # The server drops the pooled keep-alive connection (as bitcoind does on
        # its idle timeout): the next call must still get through.
        server.drop_connections()
        await asyncio.sleep(0.05)
        assert await client.call("b") == "ok"
        assert server.connections == 2


async def test_401_is_auth_error_and_cookie_is_reread(tmp_path: Path) -> None:
    cookie = tmp_path / ".cookie"
    cookie.write_text("__cookie__:old")
    good = "Basic " + __import__("base64").b64encode(b"__cookie__:new").decode()

    async def handler(headers: dict[str, str], body: bytes) -> bytes:
        if headers.get("authorization") != good:
            return b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
        return http(200, result(body, "ok"))

    async with FakeServer(handler) as server:
        async with RpcClient(server.url, cookie_path=cookie) as client:
            with pytest.raises(RpcAuthError, match="401"):
                await client.call("getblockcount")
            cookie.write_text("__cookie__:new")  # the node restarted: new cookie
            assert await client.call("getblockcount") == "ok"
        async with RpcClient(server.url, cookie_path=tmp_path / "missing") as client:
            with pytest.raises(RpcAuthError, match="cookie"):
                await client.call("getblockcount")


def test_bad_url_rejected() -> None:
    with pytest.raises(ValueError, match="unsupported RPC URL"):
        RpcClient("https://example.com")


async def test_closed_client_refuses(echo: FakeServer) -> None:
    client = RpcClient(echo.url)
    await client.close()
    with pytest.raises(RpcTransportError, match="closed"):
        await client.call("x")
