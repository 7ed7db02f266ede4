"""The channel ledger: channels as the gateway holds them, and the only code that
reads or writes their state (see :mod:`gateway.ledger.ledger`)."""

from pathlib import Path

from gateway.ledger.cluster import Cluster, ClusterError, new_host_id
from gateway.ledger.handoff import SETTLEABLE
from gateway.ledger.ledger import ChainWatch, Ledger, list_channels
from gateway.ledger.live import (
    FUNDED_STATES,
    LIVE_STATES,
    ChannelReleased,
    LiveChannel,
    SessionHandle,
)
from gateway.ledger.pg_store import Fenced, PgStore, SchemaError, is_postgres, upgrade
from gateway.ledger.reports import UNSETTLED_STATES, Reports
from gateway.ledger.store import Store, StoreClosed


def open_store(
    url: str, datadir: Path, *, host_id: str = "", lease_s: float = 10.0
) -> tuple[Store | PgStore, Cluster | None]:
    """The ledger's store for ``url``: the SQLite file in ``datadir`` when empty, else
    PostgreSQL and this host's place in the cluster sharing it (``host_id``)."""
    if not is_postgres(url):
        return Store(datadir / "gateway.db"), None
    store = PgStore(url, name=f"paystream-{host_id}")
    return store, Cluster(store, host_id, lease_s=lease_s)

__all__ = [
    "FUNDED_STATES",
    "LIVE_STATES",
    "SETTLEABLE",
    "UNSETTLED_STATES",
    "ChainWatch",
    "ChannelReleased",
    "Cluster",
    "ClusterError",
    "Fenced",
    "Ledger",
    "LiveChannel",
    "PgStore",
    "Reports",
    "SchemaError",
    "SessionHandle",
    "Store",
    "StoreClosed",
    "is_postgres",
    "list_channels",
    "new_host_id",
    "open_store",
    "upgrade",
]
