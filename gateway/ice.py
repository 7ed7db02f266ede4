"""ICE settings for the gateway's aiortc peers, and loopback host candidates.

Two aiortc defaults do not suit the gateway:

* ``RTCConfiguration()`` uses a public STUN server: the gateway uses only the
  ICE servers it is configured with (none by default, which is right for a
  gateway with a public address and for loopback).
* aioice gathers a host candidate on every interface address *except*
  127.0.0.1 (``aioice.ice.get_host_addresses``). A gateway bound to 127.0.0.1
  (the tests, the demo) would then offer only addresses it was not asked to
  serve on, and a peer on the same machine could not reach it over loopback.

So when the gateway serves on a loopback address, :func:`prepare_gathering`
gathers the host candidate on that address *only*, before aiortc's own
gathering runs: media then stays on the address the operator chose. It does
so through aioice's ``Connection.get_component_candidates(component,
addresses)`` (the coroutine ``gather_candidates`` calls with the interface
list) and marks the connection's gathering as done
(``_local_candidates_start``/``_local_candidates_end``), so that aiortc's
``RTCIceGatherer.gather()`` (called from ``setLocalDescription``) finds it
complete and the SDP it writes carries the loopback candidate. With ICE
servers configured, the same call also gathers server-reflexive and relayed
candidates for that address. On any other address aioice gathers as usual.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field

from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection
from aiortc.rtcicetransport import RTCIceGatherer

#: ICE component 1 (RTP); WebRTC multiplexes RTCP on it (RFC 5761), so there
#: is no component 2.
_RTP_COMPONENT = 1


@dataclass(frozen=True)
class IceConfig:
    """How the gateway's peers gather candidates.

    ``servers``: STUN/TURN servers for real deployments (none by default).
    ``host``: the address the gateway serves on; when it is a loopback
    address, candidates are gathered on it alone (see the module docstring).
    """

    servers: Sequence[RTCIceServer] = field(default_factory=tuple)
    host: str | None = None

    @property
    def loopback(self) -> bool:
        """Whether candidates are gathered on the loopback address ``host`` only."""
        return is_loopback(self.host)

    def configuration(self) -> RTCConfiguration:
        """An ``RTCConfiguration`` with exactly these ICE servers."""
        return RTCConfiguration(iceServers=list(self.servers))


#: The configuration the tests and the demo use: loopback only, no servers.
LOOPBACK = IceConfig(host="127.0.0.1")


def is_loopback(host: str | None) -> bool:
    """Whether ``host`` is a literal loopback address (127.0.0.0/8 or ::1)."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _loopback_address(host: str) -> str:
    return "127.0.0.1" if host == "localhost" else host


async def prepare_gathering(pc: RTCPeerConnection, ice: IceConfig) -> None:
    """Gather ``pc``'s host candidates on ``ice.host`` when it is loopback.

    Call after the transceivers exist (after ``addTrack``/``addTransceiver``
    for an offer, after ``setRemoteDescription`` for an answer) and before
    ``setLocalDescription``. Does nothing when ``ice.host`` is not loopback.
    """
    if not ice.loopback or ice.host is None:
        return
    address = _loopback_address(ice.host)
    for gatherer in _gatherers(pc):
        connection = gatherer._connection
        if gatherer.state != "new" or connection._local_candidates_start:
            continue
        connection._local_candidates_start = True
        connection._local_candidates += await connection.get_component_candidates(
            component=_RTP_COMPONENT, addresses=[address]
        )
        connection._local_candidates_end = True


def keep_reachable_candidates(sdp: str, ice: IceConfig) -> str:
    """``sdp`` without the remote candidates a loopback-bound gateway cannot use.

    A gateway gathering on loopback alone can pair only with loopback
    candidates; the others (LAN addresses, mDNS ``.local`` names, RFC 8839
    section 5.1) would only make aioice send checks, or multicast DNS queries,
    that cannot succeed. Unchanged when ``ice`` is not loopback.
    """
    if not ice.loopback:
        return sdp
    kept = []
    for line in sdp.split("\r\n"):
        if line.startswith("a=candidate:"):
            fields = line.split(" ")
            if len(fields) < 5 or not is_loopback(fields[4]):
                continue
        kept.append(line)
    return "\r\n".join(kept)


def _gatherers(pc: RTCPeerConnection) -> list[RTCIceGatherer]:
    """The distinct ICE gatherers of ``pc``'s transceivers and data channel transport."""
    transports = [t.receiver.transport for t in pc.getTransceivers() if not t.stopped]
    if pc.sctp is not None:
        transports.append(pc.sctp.transport)
    gatherers: dict[int, RTCIceGatherer] = {}
    for dtls in transports:
        gatherer = dtls.transport.iceGatherer
        gatherers.setdefault(id(gatherer), gatherer)
    return list(gatherers.values())
