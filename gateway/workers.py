"""Several gateway processes on one port and one store: ``gateway serve --workers N``.

One CPython process tops out near one core (``docs/performance.md``). With
``--workers N`` a supervisor process runs the embedded node, opens the
listening socket and starts N worker processes that all accept on it (the
pre-fork model: the kernel gives each connection to one of them). Each
worker is a whole :class:`gateway.server.Gateway` with its own event loop,
store connection (group commit; WAL takes one writer at a time, and the
workers take turns on ``gateway.db.lock``, see :mod:`gateway.ledger.store`) and
settlement duty.

Theory of operation:

* **One holder per channel.** A channel's state lives in exactly one worker,
  its holder. By default that is ``id % N``: a worker allocates channel ids
  (K2's BIP32 index) ``≡ its index (mod N)``, so the channels it opens are its
  own and no two workers derive the same key. A ``resume`` that lands on
  another worker asks the supervisor to *acquire* the channel. The
  supervisor asks the holder to *release* it. The holder ends the old session
  (``session_replaced``) and makes the meter durable, then drops the channel
  and answers. Only then does the new holder load the channel from the store.
  Every paid satoshi is durable before ``paid`` (protocol.md section 7), so a
  hand-over loses nothing. The supervisor keeps the moved channels in
  memory; after a full restart every channel is back with ``id % N``.
* **Settlement duty per holder.** A worker settles the channels it holds.
  A worker that dies is started again with the same index, and it loads the
  channels it held from the store. A restart settles what is due (restart
  recovery, section 8). While it is down, the channels it held can be acquired
  without asking it.
* **Fan-out.** Operator settlement, ``/api/health`` and the dashboard's channel
  list ask every worker through the supervisor (:meth:`Supervisor.everywhere`).
* **Limits.** ``max_sessions_per_ip`` and ``max_unfunded_per_ip`` hold per
  worker.

Supervisor and workers talk JSON lines over a socketpair
(:class:`gateway.handover.Link`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.config import Config, ConfigError
from gateway.handover import LINK_LIMIT, Link, LinkError, WorkerRole
from gateway.server import (
    ACCESS_LOG,
    NETWORKS,
    Gateway,
    announce,
    operator_address,
    operator_token,
    tune_gc,
    urls,
)

log = logging.getLogger(__name__)

#: Longest a worker may take to start (load its channels, settle what is due).
START_TIMEOUT_S = 120.0
#: Longest operator settlement waits for a restarting worker (restart
#: back-off is at most 10 s, then it loads its channels).
WHOLE_WAIT_S = 30.0

class WorkerStartError(RuntimeError):
    """A worker exited before it served (its log says why)."""


class WorkersDown(RuntimeError):
    """A request that needs every worker found one not serving."""


@dataclass
class _Turn:
    """Hand-overs of one channel, one at a time (:meth:`Supervisor.acquire`)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0


