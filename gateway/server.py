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
import contextlib
import json
import logging
import time
from collections import Counter, OrderedDict
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from gateway.chain.rpc import RpcClient, RpcException
from gateway.chain.watch import REORG_WINDOW, ChainFollower
from gateway.channels import FUNDED_STATES, LIVE_STATES, ChannelReleased, LiveChannel, restore
from gateway.config import Config, ConfigError
from gateway.datadir import secure_datadir, write_private
from gateway.funding import FundingDuty
from gateway.keys import MasterKey
from gateway.media.catalog import Catalog, MediaItem
from gateway.protocol.channel import ServerState
from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.protocol.messages import Limits
from gateway.protocol.scripts import address_to_script_pubkey
from gateway.session import Session
from gateway.settlement import Settler
from gateway.store import Store
from gateway.workers import LinkError, WorkerRole

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
#: Bytes of media chunks kept in memory. Every viewer of an item reads the
#: same chunks; a thread hop per chunk read cost ~13% of the gateway's CPU
#: at 5k paid chunks/s (``gateway bench``, py-spy).
CHUNK_CACHE_BYTES = 64 * 1024 * 1024


class PaystreamConnection(ServerConnection):
    """websockets' server connection, writing each batch of frames at once.

    :meth:`gateway.session.Session._send` queues a ``paid``, a ``chunk``, its
    binary frame and the next ``due`` together; websockets writes each frame
    with its own ``transport.write`` (a ``send`` syscall each), which was a
    third of the gateway's time per paid chunk (``gateway bench``, py-spy).
    ``writelines`` costs one (uvloop: one vectored write, no copy).
    """

    def send_data(self) -> None:
        """Write everything the protocol has queued; ``b""`` is websockets' EOF mark."""
        pending: list[bytes] = []
        for data in self.protocol.data_to_send():
            if data:
                pending.append(data)
                continue
            if pending:
                self.transport.writelines(pending)
                pending = []
            # As websockets does: half-close when the transport can, else close.
            if self.transport.can_write_eof():
                with contextlib.suppress(Exception):  # websockets: write_eof raises anything
                    self.transport.write_eof()
            else:
                self.transport.close()
        if pending:
            self.transport.writelines(pending)


