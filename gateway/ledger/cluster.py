"""Several gateway hosts on one PostgreSQL ledger: who holds each channel.

Theory of operation
-------------------

* **Hosts and leases.** Each gateway host has a name (``host_id``) and a row
  in ``hosts`` whose ``alive_until`` it renews every ``lease_s / 3`` seconds,
  in the database's clock (no host's clock matters). A host whose lease ran
  out is taken for dead, although it may only be paused.
* **One holder per channel, fenced.** A funded channel's row names its
  ``holder`` and an ``epoch``. Every write the holder makes of the channel
  starts with ``paystream_fence(id, epoch)``: it locks the row and fails the
  whole write if the epoch moved (migrations/0001_schema.sql). Every change of
  holder raises the epoch. So a host that was paused past its lease and
  comes back cannot write over the host that took its channels: its write is
  refused whole, and it drops the channel and tells its session
  ``session_replaced``.
* **Take-over on resume.** A ``resume`` that lands on a host that does not
  hold the channel asks the holder to let go (``NOTIFY paystream``): the
  holder ends its session (``session_replaced``), writes the meter and hands
  the row over (``holder``, ``epoch + 1``) in one fenced write, as a worker does
  within one host. If the holder's lease has run out, the new host takes the
  row without asking (``epoch + 1``, in one statement that checks the lease).
  Any write the old holder had in flight committed before (the fence's row
  lock), so the copy loaded afterwards is complete.
* **Lost channels.** Each renewal compares the channels held here with the
  rows: one whose holder or epoch moved is dropped at once, not only at its
  next write.
* **Orphans.** One host at a time is the leader (a session advisory lock on a
  connection of its own; a dead leader's lock goes with its connection). The
  leader adopts every live channel whose holder's lease has run out, so the
  channels of a dead host are settled (or resumed) all the same.
* **Ids.** Channel ids (K2's BIP32 index) come from the ``channel_ids``
  sequence, a few at a time: never the same twice, whichever host asks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg

from gateway.ledger.pg_store import PgStore, connect
from gateway.ledger.store import Op

log = logging.getLogger(__name__)

#: The advisory lock key of the leader (who adopts the channels of dead hosts).
LEADER_LOCK = 0x5061_7973_7472_6D4C  # "PaystrmL"
#: The NOTIFY channel of hand-over requests between hosts.
NOTIFY_CHANNEL = "paystream"
#: Channel ids taken from the sequence at once (a gap is harmless, a repeat is not).
ID_BLOCK = 16
#: States whose channels have a holder (a closed one is nobody's).
HELD_STATES = ("funding", "ready", "closing")
_HELD = ", ".join(f"'{s}'" for s in HELD_STATES)
_NOW = "extract(epoch from clock_timestamp())"
#: A host whose lease ran out (or no holder at all): its channels may be taken.
_HOLDER_GONE = (
    "(channels.holder IS NULL OR NOT EXISTS (SELECT 1 FROM hosts h WHERE "
    f"h.host = channels.holder AND h.alive_until > {_NOW}))"
)


class ClusterError(RuntimeError):
    """This host may not join the cluster (another master key, operator address...)."""


def new_host_id() -> str:
    """A name for a new host: its machine's name and a random suffix."""
    return f"{socket.gethostname()[:40]}-{secrets.token_hex(3)}"


@dataclass
class Holding:
    """A channel's row as the cluster sees it."""

    row_id: int
    holder: str | None
    epoch: int
    state: str
    holder_alive: bool


class Holder(Protocol):
    """What the cluster asks of this host's ledger (gateway/ledger/ledger.py)."""

    def held(self) -> dict[int, int]:
        """row id -> epoch of every channel held here."""

    async def release_to(self, row_id: int, host: str) -> None:
        """Hand channel ``row_id`` to ``host``."""

    def lost(self, row_id: int) -> None:
        """Another host took channel ``row_id``: drop it."""

    async def adopt(self, row_id: int) -> Any:
        """Hold channel ``row_id`` of a dead host."""


