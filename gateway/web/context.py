"""What the web front end works with, handed in by the gateway's wiring (server.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.chain.watch import ChainFollower
from gateway.ledger import Ledger
from gateway.live.onair import OnAir
from gateway.media.library import Library
from gateway.protocol.messages import Limits
from gateway.settlement import Settler


@dataclass
class WebContext:
    """The parts the pages and the JSON endpoints read; they own none of them."""

    ledger: Ledger
    rpc: Any
    follower: ChainFollower
    settler: Settler
    library: Library
    network: str
    limits: Limits
    #: ``Authorization: Bearer <token>`` opens the dashboard's API.
    operator_token: str
    #: Ask every worker (just this process without ``--workers``): server.py.
    everywhere: Callable[..., Awaitable[list[Any]]]
    #: Funding addresses the demo faucet already paid (once per channel).
    faucet_paid: set[str] = field(default_factory=set)
    #: The live items on air here (None: no live ingest), and each publisher's
    #: WHIP bearer token (gateway/web/whip.py).
    on_air: OnAir | None = None
    publisher_token: Callable[[str], str] | None = None
