"""SDP offer validation for WHIP publishers and live viewers (gateway/live/sdp.py).

The offers are modelled on what Chromium and OBS Studio's WHIP output
(libdatachannel) send, plus aiortc's own; candidates are on 127.0.0.1 so an
answer can be made without any traffic leaving loopback.
"""

from __future__ import annotations

import pytest

from gateway.ice import keep_reachable_candidates
from gateway.live import LOOPBACK, LiveHub, LiveIngest, OfferError, validate_offer
from gateway.live.sdp import MAX_OFFER_BYTES
from gateway.live.synthetic import ProbeViewer, SyntheticPublisher

FINGERPRINT = "sha-256 " + ":".join(f"{b:02X}" for b in range(32))

CHROMIUM_PUBLISHER = """v=0
o=- 4611731400430051336 2 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE 0 1
a=extmap-allow-mixed
a=msid-semantic: WMS stream
m=audio 9 UDP/TLS/RTP/SAVPF 111 63 9 0 8 13 110 126
c=IN IP4 0.0.0.0
a=rtcp:9 IN IP4 0.0.0.0
a=candidate:1467250027 1 udp 2122260223 127.0.0.1 46243 typ host generation 0 network-id 1
a=candidate:3145520455 1 udp 2122262783 abcdefab-1234-4321-9876-0123456789ab.local 46244 typ host
a=ice-ufrag:Qx7u
a=ice-pwd:bkWvTnC0Rr4dG7f2pL9yZ1mE
a=ice-options:trickle
a=fingerprint:{fingerprint}
a=setup:actpass
a=mid:0
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level
a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid
a=sendonly
a=msid:stream audio0
a=rtcp-mux
a=rtpmap:111 opus/48000/2
a=rtcp-fb:111 transport-cc
a=fmtp:111 minptime=10;useinbandfec=1
a=rtpmap:63 red/48000/2
a=fmtp:63 111/111
a=rtpmap:9 G722/8000
a=rtpmap:0 PCMU/8000
a=rtpmap:8 PCMA/8000
a=rtpmap:13 CN/8000
a=rtpmap:110 telephone-event/48000
a=rtpmap:126 telephone-event/8000
a=ssrc:1001 cname:4TOk42mSjXCkVIa6
a=ssrc:1001 msid:stream audio0
m=video 9 UDP/TLS/RTP/SAVPF 96 97 102 103 45 46 98 99
c=IN IP4 0.0.0.0
a=rtcp:9 IN IP4 0.0.0.0
a=ice-ufrag:Qx7u
a=ice-pwd:bkWvTnC0Rr4dG7f2pL9yZ1mE
a=ice-options:trickle
a=fingerprint:{fingerprint}
a=setup:actpass
a=mid:1
a=extmap:2 http://www.webrtc.org/experiments/rtp-hdrext/abs-send-time
a=extmap:4 urn:ietf:params:rtp-hdrext:sdes:mid
a=sendonly
a=msid:stream video0
a=rtcp-mux
a=rtcp-rsize
a=rtpmap:96 VP8/90000
a=rtcp-fb:96 goog-remb
a=rtcp-fb:96 transport-cc
a=rtcp-fb:96 ccm fir
a=rtcp-fb:96 nack
a=rtcp-fb:96 nack pli
a=rtpmap:97 rtx/90000
a=fmtp:97 apt=96
a=rtpmap:102 H264/90000
a=rtcp-fb:102 nack pli
a=fmtp:102 level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f
a=rtpmap:103 rtx/90000
a=fmtp:103 apt=102
a=rtpmap:45 AV1/90000
a=rtpmap:46 rtx/90000
a=fmtp:46 apt=45
a=rtpmap:98 VP9/90000
a=fmtp:98 profile-id=0
a=rtpmap:99 rtx/90000
a=fmtp:99 apt=98
a=ssrc-group:FID 2001 2002
a=ssrc:2001 cname:4TOk42mSjXCkVIa6
a=ssrc:2002 cname:4TOk42mSjXCkVIa6
""".replace("{fingerprint}", FINGERPRINT)

