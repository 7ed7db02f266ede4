"""The channel ledger: channels as the gateway holds them, and the only code that
reads or writes their state (see :mod:`gateway.ledger.ledger`)."""

from gateway.ledger.ledger import SETTLEABLE, ChainWatch, Ledger, list_channels
from gateway.ledger.live import (
    FUNDED_STATES,
    LIVE_STATES,
    ChannelReleased,
    LiveChannel,
    SessionHandle,
)
from gateway.ledger.reports import UNSETTLED_STATES, Reports
from gateway.ledger.store import Store, StoreClosed

__all__ = [
    "FUNDED_STATES",
    "LIVE_STATES",
    "SETTLEABLE",
    "UNSETTLED_STATES",
    "ChainWatch",
    "ChannelReleased",
    "Ledger",
    "LiveChannel",
    "Reports",
    "SessionHandle",
    "Store",
    "StoreClosed",
    "list_channels",
]
