"""The live items on air in one gateway process: one hub per publishing live item.

The gateway's wiring (``gateway/server.py``) builds one :class:`OnAir` and
hands it to the WHIP endpoint (``gateway/web/whip.py``), which starts and
stops publishers, and to the sessions (``gateway/session_live.py``), which
add viewers to a hub or read its fragments. A live item is on air from its
publisher's WHIP ``POST`` until its hub ends (``DELETE``, the publisher lost,
or the gateway stopping); then the next publisher may start it again.

With ``gateway serve --workers N`` each worker has its own :class:`OnAir`:
a viewer reaches a live item only on the worker its publisher reached
(docs/design.md, "Live").
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gateway.ice import IceConfig
from gateway.live.hub import LiveHub
from gateway.live.ingest import LiveIngest
from gateway.live.record import Recording
from gateway.live.rendition import LiveConfig
from gateway.live.sdp import Offer
from gateway.media.catalog import LiveItem

log = logging.getLogger(__name__)

#: Item ids are at most 64 characters (gateway/media/catalog.py): a
#: recording's id is the live id (cut to this) and a UTC time stamp.
_RECORDING_PREFIX = 48


class OnAirBusy(RuntimeError):
    """The live item already has a publisher (WHIP: 409)."""


@dataclass
class LiveTally:
    """What one live item earned in this process: for the dashboard."""

    #: Viewers watching now (WebRTC and MSE).
    viewers: int = 0
    #: Live seconds delivered beyond the free allowance (paid for), in ms.
    paid_ms: int = 0
    #: What viewers paid for them, msat·ms/s (the meter's unit, protocol.md section 7).
    bill: int = 0


class OnAir:
    """The hubs of the live items being published here, by live id."""

    def __init__(
        self,
        media_dir: Path,
        *,
        ice: IceConfig | None = None,
        config: LiveConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.media_dir = Path(media_dir)
        self.ice = ice or IceConfig()
        self.config = config or LiveConfig()
        self.hubs: dict[str, LiveHub] = {}
        #: WHIP session id (the ``Location``) → (live id, ingest).
        self.sessions: dict[str, tuple[str, LiveIngest]] = {}
        self.tallies: dict[str, LiveTally] = {}
        self._clock = clock

    def on_air(self) -> set[str]:
        """The live ids being published now."""
        return {lid for lid, hub in self.hubs.items() if hub.state != "ended"}

    def hub(self, live_id: str) -> LiveHub | None:
        """The hub of ``live_id`` if it is on air."""
        hub = self.hubs.get(live_id)
        return hub if hub is not None and hub.state != "ended" else None

    def tally(self, live_id: str) -> LiveTally:
        """The dashboard's figures of ``live_id`` (made on first use)."""
        return self.tallies.setdefault(live_id, LiveTally())

    def _recording(self, item: LiveItem) -> Recording:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(self._clock()))
        return Recording(
            media_dir=self.media_dir,
            item_id=f"{item.id[:_RECORDING_PREFIX]}-{stamp}",
            title=f"{item.title} (recorded {stamp[:8]})",
            publisher=item.publisher,
            rate_msat=item.rate_msat,
            free_ms=item.free_ms,
            enabled=item.record,
        )

    async def publish(self, item: LiveItem, offer: Offer) -> LiveIngest:
        """Start ``item`` on air from its publisher's validated WHIP offer.

        Raises :class:`OnAirBusy` when it already has a publisher. The
        hub is made and registered before the first ``await``, so two
        publishers racing for one live id cannot both start.
        """
        if self.hub(item.id) is not None:
            raise OnAirBusy(f"{item.id} already has a publisher")
        hub = LiveHub(item.id, self.config, ice=self.ice, recording=self._recording(item))
        self.hubs[item.id] = hub
        try:
            ingest = await LiveIngest.start(hub, offer)
        except BaseException:
            if self.hubs.get(item.id) is hub:
                del self.hubs[item.id]
            await hub.end("lost")
            raise
        self.sessions[ingest.session_id] = (item.id, ingest)
        hub.on_end(lambda reason: self._ended(item.id, hub, ingest.session_id, reason))
        log.info("live %s: on air", item.id)
        return ingest

    def _ended(self, live_id: str, hub: LiveHub, session_id: str, reason: str) -> None:
        log.info("live %s: off air (%s)", live_id, reason)
        self.sessions.pop(session_id, None)
        if self.hubs.get(live_id) is hub:
            del self.hubs[live_id]

    def session(self, live_id: str, session_id: str) -> LiveIngest | None:
        """The WHIP session ``session_id`` of ``live_id``, if it is running."""
        found = self.sessions.get(session_id)
        return found[1] if found is not None and found[0] == live_id else None

    async def stop(self) -> None:
        """End every live item (the gateway stops): viewers get ``end``."""
        ingests = [ingest for _, ingest in self.sessions.values()]
        await asyncio.gather(*(ingest.stop() for ingest in ingests), return_exceptions=True)
        hubs = list(self.hubs.values())
        await asyncio.gather(*(hub.end("stopped") for hub in hubs), return_exceptions=True)