class Cluster:
    """This host's place among the gateway hosts sharing one PostgreSQL ledger."""

    def __init__(self, store: PgStore, host_id: str, *, url: str = "", lease_s: float = 10.0):
        self.store = store
        self.host_id = host_id
        self.url = url
        self.lease_s = lease_s
        self._ids: list[int] = []
        self._ids_lock = asyncio.Lock()
        self._holder: Holder | None = None
        self._listener: asyncpg.Connection | None = None
        self._leader_conn: asyncpg.Connection | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        #: True while this host holds the leader's lock.
        self.leader = False
        self.stopping = False

    # -- start and stop ---------------------------------------------------------------

    async def agree(
        self,
        key: str,
        explicit: str,
        fallback: Callable[[], Awaitable[str]] | None = None,
    ) -> str:
        """The cluster's value of shared setting ``key``; the first host to ask sets it.

        ``explicit``: this host's configured value, which must match the
        cluster's (a host with another master key would derive other K2s for
        the same ids; one with another operator address would pay elsewhere).
        Without one, the cluster's value is taken, or ``fallback()`` sets it.
        """
        name = f"cluster_{key}"
        rows = await self.store.execute("SELECT value FROM meta WHERE key = ?", (name,))
        if not rows:
            candidate = explicit or (await fallback() if fallback is not None else "")
            await self.store.execute(
                "INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING",
                (name, candidate),
            )
            rows = await self.store.execute("SELECT value FROM meta WHERE key = ?", (name,))
        stored = str(rows[0]["value"])
        if explicit and stored != explicit:
            hint = {
                "master_key": "give every host the same master key (--master-key FILE)",
                "operator_token": "leave operator_token unset: the cluster has one",
            }.get(key, f"the cluster's is {stored}")
            raise ClusterError(f"this host's {key.replace('_', ' ')} is not the cluster's: {hint}")
        return stored

    async def register(self) -> None:
        """Write this host's row: its URL and a fresh lease."""
        await self.store.execute(
            f"INSERT INTO hosts(host, url, alive_until, started_at) VALUES (?, ?, {_NOW} + ?, "
            f"{_NOW}) ON CONFLICT(host) DO UPDATE SET url = excluded.url, "
            "alive_until = excluded.alive_until",
            (self.host_id, self.url, float(self.lease_s)),
        )

    async def start(self, holder: Holder) -> None:
        """Listen for hand-over requests and keep the lease (after the channels are loaded)."""
        self._holder = holder
        self._listener = await connect(self.store.dsn, f"paystream-listen-{self.host_id}")
        await self._listener.add_listener(NOTIFY_CHANNEL, self._notified)
        self._loop_task = asyncio.create_task(self._keep(), name="cluster-lease")

    async def stop(self) -> None:
        """Stop renewing and listening (the lease runs out; the leader lock goes)."""
        self.stopping = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for task in list(self._tasks):
            task.cancel()
        # Gone on purpose: the leader adopts what is left at once, and a
        # viewer resuming elsewhere need not wait out the lease.
        with contextlib.suppress(Exception):
            await self.store.execute(
                "UPDATE hosts SET alive_until = 0 WHERE host = ?", (self.host_id,)
            )
        for conn in (self._listener, self._leader_conn):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)

    # -- ids and fences --------------------------------------------------------------

    async def next_index(self) -> int:
        """A channel id no host has had, from the database's sequence."""
        async with self._ids_lock:
            if not self._ids:
                rows = await self.store.execute(
                    "SELECT nextval('channel_ids') AS id FROM generate_series(1, ?)", (ID_BLOCK,)
                )
                self._ids = sorted(int(r["id"]) for r in rows)
            return self._ids.pop(0)

    @staticmethod
    def fence_op(row_id: int, epoch: int) -> Op:
        """The statement that guards a holder's write (see the module docstring)."""
        return ("SELECT paystream_fence(?, ?)", (row_id, epoch))

    def claim_op(self, row_id: int) -> Op:
        """A channel funded here is held here, at epoch 1 (written with its funding)."""
        return ("UPDATE channels SET holder = ?, epoch = 1 WHERE id = ?", (self.host_id, row_id))

    @staticmethod
    def hand_op(row_id: int, to: str) -> Op:
        """The holder hands a channel to host ``to`` (after its fence, in its last write)."""
        return ("UPDATE channels SET holder = ?, epoch = epoch + 1 WHERE id = ?", (to, row_id))

    # -- holdings -------------------------------------------------------------------------

    async def holding(self, row_id: int) -> Holding | None:
        """The channel's holder, epoch and state now."""
        rows = await self.store.execute(
            f"SELECT id, holder, epoch, state, NOT {_HOLDER_GONE} AS alive FROM channels "
            "WHERE id = ?",
            (row_id,),
        )
        if not rows:
            return None
        r = rows[0]
        return Holding(r["id"], r["holder"], r["epoch"], r["state"], bool(r["alive"]))

    async def take(self, row_id: int, epoch: int) -> int | None:
        """Take the channel if its holder is gone (or it is ours): the new epoch, else None."""
        rows = await self.store.execute(
            "UPDATE channels SET holder = ?, epoch = epoch + 1 WHERE id = ? AND epoch = ? "
            f"AND (channels.holder = ? OR {_HOLDER_GONE}) RETURNING epoch",
            (self.host_id, row_id, epoch, self.host_id),
        )
        return int(rows[0]["epoch"]) if rows else None

    async def acquire(self, row_id: int, settleable: tuple[str, ...]) -> Holding | None:
        """Become the holder of channel ``row_id`` for a resume; its holding then.

        Asks a live holder to hand it over and waits; takes it from a dead
        one (its lease ran out). Answers the holding as it is when the
        channel is no longer settleable (the holder closed it: its client
        gets ``channel_closed``), and None if this did not end within the
        holder's lease and a bit (the client may resume again).
        """
        deadline = time.monotonic() + self.lease_s + 2.0
        asked_at = 0.0
        while time.monotonic() < deadline:
            seen = await self.holding(row_id)
            if seen is None:
                return None
            if seen.state not in settleable:
                return seen
            if seen.holder == self.host_id and seen.epoch > 0:
                return seen  # handed to us (or ours already)
            if not seen.holder_alive or seen.holder is None:
                epoch = await self.take(row_id, seen.epoch)
                if epoch is not None:
                    seen.holder, seen.epoch = self.host_id, epoch
                    return seen
                continue  # the row moved meanwhile: look again
            if time.monotonic() - asked_at > 1.0:
                asked_at = time.monotonic()
                await self.notify({"op": "release", "row": row_id, "host": seen.holder,
                                   "to": self.host_id})
            await asyncio.sleep(0.05)
        return None

    async def notify(self, message: dict[str, Any]) -> None:
        """Send ``message`` to every host (``NOTIFY``, delivered when it commits)."""
        await self.store.execute(
            "SELECT pg_notify(?, ?)", (NOTIFY_CHANNEL, json.dumps(message, separators=(",", ":")))
        )

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            message = json.loads(payload)
        except ValueError:
            return
        if (
            message.get("op") == "release"
            and message.get("host") == self.host_id
            and self._holder is not None
        ):
            self._spawn(self._holder.release_to(int(message["row"]), str(message["to"])))

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("cluster task failed: %s", task.exception())

    # -- the lease, lost channels and orphans -------------------------------------------------

    async def _keep(self) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is away: the next round tries again
                log.warning("cluster round failed: %s", exc)

    async def round(self) -> None:
        """Renew the lease, drop the channels another host took, adopt the orphans (leader)."""
        await self.store.execute(
            f"UPDATE hosts SET alive_until = {_NOW} + ? WHERE host = ?",
            (float(self.lease_s), self.host_id),
        )
        assert self._holder is not None
        held = self._holder.held()
        if held:
            rows = await self.store.execute(
                f"SELECT id, epoch FROM channels WHERE holder = ? AND state IN ({_HELD})",
                (self.host_id,),
            )
            ours = {int(r["id"]): int(r["epoch"]) for r in rows}
            for row_id, epoch in held.items():
                if ours.get(row_id) != epoch:
                    log.warning("channel %d was taken over by another host", row_id)
                    self._holder.lost(row_id)
        if await self._lead():
            for row_id in await self.orphans():
                await self._holder.adopt(row_id)

    async def _lead(self) -> bool:
        """Hold (or try to take) the leader's lock; whether this host leads now."""
        try:
            if self._leader_conn is None or self._leader_conn.is_closed():
                self.leader = False
                self._leader_conn = await connect(self.store.dsn, f"paystream-lead-{self.host_id}")
            if not self.leader:
                self.leader = bool(
                    await self._leader_conn.fetchval("SELECT pg_try_advisory_lock($1)", LEADER_LOCK)
                )
                if self.leader:
                    log.info("this host (%s) leads: it adopts the channels of dead hosts",
                             self.host_id)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("leader election failed: %s", exc)
            self.leader = False
        return self.leader

    async def orphans(self) -> list[int]:
        """Live channels whose holder's lease ran out (or that have none)."""
        rows = await self.store.execute(
            f"SELECT id FROM channels WHERE state IN ({_HELD}) AND channel_id IS NOT NULL "
            f"AND {_HOLDER_GONE} ORDER BY id"
        )
        return [int(r["id"]) for r in rows]

    async def hosts(self) -> list[dict[str, Any]]:
        """Every host that ever joined: name, URL, whether its lease runs."""
        return await self.store.execute(
            f"SELECT host, url, alive_until > {_NOW} AS alive FROM hosts ORDER BY host"
        )
