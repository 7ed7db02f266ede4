"""A session's live stream: a live item watched over the paystream session.

Called by :meth:`gateway.session.Session._on_play` for a live item of the
catalog (``[live.<id>]``) that is on air here (:class:`~gateway.live.onair.OnAir`);
the metering is the catalog's (protocol.md sections 7 and 11): live interval
``k`` is chunk ``k`` of the live item, quoted by the channel's meter, its
free allowance per (channel, live item), paid before it flows, committed to
the meter once it flows.

* MSE (``play`` without ``webrtc``): each fMP4 fragment of the hub's
  :class:`~gateway.live.FragmentLog` goes out as an ordinary ``chunk`` with
  its binary frame, after the initialization segment: the same ``due`` /
  ``pay`` / ``paid`` / ``chunk`` turn as a file's chunk, so a player of files
  plays a live item unchanged.
* WebRTC (``play.webrtc`` = the viewer's SDP offer): the gateway answers
  ``webrtc_answer`` and forwards media through a
  :class:`~gateway.live.LiveViewer` for the intervals it allows. When the
  viewer's media reaches the edge of what is allowed (its tracks block at
  interval ``k``: :meth:`LiveViewer.on_blocked`), interval ``k`` is quoted:
  free or already paid, it is allowed at once (no packet waits); else
  ``due`` goes out and the viewer stays stopped until a ``pay`` covering it
  is durable (:attr:`LiveChannel.durable_paid`, design.md "Money rules").
  Each interval allowed is announced by ``interval`` (a chunk without bytes)
  and committed to the meter. A due is sent only for an interval whose
  media exists, so a viewer pays only for intervals that flow: when the
  publisher stops, an interval not yet paid is never billed.

The stream ends with ``end`` (reason ``finished``) when the hub ends (the
publisher stopped or was lost) or the viewer's connection failed.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Protocol

from gateway.live import LiveHub, LiveViewer, OfferError, validate_offer
from gateway.media.catalog import LiveItem
from gateway.protocol.channel import ServerState
from gateway.protocol.errors import ErrorCode, ProtocolError
from gateway.protocol.messages import (
    Chunk,
    Due,
    End,
    Interval,
    Message,
    Play,
    Stream,
    WebrtcAnswer,
)
from gateway.protocol.metering import INIT_SEGMENT, Quote
from gateway.wsconn import ConnectionClosed

if TYPE_CHECKING:
    from gateway.ledger import LiveChannel
    from gateway.live.onair import LiveTally, OnAir


class _Context(Protocol):
    @property
    def on_air(self) -> OnAir | None:
        """The live items on air here."""


class Session(Protocol):
    """What a live stream uses of its :class:`gateway.session.Session` (no import cycle)."""

    @property
    def ctx(self) -> _Context:
        """The session's context."""

    _paid_event: asyncio.Event
    _stream: asyncio.Task[None] | None
    _streaming_media: str | None

    async def _send(self, *frames: Message | bytes | str) -> None: ...

    async def _wait_paid(self) -> list[Message | bytes]: ...

    async def _stop_stream(self, *, send_end: bool = False) -> None: ...


#: Seconds a ``due`` sent before the stream ended waits for its ``pay``.
END_GRACE_S = 2.0

#: What the WebRTC tracks carry (gateway/live/viewer.py), for ``stream.mime``.
WEBRTC_MIME = 'video/webm; codecs="vp8, opus"'