class Supervisor:
    """Runs the node, the listening socket and N workers; see the module docstring."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.count = config.workers
        self.datadir = Path(config.datadir)
        self.node: Any = None
        self.network = "regtest"
        self.port = config.port
        self.urls: dict[str, str] = {}
        self._sock: socket.socket | None = None
        self._worker_config: dict[str, Any] = {}
        self._links: dict[int, Link] = {}
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._ready: dict[int, asyncio.Future[None]] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        #: row id → worker, for channels held elsewhere than ``id % count``.
        self.moved: dict[int, int] = {}
        #: One turn per channel being handed over, dropped by its last user.
        self._turns: dict[int, _Turn] = {}
        #: Set while every worker serves (cleared while one is restarting).
        self._all_serving = asyncio.Event()
        #: Set when the supervisor is stopping: a worker's exit is then expected.
        self.stopping = False
        self._started = False
        self._backoff: dict[int, float] = {}

    async def start(self) -> None:
        """Prepare what the workers share, then start them all and wait until they serve."""
        from gateway.chain.rpc import RpcClient
        from gateway.keys import MasterKey
        from gateway.ledger import Store
        from gateway.media.catalog import Catalog

        # A bad catalog fails here, once, rather than in every worker.
        Catalog.load(self.config.media)
        # The schema, the master key, the operator's address and token are
        # made once, here: N workers doing it at once would race.
        await Store(self.datadir / "gateway.db").close()
        MasterKey.load_or_create(self.datadir / "master.key")
        config = self.config
        rpc_url, cookie = config.rpc_url, config.rpc_cookie
        if rpc_url is None:
            from gateway.chain.node import EmbeddedNode

            self.node = EmbeddedNode(
                self.datadir / "node",
                rpc_port=config.rpc_port,
                block_interval=config.block_interval,
            )
            await self.node.start()
            rpc_url, cookie = self.node.rpc_url, self.node.cookie_path
        rpc = RpcClient(
            rpc_url, cookie_path=cookie, user=config.rpc_user, password=config.rpc_password
        )
        try:
            chain = (await rpc.call("getblockchaininfo"))["chain"]
            self.network = NETWORKS.get(chain, chain)
            try:
                config.check_network(self.network)
            except ConfigError as exc:
                raise WorkerStartError(str(exc)) from None
            address = config.operator_address or await operator_address(rpc, self.datadir)
        finally:
            await rpc.close()
        self._sock = socket.create_server((config.host, config.port), backlog=4096)
        self.port = self._sock.getsockname()[1]
        worker = dataclasses.replace(
            config,
            rpc_url=rpc_url,
            rpc_cookie=cookie,
            port=self.port,
            operator_address=address,
            operator_token=config.operator_token or operator_token(self.datadir),
        )
        settings = json.loads(json.dumps(dataclasses.asdict(worker), default=str))
        # None is each optional setting's default, and not a value a config file can hold.
        self._worker_config = {k: v for k, v in settings.items() if v is not None}
        self.urls = urls(config.host, self.port, self.node)
        try:
            for index in range(self.count):
                await self._spawn(index)
            await asyncio.gather(*self._ready.values())
            self._started = True
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop every worker (SIGTERM: each finishes its sessions' writes), then the node."""
        self.stopping = True
        for proc in self._procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in list(self._procs.values()):
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                log.warning("worker %d did not stop; killing it", proc.pid)
                proc.kill()
                await proc.wait()
        for task in self._watchers:
            task.cancel()
        if self._sock is not None:
            self._sock.close()
        if self.node is not None:
            await self.node.stop()

    async def _spawn(self, index: int) -> None:
        assert self._sock is not None
        ours, theirs = socket.socketpair()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway.workers",
            str(theirs.fileno()),
            pass_fds=(self._sock.fileno(), theirs.fileno()),
        )
        theirs.close()
        if self.stopping:  # a restart raced the shutdown
            proc.terminate()
        reader, writer = await asyncio.open_unix_connection(sock=ours, limit=LINK_LIMIT)
        start = {
            "config": self._worker_config,
            "index": index,
            "count": self.count,
            "listen_fd": self._sock.fileno(),
            "extra": sorted(i for i, w in self.moved.items() if w == index),
            "away": sorted(i for i, w in self.moved.items() if i % self.count == index),
            "log_level": logging.getLogger().level,
            "access_log_level": logging.getLogger(ACCESS_LOG).level,
        }
        # The first line, before the link starts reading: the worker's settings.
        writer.write(json.dumps(start).encode() + b"\n")

        async def handle(op: str, args: dict[str, Any]) -> Any:
            return await self._handle(index, op, args)

        self._links[index] = Link(reader, writer, handle)
        self._procs[index] = proc
        self._ready[index] = asyncio.get_running_loop().create_future()
        watcher = asyncio.create_task(self._watch(index, proc))
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)

    async def _watch(self, index: int, proc: asyncio.subprocess.Process) -> None:
        """Start a worker again when it dies (its channels wait in the store)."""
        born = asyncio.get_running_loop().time()
        code = await proc.wait()
        link = self._links.pop(index, None)
        self._note_serving()
        if link is not None:
            link.close()
        if not self._started:  # the first start failed: `gateway serve` fails
            ready = self._ready[index]
            if not ready.done():
                ready.set_exception(
                    WorkerStartError(f"gateway worker {index} exited with status {code} at start")
                )
            return
        if self.stopping:
            return
        # A worker that dies at once (say, a full disk) is retried less often.
        lived = asyncio.get_running_loop().time() - born
        self._backoff[index] = 0.5 if lived > 10 else min(2 * self._backoff.get(index, 0.25), 10)
        log.warning(
            "worker %d exited with %s; starting it again in %.1f s",
            index,
            code,
            self._backoff[index],
        )
        await asyncio.sleep(self._backoff[index])
        if not self.stopping:
            await self._spawn(index)

    async def _handle(self, index: int, op: str, args: dict[str, Any]) -> Any:
        if op == "ready":
            self._ready[index].set_result(None)
            self._note_serving()
            return True
        if op == "acquire":
            return await self.acquire(index, int(args["row"]))
        if op == "everywhere":
            return await self.everywhere(args["what"], args["args"], whole=args.get("whole", False))
        raise ValueError(f"unknown request {op!r}")

    async def acquire(self, index: int, row_id: int) -> bool:
        """Make worker ``index`` the holder of channel ``row_id``.

        False: the holder kept it because it is closing (the store says so).
        Raises :class:`LinkError` if the holder is alive and could not release
        it (its store write failed): it still holds the channel.
        """
        # No await between taking the turn and counting this user in: a turn
        # is dropped only when nobody holds or waits for it.
        turn = self._turns.setdefault(row_id, _Turn())
        turn.users += 1
        try:
            return await self._hand_over(turn.lock, index, row_id)
        finally:
            turn.users -= 1
            if turn.users == 0:
                del self._turns[row_id]

    async def _hand_over(self, lock: asyncio.Lock, index: int, row_id: int) -> bool:
        async with lock:
            holder = self.moved.get(row_id, row_id % self.count)
            if holder != index:
                link = self._links.get(holder)
                if link is not None:  # alive: it must release first
                    # No timeout: a holder that answered late would have let go
                    # of a channel nobody then holds, and no one would settle it.
                    try:
                        released = await link.request("release", row=row_id)
                    except LinkError:
                        if holder in self._links:  # still alive: it failed to release
                            raise
                        released = True  # it died: it holds nothing now
                    if not released:
                        return False
                # A dead holder holds nothing; its restart reads `moved`.
                if row_id % self.count == index:
                    self.moved.pop(row_id, None)
                else:
                    self.moved[row_id] = index
        return True

    def _down(self) -> list[int]:
        """Workers not serving now: dead, waiting to restart, or starting."""
        return [
            i
            for i in range(self.count)
            if i not in self._links or i not in self._ready or not self._ready[i].done()
        ]

    def _note_serving(self) -> None:
        if self._down():
            self._all_serving.clear()
        else:
            self._all_serving.set()

    async def everywhere(
        self, what: str, args: dict[str, Any], *, whole: bool = False
    ) -> list[Any]:
        """Ask every running worker ``what``; the answers of those that answered.

        ``whole``: the answer must cover every channel (operator settlement),
        so a worker that is restarting is waited for, up to ``WHOLE_WAIT_S``;
        raises :class:`WorkersDown` if one is still not serving then, or one
        fails to answer. Health
        and the dashboard answer at once with the workers that serve.
        """
        if whole:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_serving.wait(), WHOLE_WAIT_S)
            if down := self._down():
                raise WorkersDown(
                    f"gateway worker {', '.join(map(str, down))} is not serving "
                    "(restarting); try again"
                )
        links = list(self._links.items())
        answers = await asyncio.gather(
            *(link.request(what, **args) for _, link in links), return_exceptions=True
        )
        failed = [
            (i, a) for (i, _), a in zip(links, answers, strict=True) if isinstance(a, Exception)
        ]
        for i, failure in failed:
            log.warning("worker %d did not answer %s: %s", i, what, failure)
        if whole and failed:  # it died meanwhile, or its settlement failed
            i, failure = failed[0]
            raise WorkersDown(f"gateway worker {i} failed: {failure}; try again")
        return [a for a in answers if not isinstance(a, BaseException)]