class Gateway:
    """Everything one gateway process runs; see the module docstring for order."""

    def __init__(self, config: Config, *, worker: WorkerRole | None = None) -> None:
        self.config = config
        #: Set in a worker of ``gateway serve --workers N`` (gateway/workers.py).
        self.worker = worker
        self.datadir = Path(config.datadir)
        secure_datadir(self.datadir)
        self.store = Store(self.datadir / "gateway.db")
        self.master = MasterKey.load_or_create(self.datadir / "master.key")
        self.node: Any = None
        self.rpc: RpcClient
        self.watcher: ChainFollower
        self.funding: FundingDuty
        self.catalog = Catalog.load(config.media)
        self.network = "regtest"
        self.limits = Limits(**config.limits.to_wire(self.network))
        #: Confirmations that make a settlement or refund final (protocol.md section 8).
        self.settle_depth = config.settle_depth(self.network)
        #: Seconds a closed channel may wait to share a settlement (settlement.py).
        self.settle_window = 0.0
        self.operator_script = b""
        self.channels: dict[str, LiveChannel] = {}
        self.settler = Settler(self)
        self.sessions: Counter[str] = Counter()
        self._unfunded: Counter[str] = Counter()
        self._next_index = 1
        self._server: Server | None = None
        self.port = config.port
        self.operator_token = config.operator_token or operator_token(self.datadir)
        # (id(item), index) -> (item, bytes): the item is held so that its id
        # is not reused while the entry lives; a republished item is a new
        # object, so its chunks are read afresh.
        self._chunks: OrderedDict[tuple[int, int], tuple[MediaItem, bytes]] = OrderedDict()
        self._chunk_bytes = 0
        self._loading: dict[tuple[int, int], tuple[MediaItem, asyncio.Future[bytes]]] = {}
        self._publisher_of: tuple[Catalog | None, dict[str, str]] = (None, {})

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
        await self.store.start()
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
        self.limits = Limits(**self.config.limits.to_wire(self.network))
        self.settle_depth = self.config.settle_depth(self.network)
        self.settle_window = self.config.settle_window(self.network, embedded=self.node is not None)
        self.watcher = ChainFollower(self.rpc)
        self.funding = FundingDuty(
            rpc=self.rpc,
            follower=self.watcher,
            store=self.store,
            channels=lambda: self.channels.values(),
            min_conf=self.limits.min_conf,
            settle_depth=self.settle_depth,
        )
        address = self.config.operator_address or await operator_address(self.rpc, self.datadir)
        self.operator_script = address_to_script_pubkey(address, self.network)
        self._load_channels()
        # What the live channels watch is registered before the follower reads
        # the blocks since the checkpoint: a settlement confirmed, or a
        # funding spent, while the gateway was down is seen now.
        await self.watcher.start(self._checkpoint(int(info["blocks"])))
        self._save_checkpoint(self.watcher.height)
        self.watcher.on_block.append(self.funding.on_block)
        self.watcher.on_block.append(self._save_checkpoint)
        self.watcher.on_reorg.append(self.funding.on_reorg)
        await self.funding.check(
            [c for c in self.channels.values() if c.core.state in FUNDED_STATES]
        )
        await self.settler.start()
        if serve_sockets:
            where: dict[str, Any] = {"sock": sock}
            if sock is None:
                where = {"host": self.config.host, "port": self.port}
            self._server = await serve(
                self._handle,
                **where,
                process_request=self._http,
                process_response=self._tag_response if self.worker is not None else None,
                create_connection=PaystreamConnection,
                compression=None,  # media does not compress; deflate is 13x slower
                max_size=MAX_CLIENT_MESSAGE,
                ping_interval=20,
                ping_timeout=20,
            )
            self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop serving, then stop every part in reverse order (those that started)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.settler.stop()
        if hasattr(self, "watcher"):
            await self.watcher.stop()
        if hasattr(self, "rpc"):
            await self.rpc.close()
        if self.node is not None:
            await self.node.stop()
        await self.store.close()

    def _load_channels(self) -> None:
        rows = self.store.read("SELECT * FROM channels ORDER BY id")
        largest = rows[-1]["id"] if rows else 0
        worker = self.worker
        self._next_index = worker.first_id_above(largest) if worker else largest + 1
        now = time.time()
        live_states = {s.value for s in LIVE_STATES}
        for row in rows:
            if row["state"] not in live_states or not row["channel_id"]:
                continue
            if worker is not None and not worker.holds_at_start(row["id"]):
                continue
            live = self._restore(row)
            # A session that was live when the gateway stopped: its grace runs
            # from the restart (section 8).
            live.disconnected_at = live.disconnected_at or now
            self.hold(live)
        log.info("loaded %d live channels", len(self.channels))

    def _checkpoint(self, tip: int) -> tuple[int, str] | None:
        """Where the follower starts: the last tip followed, stored in ``meta``.

        None (start at the tip) for a new gateway; a store without one but
        with live channels (made by a version that kept none) is read from
        REORG_WINDOW blocks back.
        """
        rows = self.store.read("SELECT value FROM meta WHERE key = 'chain_checkpoint'")
        if rows:
            height, _, block_hash = str(rows[0]["value"]).partition(":")
            return int(height), block_hash
        if self.channels:
            return max(0, tip - REORG_WINDOW), ""
        return None

    def _save_checkpoint(self, height: int) -> None:
        """Follower callback: remember the tip followed (where the next start reads from)."""
        value = f"{height}:{self.watcher.best_hash}"
        op = ("INSERT OR REPLACE INTO meta(key, value) VALUES ('chain_checkpoint', ?)", (value,))
        task = asyncio.ensure_future(self.store.write([op]))
        task.add_done_callback(_log_failure)

    def hold(self, live: LiveChannel) -> None:
        """Hold a funded channel here; the follower watches its funding and settlement."""
        self.channels[live.channel_id] = live
        outpoint = live.core.outpoint
        assert outpoint is not None
        self.watcher.watch_outpoint(outpoint.txid, outpoint.vout)
        if live.core.settlement_txid is not None:
            self.watcher.watch_txid(live.core.settlement_txid)

    def drop(self, live: LiveChannel) -> None:
        """Stop holding ``live`` (it ended, or went to another worker)."""
        if self.channels.get(live.channel_id) is live:
            del self.channels[live.channel_id]
        outpoint = live.core.outpoint
        if outpoint is not None:
            self.watcher.unwatch_outpoint(outpoint.txid, outpoint.vout)
        if live.core.settlement_txid is not None:
            self.watcher.unwatch_txid(live.core.settlement_txid)

    def _restore(self, row: Any) -> LiveChannel:
        deliveries = self.store.read(
            "SELECT media, delivered_ms, bill FROM deliveries WHERE channel = ?", (row["id"],)
        )
        privkey, _ = self.master.channel_key(row["id"])
        return restore(row, deliveries, privkey=privkey, limits=self.limits)

    # -- what sessions ask of the gateway -------------------------------------------

    def next_key_index(self) -> int:
        """A fresh channel index: store row id and K2's BIP32 child (gateway/keys.py)."""
        index = self._next_index
        # Workers allocate ids ≡ their index (mod N): no two derive one key.
        self._next_index += self.worker.count if self.worker else 1
        return index

    def unfunded_opens(self, peer: str) -> int:
        """Channels opened from ``peer`` and not funded yet."""
        return self._unfunded[peer]

    def note_unfunded(self, peer: str, delta: int) -> None:
        """Count an unfunded open from ``peer`` (+1) or its end (-1)."""
        self._unfunded[peer] += delta
        if self._unfunded[peer] <= 0:
            del self._unfunded[peer]

    def known_outpoint(self, channel_id: str) -> bool:
        """True if a stored channel (in any state) is funded by ``channel_id``."""
        return bool(self.store.read("SELECT 1 FROM channels WHERE channel_id = ?", (channel_id,)))

    def load_stored(self, channel_id: str) -> LiveChannel | None:
        """A copy of a channel this process does not hold, as stored (any state).

        A closed one, so that ``resume`` gets ``channel_closed``; in a worker,
        a live one held by another worker, to check a ``resume`` before
        :meth:`take_over`.
        """
        rows = self.store.read("SELECT * FROM channels WHERE channel_id = ?", (channel_id,))
        return self._restore(rows[0]) if rows else None

    async def take_over(self, stored: LiveChannel) -> LiveChannel:
        """Become the holder of a live channel another worker holds (gateway/workers.py).

        The supervisor has the holder end its session and make the meter
        durable first, so the copy loaded here afterwards is complete. Answers
        the stored copy if the channel closed meanwhile (the holder kept it).
        """
        assert self.worker is not None
        if stored.core.state not in _SETTLEABLE:
            return stored
        try:
            acquired = await self.worker.link.request("acquire", row=stored.row_id)
        except LinkError:
            raise ProtocolError(
                ErrorCode.BUSY, "the channel is being handed between workers; resume again"
            ) from None
        held = self.channels.get(stored.channel_id)
        if held is not None:  # another session here took it meanwhile
            return held
        fresh = self.load_stored(stored.channel_id)
        assert fresh is not None
        if not acquired or fresh.core.state not in _SETTLEABLE:
            return fresh
        fresh.disconnected_at = time.time()
        self.hold(fresh)
        return fresh

    async def release(self, row_id: int) -> bool:
        """Hand channel ``row_id`` to another worker (the supervisor asks).

        Ends its session (``session_replaced``, as a resume does in section 5)
        and makes the meter durable, then forgets the channel. False if it is
        closing: a settlement in flight stays with the worker that started it.
        """
        live = next((c for c in self.channels.values() if c.row_id == row_id), None)
        if live is None:
            return True
        async with live.lock:  # no payment or settlement of it is half done
            if self.channels.get(live.channel_id) is not live:
                return True
            if live.core.state not in _SETTLEABLE:
                return False
            session, live.session = live.session, None
            if session is not None:
                session.replaced()  # its stream stops before the meter is written
            live.disconnected_at = live.disconnected_at or time.time()
            await self.store.write(
                [
                    *live.meter_ops(self.publisher_of),
                    (
                        "UPDATE channels SET disconnected_at = ? WHERE id = ?",
                        (live.disconnected_at, live.row_id),
                    ),
                ]
            )
            # Only once durable: if the write failed, it stays held here.
            live.released = True
            self.drop(live)
        return True

    def catalog_item(self, media: str) -> MediaItem | None:
        """The catalog item ``media``, re-reading catalog.toml if it changed."""
        self.catalog = self.catalog.reload_if_changed()
        return self.catalog.items.get(media)

    def cached_chunk(self, item: MediaItem, index: int) -> bytes | None:
        """Chunk ``index`` of ``item`` if it is in memory (no ``await``), else None."""
        key = (id(item), index)
        hit = self._chunks.get(key)
        if hit is not None and hit[0] is item:
            self._chunks.move_to_end(key)
            return hit[1]
        return None

    async def read_chunk(self, item: MediaItem, index: int) -> bytes:
        """Chunk ``index`` of ``item`` (-1: init segment), from memory when cached."""
        hit = self.cached_chunk(item, index)
        if hit is not None:
            return hit
        key = (id(item), index)
        # Viewers of one item move in step: the first miss reads, the rest wait for it.
        loading = self._loading.get(key)
        if loading is not None and loading[0] is item:
            return await asyncio.shield(loading[1])
        task = asyncio.ensure_future(asyncio.to_thread(item.read_chunk, index))
        self._loading[key] = (item, task)
        try:
            data = await asyncio.shield(task)
        finally:
            if self._loading.get(key, (None, None))[1] is task:
                del self._loading[key]
        if len(data) <= CHUNK_CACHE_BYTES // 16:
            old = self._chunks.pop(key, None)
            if old is not None:
                self._chunk_bytes -= len(old[1])
            self._chunks[key] = (item, data)
            self._chunk_bytes += len(data)
            while self._chunk_bytes > CHUNK_CACHE_BYTES:
                _, (_, evicted) = self._chunks.popitem(last=False)
                self._chunk_bytes -= len(evicted)
        return data

    @property
    def publisher_of(self) -> dict[str, str]:
        """media id → publisher id, for the deliveries table (per catalog snapshot)."""
        catalog, mapping = self._publisher_of
        if catalog is not self.catalog:  # asked on every pay: build once per snapshot
            mapping = {iid: item.publisher for iid, item in self.catalog.items.items()}
            self._publisher_of = (self.catalog, mapping)
        return mapping

    # -- sockets ------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        peer = ws.remote_address[0] if ws.remote_address else "?"
        if self.sessions[peer] >= self.config.max_sessions_per_ip:
            await ws.send(
                json.dumps(
                    {
                        "type": "error",
                        "code": "busy",
                        "message": "too many sessions from this address",
                        "fatal": True,
                    }
                )
            )
            await ws.close(1013, "busy")
            return
        self.sessions[peer] += 1
        session = Session(self, ws, peer)
        where = f"{peer}:{ws.remote_address[1]}" if ws.remote_address else peer
        log.info("session from %s started", where)
        try:
            await session.run()
        finally:
            log.info("session from %s ended (channel %s)", where, session.channel_label())
            self.sessions[peer] -= 1
            if self.sessions[peer] <= 0:
                del self.sessions[peer]

    async def _http(self, ws: ServerConnection, request: Request) -> Response | None:
        path, _, query = request.path.partition("?")
        if path == PATH or path in LEGACY_PATHS:
            if request.headers.get("Upgrade", "").lower() != "websocket":
                return _json_response(HTTPStatus.UPGRADE_REQUIRED, {"error": "use a WebSocket"})
            return None
        if path == "/api/health":
            return _json_response(HTTPStatus.OK, await self.health())
        if path == "/api/catalog":
            self.catalog = self.catalog.reload_if_changed()
            return _json_response(HTTPStatus.OK, self.catalog.to_api())
        if path == "/api/admin/settle":
            return await self._admin_settle(request, query)
        try:
            from gateway import web
        except ModuleNotFoundError as exc:  # the web front end is optional
            if exc.name != "gateway.web":
                raise
        else:
            answer = await web.handle_http(self, request)
            if answer is not None:
                return answer
        return _json_response(HTTPStatus.NOT_FOUND, {"error": f"no such path {path}"})

    async def _admin_settle(self, request: Request, query: str) -> Response:
        """``/api/admin/settle[?channel=ID]`` with the operator token (``gateway settle``)."""
        if request.headers.get("Authorization", "") != f"Bearer {self.operator_token}":
            return _json_response(HTTPStatus.UNAUTHORIZED, {"error": "operator token required"})
        wanted = dict(p.partition("=")[::2] for p in query.split("&") if p).get("channel")
        try:
            # Every worker must answer: a channel's holder may be restarting.
            answers = await self.everywhere("settle", whole=True, channel=wanted)
        except LinkError as exc:  # a worker is down (workers.WHOLE_WAIT_S) or failed
            message = str(exc).removeprefix("WorkersDown: ")
            return _json_response(HTTPStatus.SERVICE_UNAVAILABLE, {"error": message})
        except RpcException as exc:  # no node: see settle_by_hand, nothing is lost
            message = f"settling failed: {exc}; try again"
            return _json_response(HTTPStatus.SERVICE_UNAVAILABLE, {"error": message})
        if all(answer is None for answer in answers):
            return _json_response(HTTPStatus.NOT_FOUND, {"error": f"no live channel {wanted}"})
        items = [item for answer in answers if answer for item in answer]
        settled = [item for item in items if "error" not in item]
        failed = [item for item in items if "error" in item]
        return _json_response(HTTPStatus.OK, {"settled": settled, "failed": failed})

    async def settle_by_hand(self, channel_id: str | None) -> list[dict[str, Any]]:
        """Settle one live channel (KeyError if unknown) or every one, now.

        Every one: ready channels are closed and settled in one batch, and
        closing ones have their batch broadcast again. It goes on past a
        channel that failed for want of the node: its item has an ``error``
        instead of a ``txid``. Nothing is lost: it is either still ready (the
        fee estimate failed first) or its settlement is stored and the duty
        broadcasts it again. One named channel raises.
        """
        if channel_id is not None:
            targets = [self.channels[channel_id]]
        else:
            states = (*_SETTLEABLE, ServerState.CLOSING)
            targets = [c for c in self.channels.values() if c.core.state in states]
        results: list[dict[str, Any]] = []
        for live in targets:
            try:
                closed = await self.settler.settle_now(live)
            except ChannelReleased:  # handed to another worker meanwhile
                continue
            except RpcException as exc:
                if channel_id is not None:
                    raise
                results.append({"channel_id": live.channel_id, "error": str(exc)})
                continue
            results.append({"channel_id": live.channel_id, **closed.to_wire()})
        return results

    async def everywhere(self, what: str, *, whole: bool = False, **args: Any) -> list[Any]:
        """:meth:`answer` ``what`` in every worker (just here without ``--workers``).

        ``whole``: wait for a restarting worker; see :meth:`Supervisor.everywhere`.
        """
        if self.worker is None:
            return [await self.answer(what, args)]
        answers = await self.worker.link.request("everywhere", what=what, args=args, whole=whole)
        return list(answers)

    async def answer(self, what: str, args: dict[str, Any]) -> Any:
        """What one gateway process answers for itself (:meth:`everywhere`, the supervisor)."""
        if what == "release":
            return await self.release(int(args["row"]))
        if what == "settle":
            try:
                return await self.settle_by_hand(args.get("channel"))
            except KeyError:
                return None
        if what == "stats":
            return {
                "worker": self.worker.index if self.worker else 0,
                "channels": len(self.channels),
                "sessions": sum(self.sessions.values()),
                "commits": self.store.commits,
                "requests": self.store.requests,
            }
        if what == "channels":
            return [live.summary() for live in self.channels.values()]
        raise ValueError(f"unknown request {what!r}")

    async def health(self) -> dict[str, Any]:
        """The body of ``GET /api/health`` (channels and sessions of every worker)."""
        stats = await self.everywhere("stats")
        return {
            "status": "ok",
            "network": self.network,
            "height": self.watcher.height,
            "channels": sum(s["channels"] for s in stats),
            "sessions": sum(s["sessions"] for s in stats),
            "workers": sorted(
                ({k: s[k] for k in ("worker", "channels", "sessions")} for s in stats),
                key=lambda s: s["worker"],
            ),
            "store": {
                "commits": sum(s["commits"] for s in stats),
                "requests": sum(s["requests"] for s in stats),
            },
        }

    def _tag_response(
        self, connection: ServerConnection, request: Request, response: Response
    ) -> None:
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


_SETTLEABLE = (ServerState.READY, ServerState.FUNDING)


class GatewayStartError(RuntimeError):
    """The gateway refuses to start (a setting unsafe on this network); one line."""


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("could not save the chain checkpoint: %s", task.exception())


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


def _json_response(status: HTTPStatus, body: Any) -> Response:
    data = json.dumps(body, default=str).encode()
    headers = Headers(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(data))),
            ("Cache-Control", "no-store"),
        ]
    )
    return Response(status.value, status.phrase, headers, data)


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


def tune_gc() -> None:
    """Keep garbage-collection pauses out of the pay → chunk path (process-wide).

    Measured with ``gateway bench --paced --viewers 1000``: with the default
    thresholds, full collections over every session's objects put 70-90 ms
    pauses at the 99th percentile of pay → chunk (1.4 ms at p50); with the GC
    off, p99 was 4.8 ms. What start made (modules, catalog, chain state) lives
    as long as the process, so it is frozen out of every collection; the young
    generation is collected every 50,000 allocations instead of 700 and a full
    collection happens a hundred times less often, so cyclic garbage is still
    reclaimed, in rarer passes.
    """
    import gc

    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)

