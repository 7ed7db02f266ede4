"""What the web pages, the dashboard and the operator read of the ledger.

Read-only queries over the store's tables (gateway/ledger/store.py), each
answering plain rows (``dict``s): the web layer shapes them into JSON and
never writes SQL itself. Written in the SQL that SQLite and PostgreSQL share,
so that every backend answers them as they are.
"""

from __future__ import annotations

from typing import Any, Protocol

#: Channel states whose bill may still be settled (protocol.md section 8).
UNSETTLED_STATES = ("funding", "ready", "closing")
#: A settlement batch that is (or will be) on chain: not one the node refused.
_LIVE_BATCH = "s.state IN ('broadcast', 'confirmed')"
_STATES = ", ".join(f"'{s}'" for s in UNSETTLED_STATES)
#: States of a channel opened and not funded (protocol.md section 5).
_UNFUNDED_STATES = ("open", "refund_signed")

Row = dict[str, Any]


class Readable(Protocol):
    """A store that answers read queries (every backend's store does)."""

    def read(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        """Rows of ``sql`` with ``params`` bound to its ``?`` placeholders."""
        ...


class Reports:
    """The ledger's read side for pages and operators (one per store)."""

    def __init__(self, store: Readable) -> None:
        self.store = store

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        return [dict(r) for r in self.store.read(sql, params)]

    # -- channels, for their clients and the web front end ------------------------

    def unfunded_channel(self, funding_script: bytes) -> Row | None:
        """The channel opened, not funded and not abandoned, that ``funding_script`` funds."""
        # By the script's index alone (one row): filtering on the state in SQL
        # lets the planner pick another index and walk every unfunded row.
        rows = self._rows(
            "SELECT id, kind, expiry, state, channel_id FROM channels WHERE funding_script = ?",
            (funding_script.hex(),),
        )
        return next(
            (r for r in rows if r["state"] in _UNFUNDED_STATES and r["channel_id"] is None), None
        )

    def channels_with_server_key(self, server_pubkey: bytes) -> list[Row]:
        """Channels whose K2 is ``server_pubkey``: kind, both keys, expiry."""
        return self._rows(
            "SELECT kind, client_pubkey, server_pubkey, expiry FROM channels "
            "WHERE server_pubkey = ?",
            (server_pubkey.hex(),),
        )

    def channel(self, channel_id: str) -> Row | None:
        """One funded channel's money: value, balance, reserve, settlement."""
        rows = self._rows(
            "SELECT id, channel_id, state, value, balance, exit_fee, closing_at, settle_txid, "
            "confirmed_height FROM channels WHERE channel_id = ?",
            (channel_id,),
        )
        return rows[0] if rows else None

    def settlement(self, txid: str) -> Row | None:
        """A stored settlement batch: its transaction, fee, vsize, state, block height."""
        rows = self._rows(
            "SELECT tx, fee, vsize, state, confirmed_height FROM settlements WHERE txid = ?",
            (txid,),
        )
        return rows[0] if rows else None

    def settled_values(self, txid: str) -> dict[str, int]:
        """channel id -> funding value, of the channels batch ``txid`` settles."""
        rows = self._rows("SELECT channel_id, value FROM channels WHERE settle_txid = ?", (txid,))
        return {r["channel_id"]: r["value"] for r in rows}

    # -- the operator's dashboard --------------------------------------------------

    def billed_by_item(self) -> list[Row]:
        """Per (media, publisher): bill, ms delivered, channels, bill unsettled and lost.

        Bills are msat*ms/s (gateway/protocol/metering.py). Unsettled: in
        channels that may still settle and have no batch; lost: in channels
        that never will (refunded, void).
        """
        return self._rows(
            "SELECT d.media, d.publisher, SUM(d.bill) AS bill, SUM(d.delivered_ms) AS ms, "
            "COUNT(*) AS n, "
            f"SUM(CASE WHEN c.settle_txid IS NULL AND c.state IN ({_STATES}) "
            "THEN d.bill ELSE 0 END) AS unsettled, "
            "SUM(CASE WHEN c.state IN ('refunded', 'void') THEN d.bill ELSE 0 END) AS lost "
            "FROM deliveries d JOIN channels c ON c.id = d.channel "
            "GROUP BY d.media, d.publisher ORDER BY d.media"
        )

    def settled_by_item(self) -> list[Row]:
        """Per (media, publisher): gross and fee share in batches broadcast or confirmed."""
        return self._rows(
            "SELECT e.media, d.publisher, SUM(e.gross) AS gross, SUM(e.fee) AS fee "
            "FROM earnings e JOIN settlements s ON s.txid = e.txid "
            "LEFT JOIN deliveries d ON d.channel = e.channel AND d.media = e.media "
            f"WHERE {_LIVE_BATCH} GROUP BY e.media, d.publisher"
        )

    def paid_out(self) -> dict[str, int]:
        """publisher -> sat of the outputs paying it, in batches broadcast or confirmed."""
        rows = self._rows(
            "SELECT p.publisher, SUM(p.amount) AS amount FROM payouts p "
            f"JOIN settlements s ON s.txid = p.txid WHERE {_LIVE_BATCH} GROUP BY p.publisher"
        )
        return {r["publisher"]: r["amount"] for r in rows}

    def recent_batches(self, limit: int) -> list[Row]:
        """The newest ``limit`` batches, each with ``members``: its channels and what they paid."""
        batches = self._rows(
            "SELECT txid, fee, vsize, reserves, channels, state, created_at, confirmed_height "
            "FROM settlements ORDER BY created_at DESC LIMIT ?",
            (limit,),
        )
        members: dict[str, list[Row]] = {}
        for r in self._rows(
            "SELECT channel_id, settle_txid, value - balance AS paid FROM channels "
            "WHERE settle_txid IN (SELECT txid FROM settlements ORDER BY created_at DESC "
            "LIMIT ?) ORDER BY id",
            (limit,),
        ):
            members.setdefault(r["settle_txid"], []).append(r)
        for batch in batches:
            batch["members"] = members.get(batch["txid"], [])
        return batches

    def funded_channels_money(self) -> list[Row]:
        """Every funded channel's state, bill, paid and when it closed and settled."""
        return self._rows(
            "SELECT state, bill, closing_at, settle_txid, settled_at, value - balance AS paid "
            "FROM channels WHERE channel_id IS NOT NULL"
        )