async def play_live(session: Session, live: LiveChannel, item: LiveItem, msg: Play) -> None:
    """Start watching live item ``item`` (``play``); the media flows from a task."""
    on_air = session.ctx.on_air
    hub = on_air.hub(item.id) if on_air is not None else None
    if on_air is None or hub is None:
        raise ProtocolError(ErrorCode.MEDIA_UNKNOWN, f"{item.id!r} is not on air")
    viewer: LiveViewer | None = None
    if msg.webrtc is not None:
        try:
            offer = validate_offer(msg.webrtc, role="viewer")
        except OfferError as exc:
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"play.webrtc: {exc}") from None
        await session._stop_stream(send_end=True)
        try:
            viewer = await hub.add_viewer(offer)
        except (ValueError, RuntimeError) as exc:  # no VP8/Opus offered; the hub ended
            raise ProtocolError(ErrorCode.BAD_MESSAGE, f"play.webrtc: {exc}") from None
    else:
        await session._stop_stream(send_end=True)
    tally = on_air.tally(item.id)
    session._streaming_media = item.id
    if viewer is not None:
        runner = _stream_webrtc(session, live, item, hub, viewer, tally)
    else:
        runner = _stream_mse(session, live, item, hub, tally)
    session._stream = asyncio.create_task(runner)


def _stream_message(live: LiveChannel, item: LiveItem, mime: str) -> Stream:
    return Stream(
        media=item.id,
        title=item.title,
        mime=mime,
        rate_msat=item.rate_msat,
        free_ms=item.free_ms,
        free_used_ms=live.meter.free_used_ms(item.id, item.free_ms),
        duration_ms=0,
        chunks=0,
        live=True,
    )


def _quote(live: LiveChannel, item: LiveItem, index: int, duration_ms: int) -> Quote:
    return live.meter.quote(
        item.id, index, duration_ms, rate_msat=item.rate_msat, free_ms=item.free_ms
    )


def _commit(live: LiveChannel, quote: Quote, tally: LiveTally) -> None:
    live.commit_chunk(quote)
    tally.paid_ms += quote.charged_ms
    tally.bill += quote.rate_msat * quote.charged_ms


async def _stream_mse(
    session: Session, live: LiveChannel, item: LiveItem, hub: LiveHub, tally: LiveTally
) -> None:
    """The live fMP4 fragments as paid chunks (protocol.md section 11, MSE)."""
    tally.viewers += 1
    # A streamer parked on a due looks again when the stream ends.
    forget = hub.on_end(lambda reason: session._paid_event.set())
    try:
        init = await hub.mse.wait_init()
        if init is None or hub.mse.mime is None:  # ended before any media
            session._streaming_media = None
            await session._send(End(media=item.id, reason="finished"))
            return
        await session._send(_stream_message(live, item, hub.mse.mime))
        if not await _send_chunk(session, live, item, hub, tally, INIT_SEGMENT, 0, 0, init):
            return
        async for fragment in hub.mse.fragments():
            index, start_ms, duration_ms, data = fragment
            assert isinstance(data, bytes)
            if not await _send_chunk(
                session, live, item, hub, tally, int(index), int(start_ms), int(duration_ms), data
            ):
                break
        if live.core.state is not ServerState.READY:
            return
        session._streaming_media = None
        await session._send(End(media=item.id, reason="finished"))
    except ConnectionClosed:
        pass
    finally:
        forget()
        tally.viewers -= 1


async def _send_chunk(
    session: Session,
    live: LiveChannel,
    item: LiveItem,
    hub: LiveHub,
    tally: LiveTally,
    index: int,
    start_ms: int,
    duration_ms: int,
    data: bytes,
) -> bool:
    """Send one chunk once paid for (section 7).

    False, with the chunk unsent and unbilled, if the channel stopped being
    ready or the stream ended while its ``due`` was unpaid.
    """
    quote = _quote(live, item, index, duration_ms)
    out: list[Message | bytes] = []
    while live.durable_paid < quote.total:
        if hub.state == "ended":  # nothing more to wait for: not sent, not billed
            await session._send(*out)
            return False
        out.append(Due(total=quote.total, media=item.id, index=index, duration_ms=duration_ms))
        await session._send(*out)
        out = await session._wait_paid()
        if hub.state == "ended" and live.durable_paid < quote.total:
            # The stream ended while this due was out: a pay already on its
            # way still gets the chunk it pays for, within END_GRACE_S.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(END_GRACE_S):
                    while live.durable_paid < quote.total and live.core.state is ServerState.READY:
                        out += await session._wait_paid()
        unpaid_at_end = hub.state == "ended" and live.durable_paid < quote.total
        if live.core.state is not ServerState.READY or unpaid_at_end:
            await session._send(*out)
            return False
    chunk = Chunk(
        media=item.id, index=index, start_ms=start_ms, duration_ms=duration_ms, size=len(data)
    )
    await session._send(*out, chunk, data)
    _commit(live, quote, tally)
    return True


