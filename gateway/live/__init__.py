"""Live pay-per-view over WebRTC: the media core (issue 16).

Theory of operation
-------------------
One :class:`LiveHub` per live stream. Media goes one way through it::

    publisher --WHIP/aiortc--> LiveIngest --decoded frames--> LiveHub
        LiveHub --VP8 + Opus, encoded once--> Rendition --> ForwardTrack x N --> viewers
        LiveHub --H.264 + AAC, encoded once--> Fmp4Packager --> FragmentLog --> MSE readers
                                                             \\-> Recorder --> catalog item

Ingest (:mod:`~gateway.live.ingest`). A publisher speaks WHIP (RFC 9725):
its SDP offer is validated by :func:`validate_offer` (aiortc accepts
garbage), then :meth:`LiveIngest.start` answers it with an aiortc peer that
only receives. aiortc decodes each track once (its receiver's decoder
thread); the ingest hands every decoded frame to the hub. Peers use only the
configured ICE servers (none by default); when the gateway serves on a
loopback address, candidates are gathered on that address alone
(:mod:`gateway.ice`: aioice leaves loopback out by default).

Clock and intervals (:mod:`~gateway.live.hub`). Live time is milliseconds
since the stream's first frame. Each track's frames keep the publisher's
RTP timing (RFC 3550) anchored to their arrival. Live time is cut into
numbered intervals of ``LiveConfig.interval_ms``: interval ``k`` is the
payment layer's chunk ``k`` (protocol.md section 7). Both video renditions
put a keyframe at the first frame of every interval.

Decode once, encode once, fan out. Each rendition has one encoder in its
own thread behind a drop-oldest queue (:mod:`~gateway.live.encode`): VP8
(realtime, constant bitrate) and Opus for WebRTC, H.264 and AAC for MSE. The
WebRTC renditions keep their recent packets (:class:`Rendition`); every
viewer's aiortc sender reads the *same* ``av.Packet`` objects through a
:class:`ForwardTrack` and only packetizes them (aiortc's ``RTCRtpSender``
calls its codec's ``pack()`` for anything that is not a frame), so the
number of encodes does not depend on the number of viewers
(:attr:`HubStats.renditions` counts them).

WebRTC viewers (:mod:`~gateway.live.viewer`). A viewer sends an offer to
receive (WHEP-style) and gets :attr:`LiveViewer.answer`. It is sent nothing
until :meth:`LiveViewer.allow` (or :meth:`LiveViewer.allow_interval`) says
up to which live time it may be: the payment layer allows the free
intervals, then each interval as it is paid. At the first packet beyond the
allowance the viewer is blocked (:attr:`LiveViewer.waiting_interval`,
:meth:`LiveViewer.on_blocked`): its tracks stop at the allowance's edge, so
an unpaid viewer stops within one interval. Allowed again, audio resumes at
once and video at a keyframe: one at most ``keyframe_gap_ms`` old, else the
next, which the viewer asks the VP8 encoder for (as for a join or a PLI;
coalesced and at most one per ``keyframe_gap_ms``), so media flows again
within about a frame interval plus an encode.

MSE path (:mod:`~gateway.live.fmp4`). The H.264 + AAC rendition is muxed
into fragmented MP4 as it is encoded: :attr:`FragmentLog.init_segment` plus
one :class:`LiveFragment` (``index``, ``start_ms``, ``duration_ms``,
``data``) per interval, each starting with a keyframe and decodable alone
after the init segment: the same shape as a catalog item's chunks, so the
WebSocket session can send them as ordinary paid chunks.
:meth:`FragmentLog.fragments` yields them as they are produced; a fragment
is ready about one interval after its start.

End and recording (:mod:`~gateway.live.record`). The publisher's ``DELETE``
(:meth:`LiveIngest.stop`), its connection failing, or its media stopping
for ``idle_timeout_s`` ends the hub (:meth:`LiveHub.end`): end callbacks
run (:meth:`LiveHub.on_end`, :meth:`LiveViewer.on_end`; the session sends
protocol ``end``), viewers' tracks end and their connections close, the
MSE rendition writes its last fragment, and with a :class:`Recording` the
fragments (written to disk as they came) become a catalog item at the same
rate.

What this package does not do: HTTP (the WHIP and viewer endpoints),
protocol messages, metering and payment. Those call this API:
``gateway/web/whip.py`` (WHIP, into :class:`~gateway.live.onair.OnAir`, the
hubs on air in a gateway process) and ``gateway/session_live.py`` (a
session's viewer: fragments as paid chunks, or a :class:`LiveViewer` allowed
interval by interval as it is paid; protocol.md section 11).
"""

from gateway.ice import LOOPBACK, IceConfig
from gateway.live.fmp4 import FragmentLog, LiveFragment
from gateway.live.hub import HubStats, LiveHub
from gateway.live.ingest import LiveIngest
from gateway.live.record import Recording
from gateway.live.rendition import EncodedPacket, LiveConfig, Rendition
from gateway.live.sdp import Offer, OfferError, validate_offer
from gateway.live.viewer import ForwardTrack, LiveViewer, ViewerStats

__all__ = [
    "LOOPBACK",
    "EncodedPacket",
    "ForwardTrack",
    "FragmentLog",
    "HubStats",
    "IceConfig",
    "LiveConfig",
    "LiveFragment",
    "LiveHub",
    "LiveIngest",
    "LiveViewer",
    "Offer",
    "OfferError",
    "Recording",
    "Rendition",
    "ViewerStats",
    "validate_offer",
]
