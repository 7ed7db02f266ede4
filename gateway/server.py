"""The gateway process: WebSocket sessions at ``/paystream/2``, JSON at
``/api/*``, the chain, the store and the settlement duty, on one port.

Start order (and reverse stop order): store → master key → chain (embedded
node unless ``rpc_url`` names a bitcoind) → chain watcher → catalog →
channels reloaded from the store → settlement duty (which settles at once
what is due: restart recovery, protocol.md section 8) → WebSocket server.

With ``gateway serve --workers N`` each of N processes runs one of these on a
shared socket, holding its own share of the channels (gateway/workers.py).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
from collections import Counter
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import WSCloseCode, web
from aiohttp.http_exceptions import HttpProcessingError
from aiortc import RTCIceServer

from gateway.chain.rpc import RpcClient, RpcException
from gateway.chain.watch import REORG_WINDOW, ChainFollower
from gateway.config import Config, ConfigError, trusted_networks
from gateway.datadir import secure_datadir, write_private
from gateway.funding import FundingDuty
from gateway.handover import LinkError, WorkerRole
from gateway.ice import IceConfig
from gateway.keys import MasterKey
from gateway.ledger import (
    ClusterError,
    Ledger,
    LiveChannel,
    PgStore,
    Store,
    open_store,
)
from gateway.live.onair import OnAir
from gateway.media.catalog import Catalog, MediaItem
from gateway.media.library import Library
from gateway.peers import host_name
from gateway.protocol.scripts import address_to_script_pubkey
from gateway.protocol.settlement import feerate
from gateway.session import Session, SessionContext
from gateway.settlement import Settler, SettleSettings
from gateway.web import WebContext, add_routes, errors
from gateway.web.http import form_params, json_response
from gateway.wsconn import AiohttpConnection

if TYPE_CHECKING:
    import socket

log = logging.getLogger(__name__)

PATH = "/paystream/2"
#: Version 1's path: still upgraded, so that a version 1 client's ``hello``
#: gets the clear ``unsupported_version`` error (protocol.md section 10).
LEGACY_PATHS = ("/paystream/1",)
#: Bitcoin Core's ``getblockchaininfo.chain`` → protocol.md ``hello.network``.
NETWORKS = {"regtest": "regtest", "signet": "signet", "test": "testnet", "main": "main"}
#: Client messages are small; a signed T1 in ``fund.tx`` is the largest.
MAX_CLIENT_MESSAGE = 256 * 1024
#: aiohttp's logger of each HTTP request (INFO: shown with ``gateway serve -v``).
ACCESS_LOG = "aiohttp.access"
#: Seconds our closing handshake waits for the peer's: a viewer that stopped
#: reading must not hold a session (or an operator's settle) for long.
CLOSE_TIMEOUT_S = 2.0


class Gateway:
    """One gateway process, wired together; see the module docstring for the order.

    It owns no channel state and no SQL: the ledger does (gateway/ledger/).
    It builds the parts, hands each the others it needs, answers HTTP, and
    accepts sessions.
    """

    def __init__(self, config: Config, *, worker: WorkerRole | None = None) -> None:
        self.config = config
        #: Set in a worker of ``gateway serve --workers N`` (gateway/workers.py).
        self.worker = worker
        self.datadir = Path(config.datadir)
        secure_datadir(self.datadir)
        self.library = Library(config.media)
        #: This gateway host's name (``/api/health``; its holdings in a shared ledger).
        self.host_id = host_name(config)  # gateway/peers.py
        store, self.cluster = open_store(
            config.store, self.datadir, host_id=self.host_id, lease_s=config.lease_s
        )
        self.master = MasterKey.load_or_create(config.master_key or self.datadir / "master.key")
        self.ledger = Ledger(
            store,
            self.master,
            publisher_of=self.library.publisher_of,
            worker=worker,
            cluster=self.cluster,
        )
        self.node: Any = None
        self.rpc: RpcClient
        self.watcher: ChainFollower
        self.funding: FundingDuty
        self.settler: Settler
        self.network = "regtest"
        self.limits = config.limits.resolve(self.network)
        #: Confirmations that make a settlement or refund final (protocol.md section 8).
        self.settle_depth = config.settle_depth(self.network)
        #: Seconds a closed channel may wait to share a settlement (settlement.py).
        self.settle_window = 0.0
        self.operator_script = b""
        self.sessions: Counter[str] = Counter()
        self._session_context: SessionContext | None = None
        self._web_context: WebContext | None = None
        self._runner: web.AppRunner | None = None
        self._trusted = trusted_networks(config.trusted_proxies)
        #: Sockets accepted that have not said ``hello`` yet (all addresses).
        self.half_open = 0
        #: Every session's socket, told "going away" when the gateway stops.
        self._sockets: set[web.WebSocketResponse] = set()
        self.port = config.port
        self.operator_token = config.operator_token or operator_token(self.datadir)
        #: Live items being published here (WHIP; gateway/live/onair.py).
        self.on_air = OnAir(config.media, ice=ice_config(config))

    @property
    def store(self) -> Store | PgStore:
        """The ledger's store (tests and the operator's tools read it)."""
        return self.ledger.store

    @property
    def channels(self) -> dict[str, LiveChannel]:
        """The channels this process holds (the ledger's)."""
        return self.ledger.channels

    @property
    def catalog(self) -> Catalog:
        """The catalog as last read."""
        return self.library.catalog

    @catalog.setter
    def catalog(self, catalog: Catalog) -> None:
        self.library.catalog = catalog

    # -- lifecycle ------------------------------------------------------------

    async def start(self, *, serve_sockets: bool = True, sock: socket.socket | None = None) -> None:
        """Start every part (see the module docstring); serve on ``sock`` if given.

        A start that fails stops what it had started, so nothing is left open.
        """
        try:
            await self._start(serve_sockets, sock)
        except BaseException:
            await self.stop()
            raise

    async def _start(self, serve_sockets: bool, sock: socket.socket | None) -> None:
        await self.ledger.start()
        if self.cluster is not None:  # refuse another master key before anything else
            try:
                await self.cluster.agree("master_key", self.master.fingerprint())
            except ClusterError as exc:
                raise GatewayStartError(str(exc)) from None
        if self.config.rpc_url is None:
            from gateway.chain.node import EmbeddedNode

            self.node = EmbeddedNode(
                self.datadir / "node",
                rpc_port=self.config.rpc_port,
                block_interval=self.config.block_interval,
            )
            await self.node.start()
            self.rpc = RpcClient(self.node.rpc_url, cookie_path=self.node.cookie_path)
        else:
            self.rpc = RpcClient(
                self.config.rpc_url,
                cookie_path=self.config.rpc_cookie,
                user=self.config.rpc_user,
                password=self.config.rpc_password,
            )
        info = await self.rpc.call("getblockchaininfo")
        self.network = NETWORKS.get(info["chain"], info["chain"])
        try:
            self.config.check_network(self.network)
        except ConfigError as exc:
            raise GatewayStartError(str(exc)) from None
        self.limits = self.config.limits.resolve(self.network)
        self.settle_depth = self.config.settle_depth(self.network)
        self.settle_window = self.config.settle_window(self.network, embedded=self.node is not None)
        if self.cluster is not None:
            try:
                address = await self._join_cluster()
            except ClusterError as exc:
                raise GatewayStartError(str(exc)) from None
        else:
            address = self.config.operator_address or await operator_address(
                self.rpc, self.datadir
            )
        self.operator_script = address_to_script_pubkey(address, self.network)
        self.watcher = ChainFollower(self.rpc)
        self.funding = FundingDuty(
            rpc=self.rpc,
            follower=self.watcher,
            ledger=self.ledger,
            min_conf=self.limits.min_conf,
            settle_depth=self.settle_depth,
        )
        self.settler = Settler(
            ledger=self.ledger,
            rpc=self.rpc,
            follower=self.watcher,
            funding=self.funding,
            library=self.library,
            settings=SettleSettings(
                interval_s=self.config.settle_interval_s,
                window_s=self.settle_window,
                depth=self.settle_depth,
                fee_floor=feerate(str(self.config.fee_floor)),
                resume_grace_s=self.limits.resume_grace_s,
                operator_script=self.operator_script,
                network=self.network,
                # A session keeps an unfunded channel two funding timeouts at most.
                unfunded_ttl_s=3 * self.config.funding_timeout_s,
            ),
        )
        held = self.ledger.load(self.limits, self.watcher)
        # What the live channels watch is registered before the follower reads
        # the blocks since the checkpoint: a settlement confirmed, or a
        # funding spent, while the gateway was down is seen now.
        checkpoint = self.ledger.checkpoint()
        if checkpoint is None and held:  # a store made by a version that kept none
            checkpoint = (max(0, int(info["blocks"]) - REORG_WINDOW), "")
        await self.watcher.start(checkpoint)
        self._save_checkpoint(self.watcher.height)
        self.watcher.on_block.append(self.funding.on_block)
        self.watcher.on_block.append(self._save_checkpoint)
        self.watcher.on_reorg.append(self.funding.on_reorg)
        await self.funding.check(self.ledger.watched_fundings())
        if self.cluster is not None:  # hand-overs, the lease, orphans: from now on
            await self.cluster.start(self.ledger)
        await self.settler.start()
        self._session_context = SessionContext(
            ledger=self.ledger,
            rpc=self.rpc,
            follower=self.watcher,
            funding=self.funding,
            settler=self.settler,
            library=self.library,
            network=self.network,
            limits=self.limits,
            funding_timeout_s=self.config.funding_timeout_s,
            idle_timeout_s=self.config.idle_timeout_s,
            max_unfunded_per_ip=self.config.max_unfunded_per_ip,
            admit=self.admit,
            handshake_timeout_s=self.config.handshake_timeout_s,
            unpaid_timeout_s=self.config.unpaid_timeout_s,
            on_air=self.on_air,
        )
        self._web_context = WebContext(
            ledger=self.ledger,
            rpc=self.rpc,
            follower=self.watcher,
            settler=self.settler,
            library=self.library,
            network=self.network,
            limits=self.limits,
            operator_token=self.operator_token,
            everywhere=self.everywhere,
            on_air=self.on_air,
            publisher_token=self.master.publisher_token,
        )
        if serve_sockets:
            await self._serve(sock)

    async def _serve(self, sock: socket.socket | None) -> None:
        """Serve HTTP and the WebSocket on one port (aiohttp), on ``sock`` if given."""
        app = web.Application(middlewares=[errors], client_max_size=MAX_CLIENT_MESSAGE)
        for path in (PATH, *LEGACY_PATHS):
            app.router.add_get(path, self._websocket, allow_head=False)
        app.router.add_get("/api/health", self._health)
        app.router.add_get("/api/catalog", self._catalog)
        app.router.add_post("/api/admin/settle", self._admin_settle)
        app.router.add_post("/api/admin/host", self._admin_host)
        assert self._web_context is not None
        add_routes(app, self._web_context)
        if self.worker is not None:
            app.on_response_prepare.append(self._tag_response)
        # Requests go to ACCESS_LOG, quiet unless ``-v`` (server_cli.py).
        self._runner = web.AppRunner(
            app,
            access_log=logging.getLogger(ACCESS_LOG),
            logger=_HTTP_LOG,  # malformed requests: one line, no traceback
            handle_signals=False,
        )
        await self._runner.setup()
        site: web.BaseSite
        if sock is not None:
            site = web.SockSite(self._runner, sock)
        else:
            site = web.TCPSite(self._runner, self.config.host, self.port, backlog=4096)
        await site.start()
        # The port the OS gave (port 0): the listening socket's own.
        server: Any = site._server
        self.port = server.sockets[0].getsockname()[1]
        if self.cluster is not None:  # where the other hosts ask this one
            self.cluster.url = f"http://{self.config.host}:{self.port}/"
            await self.cluster.register()

    async def _join_cluster(self) -> str:
        """Take the cluster's operator address and token (set them if first); register."""
        assert self.cluster is not None
        address = await self.cluster.agree(
            "operator_address",
            self.config.operator_address,
            lambda: operator_address(self.rpc, self.datadir),
        )
        local = self.operator_token

        async def ours() -> str:
            return local

        token = await self.cluster.agree("operator_token", self.config.operator_token, ours)
        if token != local:  # `gateway settle` reads the data dir's copy
            write_private(self.datadir / "operator-token", token + "\n")
            self.operator_token = token
        await self.cluster.register()
        return address

    async def stop(self) -> None:
        """Stop serving, then stop every part in reverse order (those that started)."""
        await self.on_air.stop()  # live viewers get `end` while their sockets are up
        # Sessions are closed with 1001 (RFC 6455 section 7.4.1, going away)
        # instead of waiting out aiohttp's shutdown timeout: each ends as a
        # disconnect does, its meter flushed, its channel kept in the ledger
        # for a resume after the restart (protocol.md section 4).
        await asyncio.gather(
            *(ws.close(code=WSCloseCode.GOING_AWAY, message=b"going away") for ws in self._sockets),
            return_exceptions=True,
        )
        if self._runner is not None:
            await self._runner.cleanup()
        if hasattr(self, "settler"):
            await self.settler.stop()
        if self.cluster is not None:
            await self.cluster.stop()
        if hasattr(self, "watcher"):
            await self.watcher.stop()
        if hasattr(self, "rpc"):
            await self.rpc.close()
        if self.node is not None:
            await self.node.stop()
        await self.ledger.close()

    def _save_checkpoint(self, height: int) -> None:
        """Follower callback: remember the tip followed (where the next start reads from)."""
        task = asyncio.ensure_future(self.ledger.save_checkpoint(height, self.watcher.best_hash))
        task.add_done_callback(_log_failure)

    def catalog_item(self, media: str) -> MediaItem | None:
        """The catalog item ``media``, re-reading catalog.toml if it changed."""
        return self.library.item(media)

    # -- sockets ------------------------------------------------------------------

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        """``/paystream/2``: one session per socket (protocol.md section 4)."""
        ws = web.WebSocketResponse(
            max_msg_size=MAX_CLIENT_MESSAGE,
            compress=False,  # media does not compress; deflate only costs CPU
            heartbeat=20,
            timeout=CLOSE_TIMEOUT_S,  # a peer that never answers our close
        )
        if not ws.can_prepare(request).ok:
            return json_response(HTTPStatus.UPGRADE_REQUIRED, {"error": "use a WebSocket"})
        if self.half_open >= self.config.max_half_open:
            return json_response(HTTPStatus.SERVICE_UNAVAILABLE,
                                 {"error": "too many connections are opening; try again"})
        peer = client_address(request, self._trusted)
        writer = await ws.prepare(request)
        assert self._session_context is not None
        session = Session(self._session_context, AiohttpConnection(ws, writer), peer)
        self.half_open += 1
        self._sockets.add(ws)
        log.info("session from %s started", peer)
        try:
            await session.run()
        finally:
            self._sockets.discard(ws)
            log.info("session from %s ended (channel %s)", peer, session.channel_label())
            if session.admitted:
                self.leave(peer)
            else:
                self.half_open -= 1
            _release(request, ws)
        return ws

    def admit(self, peer: str) -> bool:
        """A session said ``hello``: count it for ``peer``, or refuse (``busy``).

        Admitted or not, it is no longer half-open.
        """
        if self.sessions[peer] >= self.config.max_sessions_per_ip:
            return False
        self.half_open -= 1
        self.sessions[peer] += 1
        return True

    def leave(self, peer: str) -> None:
        """An admitted session ended."""
        self.sessions[peer] -= 1
        if self.sessions[peer] <= 0:
            del self.sessions[peer]

    async def _health(self, request: web.Request) -> web.Response:
        return json_response(HTTPStatus.OK, await self.health())

    async def _catalog(self, request: web.Request) -> web.Response:
        return json_response(HTTPStatus.OK, self.library.current().to_api(self.on_air.on_air()))

    async def _admin_settle(self, request: web.Request) -> web.Response:
        """``POST /api/admin/settle[?channel=ID]`` with the operator token (``gateway settle``).

        Settling never waits on a client: each session is told in the background.
        """
        if not self._is_operator(request):
            return json_response(HTTPStatus.UNAUTHORIZED, {"error": "operator token required"})
        wanted = (await form_params(request)).get("channel")
        try:
            # Every worker must answer: a channel's holder may be restarting.
            answers = await self.everywhere("settle", whole=True, channel=wanted)
        except LinkError as exc:  # a worker is down (workers.WHOLE_WAIT_S) or failed
            message = str(exc).removeprefix("WorkersDown: ")
            return json_response(HTTPStatus.SERVICE_UNAVAILABLE, {"error": message})
        except RpcException as exc:  # no node: see Settler.settle_by_hand, nothing is lost
            message = f"settling failed: {exc}; try again"
            return json_response(HTTPStatus.SERVICE_UNAVAILABLE, {"error": message})
        if all(answer is None for answer in answers):
            return json_response(HTTPStatus.NOT_FOUND, {"error": f"no live channel {wanted}"})
        items = [item for answer in answers if answer for item in answer]
        settled = [item for item in items if "error" not in item]
        failed = [item for item in items if "error" in item]
        return json_response(HTTPStatus.OK, {"settled": settled, "failed": failed})

    def _is_operator(self, request: web.Request) -> bool:
        """The request carries the operator token (compared in constant time)."""
        given = request.headers.get("Authorization", "").encode()
        return hmac.compare_digest(given, f"Bearer {self.operator_token}".encode())

    async def _admin_host(self, request: web.Request) -> web.Response:
        """``POST /api/admin/host`` (form ``what``, ``args`` as JSON): another host asks."""
        if not self._is_operator(request):
            return json_response(HTTPStatus.UNAUTHORIZED, {"error": "operator token required"})
        params = await form_params(request)
        what = params.get("what", "")
        if what not in ("stats", "channels", "settle"):
            return json_response(HTTPStatus.BAD_REQUEST, {"error": f"cannot answer {what!r}"})
        try:
            args = json.loads(params.get("args", "{}"))
        except ValueError:
            return json_response(HTTPStatus.BAD_REQUEST, {"error": "args must be a JSON object"})
        if not isinstance(args, dict):
            return json_response(HTTPStatus.BAD_REQUEST, {"error": "args must be a JSON object"})
        try:
            answer = await self.answer(what, args)
        except RpcException as exc:
            return json_response(HTTPStatus.SERVICE_UNAVAILABLE, {"error": str(exc)})
        return json_response(HTTPStatus.OK, {"answer": answer})

    async def everywhere(self, what: str, *, whole: bool = False, **args: Any) -> list[Any]:
        """:meth:`answer` ``what`` in every worker (just here without ``--workers``).

        ``whole``: wait for a restarting worker; see :meth:`Supervisor.everywhere`.
        With a shared ledger: in every host of the cluster.
        """
        if self.cluster is not None:
            from gateway.peers import HostDown, everywhere_in_cluster

            try:
                return await everywhere_in_cluster(
                    self.cluster, self.operator_token, self.answer, what, args, whole=whole
                )
            except HostDown as exc:  # answered 503 like a worker that is down
                raise LinkError(str(exc)) from None
        if self.worker is None:
            return [await self.answer(what, args)]
        answers = await self.worker.link.request("everywhere", what=what, args=args, whole=whole)
        return list(answers)

    async def answer(self, what: str, args: dict[str, Any]) -> Any:
        """What one gateway process answers for itself (:meth:`everywhere`, the supervisor)."""
        if what == "release":
            return await self.ledger.release(int(args["row"]))
        if what == "settle":
            try:
                return await self.settler.settle_by_hand(args.get("channel"))
            except KeyError:
                return None
        if what == "stats":
            return {
                "host": self.host_id,
                "worker": self.worker.index if self.worker else 0,
                "channels": len(self.channels),
                "sessions": sum(self.sessions.values()),
                **self.ledger.stats,
            }
        if what == "channels":
            return [live.summary() for live in self.channels.values()]
        raise ValueError(f"unknown request {what!r}")

    async def health(self) -> dict[str, Any]:
        """The body of ``GET /api/health`` (channels and sessions of every worker)."""
        stats = await self.everywhere("stats")
        return {
            "status": "ok",
            "host": self.host_id,
            "network": self.network,
            "height": self.watcher.height,
            "channels": sum(s["channels"] for s in stats),
            "sessions": sum(s["sessions"] for s in stats),
            "workers": sorted(
                ({k: s[k] for k in ("worker", "channels", "sessions")} for s in stats),
                key=lambda s: s["worker"],
            ),
            "hosts": sorted(
                ({k: s[k] for k in ("host", "channels", "sessions")} for s in stats),
                key=lambda s: s["host"],
            ),
            "store": {
                "commits": sum(s["commits"] for s in stats),
                "requests": sum(s["requests"] for s in stats),
            },
            # With a shared ledger: this host's own store figures.
            **({"own_store": self.ledger.stats} if self.cluster is not None else {}),
        }

    async def _tag_response(self, request: web.Request, response: web.StreamResponse) -> None:
        """Name the worker in every answer (operators and tests see where a session runs)."""
        assert self.worker is not None
        response.headers["X-Paystream-Worker"] = str(self.worker.index)

    def urls(self) -> dict[str, str]:
        """Where clients find this gateway (printed on start)."""
        return urls(self.config.host, self.port, self.node)


def urls(host: str, port: int, node: Any) -> dict[str, str]:
    """Where clients find a gateway on ``host:port``, and its embedded ``node`` if any."""
    found = {"ws": f"ws://{host}:{port}{PATH}", "web": f"http://{host}:{port}/"}
    if node is not None:
        found["rpc"] = node.rpc_url
        found["cookie"] = str(node.cookie_path)
    return found



class _ClientErrorsInOneLine(logging.Filter):
    """A malformed request is the client's error: one INFO line, never a traceback.

    aiohttp logs what its parser refuses (bad method, version, a line too
    long) at ERROR with the parser's traceback; anyone can send such bytes,
    so left alone they would write tracebacks into the log at will (hardening
    issue, item 4). The gateway's own errors keep theirs.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            said = record.getMessage()
            record.msg = "%s (bad request: %s)"
            record.args = (said, " ".join(str(exc).split())[:200])
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


_HTTP_LOG = logging.getLogger("gateway.http")
_HTTP_LOG.addFilter(_ClientErrorsInOneLine())


def client_address(
    request: web.Request, trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> str:
    """The viewer's address: the socket's peer, or what trusted proxies say it is.

    Only when the peer is a trusted proxy are ``Forwarded`` (RFC 7239) or
    ``X-Forwarded-For`` read, right to left: the first address that is not a
    trusted proxy is the client (anything further left, the client wrote).
    """
    peer = request.remote or "?"
    if not trusted or not _is_trusted(peer, trusted):
        return peer
    hops = _forwarded_for(request.headers.get("Forwarded", ""))
    if not hops:
        hops = [h.strip() for h in request.headers.get("X-Forwarded-For", "").split(",")]
    for hop in reversed([h for h in hops if h]):
        if not _is_trusted(hop, trusted):
            return hop
    return peer


def _forwarded_for(header: str) -> list[str]:
    """The ``for=`` addresses of an RFC 7239 ``Forwarded`` header, in order."""
    hops = []
    for element in header.split(","):
        for pair in element.split(";"):
            name, _, value = pair.strip().partition("=")
            if name.lower() == "for":
                value = value.strip('"')
                if value.startswith("["):  # [IPv6]:port
                    value = value[1 : value.find("]")]
                elif value.count(":") == 1:  # IPv4:port
                    value = value.split(":")[0]
                hops.append(value)
    return hops


def _is_trusted(address: str, trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False  # "unknown", an obfuscated name: never a trusted proxy
    return any(ip in network for network in trusted)


class GatewayStartError(RuntimeError):
    """The gateway refuses to start (a setting unsafe on this network); one line."""


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not save the chain checkpoint: %s", task.exception())


def ice_config(config: Config) -> IceConfig:
    """The live peers' ICE settings: ``ice_servers``, and loopback when served there."""
    servers = [RTCIceServer(url.strip()) for url in config.ice_servers.split(",") if url.strip()]
    return IceConfig(servers=tuple(servers), host=config.host)


def operator_token(datadir: Path) -> str:
    """The operator token kept in the data dir (mode 0600), made on first run."""
    import secrets

    path = datadir / "operator-token"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        token = secrets.token_urlsafe(24)
        write_private(path, token + "\n", exclusive=True)
        return token


async def operator_address(rpc: RpcClient, datadir: Path) -> str:
    """The operator's payout address, asked of the node's wallet once and kept."""
    path = datadir / "operator-address"
    if path.exists():
        return path.read_text().strip()
    address = str(await rpc.call("getnewaddress"))
    write_private(path, address + "\n")
    return address


async def run_gateway(config: Config, *, ready: asyncio.Event | None = None) -> None:
    """Run until cancelled or SIGINT/SIGTERM; print where to connect."""
    import signal

    gateway = Gateway(config)
    await gateway.start()
    tune_gc()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    announce(gateway.network, gateway.urls(), gateway.datadir)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        await gateway.stop()


def announce(network: str, urls: dict[str, str], datadir: Path, *, workers: int = 1) -> None:
    """Print where to connect and write ``DATADIR/gateway.json`` (``gateway settle`` reads it)."""
    import os

    suffix = f" ({workers} workers)" if workers > 1 else ""
    print(f"paystream gateway on {network}{suffix}", flush=True)
    print(f"  websocket: {urls['ws']}", flush=True)
    print(f"  web:       {urls['web']}", flush=True)
    if "rpc" in urls:
        print(f"  node rpc:  {urls['rpc']}  (cookie {urls['cookie']})", flush=True)
    # Atomic: `gateway settle` and tests read it while we may be writing it.
    info = datadir / "gateway.json"
    write_private(info.with_suffix(".tmp"), json.dumps({"pid": os.getpid(), **urls}))
    info.with_suffix(".tmp").replace(info)


def _release(request: web.Request, ws: web.WebSocketResponse) -> None:
    """Let a finished socket be freed by reference counting, not by a full collection.

    aiohttp (3.14) leaves two reference cycles through every ended
    ``WebSocketResponse``: the connection's protocol keeps the socket's
    data callback after the connection is lost (socket → request → protocol
    → socket), and the error that ended a dropped socket (writing the close
    frame to a reset peer, while handling the end of the stream) is kept on
    the socket with tracebacks whose frames hold the socket. ``tune_gc``
    makes full collections rare, so every viewer that left stayed in memory
    until the next one and RSS grew through a soak (docs/performance.md).
    The error is kept for ``ws.exception()``; only its frames go. The
    callback is a private field of aiohttp's: if it is renamed, this does
    nothing and tests/test_abuse.py fails.
    """
    exc, seen = ws.exception(), set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc.__traceback__ = None
        exc = exc.__context__
    protocol = request.protocol
    if getattr(protocol, "_data_received_cb", None) is not None:
        protocol._data_received_cb = None


def tune_gc() -> None:
    """Keep garbage-collection pauses out of the pay → chunk path (process-wide).

    With the default thresholds, full collections over every session's
    objects put long pauses at the 99th percentile of pay → chunk
    (``gateway bench --paced``; docs/performance.md). What start made
    (modules, catalog, chain state) lives as long as the process, so it is
    frozen out of every collection; the young generation is collected every
    50,000 allocations instead of 700 and a full collection happens a hundred
    times less often, so cyclic garbage is still reclaimed, in rarer passes.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)