async def _stream_webrtc(
    session: Session,
    live: LiveChannel,
    item: LiveItem,
    hub: LiveHub,
    viewer: LiveViewer,
    tally: LiveTally,
) -> None:
    """Gate a WebRTC viewer by live interval (protocol.md section 11, WebRTC)."""
    interval_ms = hub.config.interval_ms
    outbox: list[Message | bytes] = []
    wake = asyncio.Event()
    #: The interval the viewer is stopped at for want of payment.
    waiting: int | None = None
    done = -1  # the last interval allowed
    closing = False

    def allow(index: int, quote: Quote) -> None:
        nonlocal done
        viewer.allow_interval(index)
        done = index
        outbox.append(
            Interval(
                media=item.id,
                index=index,
                start_ms=hub.interval_start(index),
                duration_ms=interval_ms,
            )
        )
        _commit(live, quote, tally)

    def blocked(index: int) -> None:
        # Called from a track's recv() as it reaches the edge: no await here,
        # so a free or prepaid interval is allowed before the packet is dropped.
        nonlocal waiting
        if closing or waiting is not None or index <= done:
            return
        quote = _quote(live, item, index, interval_ms)
        if live.durable_paid >= quote.total and live.core.state is ServerState.READY:
            allow(index, quote)
        else:
            waiting = index
            outbox.append(
                Due(total=quote.total, media=item.id, index=index, duration_ms=interval_ms)
            )
        wake.set()

    def ended(reason: str) -> None:
        wake.set()
        session._paid_event.set()  # a streamer parked on a due looks again

    tally.viewers += 1
    viewer.on_blocked(blocked)
    viewer.on_end(ended)
    try:
        assert viewer.answer is not None
        await session._send(
            _stream_message(live, item, WEBRTC_MIME),
            WebrtcAnswer(media=item.id, sdp=viewer.answer),
        )
        while not viewer.ended.is_set():
            if waiting is None:
                await wake.wait()
                wake.clear()
                out, outbox[:] = list(outbox), []
                if out:
                    await session._send(*out)
                continue
            # A due is out (or in the outbox): wait for a durable pay.
            out, outbox[:] = list(outbox), []
            await session._send(*out)
            quote = _quote(live, item, waiting, interval_ms)
            paid = [] if live.durable_paid >= quote.total else await session._wait_paid()
            if viewer.ended.is_set() or live.core.state is not ServerState.READY:
                await session._send(*paid)
                break
            quote = _quote(live, item, waiting, interval_ms)
            if live.durable_paid >= quote.total:
                index, waiting = waiting, None
                allow(index, quote)
            else:  # a partial payment: the same due again (section 7)
                outbox.append(
                    Due(total=quote.total, media=item.id, index=waiting, duration_ms=interval_ms)
                )
            out, outbox[:] = [*paid, *outbox], []
            await session._send(*out)
        if viewer.ended.is_set() and live.core.state is ServerState.READY:
            session._streaming_media = None
            out, outbox[:] = [*outbox, End(media=item.id, reason="finished")], []
            await session._send(*out)
    except ConnectionClosed:
        pass
    finally:
        closing = True
        tally.viewers -= 1
        # Stopped (stop, another play, a closed channel): intervals allowed and
        # metered since the last send are announced, before the `end` that
        # follows, or the client's bill would part from ours (section 7).
        if outbox:
            with contextlib.suppress(Exception):
                await session._send(*[m for m in outbox if isinstance(m, Interval)])
        with contextlib.suppress(Exception):
            await asyncio.shield(viewer.close())