# OBS Studio's WHIP output (libdatachannel): transport attributes at
# session level, H.264 constrained baseline and Opus, LF line endings.
OBS_PUBLISHER = """v=0
o=rtc 3418212436 0 IN IP4 127.0.0.1
s=-
t=0 0
a=group:BUNDLE 0 1
a=group:LS 0 1
a=msid-semantic:WMS *
a=setup:actpass
a=ice-ufrag:V3cK
a=ice-pwd:w2DPyGmsyx9IvkQ2fzEXDd
a=ice-options:ice2,trickle
a=fingerprint:{fingerprint}
m=audio 40123 UDP/TLS/RTP/SAVPF 111
c=IN IP4 127.0.0.1
a=mid:0
a=sendonly
a=ssrc:3372449813 cname:obs
a=ssrc:3372449813 msid:obs-stream obs-audio
a=msid:obs-stream obs-audio
a=rtcp-mux
a=rtpmap:111 opus/48000/2
a=fmtp:111 minptime=10;maxaveragebitrate=96000;stereo=1;sprop-stereo=1;useinbandfec=1
a=candidate:1 1 UDP 2122317823 127.0.0.1 40123 typ host
a=end-of-candidates
m=video 40123 UDP/TLS/RTP/SAVPF 96
c=IN IP4 127.0.0.1
a=mid:1
a=sendonly
a=ssrc:3372449814 cname:obs
a=ssrc:3372449814 msid:obs-stream obs-video
a=msid:obs-stream obs-video
a=rtcp-mux
a=rtpmap:96 H264/90000
a=rtcp-fb:96 nack
a=rtcp-fb:96 nack pli
a=rtcp-fb:96 goog-remb
a=fmtp:96 profile-level-id=42e01f;packetization-mode=1;level-asymmetry-allowed=1
""".replace("{fingerprint}", FINGERPRINT)


def crlf(text: str) -> str:
    return text.replace("\n", "\r\n")


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new)


def test_chromium_offer_passes() -> None:
    offer = validate_offer(crlf(CHROMIUM_PUBLISHER))
    assert [(m.kind, m.mid, m.direction) for m in offer.media] == [
        ("audio", "0", "sendonly"),
        ("video", "1", "sendonly"),
    ]
    assert offer.media[0].codecs == ("opus", "g722", "pcmu", "pcma")
    assert offer.media[1].codecs == ("vp8", "h264")
    assert offer.kinds == {"audio", "video"}
    assert offer.sdp.endswith("\r\n") and "\n" not in offer.sdp.replace("\r\n", "")


def test_obs_offer_passes_with_session_level_transport() -> None:
    offer = validate_offer(OBS_PUBLISHER.encode())  # LF endings, bytes
    assert [(m.kind, m.codecs) for m in offer.media] == [("audio", ("opus",)), ("video", ("h264",))]
    assert "\r\n" in offer.sdp


async def test_aiortc_offers_pass_and_get_answers() -> None:
    """aiortc's own publisher and viewer offers validate; aiortc answers the OBS one."""
    publisher, viewer = SyntheticPublisher(), ProbeViewer()
    try:
        assert validate_offer(await publisher.offer()).kinds == {"audio", "video"}
        viewer_offer = validate_offer(await viewer.offer(), role="viewer")
        assert {m.kind: m.codecs[0] for m in viewer_offer.media} == {
            "video": "vp8",
            "audio": "opus",
        }
    finally:
        await publisher.close()
        await viewer.close()
    hub = LiveHub("obs", ice=LOOPBACK)
    ingest = await LiveIngest.start(hub, OBS_PUBLISHER)
    try:
        assert ingest.answer is not None
        answer = ingest.answer
        assert answer.count("a=recvonly") == 2 and "H264/90000" in answer
        assert "127.0.0.1" in answer and "192.0.2" not in answer  # loopback candidates only
    finally:
        await ingest.stop()
    assert hub.end_reason == "stopped"


def test_loopback_gateway_drops_unreachable_remote_candidates() -> None:
    offer = validate_offer(crlf(CHROMIUM_PUBLISHER))
    kept = keep_reachable_candidates(offer.sdp, LOOPBACK)
    assert "127.0.0.1 46243 typ host" in kept and ".local" not in kept


def test_viewer_role_takes_receiving_sections_only() -> None:
    receiving = CHROMIUM_PUBLISHER.replace("a=sendonly", "a=recvonly")
    assert validate_offer(receiving, role="viewer").kinds == {"audio", "video"}
    with pytest.raises(OfferError) as error:
        validate_offer(CHROMIUM_PUBLISHER, role="viewer")
    assert error.value.code == "no_media"
    # A viewer is sent VP8 only: H.264 alone is no codec for it.
    h264_only = edit(receiving, "96 97 102 103 45 46 98 99", "102 103")
    with pytest.raises(OfferError) as error:
        validate_offer(h264_only, role="viewer")
    assert error.value.code == "no_codec" and "VP8" in str(error.value)


GARBAGE = [
    ("", "bad_line"),
    ("hello world", "bad_line"),
    ('{"type": "offer", "sdp": "v=0"}', "bad_line"),
    ("v=0\r\n", "bad_origin"),
    ("v=1\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n", "bad_version"),
    ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n", "no_media"),
    ("v=0\r\no=- x 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n", "bad_origin"),
    ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns= \r\nt=0 0\r\n", "bad_session_name"),
    ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "bad_timing"),
    ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nx=1\r\n", "bad_order"),
    ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio\r\n", "bad_media_line"),
    (
        "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF opus\r\n",
        "bad_media_line",
    ),
    ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 RTP/AVP 0\r\n", "no_connection"),
]