async def run_supervisor(config: Config) -> None:
    """``gateway serve --workers N``: run until SIGINT/SIGTERM; print where to connect."""

    supervisor = Supervisor(config)
    await supervisor.start()
    stop = asyncio.Event()

    def stopping() -> None:
        # At once, not when stop() runs: Ctrl-C reaches the workers too, and
        # their exits must not be taken for crashes to restart from.
        supervisor.stopping = True
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping)
    announce(supervisor.network, supervisor.urls, supervisor.datadir, workers=supervisor.count)
    try:
        await stop.wait()
    finally:
        await supervisor.stop()


async def _work(link_fd: int) -> None:
    """A worker process: read its settings from the link, serve until told to stop."""

    sock = socket.socket(fileno=link_fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=LINK_LIMIT)
    start = json.loads(await reader.readline())
    logging.basicConfig(
        level=start["log_level"],
        format=f"%(asctime)s %(levelname)s worker-{start['index']} %(name)s: %(message)s",
    )
    logging.getLogger(ACCESS_LOG).setLevel(start["access_log_level"])
    config = Config()
    config.update(start["config"])
    gateway: Gateway | None = None
    started = asyncio.Event()

    async def handle(op: str, args: dict[str, Any]) -> Any:
        # A release must wait until this worker has loaded what it holds.
        await started.wait()
        assert gateway is not None
        return await gateway.answer(op, args)

    link = Link(reader, writer, handle)
    role = WorkerRole(
        index=start["index"],
        count=start["count"],
        link=link,
        extra=set(start["extra"]),
        away=set(start["away"]),
    )
    gateway = Gateway(config, worker=role)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await gateway.start(sock=socket.socket(fileno=start["listen_fd"]))
    started.set()
    tune_gc()
    await link.request("ready")
    try:
        # A supervisor that is gone cannot restart or hand over: stop too.
        waits = [asyncio.ensure_future(link.closed.wait()), asyncio.ensure_future(stop.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for wait in waits:
            wait.cancel()
    finally:
        await gateway.stop()
        link.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point of a worker process (``python -m gateway.workers LINK_FD``)."""
    import uvloop

    args = sys.argv[1:] if argv is None else argv
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_work(int(args[0])))
    except Exception as exc:  # the supervisor reports the exit; say why in one line
        print(f"gateway worker: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    # Run as ``python -m gateway.workers`` this file is ``__main__``, a second
    # copy whose classes are not the ones the rest of the gateway imports:
    # the canonical module's main() runs with those.
    from gateway.workers import main as _main

    sys.exit(_main())
