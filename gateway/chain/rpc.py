"""Async JSON-RPC client for Bitcoin Core (``bitcoind``) and the embedded node.

HTTP is aiohttp's: one ``ClientSession`` per client, whose connector keeps a
pool of keep-alive connections. On top of it: basic auth from a cookie file
(re-read when the node restarts and answers 401) or ``user``/``password``, a
cap on the response size, one overall timeout per call, and typed errors.
Amounts are parsed as ``Decimal`` like python-bitcoinrpc's AuthServiceProxy,
so BTC values never pick up float error.

Exceptions::

    RpcException
    ├── RpcError(code, message)         the node answered with a JSON-RPC error
    │   ├── RpcMethodNotFound           -32601
    │   ├── RpcInvalidParams            -32602
    │   ├── RpcMiscError                -1
    │   ├── RpcTypeError                -3
    │   ├── RpcInvalidAddressOrKey      -5
    │   ├── RpcWalletInsufficientFunds  -6
    │   ├── RpcInvalidParameter         -8
    │   ├── RpcDeserializationError     -22
    │   ├── RpcVerifyError              -25
    │   ├── RpcVerifyRejected           -26
    │   └── RpcVerifyAlreadyInChain     -27
    └── RpcTransportError               no usable JSON-RPC answer
        ├── RpcAuthError                HTTP 401/403
        └── RpcTimeoutError             no answer within ``timeout``
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace, TracebackType
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
from yarl import URL

#: Cap on a response body, far above any answer this project asks for.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: Connections one client opens at most (more concurrent calls wait for one).
MAX_CONNECTIONS = 32
#: Seconds an idle pooled connection is kept: below bitcoind's 30 s
#: ``-rpcservertimeout``, so the client, not the server, closes it first.
KEEPALIVE_SECONDS = 15.0


class RpcException(Exception):
    """Base class of every error raised by ``RpcClient``."""


class RpcError(RpcException):
    """A JSON-RPC error object from the node: ``code`` and ``message`` as sent."""

    code: int = 0

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{message} (code {code})")
        self.code = code
        self.message = message

    @staticmethod
    def from_error(error: Any) -> RpcError:
        """Build the most specific subclass for a JSON-RPC ``error`` member."""
        if isinstance(error, dict):
            try:
                code = int(error.get("code", -1))
            except (TypeError, ValueError):
                code = -1
            message = str(error.get("message", ""))
        else:
            code, message = -1, str(error)
        return _ERRORS_BY_CODE.get(code, RpcError)(code, message)


class RpcMethodNotFound(RpcError):
    """-32601 RPC_METHOD_NOT_FOUND."""


class RpcInvalidParams(RpcError):
    """-32602 RPC_INVALID_PARAMS."""


class RpcMiscError(RpcError):
    """-1 RPC_MISC_ERROR."""


class RpcTypeError(RpcError):
    """-3 RPC_TYPE_ERROR."""


class RpcInvalidAddressOrKey(RpcError):
    """-5 RPC_INVALID_ADDRESS_OR_KEY (also: no such transaction/block)."""


class RpcWalletInsufficientFunds(RpcError):
    """-6 RPC_WALLET_INSUFFICIENT_FUNDS."""


class RpcInvalidParameter(RpcError):
    """-8 RPC_INVALID_PARAMETER."""


class RpcDeserializationError(RpcError):
    """-22 RPC_DESERIALIZATION_ERROR (e.g. ``TX decode failed``)."""


class RpcVerifyError(RpcError):
    """-25 RPC_VERIFY_ERROR (e.g. ``bad-txns-inputs-missingorspent``)."""


class RpcVerifyRejected(RpcError):
    """-26 RPC_VERIFY_REJECTED: refused by consensus or policy (e.g. ``non-final``)."""


class RpcVerifyAlreadyInChain(RpcError):
    """-27 RPC_VERIFY_ALREADY_IN_CHAIN."""


_ERRORS_BY_CODE: dict[int, type[RpcError]] = {
    -32601: RpcMethodNotFound,
    -32602: RpcInvalidParams,
    -1: RpcMiscError,
    -3: RpcTypeError,
    -5: RpcInvalidAddressOrKey,
    -6: RpcWalletInsufficientFunds,
    -8: RpcInvalidParameter,
    -22: RpcDeserializationError,
    -25: RpcVerifyError,
    -26: RpcVerifyRejected,
    -27: RpcVerifyAlreadyInChain,
}


class RpcTransportError(RpcException):
    """No usable JSON-RPC answer: connection failure, bad HTTP, non-JSON body."""


class RpcAuthError(RpcTransportError):
    """HTTP 401/403: wrong cookie or credentials."""


class RpcTimeoutError(RpcTransportError):
    """The node did not answer within the client's timeout."""