@pytest.mark.parametrize(("text", "code"), GARBAGE)
def test_garbage_is_refused_with_a_named_error(text: str, code: str) -> None:
    with pytest.raises(OfferError) as error:
        validate_offer(text)
    assert error.value.code == code
    assert str(error.value)


def test_binary_and_oversize_offers_are_refused() -> None:
    with pytest.raises(OfferError) as error:
        validate_offer(b"v=0\r\n\xff\xfe\x00garbage")
    assert error.value.code == "not_utf8"
    with pytest.raises(OfferError) as error:
        validate_offer("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=\x00\r\n")
    assert error.value.code == "bad_line"
    padded = CHROMIUM_PUBLISHER + "a=x-padding:" + "p" * 1000 + "\n"
    big = CHROMIUM_PUBLISHER + ("a=x-padding:" + "p" * 1000 + "\n") * (MAX_OFFER_BYTES // 1000)
    assert validate_offer(padded)  # unknown attributes are fine
    with pytest.raises(OfferError) as error:
        validate_offer(big)
    assert error.value.code == "too_large" and str(MAX_OFFER_BYTES) in str(error.value)
    with pytest.raises(OfferError) as error:
        validate_offer(CHROMIUM_PUBLISHER + "a=x:" + "y" * 5000 + "\n")
    assert error.value.code == "bad_line"


@pytest.mark.parametrize(
    ("old", "new", "code"),
    [
        # Every fingerprint removed (both sections).
        (f"a=fingerprint:{FINGERPRINT}\n", "", "no_fingerprint"),
        (f"a=fingerprint:{FINGERPRINT}", "a=fingerprint:sha-256 00:11:zz", "bad_fingerprint"),
        (f"a=fingerprint:{FINGERPRINT}", "a=fingerprint:sha-256 00:11", "bad_fingerprint"),
        (f"a=fingerprint:{FINGERPRINT}", "a=fingerprint:md5 00:11", "bad_fingerprint"),
        ("a=ice-ufrag:Qx7u\n", "", "no_ice_credentials"),
        ("a=ice-pwd:bkWvTnC0Rr4dG7f2pL9yZ1mE", "a=ice-pwd:short", "bad_ice_credentials"),
        ("a=setup:actpass\n", "", "no_setup"),
        ("a=setup:actpass", "a=setup:holdconn", "bad_setup"),
        ("a=rtcp-mux\n", "", "no_rtcp_mux"),
        ("UDP/TLS/RTP/SAVPF", "RTP/AVP", "bad_proto"),
        ("a=sendonly", "a=recvonly", "no_media"),
        ("a=sendonly", "a=inactive", "no_media"),
        # Audio offering only codecs the gateway does not take, video refused (port 0).
        ("111 63 9 0 8 13 110 126", "13 110", "no_codec"),
        ("m=video 9 ", "m=video 0 ", None),
    ],
)
def test_broken_offers_name_what_is_wrong(old: str, new: str, code: str | None) -> None:
    text = edit(CHROMIUM_PUBLISHER, old, new)
    if code is None:
        assert validate_offer(text).kinds == {"audio"}
        return
    with pytest.raises(OfferError) as error:
        validate_offer(text)
    assert error.value.code == code, str(error.value)


def test_one_section_per_kind() -> None:
    video = CHROMIUM_PUBLISHER[CHROMIUM_PUBLISHER.index("m=video") :]
    with pytest.raises(OfferError) as error:
        validate_offer(CHROMIUM_PUBLISHER + video.replace("a=mid:1", "a=mid:2"))
    assert error.value.code == "duplicate_kind"
    # A second video section the publisher only receives on is ignored.
    extra = video.replace("a=mid:1", "a=mid:2").replace("a=sendonly", "a=recvonly")
    assert validate_offer(CHROMIUM_PUBLISHER + extra).kinds == {"audio", "video"}


def test_h264_profiles_aiortc_cannot_take_are_no_codec() -> None:
    """aiortc refuses a whole offer when a section has no common codec: so do we, first."""
    for old, new in [
        ("profile-level-id=42e01f", "profile-level-id=640c1f"),  # High
        ("packetization-mode=1", "packetization-mode=0"),
        ("packetization-mode=1", "packetization-mode=x"),
    ]:
        with pytest.raises(OfferError) as error:
            validate_offer(edit(OBS_PUBLISHER, old, new))
        assert error.value.code == "no_codec" and "video section 1" in str(error.value)
    mono = edit(OBS_PUBLISHER, "a=rtpmap:111 opus/48000/2", "a=rtpmap:111 opus/16000/1")
    with pytest.raises(OfferError) as error:
        validate_offer(mono)
    assert error.value.code == "no_codec" and "audio section 0" in str(error.value)


def test_too_many_sections() -> None:
    section = "m=application 9 UDP/DTLS/SCTP webrtc-datachannel\nc=IN IP4 0.0.0.0\n"
    with pytest.raises(OfferError) as error:
        validate_offer(CHROMIUM_PUBLISHER + section * 20)
    assert error.value.code == "too_many_media"
