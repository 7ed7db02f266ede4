"""The node's RPC HTTP server refuses abusive requests early, as bitcoind's does.

A ``gateway node`` subprocess (so that its memory can be measured alone) is
reached with raw sockets on 127.0.0.1: a head over 8 KiB or with too many
fields gets 431, an oversize Content-Length 413 and a wrong cookie 401 before
any body byte is read, and a request still incomplete after the server's
timeout 408 (slowloris).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.chain.node.common import MAX_REQUEST_BYTES
from gateway.chain.rpc import RpcClient

GATEWAY = str(Path(sys.executable).with_name("gateway"))
TIMEOUT = 1.5


class NodeProcess:
    def __init__(self, proc: subprocess.Popen[str], url: str, cookie: Path) -> None:
        self.proc = proc
        self.url = url
        self.cookie = cookie
        self.port = int(url.rsplit(":", 1)[1])

    def auth(self) -> str:
        return "Basic " + base64.b64encode(self.cookie.read_bytes()).decode()

    def peak_rss_kib(self) -> int:
        """VmHWM: the most memory the node ever had resident."""
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        line = next(x for x in status.splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1])

    def height(self) -> int:
        async def ask() -> int:
            async with RpcClient(self.url, cookie_path=self.cookie) as rpc:
                return int(await rpc.call("getblockcount"))

        return asyncio.run(ask())


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    datadir = tmp_path_factory.mktemp("httpnode")
    proc = subprocess.Popen(
        [GATEWAY, "node", "--datadir", str(datadir), "--rpc-port", "0",
         "--rpc-timeout", str(TIMEOUT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(3)]
    url = lines[1].split("RPC URL: ")[1].strip()
    cookie = Path(lines[2].split("cookie: ")[1].strip())
    try:
        yield NodeProcess(proc, url, cookie)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def exchange(node: NodeProcess, head: bytes, *, read_timeout: float = 10) -> tuple[bytes, float]:
    """Send ``head`` (sending on in a thread), return the answer and how long it took."""
    sock = socket.create_connection(("127.0.0.1", node.port))
    sock.settimeout(read_timeout)

    def send() -> None:
        # The server stops reading a refused request: a failed send is expected.
        with contextlib.suppress(OSError):
            sock.sendall(head)

    sender = threading.Thread(target=send)
    start = time.monotonic()
    sender.start()
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except OSError:
        pass
    elapsed = time.monotonic() - start
    sender.join(timeout=30)
    sock.close()
    return answer, elapsed


def test_a_million_headers_are_refused_without_growing_the_node(node: NodeProcess) -> None:
    head = b"POST / HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: y\r\n" * 1_000_000 + b"\r\n"
    before = node.peak_rss_kib()
    answer, _ = exchange(node, head)
    assert answer.startswith(b"HTTP/1.1 431 ")
    grown = node.peak_rss_kib() - before
    assert grown < 4 * 1024, f"the node grew by {grown} KiB"
    assert node.height() == 120  # and it still serves


def test_too_many_small_headers_get_431(node: NodeProcess) -> None:
    head = b"POST / HTTP/1.1\r\nHost: x\r\n" + b"A: b\r\n" * 150 + b"Content-Length: 2\r\n\r\n{}"
    answer, _ = exchange(node, head)
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_oversize_content_length_gets_413_before_the_body(node: NodeProcess) -> None:
    head = (
        b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: " + node.auth().encode()
        + f"\r\nContent-Length: {MAX_REQUEST_BYTES + 1}\r\n\r\n".encode()
    )
    answer, elapsed = exchange(node, head)  # no body is ever sent
    assert answer.startswith(b"HTTP/1.1 413 ") and elapsed < TIMEOUT
    assert b"connection: close" in answer.lower()


def test_wrong_cookie_gets_401_before_the_body(node: NodeProcess) -> None:
    head = (
        b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: Basic eDp5\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    answer, elapsed = exchange(node, head)
    assert answer.startswith(b"HTTP/1.1 401 ") and elapsed < TIMEOUT
    assert b'www-authenticate: basic realm="jsonrpc"' in answer.lower()


def test_get_is_405(node: NodeProcess) -> None:
    answer, _ = exchange(node, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 405 ")
    assert answer.endswith(b"JSONRPC server handles only POST requests")


def test_slowloris_gets_408_within_the_timeout(node: NodeProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", node.port))
    sock.settimeout(0.1)
    start = time.monotonic()
    sock.sendall(b"POST / HTTP/1.1\r\nHost: x\r\n")
    answer = b""
    while time.monotonic() - start < TIMEOUT + 3:
        with contextlib.suppress(OSError):
            sock.sendall(b"X-Slow: 1\r\n")  # one header now and then, never the end
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        answer += chunk
    elapsed = time.monotonic() - start
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert TIMEOUT - 0.1 <= elapsed < TIMEOUT + 1.5


def test_slow_body_gets_408_and_idle_keep_alive_is_closed_quietly(node: NodeProcess) -> None:
    head = (
        b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: " + node.auth().encode()
        + b"\r\nContent-Length: 100\r\n\r\n{\"method\""
    )
    answer, elapsed = exchange(node, head)
    assert answer.startswith(b"HTTP/1.1 408 ") and elapsed < TIMEOUT + 1.5
    # A connection that sends nothing is closed after the timeout without an answer.
    answer, elapsed = exchange(node, b"")
    assert answer == b"" and TIMEOUT - 0.1 <= elapsed < TIMEOUT + 1.5


def test_keep_alive_batch_and_json_rpc_statuses(node: NodeProcess) -> None:
    auth = node.auth().encode()

    def post(body: bytes) -> bytes:
        return (b"POST / HTTP/1.1\r\nHost: x\r\nAuthorization: " + auth
                + f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)

    sock = socket.create_connection(("127.0.0.1", node.port))
    sock.settimeout(10)
    try:
        replies = []
        for body in (b'{"id":1,"method":"getblockcount"}', b'{"id":2,"method":"nope"}',
                     b'[{"id":3,"method":"getblockcount"}]', b"not json"):
            sock.sendall(post(body))
            data = b""
            while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + int(
                data.split(b"Content-Length: ")[1].split(b"\r\n")[0]
                if b"Content-Length: " in data else 0
            ):
                data += sock.recv(65536)
            replies.append(data)
    finally:
        sock.close()
    assert replies[0].startswith(b"HTTP/1.1 200 ") and replies[0].endswith(
        b'{"result":120,"error":null,"id":1}')
    assert replies[1].startswith(b"HTTP/1.1 404 ")
    assert replies[2].startswith(b"HTTP/1.1 200 ") and replies[2].endswith(b"]")
    assert replies[3].startswith(b"HTTP/1.1 500 ") and b"-32700" in replies[3]