def _json_default(value: Any) -> Any:
    if isinstance(value, Decimal):
        return float(value) if value != value.to_integral_value() else int(value)
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    raise TypeError(f"cannot serialize {type(value).__name__} to JSON")


class RpcClient:
    """Bitcoin Core JSON-RPC client.

    ``url`` is ``http://host:port[/wallet/NAME]``; credentials come from
    ``cookie_path`` (``__cookie__:<hex>``, as bitcoind writes it), from
    ``user``/``password``, or from the URL. Safe for concurrent calls: each
    in-flight request uses its own pooled connection (at most
    ``MAX_CONNECTIONS``); idle ones are reused.
    """

    def __init__(
        self,
        url: str,
        *,
        cookie_path: str | Path | None = None,
        user: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"unsupported RPC URL {url!r}: expected http://host:port")
        self.url = url
        # Credentials travel in our Authorization header only, never from the URL.
        self._post_url = URL.build(
            scheme="http", host=parts.hostname, port=parts.port or 8332, path=parts.path or "/"
        )
        if user is None and parts.username is not None:
            user, password = unquote(parts.username), unquote(parts.password or "")
        self._user = user
        self._password = password
        self._cookie_path = Path(cookie_path) if cookie_path is not None else None
        self._auth: str | None = None
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._ids = itertools.count(1)
        self._closed = False

    async def __aenter__(self) -> RpcClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the pooled connections; the client must not be used afterwards."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._session_loop is asyncio.get_running_loop():
            await session.close()

    def _http(self) -> aiohttp.ClientSession:
        """The session, made on first use inside the running loop (it belongs to that loop)."""
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._session_loop is not loop:
            trace = aiohttp.TraceConfig()
            trace.on_connection_reuseconn.append(_note_reused)
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE_SECONDS
                ),
                # One deadline per call is ours (``timeout``), not aiohttp's.
                timeout=aiohttp.ClientTimeout(total=None),
                trace_configs=[trace],
                trust_env=False,
            )
            self._session_loop = loop
        return self._session

    def _credentials(self, *, reload: bool = False) -> str | None:
        if self._auth is not None and not reload:
            return self._auth
        if self._cookie_path is not None:
            try:
                cookie = self._cookie_path.read_text().strip()
            except OSError as exc:
                raise RpcAuthError(f"cannot read cookie file {self._cookie_path}: {exc}") from exc
            self._auth = base64.b64encode(cookie.encode()).decode()
        elif self._user is not None:
            raw = f"{self._user}:{self._password or ''}"
            self._auth = base64.b64encode(raw.encode()).decode()
        return self._auth

    async def call(self, method: str, *params: Any) -> Any:
        """Call ``method`` with positional ``params``; return its ``result``.

        Raises ``RpcError`` (a subclass per code) or ``RpcTransportError``.
        """
        request_id = next(self._ids)
        payload = {"jsonrpc": "1.0", "id": request_id, "method": method, "params": list(params)}
        answer = await self._post(payload)
        if not isinstance(answer, dict):
            raise RpcTransportError("JSON-RPC answer is not an object")
        error = answer.get("error")
        if error is not None:
            raise RpcError.from_error(error)
        if "result" not in answer:
            raise RpcTransportError("JSON-RPC answer has neither result nor error")
        return answer["result"]

    async def batch(
        self, calls: Iterable[tuple[str, Sequence[Any]]]
    ) -> list[Any | RpcError]:
        """Send several calls in one HTTP request (JSON-RPC batch).

        Returns one item per call, in order: the result, or the ``RpcError``
        instance for a call that failed (not raised, so the others survive).
        """
        ids: list[int] = []
        payload = []
        for method, params in calls:
            request_id = next(self._ids)
            ids.append(request_id)
            payload.append(
                {"jsonrpc": "1.0", "id": request_id, "method": method, "params": list(params)}
            )
        if not payload:
            return []
        answer = await self._post(payload)
        if isinstance(answer, dict) and answer.get("error") is not None:
            raise RpcError.from_error(answer["error"])
        if not isinstance(answer, list):
            raise RpcTransportError("batch answer is not a JSON array")
        by_id: dict[Any, Any] = {}
        for item in answer:
            if isinstance(item, dict):
                by_id[item.get("id")] = item
        results: list[Any | RpcError] = []
        for request_id in ids:
            item = by_id.get(request_id)
            if item is None:
                raise RpcTransportError(f"batch answer lacks id {request_id}")
            if item.get("error") is not None:
                results.append(RpcError.from_error(item["error"]))
            else:
                results.append(item.get("result"))
        return results

    async def _post(self, payload: Any) -> Any:
        if self._closed:
            raise RpcTransportError("client is closed")
        body = json.dumps(payload, default=_json_default).encode()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that races with completion (fixed in 3.12), which
            # left the chain watcher un-cancellable at shutdown.
            async with asyncio.timeout(self.timeout):
                return await self._post_with_retry(body)
        except TimeoutError as exc:
            raise RpcTimeoutError(f"no answer from {self.url} within {self.timeout:g} s") from exc

    async def _post_with_retry(self, body: bytes) -> Any:
        auth = self._credentials()
        for attempt in range(3):
            status, data = await self._request(body, auth)
            if status in (401, 403):
                # bitcoind writes a fresh cookie at each start: re-read it once.
                if self._cookie_path is not None and attempt < 2:
                    new_auth = self._credentials(reload=True)
                    if new_auth != auth:
                        auth = new_auth
                        continue
                raise RpcAuthError(f"HTTP {status}: authorization failed at {self.url}")
            return self._decode(status, data)
        raise RpcTransportError(f"no answer from {self.url}")

    async def _request(self, body: bytes, auth: str | None) -> tuple[int, bytes]:
        """One POST; (status, body). Retried once when a pooled connection turns out stale."""
        headers = {"Content-Type": "application/json"}
        if auth:
            headers["Authorization"] = f"Basic {auth}"
        for retry in (True, False):
            note = SimpleNamespace(reused=False)
            try:
                async with self._http().post(
                    self._post_url, data=body, headers=headers, allow_redirects=False,
                    trace_request_ctx=note,
                ) as response:
                    return response.status, await _read_capped(response)
            except aiohttp.ClientConnectorError as exc:
                raise RpcTransportError(f"cannot connect to {self.url}: {exc}") from exc
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # A pooled keep-alive connection may have been closed by the
                # server while idle: retry once on a fresh one.
                if retry and note.reused:
                    continue
                raise RpcTransportError(f"connection to {self.url} failed: {exc}") from exc
            except aiohttp.ClientResponseError as exc:
                raise RpcTransportError(
                    f"malformed HTTP status line or headers from {self.url}: {exc.message}"
                ) from exc
            except aiohttp.ClientError as exc:
                raise RpcTransportError(f"HTTP exchange with {self.url} failed: {exc}") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _decode(status: int, data: bytes) -> Any:
        try:
            answer = json.loads(data, parse_float=Decimal)
        except (UnicodeDecodeError, ValueError) as exc:
            snippet = data[:80].decode("utf-8", "replace")
            raise RpcTransportError(f"HTTP {status}: non-JSON answer {snippet!r}") from exc
        # bitcoind answers JSON-RPC 1.0 errors with HTTP 500/404 and a JSON body;
        # any other non-200 status without a JSON-RPC body is a transport failure.
        if status != 200 and not (
            isinstance(answer, dict) and answer.get("error") is not None
        ) and not isinstance(answer, list):
            raise RpcTransportError(f"HTTP {status} without a JSON-RPC error")
        return answer


async def _note_reused(
    session: aiohttp.ClientSession, context: SimpleNamespace, params: object
) -> None:
    context.trace_request_ctx.reused = True


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    """The response body, refused past ``MAX_RESPONSE_BYTES`` (before reading it if declared)."""
    length = response.content_length
    if length is not None and length > MAX_RESPONSE_BYTES:
        raise RpcTransportError(f"response body of {length} bytes refused")
    data = bytearray()
    async for chunk in response.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > MAX_RESPONSE_BYTES:
            raise RpcTransportError("response body too large")
    return bytes(data)
